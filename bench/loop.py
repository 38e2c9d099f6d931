"""Training throughput: traind's loop, saving at the job's cadence, against a hand-written
PyTorch loop doing the same work (same model, data, batches, optimizer, scheduler,
validation every epoch) and saving at the same steps the usual way: `torch.save` of the
state dicts and RNG state to a temporary file, fsync, rename.

traind runs as `traind run` does (Trainer + Checkpointer in a job folder), without the
interpreter's start-up. Each sample of the seed MLP's series is a run in a fresh
interpreter of its own (after a warm-up run there): on this kind of VM one process's
speed differs from the next one's by tens of percent, more than any effect measured
here, and a ratio taken inside one process carries that luck on both sides unequally.
The series run interleaved, in rotated order, and are compared by their medians:

- seed MLP (20-256-10, ~1 MB of state), the default cadence (a save each epoch), against
  `hand` (the idiomatic `DataLoader(TensorDataset)` loop, which collates each batch
  sample by sample) and `hand-gather` (one gather per batch, as traind feeds itself, so
  that the ratio is the loop's and the saves' own cost). `hand-gather-again` is an A/A
  control: the same loop twice, whose ratio is this run's noise floor.
- the same MLP saving only its final save: the default cadence's overhead.
- the same MLP writing TensorBoard event files: their cost on the step path.
- a ~100 MB state (an 8.4M-parameter MLP and its AdamW moments) saved every 20 steps:
  traind's saves run behind training, the hand loop's block it.
- PyTorch Lightning with ModelCheckpoint on the seed MLP, where it is installed
  (`pip install -e .[bench]`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traind.jobs import data
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs.jobfile import parse_spec
from traind.jobs.metrics import Recorder, read_metrics, tensorboard_available
from traind.jobs.train import Trainer

from bench.stats import paired_row, row, series

MLP = """
name = "bench-mlp"
seed = 0
[model]
layers = [["Linear", 20, 256], ["ReLU"], ["Linear", 256, 10]]
init = {{ weight = "xavier_uniform", bias = "zeros" }}
[data]
samples = {samples}
features = 20
classes = 10
batch_size = 64
[optimizer]
name = "AdamW"
lr = 1e-3
weight_decay = 0.01
[scheduler]
name = "StepLR"
step_size = 2
gamma = 0.5
[train]
epochs = {epochs}
log_every_steps = 10
[checkpoint]
{checkpoint}
"""
DEFAULT_CADENCE = ""  # every epoch, every 10 minutes, and best: one save per epoch here
FINAL_ONLY = "every_epochs = 0\nevery_minutes = 0\nkeep_best = 0"

BIG = """
name = "bench-big"
seed = 0
[model]
layers = [["Linear", 1024, 4096], ["ReLU"], ["Linear", 4096, 1024]]
[data]
samples = {samples}
features = 1024
classes = 1024
batch_size = 64
[optimizer]
name = "AdamW"
lr = 1e-3
weight_decay = 0.01
[scheduler]
name = "StepLR"
step_size = 2
gamma = 0.5
[train]
epochs = 1
log_every_steps = 10
[checkpoint]
every_steps = 20
every_epochs = 0
every_minutes = 0
keep_best = 0
"""


def _job(text: str):
    spec = parse_spec(text, "toml", Path("bench.toml"))
    return build_job(spec, spec.name or "bench")


STALLS: list[float] = []  # per run of run_traind: the share of its time its training thread spent in saves


def run_traind(text: str, tensorboard: bool = False) -> tuple[float, int]:
    """Train the job in a fresh job folder, saving as its policy says; the time runs until
    the final save is committed. Appends the share of that time spent in saves (snapshot
    copies and waits for the previous write: a save's stall_s, which holds its waited_s)
    to STALLS."""
    job = _job(text)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        recorder = Recorder(Path(folder), tensorboard=tensorboard)
        recorder.keep_until(0, 0)
        trainer = Trainer(job, recorder)
        checkpoints = Checkpointer(trainer, Path(folder), recorder)
        start = time.perf_counter()
        trainer.fit(checkpoints.boundary)
        checkpoints.close()
        elapsed = time.perf_counter() - start
        recorder.close()
        saves = [r for r in read_metrics(Path(folder)) if r.get("kind") == "save"]
        STALLS.append(sum(r["stall_s"] for r in saves) / elapsed)
    return elapsed, trainer.progress.step


def run_traind_tensorboard(text: str) -> tuple[float, int]:
    return run_traind(text, tensorboard=True)


def run_hand_loader(text: str) -> tuple[float, int]:
    return run_hand(text, gather=False)


def run_hand_gather(text: str) -> tuple[float, int]:
    return run_hand(text, gather=True)


def in_a_process(function: str, text: str, warmup: str, module: str = "bench.loop") -> tuple[float, int]:
    """One sample: MODULE's FUNCTION (text -> (seconds, steps)) run on WARMUP, then on
    TEXT, in a fresh interpreter; (seconds, steps) of the second run. A run of traind's
    appends its time in saves to STALLS here."""
    code = ("import importlib, json, sys; from bench import loop; "
            "f = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); f(sys.argv[4]); "
            "n = len(loop.STALLS); seconds, steps = f(sys.argv[3]); "
            "stall = loop.STALLS[-1] if len(loop.STALLS) > n else None; "
            "print(json.dumps({'seconds': seconds, 'steps': steps, 'stall': stall}))")
    done = subprocess.run([sys.executable, "-c", code, module, function, text, warmup],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} in a process of its own failed:\n{done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found["stall"] is not None:
        STALLS.append(found["stall"])
    return found["seconds"], found["steps"]


def _save_by_hand(path: Path, net, optimizer, scheduler, steps: int) -> None:
    """The usual safe-ish recipe: torch.save to a temporary file, fsync, rename."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": steps}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_hand(text: str, gather: bool, every_steps: int = 0) -> tuple[float, int]:
    """The baseline: the same model and data (taken from the built job before training),
    saved every EVERY_STEPS steps (0: at each epoch's end) and at the end."""
    job = _job(text)
    train, val, batch = job.splits.train, job.splits.val, job.spec.data.batch_size
    net, loss_fn = job.model, nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    if gather:
        def batches(x, y, shuffle):
            order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
            for idx in order.split(batch):
                yield x[idx], y[idx]
        train_iter = lambda: batches(train.x, train.y, True)  # noqa: E731
        val_iter = lambda: batches(val.x, val.y, False)  # noqa: E731
    else:
        train_loader = DataLoader(TensorDataset(train.x, train.y), batch_size=batch, shuffle=True)
        val_loader = DataLoader(TensorDataset(val.x, val.y), batch_size=batch)
        train_iter, val_iter = (lambda: iter(train_loader)), (lambda: iter(val_loader))
    epochs = job.spec.train.epochs
    steps = 0
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        path = Path(folder) / "ckpt.pt"
        start = time.perf_counter()
        for epoch in range(epochs):
            net.train()
            total = 0.0
            for i, (x, y) in enumerate(train_iter()):
                optimizer.zero_grad()  # (the tutorials' order: before the forward pass)
                loss = loss_fn(net(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
                if every_steps and steps % every_steps == 0 and i + 1 < job.steps_per_epoch:
                    _save_by_hand(path, net, optimizer, scheduler, steps)
            net.eval()
            with torch.no_grad():
                val_loss = correct = 0.0
                for x, y in val_iter():
                    out = net(x)
                    val_loss += float(loss_fn(out, y)) * len(y)
                    correct += int((out.argmax(-1) == y).sum())
            scheduler.step()
            if not every_steps or epoch + 1 == epochs:
                _save_by_hand(path, net, optimizer, scheduler, steps)
        elapsed = time.perf_counter() - start
    return elapsed, steps


def save_cost(rounds: int, steps: int = 2000, every: int = 200) -> tuple[float, float]:
    """Milliseconds of training lost per save of the seed MLP, in this process: STEPS
    hand-written steps on one batch with a save every EVERY steps, by traind (the snapshot,
    then the write on its own thread) and by hand (`torch.save` + fsync, inline), each
    against the same steps without saves right before it; the medians over ROUNDS."""
    job = _job(MLP.format(samples=4096, epochs=1, checkpoint=FINAL_ONLY))
    net, optimizer, loss_fn = job.model, job.optimizer, job.loss_fn
    x, y = job.splits.train.x[:64].clone(), job.splits.train.y[:64].clone()
    lost: dict[str, list[float]] = {"traind": [], "hand": []}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        recorder = Recorder(Path(folder))
        trainer = Trainer(job, recorder)
        checkpoints = Checkpointer(trainer, Path(folder), recorder)

        def train(save) -> float:
            start = time.perf_counter()
            for i in range(1, steps + 1):
                loss = loss_fn(net(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()
                if save is not None and i % every == 0:
                    save(i)
            checkpoints.writer.wait()
            return time.perf_counter() - start

        def traind_save(i: int) -> None:
            trainer.progress.step += 1
            checkpoints.save({"auto"})

        def hand_save(i: int) -> None:
            _save_by_hand(Path(folder) / "ckpt.pt", net, optimizer, job.scheduler, i)

        train(traind_save)
        train(hand_save)  # both warmed: the snapshot buffers allocated, the files there
        for _ in range(rounds):
            for side, save in (("traind", traind_save), ("hand", hand_save)):
                plain = train(None)
                lost[side].append((train(save) - plain) / (steps // every) * 1e3)
        checkpoints.close()
        recorder.close()
    return statistics.median(lost["traind"]), statistics.median(lost["hand"])


def step_job(samples: int, precision: str = "fp32"):
    """The seed MLP's job of SAMPLES at train.precision PRECISION, built, its validation
    split dropped: the job whose step `step_cost` and bench/instructions.py measure."""
    job = _job(MLP.format(samples=samples, epochs=1, checkpoint=FINAL_ONLY)
               .replace("[train]\n", f'[train]\nprecision = "{precision}"\n'))
    job.splits = dataclasses.replace(job.splits, val=None)
    return job


def step_cost(rounds: int, samples: int = 16384, precision: str = "fp32") -> dict[str, float]:
    """Steps per second of the seed MLP in this process, one epoch a sample,
    the sides rotated, medians over ROUNDS: the hand gather loop's step (`hand`, and again,
    `hand-again`, this process's noise floor), an epoch of `Trainer.fit` (the batch grouping,
    the held losses and their look, the step records, the epoch's end with no validation
    split to run), and the same with the Checkpointer's boundary after each step (no save
    falls due inside the epoch). PRECISION "bf16": the job's train.precision, and the hand
    step's forward pass and loss under `torch.autocast`, as the PyTorch docs write it.
    One process, so the ratios are free of the process-to-process luck of `measure`'s
    series, and the full run's other costs (validation, saves, epoch ends) are left out."""
    job = step_job(samples, precision)
    autocast = precision == "bf16"
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        recorder = Recorder(Path(folder))
        recorder.keep_until(0, 0)
        trainer = Trainer(job, recorder)
        checkpoints = Checkpointer(trainer, Path(folder), recorder)

        def hand() -> tuple[float, int]:
            start = time.perf_counter()
            n = hand_epoch(job, autocast)
            return time.perf_counter() - start, n

        def traind(boundary) -> tuple[float, int]:
            start = time.perf_counter()
            n = trainer_epoch(trainer, boundary)  # its end without validation (no val split here)
            return time.perf_counter() - start, n

        def inside(t: Trainer) -> bool:  # the boundaries between steps (the epoch's end would save: its final)
            return t.progress.batch != 0 and checkpoints.boundary(t)

        sides = {"hand": hand, "traind-step": lambda: traind(lambda t: False),
                 "traind-step+boundary": lambda: traind(inside), "hand-again": hand}
        for run in sides.values():  # warm-up
            run()
        rates = series(sides, rounds)
        checkpoints.close()
        recorder.close()
    return {side: statistics.median(r) for side, r in rates.items()}


def hand_epoch(job, autocast: bool = False) -> int:
    """The hand gather step over one epoch of JOB's batches, traind's batch order (the
    forward pass and loss under bf16 `torch.autocast` where AUTOCAST, as the PyTorch docs
    write it), with the job's model, loss and optimizer; the steps taken."""
    net, loss_fn, optimizer, n = job.model, job.loss_fn, job.optimizer, 0
    for x, y in data.train_loader(job.splits.train, job.spec.data, job.spec.seed, 0):
        optimizer.zero_grad()
        if autocast:
            with torch.autocast("cpu", torch.bfloat16):
                loss = loss_fn(net(x), y)
        else:
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
        n += 1
    return n


def trainer_epoch(trainer: Trainer, boundary=lambda t: False) -> int:
    """One epoch of TRAINER's job, from its first batch again, through `Trainer.fit` (the
    loop's step, its held losses and their look, the epoch's end) with BOUNDARY between
    steps; the steps taken."""
    p = trainer.progress
    p.epoch, p.batch, before = 0, 0, p.step
    trainer.fit(boundary)
    return p.step - before


def step_row(case: str, cost: dict[str, float], side: str, goal: float, rounds: int) -> dict:
    """The row of SIDE of a `step_cost` reading COST (ROUNDS epochs a side) against its hand step."""
    inside = abs(1 - cost["hand-again"] / cost["hand"])
    return row(case, cost[side], cost["hand"], goal, inside,
               f"steps/s ({1e6 / cost[side]:.1f} vs {1e6 / cost['hand']:.1f} us a step), median of {rounds} epochs "
               f"a side, one process; A/A noise {inside:.1%}")


def paired(text: str, rounds: int, hand: Callable[[str], tuple[float, int]] | None = None) -> dict[str, list[float]]:
    """The whole run of TEXT (steps, validation, saves), by traind, by the hand gather
    loop (or HAND), and by that loop again (the A/A control), ROUNDS times in this
    process after a warm-up of each, the order rotated: each round's steps/s of traind and
    of the second hand run, as ratios to the same round's hand run.

    On this kind of VM the speed moves by tens of percent within seconds, in one process as
    between processes (two hand runs back to back: 0.89 to 1.33 of each other), so a ratio
    of medians over separate samples carries that drift, while a ratio of two runs a second
    apart mostly does not (this A/A stays within a few points of 1.0 where the separate
    processes' read 8 to 11%). Rounds one after another are still not independent draws,
    so the interval `stats.interval` gives them is narrower than the truth
    (docs/PERFORMANCE.md, "Looks from the clock, and readings paired in one process")."""
    hand = hand or run_hand_gather
    sides = {"hand": lambda: hand(text), "traind": lambda: run_traind(text), "hand-again": lambda: hand(text)}
    for run in sides.values():  # warm-up
        run()
    ratios: dict[str, list[float]] = {"traind": [], "hand-again": []}
    rates = series(sides, rounds)  # each list in round order
    for i in range(rounds):
        for side in ratios:
            ratios[side].append(rates[side][i] / rates["hand"][i])
    return ratios


def run_lightning(text: str) -> tuple[float, int]:
    """PyTorch Lightning on the same model and data, as its docs show it: DataLoaders over
    TensorDatasets, and ModelCheckpoint saving every epoch (save_last)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="lightning")
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    job = _job(text)
    train, val, batch = job.splits.train, job.splits.val, job.spec.data.batch_size

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.loss_fn = job.model, nn.CrossEntropyLoss()

        def training_step(self, b, i):
            return self.loss_fn(self.net(b[0]), b[1])

        def validation_step(self, b, i):
            out = self.net(b[0])
            self.log("val_loss", self.loss_fn(out, b[1]), prog_bar=False)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        trainer = L.Trainer(max_epochs=job.spec.train.epochs, default_root_dir=folder, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            num_sanity_val_steps=0,
                            callbacks=[ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_last=True)])
        loaders = (DataLoader(TensorDataset(train.x, train.y), batch_size=batch, shuffle=True),
                   DataLoader(TensorDataset(val.x, val.y), batch_size=batch))
        start = time.perf_counter()
        trainer.fit(Module(), *loaders)
        elapsed = time.perf_counter() - start
    return elapsed, trainer.global_step


def lightning_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lightning") is not None


def measure(quick: bool = False) -> list[dict]:
    samples, epochs, reps, big_samples, big_reps = (2048, 3, 2, 1600, 1) if quick else (65536, 3, 10, 8000, 4)
    # (a run of 65,536 samples takes about a second: long enough that a process's fixed costs fade)
    mlp = MLP.format(samples=samples, epochs=epochs, checkpoint=DEFAULT_CADENCE)
    bare = MLP.format(samples=samples, epochs=epochs, checkpoint=FINAL_ONLY)
    warmup = MLP.format(samples=1024, epochs=1, checkpoint=DEFAULT_CADENCE)  # the allocator and kernels warmed
    shares: list[float] = []

    def fresh(function: str, text: str = mlp):
        return lambda: in_a_process(function, text, warmup)

    def traind_default():
        result = in_a_process("run_traind", mlp, warmup)
        shares.append(STALLS[-1])
        return result

    runs = {"traind": traind_default, "traind-final-only": fresh("run_traind", bare),
            "hand": fresh("run_hand_loader"), "hand-gather": fresh("run_hand_gather"),
            "hand-gather-again": fresh("run_hand_gather")}
    if tensorboard_available():
        runs["traind-tensorboard"] = fresh("run_traind_tensorboard")
    if lightning_available():  # pip install traind[bench]
        runs["lightning"] = fresh("run_lightning")
    rates = series(runs, reps)
    median = {w: statistics.median(r) for w, r in rates.items()}
    noise = abs(1 - median["hand-gather-again"] / median["hand-gather"])
    detail = (f"steps/s, {epochs} epochs of {samples} samples, a save per epoch, median of {reps} processes a side; "
              f"A/A noise {noise:.1%}")
    rows = [row("loop + saves, seed MLP, vs hand DataLoader loop", median["traind"], median["hand"], 0.97, noise,
                detail),
            row("loop + saves, seed MLP, vs hand gather loop", median["traind"], median["hand-gather"], 0.97, noise,
                detail),
            row("A/A control: hand gather loop vs itself", median["hand-gather-again"], median["hand-gather"], None,
                noise, "two identical loops; their ratio is this run's noise floor")]
    pairs, paired_samples = (3, 2048) if quick else (24, 65536)
    found = paired(MLP.format(samples=paired_samples, epochs=1, checkpoint=DEFAULT_CADENCE), pairs)
    rows.append(paired_row("loop + saves, seed MLP, vs hand gather loop, paired in one process", found["traind"],
                           found["hand-again"], 0.97,
                           f"median over {pairs} rounds of each round's ratio of neighbouring runs (1 epoch of "
                           f"{paired_samples} samples, validation, its save waited for at the end)"))
    if "lightning" in median:
        rows.append(row("loop + saves, seed MLP, vs PyTorch Lightning + ModelCheckpoint", median["traind"],
                        median["lightning"], None, noise, detail))
    share, slowdown = statistics.median(shares), median["traind-final-only"] / median["traind"] - 1
    rows.append({"case": "checkpoint overhead, default cadence: training thread's time in saves",
                 "traind": f"{share:.2%}", "baseline": "-", "ratio": round(share, 4), "goal": "<= 1%",
                 "verdict": "met" if share <= 0.01 else "missed",
                 "detail": f"a save per {samples * 4 // 5 // 64} steps ({samples * 4 // 5 // 64 / median['traind']:.2f} s); "
                           f"end to end, saving each epoch vs only at the end: {slowdown:+.1%} (A/A noise {noise:.1%})"})
    if "traind-tensorboard" in median:
        rows.append(row("TensorBoard event files: steps/s with vs without", median["traind-tensorboard"],
                        median["traind"], None, noise, "their cost on the step path; " + detail))
    ours, theirs = save_cost(3 if quick else 9)
    rows.append({"case": "a save's cost to training, seed MLP: traind vs torch.save + fsync inline",
                 "traind": f"{ours:.2f} ms", "baseline": f"{theirs:.2f} ms", "ratio": round(ours / theirs, 2),
                 "goal": "<= 1.0", "verdict": "met" if ours <= theirs else "missed",
                 "detail": "training time lost per save, one process, a save every 200 steps; traind's write runs on "
                           "a thread of the training process, whose GIL it takes at each of its ~76 system calls"})
    cost, epochs = step_cost(4 if quick else 20), 4 if quick else 20
    for side, what in (("traind-step", "traind's step"), ("traind-step+boundary", "traind's step + boundary")):
        rows.append(step_row(f"a step in one process, seed MLP: {what} vs the hand gather step", cost, side, 0.97,
                             epochs))
    big = BIG.format(samples=big_samples)
    run_traind(warmup)  # this series runs in this process: its first sample must not pay the first-run costs
    rates = series({"traind": lambda: run_traind(big), "hand-gather": lambda: run_hand(big, True, every_steps=20)},
                   big_reps)
    ours, theirs = statistics.median(rates["traind"]), statistics.median(rates["hand-gather"])
    rows.append(row("loop + saves, ~100 MB state saved every 20 steps, vs hand gather loop", ours, theirs, 1.0, noise,
                    f"steps/s, median of {big_reps}; traind saves behind training, torch.save + fsync blocks it"))
    return rows
