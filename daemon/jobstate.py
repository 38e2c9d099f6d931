"""A job's state, kept in its folder (`jobs/NAME/state.json`): the one place where job
states change. Written durably (beside, fsynced, renamed, folder fsynced), so that the
folders stay the source of truth that any index is rebuilt from (CONTRACT §2).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path

from traind.jobs.folder import STATE_FILE
from traind.store.errors import TraindError
from traind.store.fs import FileSystem, write_durably, write_new

STATE_LOCK = "state.lock"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"
    """A sweep's trial its pruner stopped (daemon/sweeps.py): saved, kept, resumable by hand."""


# Which state may follow which. A job that ended can be queued again by `load` (or
# `resume` after a failure); a running one goes back to the queue when its worker stops.
ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.PAUSED, JobState.CANCELLED, JobState.PRUNED},
    JobState.RUNNING: {JobState.QUEUED, JobState.PAUSED, JobState.DONE, JobState.FAILED, JobState.CANCELLED},
    JobState.PAUSED: {JobState.QUEUED, JobState.CANCELLED, JobState.PRUNED},
    JobState.DONE: {JobState.QUEUED},
    JobState.FAILED: {JobState.QUEUED},
    JobState.CANCELLED: {JobState.QUEUED},
    JobState.PRUNED: {JobState.QUEUED, JobState.CANCELLED},
}


# How a run ended, when not well: the job file or its saves do not fit (never retried); the
# job failed (a non-finite loss past its rollbacks, a failed save, an error in its code);
# out of memory (an allocation failed, or the kernel's OOM killer); killed by a signal;
# crashed (a segfault, an abort, an unexpected exit); stopped with the daemon; a save that
# did not fit on the disk (queued, it goes on once there is room).
CAUSES = ("bad_job", "failed", "out_of_memory", "killed", "crashed", "interrupted", "disk_full")


class BadTransition(TraindError):
    """A state change the job's current state does not allow."""


@dataclass(frozen=True)
class JobRecord:
    """What the daemon knows of a job beyond its job file and saves."""

    name: str
    state: JobState
    priority: int = 0
    """Higher runs first."""
    submitted: float = 0.0
    """When the job was accepted (seconds since the epoch); ties in priority run in this order."""
    restarts: int = 0
    """Times its worker was started again after dying."""
    last_error: str | None = None
    """Why it last failed or stopped, in words."""
    cause: str | None = None
    """What kind of end last_error tells of: one of CAUSES, or None."""
    changed: float = 0.0
    """When the state last changed."""
    origin: str | None = None
    """The inbox file it was accepted from (name, size, mtime): a claim a crash left behind is
    told from a new file that repeats the job by this."""

    def as_json(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, doc: dict) -> JobRecord:
        known = {f.name for f in fields(cls)}  # a newer traind's extra keys do not hide the job
        return cls(**{**{k: v for k, v in doc.items() if k in known}, "state": JobState(doc["state"])})


def signature(path: str) -> str | None:
    """What changes whenever the file at PATH is replaced or written (inode, size, mtime);
    None if it is missing. Cheaper than reading it: one stat."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def read_state(folder: Path) -> JobRecord | None:
    """The job's record, or None if FOLDER has none (or only a damaged one)."""
    try:
        return JobRecord.from_json(json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_state(folder: Path, record: JobRecord, fs: FileSystem | None = None, staged: bool = False) -> JobRecord:
    """Write RECORD durably; STAGED: as a new file of a staging folder (see `write_new`)."""
    write = write_new if staged else write_durably
    write(fs or FileSystem(), folder / STATE_FILE, json.dumps(record.as_json(), indent=1).encode())
    return record


@contextmanager
def _locked(folder: Path):
    """Serialize read-modify-write of the record: the daemon and the CLI both change it."""
    fd = os.open(folder / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def transition(folder: Path, to: JobState, fs: FileSystem | None = None, allow_from: set | None = None,
               **changes) -> JobRecord:
    """Move the job in FOLDER to state TO (with CHANGES to its record), if that is allowed
    (and, given ALLOW_FROM, only from one of those states)."""
    with _locked(folder):
        record = read_state(folder)
        if record is None:
            raise BadTransition(f"{folder} has no readable {STATE_FILE}; it is not a job of this home")
        allowed = to == record.state or to in ALLOWED[record.state]
        if not allowed or (allow_from is not None and record.state not in allow_from):
            raise BadTransition(f"job '{record.name}' is {record.state.value}; it cannot become {to.value}")
        return write_state(folder, replace(record, state=to, changed=time.time(), **changes), fs)
