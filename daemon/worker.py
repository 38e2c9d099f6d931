"""A job's worker: one process per running job, so that a crash, a segfault or an OOM
kill of one job never takes down the daemon or another job.

    python -m traind.daemon.worker --home HOME NAME

It trains the job folder as `traind run` does, takes the job's requests (pause, cancel,
quicksave) at step boundaries, and tells the daemon how it ended by its exit status;
why it failed, in words, goes to `worker.error` in the folder.
"""

from __future__ import annotations

import argparse
import sys
from enum import IntEnum
from pathlib import Path

from traind.daemon.home import Home
from traind.daemon.run import JobBusy, Run
from traind.jobs.errors import JobSpecError, OutOfMemory
from traind.jobs.folder import SPEC_FILE, WORKER_ERROR
from traind.jobs.spec import JobSpec
from traind.store.errors import DiskFull, TraindError
from traind.store.fs import FileSystem, write_durably

LOCK_WAIT = 120.0


class Exit(IntEnum):
    DONE = 0
    FAILED = 1
    """The job failed (a non-finite loss, a failed save...); see worker.error."""
    BAD_JOB = 2
    """Its job file or saves do not fit; retrying cannot help."""
    STOPPED = 75
    """Stopped by SIGTERM (the daemon is stopping): queued again."""
    PAUSED = 76
    CANCELLED = 77
    OUT_OF_MEMORY = 78
    """An allocation failed (host or device); tried again, as memory may free up."""
    DISK_FULL = 79
    """A save did not fit; queued again once the disk has room."""


ENDINGS = {"paused": Exit.PAUSED, "cancelled": Exit.CANCELLED, "stopped": Exit.STOPPED}  # a request ended the run


def run(home: Home, name: str) -> Exit:
    folder = home.job_dir(name)
    try:
        spec = JobSpec.model_validate_json((folder / SPEC_FILE).read_text())
        run = Run(spec, name, folder, lock_wait=LOCK_WAIT)  # a worker of a dead daemon may still be saving
        done = run.go()
    except JobSpecError as e:
        return _failed(folder, Exit.BAD_JOB, str(e))
    except OutOfMemory as e:
        return _failed(folder, Exit.OUT_OF_MEMORY, str(e))
    except DiskFull as e:
        return _failed(folder, Exit.DISK_FULL, str(e))
    except (JobBusy, TraindError) as e:
        return _failed(folder, Exit.FAILED, str(e))
    except (OSError, ValueError) as e:  # spec.json missing or unreadable
        return _failed(folder, Exit.BAD_JOB, f"{folder / SPEC_FILE}: {e}")
    if done:
        return Exit.DONE
    return ENDINGS.get(run.ending, Exit.STOPPED)


def _failed(folder: Path, code: Exit, why: str) -> Exit:
    try:
        write_durably(FileSystem(), folder / WORKER_ERROR, why.encode())
    except OSError:
        pass  # a full disk, say: the exit status still tells the daemon what happened
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traind.daemon.worker", description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("name")
    args = parser.parse_args(argv)
    return int(run(Home(args.home), args.name))


if __name__ == "__main__":
    sys.exit(main())
