"""The training loop: one flat pass over steps and epochs, as nanoGPT's train.py.

Between two steps the loop is at a *boundary*: the model, optimizer, scheduler, the
global RNGs and `Progress` together are everything needed to continue exactly (CONTRACT
§5.5), since each epoch's batch order follows from (seed, epoch) and not from the RNGs.
The `boundary` callback runs there; returning True stops the loop (signals, pause, saves).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from traind.jobs import data
from traind.jobs.build import Job
from traind.jobs.errors import NonFiniteLoss, is_out_of_memory
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
    """Batches of the current epoch done (train.accumulate of them to a step)."""
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
    mark: float | None = None
    """train.early_stop: the monitored value of the last epoch that counted as an improvement."""
    stale: int = 0
    """train.early_stop: epochs in a row since then."""
    stopped: str | None = None
    """Why training ended before its length ("early stop at epoch 7"), once it has."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


LOOK_EVERY = 1024
"""Batches whose losses wait on the device at most, between two looks at them: a bound on
what waits (a GPU's 1,024 scalars take 0.5 MiB), not a cadence. Looks come from the clock
(LOOK_SECONDS), saves and epoch ends. A look slowed the seed MLP's step where it fell by
about 320 us (the stack, the transfer, the records written, and the caches they take), so
a look every 64 batches cost its epoch 0.7 to 0.9% (docs/PERFORMANCE.md)."""
LOOK_SECONDS = 1.0
"""A logged step whose losses were last looked at this long ago is looked at now (one
process: its step records then appear as a slow model makes them; with ranks, every logged
step is looked at, as every rank must look at the same steps)."""

Batch = tuple[int, torch.Tensor, torch.Tensor]
"""(its index in the epoch, inputs, targets)."""


class Trainer:
    """The loop over one job. In a WORLD of several ranks, each trains on its share of
    every global batch through DDP (the job's model stays the plain module, which saves
    hold), and the loss, its finiteness and the validation metrics are the whole world's.

    A step takes train.accumulate batches. Their losses stay on the device, unread (reading
    one waits for the device: on a GPU, a stall every step): `look` brings them over in
    one transfer (and, with ranks, one all-reduce) where the loop stops anyway, at a logged
    step, before a save, at an epoch's end, and every LOOK_EVERY batches. A non-finite one
    raises NonFiniteLoss there, naming its batch; the weights it reached are then not
    healthy, and no save is made of them: the run rolls back to the newest healthy save."""

    def __init__(self, job: Job, recorder: Recorder, progress: Progress | None = None, world: World = World()):
        self.job, self.spec, self.recorder, self.world = job, job.spec, recorder, world
        self.progress = progress or Progress()
        job.splits, moved = data.on_device(job.splits, job.device, self.spec.data.num_workers)
        if moved:
            recorder.say(f"data on {job.device}: {moved / 2**20:.1f} MiB, each batch gathered there")
        self.net = job.model
        """What the forward pass calls: the model, or its DDP wrapper or compiled form (made at the first fit)."""
        self._part = (world.rank, world.size)
        self.pin = job.device.type == "cuda"
        # Per-step decisions that never change, taken once: at ~0.5 ms a step on a small
        # model, each attribute chain in the hot path shows up in bench/loop.py.
        train = self.spec.train
        self._move = job.device.type != "cpu" and not data.resident(job.splits.train, job.device)
        self._move_val = job.device.type != "cpu" and not data.resident(job.splits.val, job.device)
        self._clip = train.grad_clip
        self._step_scheduler = job.scheduler if self.spec.scheduler and self.spec.scheduler.interval == "step" else None
        self._limit = train.max_steps
        self._log_every = train.log_every_steps
        self._accumulate = train.accumulate
        self.alone = train.accumulate == 1 and world.size == 1
        """Whether each batch is a step of its own on one rank: `fit` then steps batch by
        batch in `_run_alone`, without `step`'s grouping (about a point of the seed MLP's step)."""
        self._autocast = job.autocast
        self._size, self._batch_size = len(job.splits.train), self.spec.data.batch_size
        self.batches_per_epoch = job.batches_per_epoch
        """The job's, taken once (the boundary asks at every step; the property costs 0.6 us)."""
        self._losses: list[torch.Tensor] = []
        """The losses not looked at yet, one a batch, as their backward passes took them (weighted)."""
        self._pending: list[tuple[int, int, int, int]] = []
        """Of each: (step, batch, this rank's samples of it, the step's samples on all ranks),
        from which `look` weighs it."""
        self._logged: list[dict] = []
        """The step records of logged steps whose losses are not looked at yet (the loss to come)."""
        self._look_by = time.monotonic() + LOOK_SECONDS
        self._compile = train.compile
        self._compiled = not train.compile
        """Whether the compiled model has run a step (its errors come at the first)."""
        self._ask_step, self._ask_at = 0, 0.0
        """`quiet_until`'s: before this step and this moment, `_run_alone` does not call the boundary."""

    def finished(self) -> bool:
        p, train = self.progress, self.spec.train
        return p.stopped is not None or \
            (train.max_steps is not None and p.step >= train.max_steps and p.batch == 0) or \
            (train.epochs is not None and p.epoch >= train.epochs)

    def fit(self, boundary: Callable[[Trainer], bool] = lambda trainer: False) -> bool:
        """Train until done (True) or until BOUNDARY asks to stop (False)."""
        job, p = self.job, self.progress
        job.model.train()
        self._prepare()
        while not self.finished():
            if not self.at_step_limit():
                loader = data.train_loader(job.splits.train, self.spec.data, self.spec.seed, p.epoch, p.batch,
                                           self.pin, self._part)
                if self.alone and not any(epoch == p.epoch for epoch, _ in p.skip):
                    stopped = self._stepping(self._run_alone, enumerate(loader, p.batch), boundary)
                else:
                    stopped = self._stepping(self._run_groups, self._groups(loader), boundary)
                if stopped:
                    return False
            self.end_epoch()
            if boundary(self):
                return self.finished()
        return True

    def quiet_until(self, step: int, moment: float) -> None:
        """A boundary's word that it has nothing to do before the loop reaches STEP or the
        monotonic clock MOMENT, whichever comes first: until then, where each batch is a step
        of its own on one rank (`alone`), the loop does not call it. Given afresh at each
        call: a boundary that says nothing is called at the next step."""
        self._ask_step, self._ask_at = step, moment

    def at_step_limit(self) -> bool:
        return self._limit is not None and self.progress.step >= self._limit

    def _groups(self, loader) -> Iterator[list[Batch]]:
        """The batches of LOADER (from Progress.batch on), train.accumulate to a step; a
        batch in Progress.skip is passed over (the step takes the next one)."""
        p, n = self.progress, self._accumulate
        index, group, skip = p.batch, [], p.skip
        for x, y in loader:
            if skip and [p.epoch, index] in skip:
                index += 1
                if not group:
                    p.batch = index
                continue
            group.append((index, x, y))
            index += 1
            if len(group) == n:
                yield group
                group = []
        if group:
            yield group
        p.batch = index

    def _prepare(self) -> None:
        """DDP around the model, then torch.compile, once its state is final (built, or
        restored from a save); the model itself stays plain, as saves hold it."""
        if self.world.size > 1 and self.net is self.job.model:
            from torch.nn.parallel import DistributedDataParallel

            device = self.job.device
            self.net = DistributedDataParallel(self.job.model, device_ids=[device] if device.type == "cuda" else None)
        if self._compile and not getattr(self.net, "_traind_compiled", False):
            self.net = torch.compile(self.net, mode="max-autotune" if self._compile == "max-autotune" else None)
            self.net._traind_compiled = True

    def _stepping(self, run: Callable[[Iterator, Callable[[Trainer], bool]], bool], steps: Iterator,
                  boundary: Callable[[Trainer], bool]) -> bool:
        """RUN (`_run_alone` or `_run_groups`) over STEPS with BOUNDARY; until the compiled
        model has made a step, a failure of the first (torch.compile compiles there) is the
        job's, naming train.compile."""
        if self._compiled:
            return run(steps, boundary)
        batches = next(steps, None)  # (the data's failures are its own, not the compile's)
        if batches is None:
            return False
        steps, first = itertools.chain([batches], steps), self.progress.step
        try:
            return run(steps, boundary)
        except Exception as e:
            if self.progress.step != first or is_out_of_memory(e) or isinstance(e, NonFiniteLoss):
                raise
            from traind.jobs.errors import JobSpecError, Problem

            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise JobSpecError([Problem(("train", "compile"), f"torch.compile failed on this model: "
                                        f"{type(e).__name__}: {line} (the traceback, in the log, names the layer)",
                                        fix="set train.compile = false, or change the layer it names")]) from e
        finally:
            if self.progress.step != first:
                self._compiled = True

    def _run_groups(self, groups: Iterator[list[Batch]], boundary: Callable[[Trainer], bool]) -> bool:
        """`step` over each of GROUPS, BOUNDARY called after each; True when it stopped the loop."""
        for group in groups:
            self.step(group)
            if self.at_step_limit():
                return False
            if boundary(self):
                return True
        return False

    def _run_alone(self, steps: Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]],
                   boundary: Callable[[Trainer], bool]) -> bool:
        """`step` over each of STEPS, (the batch's index, (inputs, targets)), each a step of
        its own on one rank (`alone`): its samples are the step's. BOUNDARY is called after a
        step unless it said it is quiet until later (`quiet_until`); True when it stopped the
        loop. One flat loop, its decisions taken before it: at ~0.5 ms a step of a small
        model, each function call and attribute chain a step shows up in bench/loop.py's
        step_cost (this loop and the quiet boundaries: about a point of the seed MLP's step,
        docs/PERFORMANCE.md, "One loop for a batch alone")."""
        job, p = self.job, self.progress
        net, loss_fn, optimizer, device, autocast = self.net, job.loss_fn, job.optimizer, job.device, self._autocast
        zero_grad, scaler, move, limit = optimizer.zero_grad, job.scaler, self._move, self._limit
        optimize = optimizer.step if scaler is None and not self._clip and self._step_scheduler is None \
            and job.ema is None else self._optimize
        log_every, monotonic = self._log_every, time.monotonic
        self._ask_step = 0  # (a word from before a rollback, or from the last epoch, no longer holds)
        for index, (x, y) in steps:
            if move:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # The last step's gradients are let go before the forward pass, not after it (as the
            # tutorials write it): the seed MLP's step ran 1-2% faster so under bf16 autocast,
            # 0.6-1% in fp32 (docs/PERFORMANCE.md, "Gradients let go before the forward pass").
            zero_grad(set_to_none=True)
            if autocast is None:
                loss = loss_fn(net(x), y)
            else:
                with torch.autocast(device.type, autocast):
                    loss = loss_fn(net(x), y)
            self._losses.append(loss.detach())
            n = x.shape[0]  # (shape, not len(): len() costs a microsecond)
            self._pending.append((p.step + 1, index, n, n))
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()
            p.batch = index + 1
            optimize()
            p.step += 1
            if p.step % log_every == 0:
                self._log_step()
            elif len(self._losses) >= LOOK_EVERY:
                self.look()
            if limit is not None and p.step >= limit:
                return False
            if p.step >= self._ask_step or monotonic() >= self._ask_at:
                self._ask_step = 0  # asked at the next step, unless the boundary says otherwise
                if boundary(self):
                    return True
        return False

    def step(self, group: list[Batch]) -> None:
        """One optimizer step over GROUP: each batch's gradients added up (weighted so that
        the step's gradient is that of the mean loss over all of the group's samples), then
        clip, step, schedule, average; with ranks, DDP's all-reduce after the last batch only."""
        job, p, world, scaler = self.job, self.progress, self.world, self.job.scaler
        ranks, last, step = world.size, len(group) - 1, p.step + 1
        total = self._group_size(group)
        job.optimizer.zero_grad(set_to_none=True)  # before the forward pass: see `_run_alone`
        for i, (index, x, y) in enumerate(group):
            if self._move:
                x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
            out, loss = self._forward(x, y)
            mine = x.shape[0]  # (shape, not len(): len() costs a microsecond)
            if mine * ranks != total:  # else one batch split evenly: the plain loss is the step's
                loss = loss * (mine * ranks / total) if mine else out.sum() * 0.0  # (a rank given no samples
                # still takes part in DDP's all-reduce)
            self._losses.append(loss.detach())
            self._pending.append((step, index, mine, total))
            if scaler is not None:
                loss = scaler.scale(loss)
            if ranks > 1 and i < last:
                with self.net.no_sync():
                    loss.backward()
            else:
                loss.backward()
        p.batch = group[-1][0] + 1
        self._update()

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's output on X and its loss against Y (under autocast where train.precision asks)."""
        job = self.job
        if self._autocast is None:
            out = self.net(x)
            return out, job.loss_fn(out, y)
        with torch.autocast(job.device.type, self._autocast):
            out = self.net(x)
            return out, job.loss_fn(out, y)

    def _whole(self, index: int) -> int:
        """Samples of batch INDEX of the epoch, all ranks together (the last may be short)."""
        return min(self._batch_size, self._size - index * self._batch_size)

    def _group_size(self, group: list[Batch]) -> int:
        if len(group) == 1:
            return self._whole(group[0][0])
        return sum(self._whole(index) for index, _, _ in group)

    def _update(self) -> None:
        """After the backward passes: the optimizer's step (`_optimize`), counted, and a
        look at the losses when due. `_run_alone` does the same inline (a call a step less),
        which tests/jobs/test_train.py holds to this path bit for bit."""
        self._optimize()
        p = self.progress
        p.step += 1
        if p.step % self._log_every == 0:
            self._log_step()
        elif len(self._losses) >= LOOK_EVERY:
            self.look()

    def _optimize(self) -> None:
        """Clip, step the optimizer (and a per-step scheduler and the EMA)."""
        job = self.job
        scaler = job.scaler
        if scaler is None:
            if self._clip:
                nn.utils.clip_grad_norm_(job.model.parameters(), self._clip)
            job.optimizer.step()
        else:  # overflowing gradients skip the step: not a non-finite loss, the scale shrinks
            if self._clip:
                scaler.unscale_(job.optimizer)
                nn.utils.clip_grad_norm_(job.model.parameters(), self._clip)
            scaler.step(job.optimizer)
            scaler.update()
        if self._step_scheduler is not None:
            self._step_scheduler.step()
        if job.ema is not None:
            job.ema.update_parameters(job.model)

    def _log_step(self) -> None:
        """A logged step's record, which waits for its loss (written by the next look), and
        that look where due."""
        p, scaler = self.progress, self.job.scaler
        record = {"kind": "step", "step": p.step, "epoch": p.epoch, "loss": None, "lr": self.lr()}
        if scaler is not None:
            record["scale"] = scaler.get_scale()
        record["time"] = round(time.time(), 3)
        self._logged.append(record)
        if self.world.size > 1 or time.monotonic() >= self._look_by or len(self._losses) >= LOOK_EVERY:
            self.look()

    def look(self) -> float | None:
        """Bring the losses not looked at yet to the host (summed over the ranks: every
        rank calls this at the same boundaries), add them to the epoch's sum, write the
        records of the logged steps among them, and return the loss of the last step (None
        when there were none); NonFiniteLoss at the first that is NaN or infinite (the
        records of the steps before it written)."""
        self._look_by = time.monotonic() + LOOK_SECONDS
        if not self._losses:
            return None
        losses, pending, p, ranks = self._losses, self._pending, self.progress, self.world.size
        values = (torch.stack(losses) if len(losses) > 1 else losses[0].reshape(1)).float()
        if ranks == 1 and self._accumulate == 1:  # each batch is its step
            wholes = [total for _, _, _, total in pending]
        else:  # each batch's samples, all ranks together; the weighted losses back to each batch's share
            wholes = [self._whole(batch) for _, batch, _, _ in pending]
            factors = [total / (ranks * whole) if mine else 0.0 for (_, _, mine, total), whole in zip(pending, wholes)]
            values = values * torch.tensor(factors, device=values.device)
        if ranks > 1:
            self.world.sum_tensor(values)
        found = values.tolist()
        logged, self._losses, self._pending, self._logged = self._logged, [], [], []
        step_losses = {record["step"]: 0.0 for record in logged}
        last, bad = pending[-1][0], None
        step_losses.setdefault(last, 0.0)
        for value, (step, batch, _, total), whole in zip(found, pending, wholes):
            if not math.isfinite(value):
                bad = NonFiniteLoss(step, p.epoch, batch, value)
                break
            p.loss_sum += value
            if step in step_losses:  # its weight in the step's loss: its share of the step's samples
                step_losses[step] += value * (whole / total)
        done = [{**record, "loss": step_losses[record["step"]]} for record in logged
                if bad is None or record["step"] < bad.step]
        if done:
            self.recorder.metrics(done)
        if bad is not None:
            raise bad
        return step_losses[last]

    def forget(self) -> None:
        """Drop the losses not looked at, and their step records (a rollback or restore puts
        another state in place)."""
        self._losses, self._pending, self._logged = [], [], []

    def validate(self) -> dict[str, float]:
        job = self.job
        if job.splits.val is None or len(job.splits.val) == 0:
            return {}
        model = job.ema if job.ema is not None else job.model
        model.eval()
        losses, sizes, rights, labels = [], [], [], 0
        move, autocast, loss_fn, device = self._move_val, self._autocast, job.loss_fn, job.device
        classification, loss_name = job.classification, self.spec.train.loss
        with torch.no_grad():
            for x, y in data.val_loader(job.splits.val, self.spec.data, self.spec.seed, self.pin, self._part):
                if move:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                size = y.shape[0]
                if not size:  # a rank's share of a batch shorter than the world
                    continue
                if autocast is None:
                    out = model(x)
                    loss = loss_fn(out, y)
                else:
                    with torch.autocast(device.type, autocast):
                        out = model(x)
                        loss = loss_fn(out, y)
                losses.append(loss)  # on the device, summed there at the end: one wait, no op a batch
                sizes.append(size)
                if classification:
                    right, n = correct_count(out, y, loss_name)
                    rights.append(right)
                    labels += n
        model.train()
        total = float((torch.stack(losses).float() * torch.tensor(sizes, device=losses[0].device)).sum()) \
            if losses else 0.0
        sums = [total, int(torch.stack(rights).sum()) if rights else 0, sum(sizes), labels]
        if self.world.size > 1:
            sums = self.world.sum(sums)
        total, correct, count, labels = sums
        found = {"val_loss": total / count}
        if job.classification:
            found["val_acc"] = correct / labels if labels else 0.0
        return found

    def end_epoch(self) -> None:
        """Validate, step an epoch scheduler, record the epoch, move to the next."""
        self.look()
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
        if self.job.ema is not None:
            record["validated"] = "ema"
        why = self._early_stop(monitored, record)
        self.recorder.metric(record)
        self.recorder.epoch_line(record, self.spec.train.epochs, self.job.total_steps)
        if why:
            self.recorder.say(why)
        p.last = metrics
        p.epoch, p.batch, p.loss_sum = p.epoch + 1, 0, 0.0

    def _early_stop(self, monitored: float | None, record: dict) -> str | None:
        """train.early_stop: count the epochs since the monitored metric last improved by
        min_delta; at patience, training ends (`finished`), the epoch's record says so, and
        so does the line returned."""
        rule, p = self.spec.train.early_stop, self.progress
        if not rule.patience or monitored is None:
            return None
        if p.mark is None or _improved(monitored, p.mark, rule.min_delta, self.spec.checkpoint.direction):
            p.mark, p.stale = monitored, 0
            return None
        p.stale += 1
        if p.stale < rule.patience:
            return None
        p.stopped = record["stopped"] = f"early stop at epoch {p.epoch + 1}"
        return (f"{p.stopped}: {self.spec.checkpoint.monitor} has not improved on {p.mark:.6g} by "
                f"{rule.min_delta:g} for {p.stale} epochs (train.early_stop.patience {rule.patience})")

    def _better(self, value: float) -> bool:
        best = self.progress.best
        if best is None or not math.isfinite(best):
            return math.isfinite(value)
        return value < best if self.spec.checkpoint.direction == "min" else value > best

    def lr(self) -> float:
        return float(self.job.optimizer.param_groups[0]["lr"])


def _improved(value: float, mark: float, min_delta: float, direction: str) -> bool:
    if not math.isfinite(value):
        return False
    if not math.isfinite(mark):
        return True
    return value < mark - min_delta if direction == "min" else value > mark + min_delta
