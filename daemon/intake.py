"""Intake, maildir-style: job files arrive in inbox/; each is taken exactly once.

- `deliver` (what `traind submit` does): a hidden temp file in inbox/, fsynced, renamed
  into place, inbox/ fsynced. A file appears there whole or not at all.
- `Intake.scan` (the daemon's rescan, the truth; watchdog events only wake it up early):
  a file renamed into inbox/ (`delivered`: the maildir way, as `traind submit` and mail
  tools deliver) is complete at once. A file written in place (`cp`, `scp`, an editor,
  `>>` in pieces) is complete only when all of these hold: no process has it open for
  writing (the kernel refuses us a read lease while one does), its size and mtime have
  stayed put for `settle` seconds, and, if it changed in the last GROWING seconds, it
  parses as a whole document (a half-written JSON, or an empty file, is still growing).
  A close is no sign of completeness: `>>` closes after every piece.
  Then it is claimed: its bytes fsynced (the writer may not have), then renamed into
  inbox/.claimed/, so that no other scan takes it, and accepted as jobs/NAME/ or moved
  to rejected/ with NAME.error beside it. A claim a crash left behind is finished at
  the next scan.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from traind.daemon.home import Home
from traind.daemon.jobstate import JobRecord, JobState, read_state, write_state
from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError
from traind.jobs.folder import job_file_name, write_job
from traind.jobs.jobfile import FORMATS, JobFile, load_job, parse_text
from traind.jobs.jobname import is_job_name
from traind.jobs.spec import JobSpec
from traind.store.errors import TraindError
from traind.store.fs import FileSystem, write_durably

CLAIMED = ".claimed"
ATTEMPT = ".attempt"  # .NAME.attempt beside a claimed file: how many daemons died taking it in
log = logging.getLogger("traind.daemon.intake")
MAX_DEATHS = 3  # daemons that died taking one file in before it is rejected
IGNORED_ENDINGS = (".tmp", ".part", "~")
SETTLE = 2.0  # seconds a file written in place must stay unchanged (and closed) to count as complete
GROWING = 15.0  # seconds after its last change in which a file that does not parse is taken as still growing


def ignored(name: str) -> bool:
    """Names that are not (yet) job files: hidden, temporary or partial ones, and other types."""
    return name.startswith(".") or name.endswith(IGNORED_ENDINGS) or Path(name).suffix.lower() not in FORMATS


def validate(job_file: JobFile) -> JobFile:
    """In full, as acceptance demands: the file, then a dry build on a real batch."""
    try:
        build_job(job_file.spec, job_file.name)
    except JobSpecError as e:
        raise job_file.locate(e) from e
    return job_file


def name_in_use(home: Home, name: str) -> str | None:
    """Why a new job may not be called NAME in HOME (a job of that name, or a file for one
    waiting in inbox/), or None."""
    if home.jobs.is_dir() and (home.job_dir(name)).exists():
        return (f"a job named '{name}' exists already in {home.jobs}; give this one another name "
                f"(name = \"...\"), or `traind rm {name}` the old one first")
    from traind.daemon.sweeps import sweep_dir

    if sweep_dir(home, name).exists():
        return f"a sweep named '{name}' exists already in {sweep_dir(home, name).parent}; give this one another name"
    for folder in (home.inbox, home.inbox / CLAIMED):
        waiting = sorted(p.name for p in folder.glob(f"{name}.*") if not ignored(p.name)) if folder.is_dir() else []
        if waiting:
            return (f"a file for a job named '{name}' waits in {folder} ({waiting[0]}); "
                    "give this one another name (name = \"...\")")
    return None


def deliver(home: Home, job_file: JobFile, fs: FileSystem | None = None) -> Path:
    """Put a validated job into HOME's inbox atomically, as the resolved spec (absolute
    paths: the inbox is not where its relative paths started)."""
    fs = fs or FileSystem()
    home.inbox.mkdir(parents=True, exist_ok=True)
    target = home.inbox / f"{job_file.name}.json"
    n = 1
    while target.exists() or (home.inbox / CLAIMED / target.name).exists():
        target, n = home.inbox / f"{job_file.name}.{n}.json", n + 1
    spec = job_file.spec.model_copy(update={"name": job_file.name})
    write_durably(fs, target, spec.model_dump_json(indent=2, exclude_defaults=True).encode())
    return target


@dataclass(frozen=True)
class Outcome:
    file: str
    """The name the file had in inbox/."""
    job: str | None
    """The job it became, if accepted."""
    error: str | None
    """Why it was rejected, if it was."""


@dataclass
class Intake:
    home: Home
    settle: float = SETTLE
    """Seconds a file's size and mtime must stay put before it counts as complete."""
    fs: FileSystem = field(default_factory=FileSystem)
    check: Callable[[Path, Path], object] | None = None
    """Validates a file elsewhere (the daemon's validator process), returning a Verdict; default in-process."""
    fits: Callable[[JobSpec], str | None] = lambda spec: None
    """Why this daemon can never run a job of this spec (it asks for more devices than there are), or None."""
    _seen: dict[str, tuple[tuple[int, int], float]] = field(default_factory=dict)

    def scan(self, now: float | None = None, delivered: set[str] | frozenset = frozenset()) -> list[Outcome]:
        """One pass over inbox/: take every complete file. DELIVERED names files known to be
        complete: renamed into inbox/ whole."""
        now = time.monotonic() if now is None else now
        for d in (self.home.inbox / CLAIMED, self.home.rejected, self.home.jobs):
            d.mkdir(parents=True, exist_ok=True)
        claimed = sorted((self.home.inbox / CLAIMED).iterdir())
        for p in claimed:  # a marker whose file is gone: its file was taken, and a fault stopped the tidy-up
            if p.name.startswith(".") and p.name.endswith(ATTEMPT) and not _marked(p).exists():
                p.unlink(missing_ok=True)
        leftovers = [p for p in claimed if p.is_file() and not p.name.startswith(".")]
        accepted = self._accepted_origins() if leftovers else {}  # one read of the job states per scan, not per file
        outcomes = [self._safely(lambda p: self._finish_leftover(p, accepted), p) for p in leftovers]
        outcomes = [o for o in outcomes if o is not None]
        present = set()
        for entry in sorted(self.home.inbox.iterdir()):
            if ignored(entry.name) or not entry.is_file():
                continue
            present.add(entry.name)
            if entry.name in delivered or self._complete(entry, now):
                outcome = self._safely(self._claim, entry)
                if outcome is not None:
                    outcomes.append(outcome)
                    self._seen.pop(entry.name, None)
        for name in set(self._seen) - present:
            del self._seen[name]
        return outcomes

    def _safely(self, take: Callable[[Path], Outcome | None], path: Path) -> Outcome | None:
        """TAKE(PATH), or None if an I/O error (EIO, a full disk) stopped it: the file stays
        where it is, whole, and the next scan tries again; the daemon serves on."""
        try:
            return take(path)
        except OSError as e:
            log.warning("could not take %s yet (%s); it stays for the next scan", path.name, e)
            return None

    def _complete(self, entry: Path, now: float) -> bool:
        """Whether ENTRY, written in place, is whole: settled, closed by every writer, and
        parsing as a document if it changed lately."""
        if not self._settled(entry, now) or open_for_writing(entry):
            return False
        try:
            if time.time() - entry.stat().st_mtime >= GROWING:
                return True  # still for GROWING seconds: whole, even if it is not a job file
            text = entry.read_text(encoding="utf-8")
            if not text.strip():
                return False
            parse_text(text, FORMATS[entry.suffix.lower()], entry)
        except (OSError, UnicodeDecodeError, JobSpecError):
            return False  # not a whole document yet: wait for more, or for GROWING to pass
        return True

    def _settled(self, entry: Path, now: float) -> bool:
        try:
            st = entry.stat()
        except FileNotFoundError:
            return False
        key = (st.st_size, st.st_mtime_ns)
        previous = self._seen.get(entry.name)
        if previous is None or previous[0] != key:
            self._seen[entry.name] = (key, now)
            # unchanged for `settle` seconds already when first seen (say, at start): complete
            return time.time() - st.st_mtime >= self.settle and previous is None
        return now - previous[1] >= self.settle

    def _claim(self, entry: Path) -> Outcome | None:
        claimed = self.home.inbox / CLAIMED / entry.name
        try:
            self.fs.fsync_file(entry)  # its writer may not have: the bytes durable before the new name
            self.fs.rename(entry, claimed)
        except FileNotFoundError:
            return None  # taken in the meantime
        self.fs.fsync_dir(claimed.parent)  # the new name durable first: a crash may leave both, never neither
        self.fs.fsync_dir(self.home.inbox)
        return self._finish(claimed)

    def _accepted_origins(self) -> dict[str, str]:
        """The origin of every job accepted from an inbox file, and the job's name."""
        records = (read_state(folder) for folder in self.home.job_folders())
        return {r.origin: r.name for r in records if r is not None and r.origin}

    def _finish_leftover(self, claimed: Path, accepted: dict[str, str]) -> Outcome:
        """A claim a crash left behind: if its job was accepted already (the crash came
        after the job folder was durable), only the claim is left to drop, and the file is
        not validated again (a file its writer never fsynced might read empty now)."""
        name = accepted.get(_origin(claimed))
        if name is not None:
            self._drop_claim(claimed)
            return Outcome(claimed.name, name, None)
        return self._finish(claimed)

    def _drop_claim(self, claimed: Path) -> None:
        self.fs.unlink(claimed)  # only once the job folder (or the rejection) is durable
        self.fs.unlink(_marker(claimed))
        self.fs.fsync_dir(claimed.parent)

    def _finish(self, claimed: Path) -> Outcome:
        """Accept or reject a claimed file; safe to run again after a crash at any point.
        The job's own code (imports, the dry build) runs in the validator's process, which
        dies alone. What follows runs here: a marker written first tells the next daemon
        if that took this one down, and after MAX_DEATHS such deaths the file is rejected
        instead of tried again (a crash loop). Fewer may be the machine's or a `kill -9`.
        Waiting for the validator does not count: a daemon killed then (the validator
        starting, say) did not die of this file."""
        marker = _marker(claimed)
        deaths = _deaths(marker)
        try:
            if deaths >= MAX_DEATHS:
                raise CrashedDaemon(f"{claimed.name}: the daemon died {deaths} times while taking this file in; "
                                    "try it with `traind validate`, and please report it")
            verdict = self.check(claimed, self.home.inbox) if self.check is not None else None
            # no fsync: a daemon killed keeps what it wrote; a power cut may lose the count (one more try)
            marker.write_text(str(deaths + 1))
            job_file = self._validated(claimed, verdict)
            unfit = self.fits(job_file.spec)
            if unfit:
                raise Rejected(f"{claimed.name}: {unfit}")
            self._accept(job_file)
            outcome = Outcome(claimed.name, job_file.name, None)
        except TraindError as e:
            self._reject(claimed, str(e))
            outcome = Outcome(claimed.name, None, str(e))
        except OSError:  # our own I/O failed (EIO, a full disk): no death; the file waits for the next scan
            _forget_attempt(marker, deaths)
            raise
        except Exception as e:  # a bug of traind's: this file is rejected, the daemon serves on
            log.exception("taking %s failed", claimed.name)
            why = f"{claimed.name}: traind failed on this file ({type(e).__name__}: {e}); please report it"
            self._reject(claimed, why)
            outcome = Outcome(claimed.name, None, why)
        self._drop_claim(claimed)
        return outcome

    def _validated(self, claimed: Path, verdict) -> JobFile:
        """The job file, from the validator's VERDICT, or validated here without one."""
        if verdict is None:
            return validate(load_job(claimed, base_dir=self.home.inbox))
        if verdict.error:
            raise Rejected(verdict.error)
        try:
            spec = JobSpec.model_validate_json(verdict.spec_json, context={"imports": False})
        except ValueError as e:  # the validator's answer must hold up here too
            raise Rejected(f"{claimed.name}: {e}") from e
        return JobFile(claimed, FORMATS[claimed.suffix.lower()], claimed.read_text(), spec)

    def _accept(self, job_file: JobFile) -> None:
        if job_file.spec.sweep is not None:
            return self._accept_sweep(job_file)
        folder = self.home.job_dir(job_file.name)
        copy = job_file_name(job_file.path.suffix)
        origin = _origin(job_file.path)
        if folder.exists():
            record = read_state(folder)
            if record is not None and record.origin == origin:
                return  # accepted before a crash; the claim is all that was left
            same = (folder / copy).is_file() and (folder / copy).read_text() == job_file.text
            if record is not None and record.origin is None and same:
                return  # the same, from a traind that kept no origin: taken for a leftover as it did
            again = " (the same file again: it has been accepted already)" if same else ""
            raise NameInUse(f"{job_file.path.name}: a job named '{job_file.name}' exists already{again} "
                            f"({folder}); give this one another name (name = \"...\") or `traind rm` the old one")
        stage = self.home.jobs / f".new-{job_file.name}"
        self.fs.remove_tree(stage)
        self.fs.mkdir(stage)
        # the stage is invisible until renamed: its files need an fsync each, its name one
        write_job(self.fs, stage, job_file, staged=True)
        write_state(stage, JobRecord(job_file.name, JobState.QUEUED, job_file.spec.priority, time.time(),
                                     changed=time.time(), origin=origin), self.fs, staged=True)
        self.fs.fsync_dir(stage)
        self.fs.rename(stage, folder)
        self.fs.fsync_dir(self.home.jobs)

    def _accept_sweep(self, job_file: JobFile) -> None:
        """A sweep file becomes HOME/sweeps/NAME; the daemon's driver makes its trials' jobs."""
        from traind.daemon import sweeps
        from traind.jobs.sweep import trial_name

        name = job_file.name
        folder = sweeps.sweep_dir(self.home, name)
        if folder.exists():
            if (folder / job_file_name(job_file.path.suffix)).is_file() and \
                    (folder / job_file_name(job_file.path.suffix)).read_text() == job_file.text:
                return  # accepted before a crash; the claim is all that was left
            raise NameInUse(f"{job_file.path.name}: a sweep named '{name}' exists already ({folder}); give this one "
                            "another name (name = \"...\")")
        if not is_job_name(trial_name(name, job_file.spec.sweep.trials - 1)):
            raise Rejected(f"{job_file.path.name}: the sweep's name '{name}' is too long for its trials' names "
                           f"({trial_name(name, 0)}, at most 64 characters); give it a shorter one")
        if self.home.job_dir(name).exists():
            raise NameInUse(f"{job_file.path.name}: a job named '{name}' exists already; give the sweep another name")
        sweeps.accept(self.home, self.fs, job_file)

    def _reject(self, claimed: Path, why: str) -> None:
        target = self.home.rejected / claimed.name
        n = 1
        while target.exists():
            target, n = self.home.rejected / f"{claimed.stem}.{n}{claimed.suffix}", n + 1
        error = why.replace(str(claimed), target.name) + "\n"
        write_durably(self.fs, target.with_name(target.name + ".error"), error.encode())
        write_durably(self.fs, target, claimed.read_bytes())


def _origin(claimed: Path) -> str:
    """What tells this file from another with the same name and text: its size and mtime,
    which the claim's rename keeps."""
    st = claimed.stat()
    return f"{claimed.name}:{st.st_size}:{st.st_mtime_ns}"


def open_for_writing(path: Path) -> bool:
    """Whether some process has PATH open for writing: the kernel grants a read lease only
    while none has. Where leases are not to be had (another owner, a network file
    system), False: stillness alone decides."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as e:
        return e.errno == errno.EAGAIN
    finally:
        os.close(fd)


def _marker(claimed: Path) -> Path:
    """Where the daemons taking CLAIMED in count their deaths."""
    return claimed.with_name(f".{claimed.name}{ATTEMPT}")


def _marked(marker: Path) -> Path:
    """The claimed file whose deaths MARKER counts."""
    return marker.with_name(marker.name[1:-len(ATTEMPT)])


def _forget_attempt(marker: Path, deaths: int) -> None:
    try:
        if deaths:
            marker.write_text(str(deaths))
        else:
            marker.unlink(missing_ok=True)
    except OSError:
        pass


def _deaths(marker: Path) -> int:
    """How many daemons died taking the file in: each writes its try into MARKER first."""
    try:
        text = marker.read_text().strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0  # empty: cut short while being written (or by a full disk)


class NameInUse(TraindError):
    exit_code = 2


class Rejected(TraindError):
    """The validator's verdict on a file: the message says why."""


class CrashedDaemon(TraindError):
    """Validating a job file ended the daemon's process."""
