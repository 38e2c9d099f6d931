"""Validating job files in a child process, so that the job's own code (its imports, its
model's constructor, the dry forward pass) never runs inside the daemon.

    python -m traind.daemon.validator      (reads requests on stdin, answers on stdout)

The child imports torch once and answers one JSON line per file. If a file's code ends
the child (a segfault, an exit, an OOM kill) or hangs it past TIMEOUT, only the child
goes: the file is rejected, and the next file gets a new child.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from traind.daemon.intake import validate
from traind.jobs.jobfile import load_job
from traind.store.errors import TraindError

TIMEOUT = 300.0


@dataclass(frozen=True)
class Verdict:
    name: str | None
    spec_json: str | None
    error: str | None


class Validator:
    def __init__(self, timeout: float = TIMEOUT):
        self.timeout, self._proc = timeout, None

    def start(self) -> None:
        """Start the child now (it takes about 2 s to import torch), unless it runs."""
        if self._proc is None or self._proc.poll() is not None:
            from traind.daemon.executor import _die_with_parent

            self._proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.validator"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_die_with_parent)

    def check(self, path: Path, base_dir: Path) -> Verdict:
        self.start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"path": str(path), "base_dir": str(base_dir)}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
            line = proc.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return Verdict(**json.loads(line))
        if not ready and proc.poll() is None:
            proc.kill()
            why = f"validating it took longer than {self.timeout:.0f} s (does its code hang?)"
        else:
            proc.wait()
            code = proc.returncode
            how = f"{signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            why = f"its code ended the validating process ({how}: a segfault, an exit, an OOM kill?)"
        proc.wait()
        self._proc = None
        return Verdict(None, None, f"{path.name}: {why}; try it with `traind validate`")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _traind_code() -> list[Path]:
    """The folders of traind's own packages (not torch's, not the job's)."""
    import traind.daemon
    import traind.jobs
    import traind.store

    return [Path(m.__file__).resolve().parent for m in (traind.daemon, traind.jobs, traind.store)]


def unexpected(path: str, error: Exception) -> str:
    """An exception validation did not expect, in words that say whose code raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = frames[-1] if frames else None
    ours = where is not None and any(Path(where.filename).resolve().is_relative_to(p) for p in _traind_code())
    place = f" at {where.filename}:{where.lineno}" if where else ""
    if ours:
        return (f"{Path(path).name}: traind failed validating this file ({type(error).__name__}: {error}{place}); "
                "this is traind's bug, not the file's: please report it, with the file")
    return (f"{Path(path).name}: validating it raised {type(error).__name__}: {error}{place}; "
            "try it with `traind validate` for the whole traceback")


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            job_file = validate(load_job(request["path"], base_dir=request["base_dir"]))
            spec = job_file.spec.model_copy(update={"name": job_file.name})
            answer = {"name": job_file.name, "spec_json": spec.model_dump_json(indent=2), "error": None}
        except TraindError as e:
            answer = {"name": None, "spec_json": None, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - an answer, never a dead child blamed on the file
            answer = {"name": None, "spec_json": None, "error": unexpected(request["path"], e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
