"""The store, side by side with what a user would otherwise do, on one ~300 MB state
(a 25M-parameter MLP and its Adam moments), in one folder on one disk:

- stall: what training waits for per save (the snapshot copy) against a plain
  in-memory copy of the same tensors (`t.clone()`), and against a blocking
  `torch.save` + fsync, the usual recipe;
- persist: bytes per second of a whole save (write, hash, fsync, commit) against
  `dd if=/dev/zero bs=1M conv=fsync` of the same size;
- resume: restoring the trainer from a save against `torch.load(weights_only=True)` of
  the same state saved with `torch.save`, then `load_state_dict`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from traind.jobs import state
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs.jobfile import parse_spec
from traind.jobs.metrics import Recorder
from traind.jobs.train import Trainer
from traind.store.saves import list_saves

JOB = """
seed = 0
[model]
layers = [["Linear", 2048, 4096], ["ReLU"], ["Linear", 4096, {width}], ["ReLU"], ["Linear", {width}, 10]]
[data]
samples = 160
features = 2048
batch_size = 32
[optimizer]
name = "Adam"
[train]
epochs = 1
[checkpoint]
every_epochs = 0
every_minutes = 0
keep_last = 100  # no rotation: the persist figure is the commit alone
"""


def _trainer(width: int, folder: Path) -> tuple[Trainer, Checkpointer]:
    spec = parse_spec(JOB.format(width=width), "toml", Path("bench-save.toml"))
    trainer = Trainer(build_job(spec, "bench-save"), Recorder(folder))
    trainer.fit()  # one epoch, so the optimizer has its moments
    return trainer, Checkpointer(trainer, folder, trainer.recorder)


def _state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    model, _ = state.model_tensors(trainer.job.model)
    opt, _ = state.optimizer_tensors(trainer.job.optimizer)
    return {**{f"m/{k}": v for k, v in model.items()}, **{f"o/{k}": v for k, v in opt.items()}}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dd(path: Path, nbytes: int) -> float:
    count = max(1, nbytes >> 20)
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    path.unlink()
    return (count << 20) / seconds


def measure(quick: bool = False) -> list[dict]:
    width, reps = (1024, 2) if quick else (4096, 6)
    root = Path(tempfile.mkdtemp(prefix="traind-bench-", dir=Path(__file__).resolve().parent.parent))
    try:
        return _measure(root, width, reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(root: Path, width: int, reps: int) -> list[dict]:
    trainer, ckpt = _trainer(width, root / "job")
    tensors = _state_tensors(trainer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    stalls, copies, blocking, persists, dds, resumes, loads = [], [], [], [], [], [], []
    ckpt.save({"auto"})
    ckpt.close()  # the first save allocates the snapshot buffers; measure the steady state
    for rep in range(reps):
        copies.append(_timed(lambda: {k: t.clone() for k, t in tensors.items()}))
        if rep % 2:  # alternate which writes first, each from a clean page cache
            os.sync()
            dds.append(_dd(root / "dd.bin", nbytes))
        os.sync()
        stalls.append(_timed(lambda: ckpt.save({"auto"})))
        persists.append(nbytes / _timed(ckpt.close))  # the write behind the stall, to its commit
        if not rep % 2:
            os.sync()
            dds.append(_dd(root / "dd.bin", nbytes))
        target = root / "torch.pt"
        blocking.append(_timed(lambda: _torch_save(trainer, target)))
        save = list_saves(root / "job" / "saves")[0][-1]
        resumes.append(_timed(lambda: state.restore(trainer, save)))
        loads.append(_timed(lambda: _torch_load(trainer, target)))
        target.unlink()
    med = statistics.median
    size = f"{nbytes / 1e6:.0f} MB state, median of {reps}"
    return [
        _row("save stall vs in-memory copy (s)", med(stalls), med(copies), "<= 1.2", med(stalls) / med(copies) <= 1.2,
             size),
        _row("save stall vs torch.save+fsync (s)", med(stalls), med(blocking), "(lower is better)", None, size),
        _row("persist throughput vs dd conv=fsync (MB/s)", med(persists) / 1e6, med(dds) / 1e6, ">= 0.9",
             med(persists) / med(dds) >= 0.9, size),
        _row("resume load vs torch.load weights_only (s)", med(resumes), med(loads), "(lower is better)", None, size),
    ]


def _torch_save(trainer: Trainer, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save({"model": trainer.job.model.state_dict(), "optimizer": trainer.job.optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(trainer: Trainer, path: Path) -> None:
    loaded = torch.load(path, weights_only=True)
    trainer.job.model.load_state_dict(loaded["model"])
    trainer.job.optimizer.load_state_dict(loaded["optimizer"])


def _row(case: str, ours: float, theirs: float, goal: str, met: bool | None, detail: str) -> dict:
    ratio = ours / theirs
    verdict = "-" if met is None else "met" if met else "missed"
    return {"case": case, "traind": round(ours, 4), "baseline": round(theirs, 4), "ratio": round(ratio, 3),
            "goal": goal, "verdict": verdict, "detail": detail}
