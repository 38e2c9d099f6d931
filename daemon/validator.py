"""Validating job files in a child process, so that the job's own code (its imports, its
model's constructor, the dry forward pass) never runs inside the daemon.

    python -m traind.daemon.validator      (reads requests on stdin, answers on stdout)

The child imports torch once, and answers one JSON line per file from a fork of itself, so
that no file's code reaches the next file's validation. If a file's code ends its fork (a
segfault, an exit, an OOM kill), the file is rejected; one that hangs the child past
TIMEOUT is rejected too, and the next file gets a new child.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from traind.daemon import liveness
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


def answer(request: dict) -> dict:
    """The verdict on one file: its name and resolved spec, or what is wrong with it."""
    try:
        job_file = validate(load_job(request["path"], base_dir=request["base_dir"]))
        spec = job_file.spec.model_copy(update={"name": job_file.name})
        return {"name": job_file.name, "spec_json": spec.model_dump_json(indent=2), "error": None}
    except TraindError as e:
        return {"name": None, "spec_json": None, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - an answer, never a dead child blamed on the file
        return {"name": None, "spec_json": None, "error": unexpected(request["path"], e)}


def names_code(path: str) -> bool:
    """Whether the job file at PATH may run code of its own when validated: a python_path,
    or any value that reads as an import path ("package.module:name"), anywhere in it. A
    file that cannot be read or parsed runs nothing (its error comes before any import)."""
    from traind.jobs.jobfile import FORMATS, parse_text
    from traind.jobs.names import is_import_path

    fmt = FORMATS.get(Path(path).suffix.lower())
    try:
        doc = parse_text(Path(path).read_bytes().decode("utf-8"), fmt, Path(path)) if fmt else None
    except Exception:  # noqa: BLE001 - unreadable or unparsable: answered without a fork, and refused
        return False

    def found(value) -> bool:
        if isinstance(value, dict):
            return bool(value.get("python_path")) or any(found(v) for v in value.values())
        if isinstance(value, list):
            return any(found(v) for v in value)
        return isinstance(value, str) and is_import_path(value)
    return found(doc)


def serve() -> None:
    """Answer each request on stdin. A file that names code of its own (names_code) is
    validated in a fork of this process, which has paid the imports and a first optimizer
    step once (daemon/warm.py): its code changes nothing of what the next file's validation
    sees (its dtype, flags, RNG, environment, cwd, a stale import of a module of the same
    name), and code that ends its process ends only that fork, which is answered for here.
    A file of traind's and torch's parts only is validated here: its build sets what it
    uses itself (the seed, deterministic algorithms), and a fork would cost it more than
    its validation (a fork of a process that holds torch: about 20 ms)."""
    from traind.daemon.warm import warm_up

    warm_up()
    for line in sys.stdin:
        request = json.loads(line)
        if not names_code(request["path"]):
            sys.stdout.write(json.dumps(answer(request)) + "\n")
            sys.stdout.flush()
            continue
        sys.stdout.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            code = 1
            try:
                liveness.die_with_parent(signal.SIGKILL)  # the daemon's timeout kills the parent, and so this
                os.dup2(2, 1)  # what the file's code prints goes to stderr, never into the answers
                with os.fdopen(write, "w") as out:
                    out.write(json.dumps(answer(request)))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as got:
            said = got.read()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if not said:  # its code ended the fork before the answer
            how = f"{signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            said = json.dumps({"name": None, "spec_json": None, "error": (
                f"{Path(request['path']).name}: its code ended the validating process ({how}: a segfault, an "
                f"exit, an OOM kill?); try it with `traind validate`")})
        sys.stdout.write(said + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
