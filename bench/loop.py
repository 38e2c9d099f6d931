"""Training throughput: traind's loop against a hand-written PyTorch loop doing the
same work (same model, data, batches, optimizer, scheduler, validation every epoch).

Two baselines, run interleaved with traind in one process:
- `hand`: the loop a user would write (d2l style), DataLoader over a TensorDataset,
  which collates each batch sample by sample;
- `hand-gather`: the same loop fed by one gather per batch, as traind's loader does,
  so that the ratio against it is the loop's own overhead alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traind.jobs.build import build_job
from traind.jobs.jobfile import parse_spec
from traind.jobs.metrics import Recorder
from traind.jobs.train import Trainer

JOB = """
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
"""


def _job(samples: int, epochs: int):
    spec = parse_spec(JOB.format(samples=samples, epochs=epochs), "toml", Path("bench-mlp.toml"))
    return build_job(spec, "bench-mlp")


def run_traind(samples: int, epochs: int) -> tuple[float, int]:
    job = _job(samples, epochs)
    with tempfile.TemporaryDirectory() as folder:
        recorder = Recorder(Path(folder))
        trainer = Trainer(job, recorder)
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
        recorder.close()
    return elapsed, trainer.progress.step


def run_hand(samples: int, epochs: int, gather: bool) -> tuple[float, int]:
    """The baseline: the same model and data (taken from the built job before training)."""
    job = _job(samples, epochs)
    train, val = job.splits.train, job.splits.val
    net, loss_fn = job.model, nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    if gather:
        def batches(x, y, shuffle):
            order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
            for idx in order.split(64):
                yield x[idx], y[idx]
        train_iter = lambda: batches(train.x, train.y, True)  # noqa: E731
        val_iter = lambda: batches(val.x, val.y, False)  # noqa: E731
    else:
        train_loader = DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True)
        val_loader = DataLoader(TensorDataset(val.x, val.y), batch_size=64)
        train_iter, val_iter = (lambda: iter(train_loader)), (lambda: iter(val_loader))
    steps = 0
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        total = 0.0
        for x, y in train_iter():
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        net.eval()
        with torch.no_grad():
            val_loss = correct = 0.0
            for x, y in val_iter():
                out = net(x)
                val_loss += float(loss_fn(out, y)) * len(y)
                correct += int((out.argmax(-1) == y).sum())
        scheduler.step()
    return time.perf_counter() - start, steps


def measure(quick: bool = False) -> list[dict]:
    """Rotate (and every other cycle reverse) the order of the runs, and compare medians. A second series
    of `hand-gather` runs, interleaved with the first, is an A/A control: the ratio of the
    two identical loops shows how much this machine's noise alone moves a ratio."""
    samples, epochs, reps = (4096, 3, 4) if quick else (16384, 3, 24)
    who = ["traind", "hand", "hand-gather", "hand-gather-again"]
    runs: dict[str, list[float]] = {w: [] for w in who}
    steps = {}
    run_traind(1024, 1)  # warm up allocator and kernels
    for rep in range(reps):
        order = who[rep % len(who):] + who[:rep % len(who)]  # each series in each place equally often
        for w in (order if rep // len(who) % 2 == 0 else order[::-1]):
            if w == "traind":
                seconds, n = run_traind(samples, epochs)
            else:
                seconds, n = run_hand(samples, epochs, gather=w.startswith("hand-gather"))
            runs[w].append(n / seconds)
            steps[w] = n
    assert len(set(steps.values())) == 1, f"the loops did different work: {steps}"
    median = {w: statistics.median(r) for w, r in runs.items()}
    noise = abs(1 - median["hand-gather-again"] / median["hand-gather"])
    detail = f"{steps['traind']} steps/run, median of {reps} rotated runs; A/A noise {noise:.1%}"
    rows = []
    for baseline, goal in (("hand", 0.97), ("hand-gather", 0.97)):
        ratio = median["traind"] / median[baseline]
        verdict = "met" if ratio >= goal else "within noise" if ratio >= goal - noise else "missed"
        rows.append({"case": f"loop steps/s, seed MLP, vs {baseline}", "traind": round(median["traind"], 1),
                     "baseline": round(median[baseline], 1), "ratio": round(ratio, 3), "goal": f">= {goal}",
                     "verdict": verdict, "detail": detail})
    rows.append({"case": "A/A control: hand-gather vs itself", "traind": round(median["hand-gather-again"], 1),
                 "baseline": round(median["hand-gather"], 1),
                 "ratio": round(median["hand-gather-again"] / median["hand-gather"], 3), "goal": "1.0 (noise)",
                 "verdict": "-", "detail": "two identical loops; their ratio is this run's noise floor"})
    return rows
