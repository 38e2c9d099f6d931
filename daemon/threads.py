"""How many CPU threads a job trains with, and why that number never changes.

On a CPU a different thread count changes how sums are split, and so the result bits: the
count is part of the job, for exact resume. It is fixed when the job first starts and
recorded in its folder (THREADS_FILE); every later run of the folder, by a daemon with
other slots or by `traind run`, trains with the recorded count, whatever else runs then.

The first start picks, in this order: the job's `threads` key; the count the daemon hands
its workers (TRAIND_THREADS: its `--threads`, else an explicit OMP_NUM_THREADS, else the
machine's cores divided among its worker slots, so that two jobs at once do not fight over
the cores); an explicit OMP_NUM_THREADS (`traind run`); all cores (in a Slurm job: the
CPUs it was given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from traind.jobs.folder import THREADS_FILE
from traind.store.fs import FileSystem, write_durably

ENV = "TRAIND_THREADS"


def cores() -> int:
    """The cores this process may run on (its affinity mask: a cgroup or taskset may limit
    it); in a Slurm job, at most the CPUs Slurm gave this task (a cluster without CPU
    binding leaves the mask whole)."""
    try:
        mask = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        mask = os.cpu_count() or 1
    given = _env("SLURM_CPUS_PER_TASK")
    if given is None and (on_node := _env("SLURM_CPUS_ON_NODE")) is not None:
        given = max(1, on_node // (_env("SLURM_NTASKS_PER_NODE") or 1))
    return min(mask, given) if given else mask


def _env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def share(slots: int, override: int | None = None) -> int:
    """The threads each of a daemon's SLOTS workers gets: OVERRIDE (`--threads`), else an
    explicit OMP_NUM_THREADS, else its share of the cores (at least one)."""
    return override or _env("OMP_NUM_THREADS") or max(1, cores() // max(slots, 1))


def per_rank(processes: int) -> int:
    """The threads each of PROCESSES ranks of one job gets: this process's count
    (TRAIND_THREADS from the daemon, else as `share`) divided among them."""
    return max(1, (_env(ENV) or share(1)) // processes)


def recorded(folder: Path) -> int | None:
    try:
        n = json.loads((folder / THREADS_FILE).read_text())["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def pin(wanted: int | None, folder: Path, say: Callable[[str], None], record: bool = True) -> int:
    """Fix the job's thread count (WANTED: its `threads` key) in FOLDER, and train with it
    (each rank of a job of several: RECORD only on the one that writes the folder)."""
    import torch

    known = recorded(folder)
    n = wanted or known or _env(ENV) or _env("OMP_NUM_THREADS") or cores()
    if known is not None and n != known:
        say(f"note: threads = {n} now, {known} before: from here on results differ in their last bits from a "
            "run that kept one count")
    if n != known and record:
        write_durably(FileSystem(), folder / THREADS_FILE, json.dumps({"threads": n}).encode())
    if n > cores():
        say(f"note: {n} threads (fixed when the job first started) on {cores()} cores: kept, for exact resume")
    settle_vml()
    torch.set_num_threads(n)
    return n


VML_FUNCTIONS = ("sqrt", "rsqrt", "exp", "expm1", "log", "log1p", "log2", "log10", "sin", "cos", "tan", "asin",
                 "acos", "atan", "sinh", "cosh", "tanh", "erf", "erfc", "erfinv", "sigmoid", "lgamma", "reciprocal",
                 "trunc", "abs", "ceil", "floor", "round")
"""The unary functions `settle_vml` calls once on one thread: those of torch's ATen/cpu/vml.h
that may go to MKL's VML, and their neighbours (a call costs microseconds)."""


def settle_vml() -> None:
    """Make MKL's vector math (VML: torch's sqrt, exp, log... of float tensors on the CPU)
    give the same bits in every process, before the job's threads start.

    Measured on 2-core VMs with torch 2.13's static MKL: in some fresh processes the first
    VML call made from a multi-threaded region computes the part of the tensor given to
    the second thread with another kernel, every element of it off by an ulp or more, and
    keeps doing so for the life of the process. AdamW's `exp_avg_sq.sqrt()` is such a
    call, so a resumed run could end a few bits away from an uninterrupted one. So the
    main thread makes the first calls, alone: one `vmlGetMode()` (asking for the mode
    changes nothing), then each unary function torch may hand to VML, on one thread (the
    same kernels as any later call: no result changes, no RNG drawn). On the first host
    the mode call alone took such processes from 8 in 50 to 0 in 140; on an Intel host
    of 2026-12-07 it still let 1 in 40 through in a test run, and 1 in 300 in a probe,
    where the calls on one thread let 0 in 300 through (docs/PERFORMANCE.md, "Exact resume
    and MKL"). A torch without MKL has no VML: nothing to do."""
    import ctypes

    import torch

    try:
        mode = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).vmlGetMode
    except (OSError, AttributeError):
        return
    mode.restype = ctypes.c_uint
    mode()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.float64):
                x = torch.linspace(0.01, 0.99, 4096, dtype=dtype)
                for name in VML_FUNCTIONS:
                    getattr(torch, name)(x)
    finally:
        torch.set_num_threads(threads)
