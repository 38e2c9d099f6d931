"""A job's state, kept in its folder (`jobs/NAME/state.json`): the one place where job
states change. Written durably (beside, fsynced, renamed, folder fsynced), so that the
folders stay the source of truth that any index is rebuilt from (CONTRACT §2).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

from traind.store.errors import TraindError
from traind.store.fs import FileSystem, write_durably

STATE_FILE = "state.json"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Which state may follow which. A job that ended can be queued again by `load` (or
# `resume` after a failure); a running one goes back to the queue when its worker stops.
ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.PAUSED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.PAUSED, JobState.DONE, JobState.FAILED, JobState.CANCELLED},
    JobState.PAUSED: {JobState.QUEUED, JobState.CANCELLED},
    JobState.DONE: {JobState.QUEUED},
    JobState.FAILED: {JobState.QUEUED},
    JobState.CANCELLED: {JobState.QUEUED},
}


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
    changed: float = 0.0
    """When the state last changed."""

    def as_json(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, doc: dict) -> JobRecord:
        return cls(**{**doc, "state": JobState(doc["state"])})


def read_state(folder: Path) -> JobRecord | None:
    """The job's record, or None if FOLDER has none (or only a damaged one)."""
    try:
        return JobRecord.from_json(json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_state(folder: Path, record: JobRecord, fs: FileSystem | None = None) -> JobRecord:
    write_durably(fs or FileSystem(), folder / STATE_FILE, json.dumps(record.as_json(), indent=1).encode())
    return record


def transition(folder: Path, to: JobState, fs: FileSystem | None = None, **changes) -> JobRecord:
    """Move the job in FOLDER to state TO (with CHANGES to its record), if that is allowed."""
    record = read_state(folder)
    if record is None:
        raise BadTransition(f"{folder} has no readable {STATE_FILE}; it is not a job of this home")
    if to != record.state and to not in ALLOWED[record.state]:
        raise BadTransition(f"job '{record.name}' is {record.state.value}; it cannot become {to.value}")
    return write_state(folder, replace(record, state=to, changed=time.time(), **changes), fs)
