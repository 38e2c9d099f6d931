"""A job's worker: one process per running job, so that a crash, a segfault or an OOM
kill of one job never takes down the daemon or another job.

    python -m traind.daemon.worker --home HOME NAME

It trains the job folder as `traind run` does, takes the job's requests (pause, cancel,
quicksave) at step boundaries, and tells the daemon how it ended by its exit status;
why it failed, in words, goes to `worker.error` in the folder. A job of several
processes (`[distributed]`) is trained by ranks the worker launches (daemon/launch.py);
their ending comes back as the worker's own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from enum import IntEnum
from pathlib import Path

from traind.daemon import preempt
from traind.daemon.home import Home
from traind.daemon.launch import Launch, LauncherStopped, RanksFailed, launch
from traind.daemon.run import LAUNCHER_HOLDS, JobBusy, Run, holding
from traind.jobs import world
from traind.jobs.errors import JobSpecError, OutOfMemory
from traind.jobs.folder import RANKS_OUTCOME, SPEC_FILE, WORKER_ERROR
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
    REQUEUED = 80
    """A Slurm job's worker, warned (preemption, time limit), saved and requeued its Slurm
    job; written to ending.json only (daemon/slurm_job.py), as Slurm starts it again."""


ENDINGS = {"paused": Exit.PAUSED, "cancelled": Exit.CANCELLED, "stopped": Exit.STOPPED}  # a request ended the run


def run(home: Home, name: str) -> int:
    """Train the job NAME of HOME; how it ended, as an Exit (or minus the signal that
    killed one of its ranks: the worker then dies of it too, as one process would)."""
    folder = home.job_dir(name)
    try:
        spec = JobSpec.model_validate_json((folder / SPEC_FILE).read_text())
        if spec.distributed.world_size > 1 and world.ranks_in_environment() == 1:
            return _launch(home, name, folder, spec)
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


def _launch(home: Home, name: str, folder: Path, spec: JobSpec) -> int:
    """Hold the job's folder and train it in its ranks, which the worker launches."""
    ranks = spec.distributed
    if ranks.nodes > 1:
        from traind.daemon import slurm_nodes

        why = slurm_nodes.in_allocation(ranks.nodes)
        if why is not None:
            return _failed(folder, Exit.BAD_JOB, why)
    with holding(folder, wait=LOCK_WAIT):
        os.environ[LAUNCHER_HOLDS] = str(os.getpid())
        if ranks.nodes > 1:  # a Slurm job of that many nodes: srun starts a launcher on each
            return slurm_nodes.across(home.root, name, folder, ranks.processes, ranks.nodes, folder / RANKS_OUTCOME,
                                      lambda code, why: _failed(folder, code, why))
        if preempt.caught() is not None:  # a Slurm job: the cluster's warning stops the ranks as a SIGTERM does
            if preempt.warned.is_set():
                return Exit.STOPPED  # warned before any rank started: nothing new to save, requeue now
            preempt.forward_as(signal.SIGTERM)
        try:
            return launch(["worker", str(home.root), name], Launch(ranks.processes))
        except RanksFailed as e:
            if e.signal_number:
                _failed(folder, Exit.FAILED, str(e))
                return -e.signal_number
            if e.code in (Exit.FAILED, Exit.BAD_JOB, Exit.OUT_OF_MEMORY, Exit.DISK_FULL):
                return e.code  # the main rank wrote why, or (a rank beside it) its output in worker.out says
            return _failed(folder, Exit.FAILED, str(e))
        except LauncherStopped:
            return Exit.STOPPED


def _failed(folder: Path, code: Exit, why: str) -> Exit:
    if not world.main_in_environment():
        return code  # the main rank tells why
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
    return end_as(run(Home(args.home), args.name))


def end_as(code: int) -> int:
    """CODE, for the worker to exit with; where a rank was killed (minus its signal), the
    worker is killed by the same signal, so that whoever watches judges the death as its own."""
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
