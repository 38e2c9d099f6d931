"""A job folder's layout, in one place (CONTRACT §2: `jobs/NAME/` holds everything of one
job). Every name in a job folder is defined here and used from here; nothing else spells
them.

    job.toml         the accepted job file, as the user wrote it (job.yaml, job.json...)
    spec.json        its spec as resolved: defaults filled in, paths absolute
    state.json       the job's state (queued, running, done...), written atomically
    lock             held (flock) by the one process training the job
    log              the run's log, appended; durable up to each acknowledged save
    metrics.jsonl    one JSON record per step, epoch and save, appended likewise
    tensorboard/     TensorBoard event files, where tensorboard is installed
    threads.json     the CPU thread count fixed at the job's first start
    requests/        control requests (pause, cancel, quicksave, reload), one file each
    load.json        a "load game" request: the save the next run starts from
    saves/           the checkpoint store, one folder per save (store/)
    worker.out       the daemon's worker's stdout and stderr
    worker.error     why the last worker ended, for the daemon to read
    slurm.json       the Slurm job that runs it (Slurm executor): its id, when submitted
    slurm.sh         that job's batch script
    ending.json      how the worker of a Slurm job ended (its exit status reaches no parent)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from traind.store.fs import FileSystem, write_durably, write_new

if TYPE_CHECKING:
    from traind.jobs.jobfile import JobFile

JOB_FILE = "job"  # and the job file's suffix: job.toml, job.yaml, job.json
SPEC_FILE = "spec.json"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
LOG_FILE = "log"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
THREADS_FILE = "threads.json"
REQUESTS = "requests"
LOAD_REQUEST = "load.json"
SAVES = "saves"
WORKER_OUT = "worker.out"
WORKER_ERROR = "worker.error"
SLURM_RECORD = "slurm.json"
SLURM_SCRIPT = "slurm.sh"
ENDING_FILE = "ending.json"
RANKS_OUTCOME = "ranks.outcome"  # a job of several nodes: the main rank's ending, for the worker (daemon/slurm_nodes.py)



def job_file_name(suffix: str) -> str:
    """The name of the accepted job file in a job folder, for a job file ending in SUFFIX."""
    return f"{JOB_FILE}{suffix.lower()}"


def write_job(fs: FileSystem, folder: Path, job_file: JobFile, staged: bool = False) -> None:
    """Put the job file as written and its spec as resolved into FOLDER: the one way a job
    folder gets them (intake, `traind run`), so that what ran can always be read back.
    STAGED: FOLDER is a stage that the caller renames into place once its own fsync has
    made these names durable (each file is fsynced here); else each is written durably."""
    write = write_new if staged else write_durably
    write(fs, folder / job_file_name(job_file.path.suffix), job_file.text.encode())
    write(fs, folder / SPEC_FILE, job_file.spec.model_dump_json(indent=2).encode())
