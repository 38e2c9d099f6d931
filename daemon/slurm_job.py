"""A job's worker inside a Slurm batch job; the batch script the Slurm executor submits
(daemon/slurm.py) `exec`s it, so that Slurm's signals reach it:

    python -m traind.daemon.slurm_job --home HOME NAME

It catches the cluster's warning (daemon/preempt.py) before importing anything slow,
trains the job as the daemon's local worker does (daemon/worker.py), and, since its exit
status reaches no parent of the daemon's, writes how it ended to the job folder
(`ending.json`: the worker.Exit code, the Slurm job id and restart count). Warned and
stopped at a save, it requeues its Slurm job, which resumes from that save.
"""

from traind.daemon import preempt

preempt.catch()  # first: a warning during the imports below must not kill the job unsaved

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

def ending(folder: Path, code: int) -> None:
    """Record how this worker ended, durably (the daemon may read it hours later)."""
    from traind.jobs.folder import ENDING_FILE
    from traind.store.fs import FileSystem, write_durably

    record = {"code": code, "job_id": os.environ.get("SLURM_JOB_ID"),
              "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
    try:
        write_durably(FileSystem(), folder / ENDING_FILE, json.dumps(record).encode())
    except OSError:
        pass  # a full disk: the daemon falls back on what Slurm tells of the job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traind.daemon.slurm_job", description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("name")
    args = parser.parse_args(argv)
    from traind.daemon.home import Home
    from traind.daemon.worker import Exit, end_as, run

    home = Home(args.home)
    folder = home.job_dir(args.name)
    code = int(run(home, args.name))
    if code == Exit.STOPPED and preempt.warned.is_set():
        ending(folder, Exit.REQUEUED)  # first: the requeue ends this process soon after
        why = preempt.requeue_self()
        if why is None:
            return 0
        print(f"traind: warned, saved, and could not requeue: {why}; the daemon submits it again", file=sys.stderr)
    ending(folder, code)
    return end_as(code)


if __name__ == "__main__":
    sys.exit(main())
