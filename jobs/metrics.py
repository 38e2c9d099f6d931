"""A job's record: metrics as JSON lines, a human-readable log, one line per epoch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log"


class Recorder:
    """Writes to FOLDER's metrics file and log (nowhere without a folder) and echoes
    each epoch's line to ECHO (the terminal of `traind run`)."""

    def __init__(self, folder: Path | None = None, echo: Callable[[str], None] | None = None,
                 name: str = "job"):
        self.echo = echo
        self.logger = logging.getLogger(f"traind.job.{name}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self._metrics = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(folder / LOG_FILE, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.logger.addHandler(handler)
            self._metrics = open(folder / METRICS_FILE, "a", encoding="utf-8", buffering=1)

    def metric(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

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
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write; the rest still counts
    return records
