"""A job's record: metrics as JSON lines, a human-readable log, one line per epoch, and
TensorBoard event files (in `tensorboard/`) where tensorboard is installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from traind.jobs.folder import LOG_FILE, METRICS_FILE, TENSORBOARD_DIR
from traind.store.fs import FileSystem, write_durably

NOT_SCALARS = {"kind", "step", "epoch", "time", "id", "kinds", "total_steps", "device"}


def tensorboard_available() -> bool:
    """Whether jobs write TensorBoard event files: tensorboard is installed, and
    TRAIND_TENSORBOARD is not 0."""
    if os.environ.get("TRAIND_TENSORBOARD", "1") == "0":
        return False
    return importlib.util.find_spec("tensorboard") is not None


def direction(monitor: str, mode: str | None) -> str:
    """Whether MONITOR is better "min" or "max": MODE if given, else max for accuracy."""
    return mode or ("max" if monitor == "val_acc" else "min")


class History:
    """One of a job's append-only records (the log, metrics.jsonl), written through FS so
    that crash tests see every append. `sync` makes what was written durable: its bytes,
    and the first time its name. A file a crash left mid-line is ended first, so that the
    next line is not glued to the torn one."""

    def __init__(self, fs: FileSystem, path: Path):
        self.fs, self.path = fs, path
        self._unnamed = not path.exists()  # created here: its name needs its folder's fsync
        self.fd = fs.open_append(path)
        self._dirty = False
        if not self._unnamed and path.stat().st_size and not _ends_a_line(path):
            self.write("\n")

    def write(self, text: str) -> None:
        self.fs.write(self.fd, memoryview(text.encode("utf-8")))
        self._dirty = True

    def sync(self) -> None:
        if self._dirty:
            self._dirty = False  # (a failed fsync is never retried into success: an error, once)
            self.fs.fsync(self.fd)
        if self._unnamed:
            self._unnamed = False
            self.fs.fsync_dir(self.path.parent)

    def close(self) -> None:
        self.fs.close(self.fd)


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _HistoryHandler(logging.Handler):
    def __init__(self, history: History):
        super().__init__()
        self.history = history

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.history.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class Recorder:
    """Writes to FOLDER's metrics file and log (nowhere without a folder) and echoes
    each epoch's line to ECHO (the terminal of `traind run`). Both are appended through FS;
    `sync` makes them durable (at each save's commit, and at close)."""

    def __init__(self, folder: Path | None = None, echo: Callable[[str], None] | None = None,
                 name: str = "job", tensorboard: bool = False, fs: FileSystem | None = None):
        self.echo, self.folder, self.fs = echo, folder, fs or FileSystem()
        self._tensorboard = tensorboard and folder is not None
        self._events = None  # TensorBoard's EventFile (jobs/events.py), opened at the first record
        self.logger = logging.getLogger(f"traind.job.{name}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self._log: History | None = None
        self._metrics: History | None = None
        self._lock = threading.Lock()  # the save writer's thread records too
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._log = History(self.fs, folder / LOG_FILE)
            handler = _HistoryHandler(self._log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.logger.addHandler(handler)
            self._metrics = History(self.fs, folder / METRICS_FILE)

    def metric(self, record: dict) -> None:
        self.metrics([record])

    def metrics(self, records: list[dict]) -> None:
        """RECORDS as lines of the metrics file, in one write; each stamped with the time
        now unless it carries its own."""
        now = round(time.time(), 3)
        text = "".join(json.dumps(record if "time" in record else {**record, "time": now}) + "\n"
                       for record in records)
        with self._lock:
            if self._metrics is not None:
                self._metrics.write(text)
            if self._tensorboard:
                for record in records:
                    self._scalars(record)

    def _scalars(self, record: dict, purge_step: int | None = None) -> None:
        """RECORD's numbers as TensorBoard scalars ("step/loss", "epoch/val_loss"...), in
        memory until the next flush (an epoch's record, a sync, or FLUSH_SECONDS)."""
        if self._events is None:
            from traind.jobs.events import EventFile

            self._events = EventFile(self.folder / TENSORBOARD_DIR, purge_step)
        kind = record.get("kind", "metric")
        values = {f"{kind}/{key}": value for key, value in record.items()
                  if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if values:
            self._events.scalars(record.get("step"), values)
        if kind == "epoch":
            self._events.flush()

    def keep_until(self, step: int, epochs_done: int) -> None:
        """Forget the records written after the save a job resumes from (they will be
        written again); with (0, 0), all of them (a fresh start)."""
        if self.folder is None:
            return
        path = self.folder / METRICS_FILE
        kept = [r for r in read_metrics(self.folder)
                if (r.get("epoch", 0) <= epochs_done if r.get("kind") == "epoch" else r.get("step", 0) <= step)]
        with self._lock:
            self._metrics.close()
            write_durably(self.fs, path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
            self._metrics = History(self.fs, path)
            if self._tensorboard:
                self._close_events()
                # TensorBoard hides the events of earlier runs from this step on: they are written again
                self._scalars({}, purge_step=step + 1 if step else 0)

    def sync(self) -> None:
        """Make everything recorded so far durable (the caller's thread waits for the disk;
        the training thread goes on recording meanwhile), and hand TensorBoard's events to
        the OS (they are not fsynced)."""
        for history in (self._metrics, self._log):
            if history is not None:
                history.sync()
        with self._lock:
            if self._events is not None:
                self._events.flush()

    def log(self, message: str, level: int = logging.INFO) -> None:
        self.logger.log(level, message)

    def say(self, message: str) -> None:
        """Log MESSAGE and show it on the terminal."""
        self.log(message)
        if self.echo is not None:
            self.echo(message)

    def epoch_line(self, record: dict, epochs: int | None, total_steps: int) -> None:
        parts = [f"epoch {record['epoch']}" + (f"/{epochs}" if epochs else ""),
                 f"step {record['step']}/{total_steps}"]
        parts += [f"{k} {record[k]:.4f}" for k in ("train_loss", "val_loss", "val_acc") if k in record]
        parts.append(f"lr {record['lr']:.3g}")
        self.say("  ".join(parts))

    def close(self) -> None:
        """Make the records durable and close them (a job that ended keeps its last lines).
        A disk that fails that fsync is not an error here: every save's commit made the
        history up to it durable or failed, and a close must not hide the error that ended
        the run."""
        try:
            self.sync()
        except OSError:
            pass
        finally:
            for handler in list(self.logger.handlers):
                handler.close()
                self.logger.removeHandler(handler)
            with self._lock:
                for history in (self._metrics, self._log):
                    if history is not None:
                        history.close()
                self._metrics = self._log = None
                self._close_events()

    def _close_events(self) -> None:
        if self._events is not None:
            self._events.close()  # flushes
            self._events = None


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # (UnicodeDecodeError too)
            continue  # a line torn by a crash mid-write; the rest still counts
        if isinstance(record, dict):
            records.append(record)
    return records
