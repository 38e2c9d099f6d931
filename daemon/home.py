"""The home folder (CONTRACT §2): where job files arrive and jobs live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
