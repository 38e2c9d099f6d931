"""Instructions a step, counted: the seed MLP's step by traind against the hand gather step
of bench/loop.py, under valgrind's callgrind, which counts every instruction a process
executes. A count does not move with the VM's speed or a process's luck: a whole process
counts the same to about 0.05%, and a side's instructions a step, the difference of two
such counts, to within about 0.7% (the garbage collector's runs falling at other points,
by docs/PERFORMANCE.md's reading). So it shows what traind adds to a step where the timed
rows, whose noise is a point or two, cannot. It does not show how fast those instructions
run (the caches, the memory they touch): the timed rows stay the ones the goals judge.

A count is of a whole process under callgrind (one thread, PYTHONHASHSEED=0): the job
built, a warm-up epoch of each side, then EPOCHS epochs of one side; a third process stops
after the warm-up, and a side's count less that one, over its steps, is its instructions
a step. The clock's looks are off in all three: under valgrind a step takes some fifty
times as long, so the clock would look every few steps, which no real run does.

valgrind hides AVX-512 from the process, so torch runs its AVX2 kernels there: the hand
step counts more instructions than it executes natively on a CPU with AVX-512 (and bf16,
converted to fp32 by those kernels, many more), so the ratio is a lower bound of the native
one. What traind adds to a step, its Python and bookkeeping, does not depend on the kernels.

Needs valgrind (Debian's `valgrind` package); without it the rows say so.

    python -m bench instructions            # the rows (about 9 minutes on two cores)
    python -m bench.instructions SIDE PRECISION EPOCHS   # one process's work (what is counted)
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("none", "hand", "traind")
GOAL = 1.03
"""traind's instructions a step at most this many times the hand step's (the work that
would cost the timed step row its 0.97)."""


def instructions(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run COMMAND under callgrind; the instructions it executed (every thread of it), and
    its standard output."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} under callgrind failed:\n{done.stderr[-2000:]}")
        found = re.search(r"^(?:totals|summary):\s*(\d+)", out.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no instruction count in callgrind's output {out}")
        return int(found.group(1)), done.stdout


def count(side: str, precision: str, epochs: int) -> tuple[int, int]:
    """(instructions, steps) of a process training SIDE ("none": only the warm-up) for EPOCHS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    total, out = instructions([sys.executable, "-m", "bench.instructions", side, precision, str(epochs)], env)
    return total, int(out.split()[-1])


def per_step(precision: str, epochs: int) -> dict[str, float]:
    """Instructions a step of the hand step and of traind's, each less the warm-up's process."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(SIDES, pool.map(lambda side: count(side, precision, epochs), SIDES)))
    base = counts["none"][0]
    return {side: (counts[side][0] - base) / counts[side][1] for side in ("hand", "traind")}


def measure(quick: bool = False) -> list[dict]:
    from bench.stats import row

    if shutil.which("valgrind") is None:
        return [{"case": "instructions a step, seed MLP: traind vs the hand gather step", "traind": "-",
                 "baseline": "-", "ratio": "-", "goal": f"<= {GOAL}", "verdict": "-",
                 "detail": "not counted: valgrind is not installed (apt-get install valgrind)"}]
    rows, epochs = [], 1 if quick else 3
    for precision in ("fp32",) if quick else ("fp32", "bf16"):
        started = time.monotonic()
        found = per_step(precision, epochs)
        rows.append(row(f"instructions a step, seed MLP ({precision}): traind's step vs the hand gather step",
                        found["traind"], found["hand"], GOAL, 0.0,
                        f"callgrind, one thread, {epochs} epochs of 103 steps a side after a warm-up, less a "
                        f"process that stops after it ({time.monotonic() - started:.0f} s)", higher=False))
    return rows


def _child(side: str, precision: str, epochs: int) -> int:
    """Build the seed MLP's job (8,192 samples: 103 steps an epoch, no validation), train a
    warm-up epoch by hand and one by traind, then EPOCHS epochs of SIDE; the steps trained
    after the warm-up."""
    from bench.loop import hand_epoch, step_job, trainer_epoch
    from traind.jobs import train
    from traind.jobs.metrics import Recorder
    from traind.jobs.train import Trainer

    train.LOOK_SECONDS = math.inf
    job = step_job(8192, precision)
    autocast = precision == "bf16"
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        recorder = Recorder(Path(folder))
        recorder.keep_until(0, 0)
        trainer = Trainer(job, recorder)
        hand_epoch(job, autocast)
        trainer_epoch(trainer)
        run = {"none": lambda: 0, "hand": lambda: hand_epoch(job, autocast),
               "traind": lambda: trainer_epoch(trainer)}
        steps = sum(run[side]() for _ in range(epochs))
        recorder.close()
    return steps


if __name__ == "__main__":
    print(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
