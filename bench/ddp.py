"""Two processes: a traind job of `processes = 2` against a hand-written torchrun DDP
script doing the same work (the seed MLP, the same global batch split between two gloo
ranks, AdamW and StepLR, validation each epoch reduced over the ranks) and saving at the
same cadence the usual way (rank 0: `torch.save` of the state dicts and RNG, fsync,
rename, each epoch).

Both start as users start them (`traind run`, which launches its ranks through torch's
agent; `torchrun --standalone --nproc-per-node 2`), with one thread per rank. Each is
timed inside, from its first step to its last save committed, so that the interpreter's
and the launcher's start-up (the same imports on both sides) does not hide the loop's
ratio. The series run interleaved, in rotated order, and compare by their medians.

    python bench/ddp.py hand JOB_FILE OUT_JSON     (what torchrun runs: the baseline)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loop import MLP
from bench.stats import row, series

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIND_TENSORBOARD": "0"}  # TensorBoard's cost: bench/loop.py


def job_text(samples: int, epochs: int) -> str:
    return MLP.format(samples=samples, epochs=epochs, checkpoint="every_minutes = 0") + \
        "[distributed]\nprocesses = 2\n"


def run_traind(text: str) -> tuple[float, int]:
    """`traind run` of TEXT: seconds from the first step to the final save's commit, and steps."""
    from traind.jobs.metrics import read_metrics
    from traind.store.commit import MANIFEST
    from traind.store.saves import list_saves

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        path, folder = Path(tmp) / "ddp.toml", Path(tmp) / "run"
        path.write_text(text)
        subprocess.run([str(BIN / "traind"), "run", str(path), "--dir", str(folder)], env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
        records = read_metrics(folder)
        start = next(r["time"] for r in records if r["kind"] == "start")
        committed = (list_saves(folder / "saves")[0][-1].path / MANIFEST).stat().st_mtime  # written last
        steps = max(r["step"] for r in records if r["kind"] == "epoch")
    return committed - start, steps


def run_hand(text: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        path, out = Path(tmp) / "ddp.toml", Path(tmp) / "out.json"
        path.write_text(text)
        subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", __file__, "hand", str(path),
                        str(out)], env={**ENV, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = json.loads(out.read_text())
    return found["seconds"], found["steps"]


def hand(job_path: str, out_path: str) -> None:
    """The baseline, as one writes it by hand: one rank of a torchrun DDP loop."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from traind.jobs.build import build_job
    from traind.jobs.jobfile import load_job

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    jf = load_job(Path(job_path))
    job = build_job(jf.spec, jf.name)  # the same model and data as traind's (taken before training)
    train, val, batch = job.splits.train, job.splits.val, job.spec.data.batch_size
    net = DistributedDataParallel(job.model)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(job.model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    checkpoint = Path(out_path).with_name("ckpt.pt")
    steps = 0
    start = time.perf_counter()
    for epoch in range(job.spec.train.epochs):
        order = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(epoch))
        net.train()
        for idx in order.split(batch):
            mine = idx.tensor_split(size)[rank]
            optimizer.zero_grad()
            loss = loss_fn(net(train.x[mine]), train.y[mine])
            loss.backward()
            optimizer.step()
            seen = loss.detach().reshape(1)
            dist.all_reduce(seen)  # the loss as the world saw it (logged, and checked)
            steps += 1
        net.eval()
        with torch.no_grad():
            sums = torch.zeros(3, dtype=torch.float64)
            for idx in torch.arange(len(val.x)).split(batch):
                mine = idx.tensor_split(size)[rank]
                out = job.model(val.x[mine])
                sums += torch.tensor([float(loss_fn(out, val.y[mine])) * len(mine),
                                      int((out.argmax(-1) == val.y[mine]).sum()), len(mine)], dtype=torch.float64)
            dist.all_reduce(sums)
        scheduler.step()
        if rank == 0:
            tmp = checkpoint.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                torch.save({"model": job.model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": steps}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint)
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"seconds": time.perf_counter() - start, "steps": steps}))
    dist.destroy_process_group()


def measure(quick: bool = False) -> list[dict]:
    samples, epochs, reps = (2048, 2, 2) if quick else (32768, 3, 6)
    text = job_text(samples, epochs)
    rates = series({"traind": lambda: run_traind(text), "hand-torchrun": lambda: run_hand(text),
                     "hand-torchrun-again": lambda: run_hand(text)}, reps)
    median = {w: statistics.median(r) for w, r in rates.items()}
    noise = abs(1 - median["hand-torchrun-again"] / median["hand-torchrun"])
    return [row("2-process DDP job (gloo, CPU) vs hand torchrun DDP script", median["traind"],
                median["hand-torchrun"], 0.97, noise,
                f"steps/s, first step to last save, {epochs} epochs of {samples} samples, a save per epoch, "
                f"median of {reps}; A/A noise {noise:.1%}")]


if __name__ == "__main__" and sys.argv[1:2] == ["hand"]:
    hand(*sys.argv[2:4])
