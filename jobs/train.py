"""The training loop: one flat pass over steps and epochs, as nanoGPT's train.py.

Between two steps the loop is at a *boundary*: the model, optimizer, scheduler, the
global RNGs and `Progress` together are everything needed to continue exactly (CONTRACT
§5.5), since each epoch's batch order follows from (seed, epoch) and not from the RNGs.
The `boundary` callback runs there; returning True stops the loop (signals, pause, saves).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from traind.jobs import data
from traind.jobs.build import Job
from traind.jobs.errors import NonFiniteLoss
from traind.jobs.metrics import Recorder
from traind.jobs.optim import correct_count


@dataclass
class Progress:
    """Where the loop stands, in plain numbers (a save stores it as JSON)."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """The current epoch, from 0."""
    batch: int = 0
    """Batches of the current epoch done."""
    loss_sum: float = 0.0
    """Sum of the current epoch's batch losses (its mean is train_loss)."""
    best: float | None = None
    """Best value of the monitored metric so far."""
    last: dict = dataclasses.field(default_factory=dict)
    """Metrics of the last finished epoch."""
    skip: list = dataclasses.field(default_factory=list)
    """[epoch, batch] pairs never trained on: where a loss was not finite (see rollback)."""
    rollbacks: int = 0
    """Rollbacks after a non-finite loss so far."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    def __init__(self, job: Job, recorder: Recorder, progress: Progress | None = None):
        self.job, self.spec, self.recorder = job, job.spec, recorder
        self.progress = progress or Progress()
        self.pin = job.device.type == "cuda"
        # Per-step decisions that never change, taken once: at ~0.5 ms a step on a small
        # model, each attribute chain in the hot path shows up in bench/loop.py.
        self._move = job.device.type != "cpu"
        self._clip = self.spec.train.grad_clip
        self._step_scheduler = job.scheduler if self.spec.scheduler and self.spec.scheduler.interval == "step" else None
        self._limit = self.spec.train.max_steps
        self._log_every = self.spec.train.log_every_steps

    def finished(self) -> bool:
        p, train = self.progress, self.spec.train
        return (train.max_steps is not None and p.step >= train.max_steps and p.batch == 0) or \
               (train.epochs is not None and p.epoch >= train.epochs)

    def fit(self, boundary: Callable[[Trainer], bool] = lambda trainer: False) -> bool:
        """Train until done (True) or until BOUNDARY asks to stop (False)."""
        job, p = self.job, self.progress
        job.model.train()
        while not self.finished():
            if not self.at_step_limit():
                loader = data.train_loader(job.splits.train, self.spec.data, self.spec.seed, p.epoch, p.batch,
                                           self.pin)
                for x, y in loader:
                    if p.skip and [p.epoch, p.batch] in p.skip:
                        p.batch += 1
                        continue
                    self.train_step(x, y)
                    if self.at_step_limit():
                        break
                    if boundary(self):
                        return False
            self.end_epoch()
            if boundary(self):
                return self.finished()
        return True

    def at_step_limit(self) -> bool:
        return self._limit is not None and self.progress.step >= self._limit

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        job, p = self.job, self.progress
        if self._move:
            x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
        loss = job.loss_fn(job.model(x), y)
        value = loss.item()
        if not math.isfinite(value):  # before backward: the weights stay as they were
            raise NonFiniteLoss(p.step + 1, p.epoch, p.batch, value)
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self._clip:
            nn.utils.clip_grad_norm_(job.model.parameters(), self._clip)
        job.optimizer.step()
        if self._step_scheduler is not None:
            self._step_scheduler.step()
        p.step += 1
        p.batch += 1
        p.loss_sum += value
        if p.step % self._log_every == 0:
            self.recorder.metric({"kind": "step", "step": p.step, "epoch": p.epoch, "loss": value, "lr": self.lr()})
        return value

    def validate(self) -> dict[str, float]:
        job = self.job
        if job.splits.val is None or len(job.splits.val) == 0:
            return {}
        job.model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for x, y in data.val_loader(job.splits.val, self.spec.data, self.spec.seed, self.pin):
                x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
                out = job.model(x)
                total += float(job.loss_fn(out, y)) * len(y)
                count += len(y)
                if job.classification:
                    correct += correct_count(out, y)
        job.model.train()
        found = {"val_loss": total / count}
        if job.classification:
            found["val_acc"] = correct / count
        return found

    def end_epoch(self) -> None:
        """Validate, step an epoch scheduler, record the epoch, move to the next."""
        p, started = self.progress, time.monotonic()
        metrics = {"train_loss": p.loss_sum / max(p.batch, 1), **self.validate()}
        monitored = metrics.get(self.spec.checkpoint.monitor)
        scheduler = self.job.scheduler
        if scheduler is not None and self.spec.scheduler.interval == "epoch":
            with warnings.catch_warnings():
                # Resumed at an epoch's end, the restored scheduler steps before this process's
                # first optimizer step; torch warns, but the restored schedule is exact.
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(monitored)
                else:
                    scheduler.step()
        if monitored is not None and p.epoch + 1 >= self.spec.checkpoint.best_after_epoch and self._better(monitored):
            p.best = monitored
        record = {"kind": "epoch", "epoch": p.epoch + 1, "step": p.step, **metrics, "lr": self.lr(),
                  "val_seconds": round(time.monotonic() - started, 4)}
        self.recorder.metric(record)
        self.recorder.epoch_line(record, self.spec.train.epochs, self.job.total_steps)
        p.last = metrics
        p.epoch, p.batch, p.loss_sum = p.epoch + 1, 0, 0.0

    def _better(self, value: float) -> bool:
        best = self.progress.best
        if best is None or not math.isfinite(best):
            return math.isfinite(value)
        return value < best if self.spec.checkpoint.direction == "min" else value > best

    def lr(self) -> float:
        return float(self.job.optimizer.param_groups[0]["lr"])
