"""The switches of a GPU-box loop, each against a hand-written loop doing the same:
gradient accumulation over 4 batches, bf16 autocast on the CPU, an EMA of the weights
(torch's AveragedModel, as a hand loop would use it). The seed MLP, one save at the end on
both sides; each run in a process of its own, the sides alternating, medians compared; an
A/A control beside them. Then each again paired in this process (`bench.loop.paired`):
neighbouring runs of traind and the hand loop, their ratio taken round by round.

A hand loop reads each loss as it goes (`loss.item()`), which costs nothing on a CPU;
traind keeps the losses on the device and reads them where the loop stops anyway.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.loop import (FINAL_ONLY, MLP, _job, _save_by_hand, in_a_process, paired, run_traind, step_cost,
                        step_row)
from bench.stats import paired_row, row

SWITCHES = {"accumulate 4": "accumulate = 4", "bf16 autocast": 'precision = "bf16"', "EMA 0.999": "ema = 0.999"}
GOALS = {"accumulate 4": 0.97, "bf16 autocast": 0.97, "EMA 0.999": 0.95}


def job_text(samples: int, epochs: int, switch: str) -> str:
    return MLP.format(samples=samples, epochs=epochs, checkpoint=FINAL_ONLY).replace("[train]\n",
                                                                                     f"[train]\n{switch}\n")


def run_hand(text: str, read_each_loss: bool = True) -> tuple[float, int]:
    """The seed MLP's hand gather loop (bench/loop.py's) with the job's switch, written as
    the PyTorch docs show it: loss / N per accumulated batch; torch.autocast around the
    forward pass and loss; AveragedModel with get_ema_multi_avg_fn, updated each step and
    validated on. READ_EACH_LOSS: `loss.item()` after each batch (else never)."""
    job = _job(text)
    train, val, batch, spec = job.splits.train, job.splits.val, job.spec.data.batch_size, job.spec.train
    device = job.device
    train, val = train.to(device), val.to(device)  # on a GPU, the data there, as traind keeps it
    net, loss_fn = job.model, nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    n, dtype = spec.accumulate, torch.bfloat16 if spec.precision == "bf16" else None
    ema = None
    if spec.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True)
    steps = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as folder:
        start = time.perf_counter()
        for epoch in range(spec.epochs):
            net.train()
            total = 0.0
            batches = list(torch.randperm(len(train.x)).to(device).split(batch))
            for first in range(0, len(batches), n):
                optimizer.zero_grad()
                group = batches[first:first + n]
                for idx in group:
                    x, y = train.x[idx], train.y[idx]
                    with torch.autocast(device.type, dtype, enabled=dtype is not None):
                        loss = loss_fn(net(x), y)
                    (loss / len(group) if len(group) > 1 else loss).backward()
                    if read_each_loss:  # the usual way: a host sync per batch on a GPU
                        total += loss.item()
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(net)
                steps += 1
            model = ema if ema is not None else net
            model.eval()
            with torch.no_grad():
                val_loss = correct = 0.0
                for idx in torch.arange(len(val.x), device=device).split(batch):
                    x, y = val.x[idx], val.y[idx]
                    with torch.autocast(device.type, dtype, enabled=dtype is not None):
                        out = model(x)
                        val_loss += float(loss_fn(out, y)) * len(y)
                    correct += int((out.argmax(-1) == y).sum())
            scheduler.step()
        _save_by_hand(Path(folder) / "ckpt.pt", net, optimizer, scheduler, steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, steps


SIDES = {"traind": "run_traind", "hand": "run_hand"}
"""Each side's function, run in a process of its own per sample (bench.loop.in_a_process)."""


def measure(quick: bool = False) -> list[dict]:
    samples, epochs, processes, pairs = (2048, 1, 2, 3) if quick else (32768, 2, 10, 24)
    rows = []
    for case, switch in SWITCHES.items():
        rates = {"traind": [], "hand": [], "hand-again": []}
        for i in range(processes):  # alternating, each order as often
            order = list(rates) if i % 2 == 0 else list(rates)[::-1]
            for who in order:
                seconds, steps = in_a_process(SIDES[who.removesuffix("-again")], job_text(samples, epochs, switch),
                                              job_text(1024, 1, switch), module=__name__)
                rates[who].append(steps / seconds)
        median = {w: statistics.median(r) for w, r in rates.items()}
        noise = abs(1 - median["hand-again"] / median["hand"])
        rows.append(row(f"{case}, seed MLP, vs hand loop doing the same", median["traind"], median["hand"],
                        GOALS[case], noise, f"steps/s, {epochs} epochs of {samples} samples, median over "
                                            f"{processes} processes a side; A/A noise {noise:.1%}"))
        found = paired(job_text(samples, 1, switch), pairs, hand=run_hand)
        rows.append(paired_row(f"{case}, seed MLP, vs hand loop doing the same, paired in one process",
                               found["traind"], found["hand-again"], GOALS[case],
                               f"median over {pairs} rounds of each round's ratio of neighbouring runs (1 epoch "
                               f"of {samples} samples, validation, one save)"))
    rounds = 4 if quick else 20
    rows.append(step_row("a bf16 step in one process, seed MLP: traind's step vs the hand step under autocast",
                         step_cost(rounds, precision="bf16"), "traind-step", GOALS["bf16 autocast"], rounds))
    return rows
