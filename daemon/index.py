"""What `traind ls` shows of each job, and the index that keeps `ls` fast with many jobs.

A job's row (CONTRACT §4's `ls` keys) is folded from its state file and its metrics file.
`HOME/index.sqlite` caches each row with the signature (inode, size, mtime) of the files
it came from, and how far into the metrics file it has read. `ls` stats two files per
job and reads again only what changed: a grown metrics file from where the row stopped
(it only grows, except when a resume rewrites it, which gives it a new inode).

The index is a cache, never the truth (CONTRACT §2): deleted, damaged, from another
version or not writable, it is rebuilt from the job folders, or `ls` works without it.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from traind.daemon.home import Home
from traind.daemon.jobstate import JobRecord, JobState, read_state, signature
from traind.daemon.liveness import held_locks, trained
from traind.jobs.folder import METRICS_FILE, SAVES, SPEC_FILE, STATE_FILE
from traind.jobs.metrics import direction
from traind.store import retention
from traind.store.saves import list_saves

INDEX_FILE = "index.sqlite"
TAIL = 64
VERSION = 5  # of the rows' shape; an index of another version is rebuilt
_SCHEMA = ("CREATE TABLE IF NOT EXISTS jobs "
           "(name TEXT PRIMARY KEY, state_sig TEXT, metrics_sig TEXT, row TEXT, tally TEXT, rank TEXT)")
QUEUE_ORDER = {"running": 0, "queued": 1, "paused": 2, "failed": 3, "cancelled": 4, "done": 5}


def queue_order(row: dict) -> list:
    """What runs now first, then what runs next (higher priority first, then the order of
    submission, as the daemon picks), then the jobs that wait for a user, then the ended."""
    return [QUEUE_ORDER.get(row["state"], 9), -(row.get("priority") or 0), row.get("submitted") or 0, row["name"]]


@dataclass
class Tally:
    """What a job's metrics file says so far, and how much of it has been read."""

    monitor: str | None = None
    """The metric `best` ranks by (from the job's spec); None when the spec is unreadable."""
    direction: str = "min"
    best_after_epoch: int = 0
    offset: int = 0
    """Bytes of the metrics file folded in: always the end of a whole line."""
    start_step: int = 0
    total_steps: int | None = None
    device: str | None = None
    last_step: int | None = None
    loss: float | None = None
    epoch: int = 0
    best: float | None = None
    tail: str = ""
    """The last bytes folded in (hex), to tell a file that grew from one rewritten."""
    run_started: float | None = None
    """When the current run (the last start record) began, seconds since the epoch."""
    last_time: float | None = None
    """When the last record was written."""
    earlier_runs: float = 0.0
    """Seconds trained by the runs before the current one."""
    stopped: str | None = None
    """Why training ended before its length (train.early_stop), from the last epoch's record."""

    def fold(self, record: dict) -> None:
        kind, t = record.get("kind"), record.get("time")
        if kind == "start":
            if self.run_started is not None and self.last_time is not None:
                self.earlier_runs += max(0.0, self.last_time - self.run_started)
            self.run_started = t if isinstance(t, (int, float)) else None
            self.start_step = record.get("step", 0)
            self.total_steps, self.device = record.get("total_steps"), record.get("device")
        elif kind in ("step", "epoch"):
            self.last_step = record.get("step")
            self.loss = record.get("loss", record.get("train_loss"))
        if isinstance(t, (int, float)):
            self.last_time = t
        if kind == "epoch":
            self.epoch = record.get("epoch", self.epoch)
            self.stopped = record.get("stopped")
            if self.monitor:
                value = record.get(self.monitor)
                if retention.improves(_policy(self.monitor, self.direction, self.best_after_epoch), value,
                                      record.get("epoch", 0), self.best):
                    self.best = value

    def read_on(self, path: Path) -> bool:
        """Fold in the whole lines of PATH after OFFSET; False (nothing folded) when PATH
        no longer continues what was read, as after a resume rewrote it. A torn last
        line (a crash mid-write, or a line being written now) waits for its end."""
        try:
            with open(path, "rb") as f:
                f.seek(self.offset - len(self.tail) // 2)
                data = f.read()
        except FileNotFoundError:
            return self.offset == 0
        seen = bytes.fromhex(self.tail)
        if not data.startswith(seen):
            return False
        data = data[len(seen):]
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash and then written past
            if isinstance(record, dict):
                self.fold(record)
        if end:
            self.offset += end
            self.tail = (seen + data[:end])[-TAIL:].hex()
        return True


def best_policy(folder: Path) -> retention.Policy | None:
    """What "best" means for the job in FOLDER (its monitor, mode, best_after_epoch, from
    spec.json); None when the spec is unreadable."""
    try:
        checkpoint = json.loads((folder / SPEC_FILE).read_text())["checkpoint"]
        return _policy(checkpoint["monitor"], direction(checkpoint["monitor"], checkpoint.get("mode")),
                       int(checkpoint.get("best_after_epoch", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=64)
def _policy(monitor: str, mode: str, best_after_epoch: int) -> retention.Policy:
    return retention.Policy(monitor=monitor, mode=mode, best_after_epoch=best_after_epoch)


def _tally(folder: Path) -> Tally:
    policy = best_policy(folder)
    return Tally() if policy is None else Tally(policy.monitor, policy.mode, policy.best_after_epoch)


def _row(folder: Path, tally: Tally, record: JobRecord | None = None) -> dict | None:
    record = record or read_state(folder)
    if record is None:
        return None
    step = tally.last_step if tally.last_step is not None else tally.start_step
    this_run = (tally.last_time - tally.run_started) if tally.run_started and tally.last_time else 0.0
    rate = (step - tally.start_step) / this_run if this_run > 0 and step > tally.start_step else None
    return {"name": record.name, "state": record.state.value, "epoch": tally.epoch, "step": step,
            "total_steps": tally.total_steps, "loss": tally.loss, "best": tally.best, "device": tally.device,
            "restarts": record.restarts, "monitor": tally.monitor, "priority": record.priority,
            "submitted": record.submitted, "elapsed": round(tally.earlier_runs + this_run, 1),
            "steps_per_s": round(rate, 2) if rate else None, "stopped": tally.stopped}


def row(folder: Path) -> dict | None:
    """The `ls` row of the job in FOLDER, read afresh; None if FOLDER holds no job. A
    folder of `traind run` (no state.json) gets the state its files tell: running while a
    process trains it, done once its newest save is final, else paused (run it again to go on)."""
    tally = _tally(folder)
    tally.read_on(folder / METRICS_FILE)
    record = read_state(folder)
    if record is None and (folder / SPEC_FILE).is_file():
        record = JobRecord(folder.name, JobState.RUNNING if trained(folder) else
                           JobState.DONE if _ended(folder) else JobState.PAUSED)
    found = _row(folder, tally, record)
    return found if found is None else live(found, folder)


def _ended(folder: Path) -> bool:
    """Whether the newest save of FOLDER is its run's final one."""
    found = list_saves(folder / SAVES)[0]
    return bool(found) and "final" in found[-1].kinds


def live(found: dict, folder: Path, locks: dict | None = None) -> dict:
    """FOUND as it is now: a job whose state says running while no process trains it (its
    daemon died or stopped) is queued: the next daemon resumes it from its newest save."""
    if found["state"] == JobState.RUNNING.value and not trained(folder, locks):
        return {**found, "state": JobState.QUEUED.value, "stale": True}
    return found


def _cached_tally(db: sqlite3.Connection | None, name: str) -> Tally | None:
    try:
        found = db.execute("SELECT tally FROM jobs WHERE name = ?", (name,)).fetchone() if db else None
        return Tally(**json.loads(found[0])) if found else None
    except (sqlite3.DatabaseError, ValueError, TypeError):
        return None


class Index:
    """The rows of every job in HOME, cached in HOME/index.sqlite."""

    def __init__(self, home: Home):
        self.home, self.path = home, home.root / INDEX_FILE

    def rows(self, queue: bool = False) -> list[dict]:
        """A row per job folder of the home, sorted by name (QUEUE: in queue order)."""
        return [json.loads(text) for text in self.rows_json(queue)]

    def rows_json(self, queue: bool = False) -> list[str]:
        """The rows as JSON texts, sorted by name or (QUEUE) in queue order: what `ls --json`
        prints. A cached row's text is printed as stored; only its small rank is decoded."""
        jobs = str(self.home.jobs)
        try:
            names = sorted(e.name for e in os.scandir(jobs) if not e.name.startswith(".") and e.is_dir())
        except FileNotFoundError:
            return []
        db = self._open()
        cached = self._cached(db)
        rows, changed = [], []  # rows: (rank, text)
        for name in names:
            folder = f"{jobs}/{name}"  # strings, not Paths: this loop runs 10,000 times for one ls
            state_sig, metrics_sig = signature(f"{folder}/{STATE_FILE}"), signature(f"{folder}/{METRICS_FILE}")
            if state_sig is None:
                continue  # not a job (yet): a folder being made, or a stray one
            hit = cached.get(name)
            if hit and hit[0] == state_sig and hit[1] == metrics_sig:
                rows.append((json.loads(hit[3]), hit[2]))
                continue
            tally = self._tally(db, Path(folder), hit, metrics_sig)
            found = _row(Path(folder), tally)
            if found is None:
                continue
            rows.append((queue_order(found), json.dumps(found)))
            if tally.monitor is not None:  # an unreadable spec is read again next time
                changed.append((name, state_sig, metrics_sig, rows[-1][1], json.dumps(asdict(tally)),
                                json.dumps(rows[-1][0])))
        if db is not None:
            self._store(db, changed, set(cached) - set(names))
            db.close()
        running = [i for i, (rank, _) in enumerate(rows) if rank[0] == QUEUE_ORDER["running"]]
        locks = held_locks() if running else None
        for i in running:  # a few at most: decoded and judged alive one by one
            found = live(json.loads(rows[i][1]), Path(jobs) / rows[i][0][3], locks)
            rows[i] = (queue_order(found), json.dumps(found))
        return [text for _, text in (sorted(rows) if queue else rows)]

    @staticmethod
    def _tally(db: sqlite3.Connection | None, folder: Path, hit: tuple | None, metrics_sig: str | None) -> Tally:
        """The cached tally read on from its offset when the metrics file only grew since
        (same inode, same bytes before the offset), else one read from the start."""
        if hit and hit[1] and metrics_sig and hit[1].split(":")[0] == metrics_sig.split(":")[0]:
            tally = _cached_tally(db, folder.name)
            if tally is not None and tally.offset <= int(metrics_sig.split(":")[1]):
                if tally.read_on(folder / METRICS_FILE):
                    return tally
        tally = _tally(folder)
        tally.read_on(folder / METRICS_FILE)
        return tally

    def _open(self) -> sqlite3.Connection | None:
        """The index, made or rebuilt as needed; None when it cannot be (ls goes on without)."""
        for attempt in range(2):
            try:
                db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
                if db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
                    db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
                    db.execute("DROP TABLE IF EXISTS jobs")
                    db.execute(_SCHEMA)
                    db.execute(f"PRAGMA user_version={VERSION}")
                return db
            except sqlite3.DatabaseError:
                if attempt or not self._discard():
                    return None
        return None

    def _discard(self) -> bool:
        """Remove a damaged index (it holds nothing that the folders do not)."""
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return True
        except OSError:
            return False

    def _cached(self, db: sqlite3.Connection | None) -> dict[str, tuple]:
        if db is None:
            return {}
        try:
            return {name: (s, m, r, k) for name, s, m, r, k in
                    db.execute("SELECT name, state_sig, metrics_sig, row, rank FROM jobs")}
        except sqlite3.DatabaseError:
            self._discard()
            return {}

    @staticmethod
    def _store(db: sqlite3.Connection, changed: list[tuple], gone: set[str]) -> None:
        if not changed and not gone:
            return
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)", changed)
                db.executemany("DELETE FROM jobs WHERE name = ?", [(n,) for n in gone])
        except sqlite3.DatabaseError:
            pass  # busy or read-only: this ls was right anyway, the next one stores it
