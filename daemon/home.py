"""The home folder (CONTRACT §2): where job files arrive and jobs live."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from traind.jobs.jobname import is_job_name
from traind.store.errors import TraindError
from traind.store.fs import FileSystem
from traind.jobs.folder import SAVES, SPEC_FILE

REMOVING = ".removing-"  # jobs/.removing-NAME: a job being forgotten (`traind rm`), gone from every listing
KEPT = "kept"  # HOME/kept/NAME: the saves of a job forgotten with --keep-saves
POKE = ".poke"  # inbox/.poke, renamed in by the CLI: "a job's state changed", a serving daemon looks now


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

    def poke(self) -> None:
        """Tell a serving daemon that a job's state changed (a resume, a load) so that it
        looks at once, not at its next rescan (a second later): inbox/.poke renamed in,
        which its inbox watch sees. A hint only, never made durable: a poke lost costs
        that second, as the rescan is the truth. Nothing when there is no inbox."""
        if not self.inbox.is_dir():
            return
        staged = self.inbox / f"{POKE}.{os.getpid()}.tmp"
        try:
            staged.write_bytes(b"")
            os.rename(staged, self.inbox / POKE)
        except OSError:  # a read-only inbox, say: the daemon's rescan finds the change all the same
            staged.unlink(missing_ok=True)

    def job_folders(self) -> list[Path]:
        """The folders of jobs/ that are jobs (not one being made, removed, or a stray)."""
        if not self.jobs.is_dir():
            return []
        return sorted(p for p in self.jobs.iterdir() if is_job_name(p.name) and p.is_dir())

    def kept_place(self, name: str) -> Path:
        """Where the saves of job NAME go when it is forgotten with --keep-saves: kept/NAME,
        or kept/NAME.N when an earlier job of that name left its saves there."""
        place, n = self.root / KEPT / name, 1
        while place.exists():
            place, n = self.root / KEPT / f"{name}.{n}", n + 1
        return place

    def job_dir(self, name: str) -> Path:
        """The folder of job NAME; BadJobName for a name that is not one (`..`, `a/b`...),
        which could otherwise reach outside the home."""
        if not is_job_name(name):
            raise BadJobName(f"'{name}' is not a job name (letters, digits, '.', '_' and '-', starting with a "
                             "letter or digit, at most 64); `traind ls` lists the jobs")
        return self.jobs / name


class UnsafeHome(TraindError):
    """Others could write to the home: a job file names code to import, so they could run
    code as the daemon's user."""

    exit_code = 2


def check_private(home: Home) -> None:
    """UnsafeHome unless HOME and its inbox/ and jobs/ are owned by this user (or root)
    and writable by no one else: not world-writable, and group-writable only where the
    group is the owner's own private group."""
    for path in (home.root, home.inbox, home.jobs):
        st = os.stat(path)
        where = f"{path} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid})"
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafeHome(f"{where} belongs to another user; the daemon (uid {os.geteuid()}) serves only a "
                             f"home of its own: `chown -R {os.geteuid()} {home.root}`, or pick another --home")
        if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and _shared_group(st.st_gid, st.st_uid)):
            raise UnsafeHome(f"{where} is writable by other users, who could drop in a job file that runs their "
                             f"code as you; `chmod go-w {path}`")


def _shared_group(gid: int, owner: int) -> bool:
    """Whether group GID has a member other than user OWNER."""
    try:
        owner_name = pwd.getpwuid(owner).pw_name
    except KeyError:
        owner_name = None
    try:
        if set(grp.getgrgid(gid).gr_mem) - {owner_name}:
            return True
    except KeyError:
        return True  # an unknown group: assume the worst
    return any(p.pw_gid == gid and p.pw_uid != owner for p in pwd.getpwall())


class NoSuchJob(TraindError):
    exit_code = 3


class BadJobName(TraindError):
    exit_code = 2


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


def finish_removals(home: Home) -> None:
    """Finish the removals a crash cut short (jobs/.removing-NAME). Their saves are kept
    (in kept/): whether the user wanted them is not known any more, and a save is worth more
    than the disk it takes."""
    for trash in sorted(home.jobs.glob(f"{REMOVING}*")) if home.jobs.is_dir() else ():
        finish_removal(home, trash, keep_saves=True)


def finish_removal(home: Home, trash: Path, keep_saves: bool) -> Path | None:
    fs = FileSystem()
    kept = None
    if keep_saves and (trash / SAVES).is_dir():
        kept = home.kept_place(trash.name[len(REMOVING):])
        kept.parent.mkdir(parents=True, exist_ok=True)
        fs.rename(trash / SAVES, kept)
        fs.fsync_dir(kept.parent)
    fs.remove_tree(trash)
    fs.fsync_dir(trash.parent)
    return kept
