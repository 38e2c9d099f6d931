"""On a CUDA device (scripts/gpu-check runs this where one is lent): throughput of bf16
jobs against a hand loop doing the same; what a step's host sync costs (traind reading
every loss at once against its default, and a hand loop with and without `loss.item()`);
and a save's stall against a plain device-to-host copy of the same state. Interleaved in
rotated order, medians compared, with an A/A control."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import loop, switches
from bench.stats import row, series
from traind.jobs import train


def seed_mlp(samples: int, epochs: int, device: str = "cuda") -> str:
    """The seed MLP of bench/loop.py on the GPU, in bf16: a small step, where launch and sync costs show."""
    return switches.job_text(samples, epochs, 'precision = "bf16"').replace("seed = 0", f'seed = 0\ndevice = "{device}"')


def mid_mlp(samples: int, epochs: int, device: str = "cuda") -> str:
    """The seed MLP's job widened to 4.7M parameters (256-2048-2048-10, batch 256), in bf16:
    enough work per step for the GPU to matter."""
    text = seed_mlp(samples, epochs, device)
    for old, new in (('name = "bench-mlp"', 'name = "bench-mid"'),
                     ('layers = [["Linear", 20, 256], ["ReLU"], ["Linear", 256, 10]]',
                      'layers = [["Linear", 256, 2048], ["ReLU"], ["Linear", 2048, 2048], ["ReLU"], ["Linear", 2048, 10]]'),
                     ("features = 20", "features = 256"), ("batch_size = 64", "batch_size = 256")):
        assert old in text, old
        text = text.replace(old, new)
    return text


def run_traind_every_loss(text: str) -> tuple[float, int]:
    """traind reading each step's loss as it comes (a look, so a host sync, every step)."""
    saved = train.LOOK_EVERY
    train.LOOK_EVERY = 1
    try:
        return loop.run_traind(text)
    finally:
        train.LOOK_EVERY = saved


def save_stall(samples: int, device: str = "cuda", width: int = 4096) -> tuple[float, float]:
    """Median stall of traind's saves of the ~100 MB BIG job on the GPU, and the median
    time of `.to("cpu")` of the same tensors (model and optimizer state), synchronised."""
    text = loop.BIG.format(samples=samples).replace("seed = 0", f'seed = 0\ndevice = "{device}"') \
        .replace("4096", str(width))
    job = loop._job(text)
    with tempfile.TemporaryDirectory() as folder:
        from traind.jobs.checkpoint import Checkpointer
        from traind.jobs.metrics import Recorder
        from traind.jobs.train import Trainer

        recorder = Recorder(Path(folder))
        trainer = Trainer(job, recorder)
        checkpoints = Checkpointer(trainer, Path(folder), recorder)
        trainer.fit(checkpoints.boundary)
        checkpoints.close()
        recorder.close()
        stalls = [json.loads(line)["stall_s"] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "save"' in line][1:]  # the first save allocates its pinned buffers
    tensors = [*job.model.state_dict().values(),
               *(v for s in job.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())]
    sync = torch.cuda.synchronize if job.device.type == "cuda" else (lambda: None)
    copies = []
    for _ in range(max(3, len(stalls))):
        sync()
        start = time.perf_counter()
        [t.to("cpu", copy=True) for t in tensors]
        sync()
        copies.append(time.perf_counter() - start)
    return statistics.median(stalls), statistics.median(copies)


def measure(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"case": "GPU rows", "traind": "-", "baseline": "-", "ratio": "-", "goal": "-", "verdict": "-",
                 "detail": "no CUDA device here: scripts/gpu-check runs them on a GPU machine"}]
    samples, epochs, reps = (4096, 1, 2) if quick else (32768, 2, 5)
    small, mid = seed_mlp(samples, epochs), mid_mlp(samples, epochs)
    for text in (seed_mlp(2048, 1), mid_mlp(2048, 1)):  # warm up kernels and the allocator
        loop.run_traind(text)
        switches.run_hand(text)
    rows = []
    name = torch.cuda.get_device_name()
    for label, text in (("seed MLP", small), ("4.7M MLP", mid)):
        rates = series({"traind": lambda: loop.run_traind(text), "traind-every-loss": lambda: run_traind_every_loss(text),
                         "hand": lambda: switches.run_hand(text), "hand-again": lambda: switches.run_hand(text),
                         "hand-no-item": lambda: switches.run_hand(text, read_each_loss=False)}, reps)
        median = {w: statistics.median(r) for w, r in rates.items()}
        noise = abs(1 - median["hand-again"] / median["hand"])
        detail = f"steps/s on {name}, bf16, {epochs} epochs of {samples} samples, median of {reps}; A/A noise {noise:.1%}"
        rows += [row(f"bf16 {label} on the GPU vs hand loop (loss.item() each step)", median["traind"],
                     median["hand"], 0.97, noise, detail),
                 row(f"per-step sync, {label}: traind's default vs a look every step", median["traind"],
                     median["traind-every-loss"], None, noise, detail),
                 row(f"per-step sync, {label}: hand loop without vs with loss.item()", median["hand-no-item"],
                     median["hand"], None, noise, detail)]
    stall, copy = save_stall(1600 if quick else 4000)
    rows.append(row("save stall of a ~100 MB state vs a plain device-to-host copy of it", stall * 1e3, copy * 1e3,
                    None, 0.0, f"ms, median over the saves of a run on {name}; pinned buffers reused from save to save",
                    higher=False))
    return rows
