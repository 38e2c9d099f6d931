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
            from traind.daemon.supervisor import _die_with_parent

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


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            job_file = validate(load_job(request["path"], base_dir=request["base_dir"]))
            spec = job_file.spec.model_copy(update={"name": job_file.name})
            answer = {"name": job_file.name, "spec_json": spec.model_dump_json(indent=2), "error": None}
        except TraindError as e:
            answer = {"name": None, "spec_json": None, "error": str(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
