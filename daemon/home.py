"""The home folder (CONTRACT §2): where job files arrive and jobs live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from traind.store.errors import TraindError
from traind.store.saves import SAVES

SPEC_FILE = "spec.json"  # in a job folder: the job's spec as resolved (defaults filled in, paths absolute)


def default_home() -> Path:
    """$TRAIND_HOME, else $XDG_STATE_HOME/traind, else ~/.local/state/traind."""
    if os.environ.get("TRAIND_HOME"):
        return Path(os.environ["TRAIND_HOME"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "traind"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job_dir(self, name: str) -> Path:
        return self.jobs / name


class NoSuchJob(TraindError):
    exit_code = 3


def job_folder(home: Home, name: str | None, folder: Path | None) -> Path:
    """The folder of job NAME in HOME, or FOLDER itself; NoSuchJob when it is not a job's."""
    path = folder if folder is not None else home.job_dir(name) if name else None
    if path is None:
        raise NoSuchJob("name a job, or give its folder with --dir JOBDIR")
    if not (path / SAVES).is_dir() and not (path / SPEC_FILE).is_file():
        where = f"in {home.jobs}" if folder is None else "there"
        raise NoSuchJob(f"no job folder at {path} (no {SAVES}/ and no {SPEC_FILE} {where}); "
                        "check the name with `traind ls`, or the path")
    return path
