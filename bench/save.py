"""The store, side by side with what a user would otherwise do, on one ~300 MB state
(a 25M-parameter MLP and its Adam moments), in one folder on one disk:

- stall: what training waits for per save (the snapshot copy) against a plain
  in-memory copy of the same tensors (`t.clone()`), and against a blocking
  `torch.save` + fsync, the usual recipe;
- persist: bytes per second of a whole save (write, hash, fsync, commit) against
  `dd if=/dev/zero bs=1M conv=fsync` of the same size;
- resume: restoring the trainer from a save against `torch.load(weights_only=True)` of
  the same state saved with `torch.save`, then `load_state_dict`; and end to end, from
  starting `traind run` on a folder with a save to its first resumed step, against a
  hand script that starts, builds the model, `torch.load`s and takes a step;
- where a save's time goes: the stall (copy), then writing, fsync, and the rest
  (hashing, manifest, commit) behind it;
- history: what making the log and metrics.jsonl durable at each save's commit costs a
  small job saving at every step, against the same job with that fsync left out;
- memory: the peak RSS a save and a resume add, against the state's size (one snapshot
  is the budget) and against `torch.save` and `torch.load`.
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
from traind.jobs.folder import METRICS_FILE, SAVES
from traind.jobs.jobfile import parse_spec
from traind.jobs.metrics import Recorder
from traind.jobs.train import Trainer
from traind.store.fs import FileSystem
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


class TimedFS(FileSystem):
    """The store's I/O, timed: where a save's time goes."""

    def __init__(self):
        self.seconds = {"write": 0.0, "fsync": 0.0}

    def write(self, fd, data):
        start = time.perf_counter()
        super().write(fd, data)
        self.seconds["write"] += time.perf_counter() - start

    def fsync(self, fd):
        start = time.perf_counter()
        super().fsync(fd)
        self.seconds["fsync"] += time.perf_counter() - start

    def fsync_dir(self, path):
        start = time.perf_counter()
        super().fsync_dir(path)
        self.seconds["fsync"] += time.perf_counter() - start


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
    width, reps = (512, 2) if quick else (4096, 6)
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
    timed = ckpt.store.fs = TimedFS()
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
        save = list_saves(root / "job" / SAVES)[0][-1]
        resumes.append(_timed(lambda: state.restore(trainer, save)))
        loads.append(_timed(lambda: _torch_load(trainer, target)))
        target.unlink()
    med = statistics.median
    size = f"{nbytes / 1e6:.0f} MB state, median of {reps}"
    persisted = sum(nbytes / p for p in persists)  # the time of every timed save, as TimedFS summed its parts
    parts = {k: v / persisted for k, v in timed.seconds.items()}
    where = (f"copy {med(stalls):.3f} s in the training thread; behind it: write {parts['write']:.0%}, "
             f"fsync {parts['fsync']:.0%}, hashing and commit {1 - sum(parts.values()):.0%} of "
             f"{persisted / reps:.3f} s")
    ours_e2e, theirs_e2e = _resume_end_to_end(root, width, 1 if reps <= 2 else 3)
    memory = [_peak_extra(kind, width, root) for kind in ("save", "torch.save", "resume", "torch.load")]
    synced, unsynced = _history_cost(root, 2 if reps <= 2 else 5)
    return [
        _row("save stall vs in-memory copy (s)", med(stalls), med(copies), "<= 1.2", med(stalls) / med(copies) <= 1.2,
             size),
        _row("save stall vs torch.save+fsync (s)", med(stalls), med(blocking), "(lower is better)", None, size),
        _row("persist throughput vs dd conv=fsync (MB/s)", med(persists) / 1e6, med(dds) / 1e6, ">= 0.9",
             med(persists) / med(dds) >= 0.9, size),
        _row("resume load vs torch.load weights_only (s)", med(resumes), med(loads), "(lower is better)", None, size),
        _row("resume, process start to first resumed step (s)", med(ours_e2e), med(theirs_e2e), "<= 0.5",
             med(ours_e2e) / med(theirs_e2e) <= 0.5,
             f"{size}; traind run vs a hand script (torch.load); both import torch"),
        {"case": "where a save's time goes", "traind": round(persisted / reps, 4), "baseline": "-", "ratio": "-",
         "goal": "-", "verdict": "-", "detail": where},
        _row("history durable per save: a small job saving every step (s)", med(synced), med(unsynced), "<= 1.1",
             med(synced) / med(unsynced) <= 1.1,
             f"{HISTORY_STEPS} steps, a save at each, keep_last 3; against the same run without the log's and "
             f"metrics' fsyncs; median of {len(synced)}"),
        _row("peak RSS added by a save vs the state's size (MB)", memory[0] / 1e6, nbytes / 1e6, "<= 1.0 (one snapshot)",
             memory[0] <= nbytes * 1.05, f"torch.save + fsync added {memory[1] / 1e6:.0f} MB"),
        _row("peak RSS added by a resume vs the state's size (MB)", memory[2] / 1e6, nbytes / 1e6, "<= 1.0",
             memory[2] <= nbytes * 1.05, f"torch.load + load_state_dict added {memory[3] / 1e6:.0f} MB"),
    ]


RESUME_JOB = JOB.replace("epochs = 1", "epochs = 2\nlog_every_steps = 1").replace(
    "every_epochs = 0", "every_epochs = 1")

HAND_RESUME = """
import sys, time
import torch
from torch import nn
width = int(sys.argv[2])
net = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, width), nn.ReLU(), nn.Linear(width, 10))
optimizer = torch.optim.Adam(net.parameters())
loaded = torch.load(sys.argv[1], weights_only=True)
net.load_state_dict(loaded["model"])
optimizer.load_state_dict(loaded["optimizer"])
x, y = torch.randn(32, 2048), torch.randint(0, 10, (32,))
loss = nn.functional.cross_entropy(net(x), y)
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(time.time())
"""


def _resume_end_to_end(root: Path, width: int, reps: int) -> tuple[list[float], list[float]]:
    """Seconds from starting a process to its first resumed training step: `traind run` on a
    job folder holding a save at the end of epoch 1, and a hand script on a torch.save file."""
    import json
    import signal
    import sys

    job_file = root / "resume.toml"
    job_file.write_text(RESUME_JOB.format(width=width))
    folder = root / "resume"
    trainer = Trainer(build_job(parse_spec(job_file.read_text(), "toml", job_file), "resume"), Recorder(folder))
    ckpt = Checkpointer(trainer, folder, trainer.recorder)
    trainer.fit(lambda t: ckpt.boundary(t) or t.progress.epoch >= 1)  # stop after epoch 1's save
    ckpt.close()
    saved_step = trainer.progress.step
    _torch_save(trainer, root / "resume.pt")
    ours, theirs = [], []
    for _ in range(reps):
        os.sync()
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(job_file), "--dir", str(folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = None
        while first is None:
            assert proc.poll() is None, "traind run ended before its first resumed step"
            time.sleep(0.01)
            try:
                lines = (folder / METRICS_FILE).read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("kind") == "step" and r.get("step") == saved_step + 1 and r["time"] >= start:
                    first = r["time"]
        proc.send_signal(signal.SIGKILL)  # the next run resumes from the same save
        proc.wait()
        ours.append(first - start)
        os.sync()
        start = time.time()
        out = subprocess.run([sys.executable, "-c", HAND_RESUME, str(root / "resume.pt"), str(width)], check=True,
                             capture_output=True, text=True).stdout
        theirs.append(float(out.strip()) - start)
    return ours, theirs


MEMORY_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from bench.save import _memory_probe
print(_memory_probe(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
"""


def _peak_extra(kind: str, width: int, root: Path) -> int:
    """Bytes of peak RSS that one save, resume, torch.save or torch.load adds, measured in a
    fresh process (VmHWM after resetting it, less VmRSS before)."""
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(width), str(root / f"mem-{kind}"),
                          str(Path(__file__).resolve().parent.parent)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_probe(kind: str, width: int, folder: Path) -> int:
    trainer, ckpt = _trainer(width, folder)
    target = folder / "torch.pt"
    if kind == "resume":
        ckpt.save({"auto"})
        ckpt.close()
        ckpt.snapshot = None
        save = list_saves(folder / SAVES)[0][-1]
        op = lambda: state.restore(trainer, save)  # noqa: E731
    elif kind == "torch.load":
        _torch_save(trainer, target)
        op = lambda: _torch_load(trainer, target)  # noqa: E731
    elif kind == "save":
        def op():
            ckpt.save({"auto"})
            ckpt.close()
    else:
        op = lambda: _torch_save(trainer, target)  # noqa: E731
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    op()
    return _status_kb("VmHWM") - before


HISTORY_JOB = """
seed = 0
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Linear", 64, 10]]
[data]
samples = 2560
batch_size = 32
val_fraction = 0.2
[train]
epochs = 2
log_every_steps = 1
[checkpoint]
every_steps = 1
keep_last = 3
"""
HISTORY_STEPS = 128


class _Unsynced(Recorder):
    """The history as it was before it was made durable: written, never fsynced."""

    def sync(self) -> None:
        pass


def _history_cost(root: Path, reps: int) -> tuple[list[float], list[float]]:
    """Wall time of training HISTORY_JOB with its history fsynced at each save, and without."""
    spec = parse_spec(HISTORY_JOB, "toml", Path("bench-history.toml"))
    times: dict[type, list[float]] = {Recorder: [], _Unsynced: []}
    for rep in range(reps):
        for kind in (Recorder, _Unsynced) if rep % 2 else (_Unsynced, Recorder):  # alternate which goes first
            folder = root / f"history-{rep}-{kind.__name__}"
            recorder = kind(folder)
            trainer = Trainer(build_job(spec, "bench-history"), recorder)
            checkpoints = Checkpointer(trainer, folder, recorder)
            os.sync()
            start = time.perf_counter()
            trainer.fit(checkpoints.boundary)
            checkpoints.close()
            times[kind].append(time.perf_counter() - start)
            recorder.close()
            shutil.rmtree(folder)
    return times[Recorder], times[_Unsynced]


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
