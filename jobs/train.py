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
from traind.jobs.world import World


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
    """The loop over one job. In a WORLD of several ranks, each trains on its share of
    every global batch through DDP (the job's model stays the plain module, which saves
    hold), and the loss, its finiteness and the validation metrics are the whole world's."""

    def __init__(self, job: Job, recorder: Recorder, progress: Progress | None = None, world: World = World()):
        self.job, self.spec, self.recorder, self.world = job, job.spec, recorder, world
        self.progress = progress or Progress()
        self.net = job.model
        """What the forward pass calls: the model, or its DDP wrapper (made at the first fit)."""
        self._part = (world.rank, world.size)
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
        step = self.train_step
        if self.world.size > 1:
            self._wrap()
            step = self._ranks_step
        while not self.finished():
            if not self.at_step_limit():
                loader = data.train_loader(job.splits.train, self.spec.data, self.spec.seed, p.epoch, p.batch,
                                           self.pin, self._part)
                for x, y in loader:
                    if p.skip and [p.epoch, p.batch] in p.skip:
                        p.batch += 1
                        continue
                    step(x, y)
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
        return self._update(value)

    def _update(self, value: float) -> float:
        """After the backward pass: clip, step the optimizer (and a per-step scheduler),
        count the step and record VALUE, its loss."""
        job, p = self.job, self.progress
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

    def _wrap(self) -> None:
        """DDP around the model, once its state is final (built, or restored from a save)."""
        if self.net is self.job.model:
            from torch.nn.parallel import DistributedDataParallel

            device = self.job.device
            self.net = DistributedDataParallel(self.job.model, device_ids=[device] if device.type == "cuda" else None)

    def _ranks_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step of the world: this rank's share of the global batch, weighted so that
        DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss
        (the last batch of an epoch may not split evenly); the loss is the world's."""
        job, p, world = self.job, self.progress, self.world
        if self._move:
            x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
        whole = min(self.spec.data.batch_size, len(job.splits.train) - p.batch * self.spec.data.batch_size)
        out = self.net(x)
        if len(x) * world.size == whole:  # an even split: DDP's mean of the ranks' means is the batch's mean
            weighted = job.loss_fn(out, y)
            share = weighted.detach() / world.size
        elif len(x):
            loss = job.loss_fn(out, y)
            share = loss.detach() * (len(x) / whole)
            weighted = loss * (len(x) * world.size / whole)
        else:  # a batch smaller than the world: this rank still takes part in DDP's all-reduce
            share, weighted = torch.zeros((), device=out.device), out.sum() * 0.0
        total = world.sum_later(share)  # the world's loss, summed while the backward pass runs
        job.optimizer.zero_grad(set_to_none=True)
        weighted.backward()
        value = total()
        if not math.isfinite(value):  # on every rank at once, before the optimizer steps: they roll back together
            raise NonFiniteLoss(p.step + 1, p.epoch, p.batch, value)
        return self._update(value)

    def validate(self) -> dict[str, float]:
        job = self.job
        if job.splits.val is None or len(job.splits.val) == 0:
            return {}
        job.model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for x, y in data.val_loader(job.splits.val, self.spec.data, self.spec.seed, self.pin, self._part):
                x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
                out = job.model(x)
                total += float(job.loss_fn(out, y)) * len(y)
                count += len(y)
                if job.classification:
                    correct += correct_count(out, y)
        job.model.train()
        if self.world.size > 1:
            total, correct, count = self.world.sum([total, correct, count])
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
