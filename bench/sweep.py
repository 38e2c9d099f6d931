"""A sweep's cost per trial, side by side with running the trial's job alone:

- trial made -> first step: from the daemon's driver making a trial's job (its state's
  `submitted`) to the job's first training step, against `traind run` of the same trial's
  job file from its process's start to its first step (both start a Python process that
  imports torch); the sweep's own part is the driver's tick (1 s) and the daemon's queue;
- pruner call: the daemon's time to ask the pruner about a trial (Optuna's
  `should_prune`, which reads the study from its SQLite storage), against one epoch of the
  trial's training: the share of an epoch it costs the daemon, which runs beside the
  trials (a trial never waits for it: the verdict comes as a pause request).
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from traind.daemon.home import Home
from traind.jobs.folder import STATE_FILE
from traind.jobs.metrics import read_metrics

SWEEP = """
name = "bench"
seed = 5
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Linear", 64, 10]]
[data]
samples = {samples}
[train]
epochs = {epochs}
[sweep]
trials = {trials}
parallel = 1
pruner = "median"
[sweep.space]
"optimizer.lr" = {{ float = [1e-4, 1e-2], log = true }}
"""


def _first_step_time(folder: Path) -> float:
    return next(r["time"] for r in read_metrics(folder) if r.get("kind") == "step")


def _sweep(root: Path, trials: int, samples: int, epochs: int) -> tuple[Home, list[float], list[float]]:
    """Run the sweep under a real daemon; each trial's seconds from made to first step, and its epochs' seconds."""
    home = Home(root / "home")
    daemon = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "daemon"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not home.inbox.is_dir():
            time.sleep(0.01)
        (home.inbox / "bench.toml").write_text(SWEEP.format(samples=samples, epochs=epochs, trials=trials))
        state = home.root / "sweeps" / "bench" / STATE_FILE
        deadline = time.monotonic() + 600
        while not (state.exists() and json.loads(state.read_text())["state"] == "done"):
            if time.monotonic() > deadline:
                raise TimeoutError("the bench sweep did not end in 600 s")
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
    made, epoch_seconds = [], []
    for n in range(trials):
        folder = home.job_dir(f"bench.t{n:03d}")
        submitted = json.loads((folder / STATE_FILE).read_text())["submitted"]
        made.append(_first_step_time(folder) - submitted)
        ends = [r["time"] for r in read_metrics(folder) if r.get("kind") == "epoch"]
        epoch_seconds += [b - a for a, b in zip(ends, ends[1:])]
    return home, made, epoch_seconds


def _alone(root: Path, home: Home, runs: int) -> list[float]:
    """`traind run` of trial 0's job file: its process's start to its first step."""
    from traind.daemon.sweep_cli import trial_spec_text

    path = root / "trial.json"
    path.write_text(trial_spec_text(home, "bench", 0))
    found = []
    for i in range(runs):
        folder = root / f"alone{i}"
        start = time.time()
        subprocess.run([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(folder)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=300)
        found.append(_first_step_time(folder) - start)
    return found


def _pruner_calls(home: Home, calls: int) -> float:
    """Seconds per should_prune of the daemon's kind, on the finished study."""
    from optuna.trial import Trial

    from traind.daemon.sweeps import open_study

    study = open_study(home.root / "sweeps" / "bench")
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    start = time.perf_counter()
    for i in range(calls):
        Trial(study, trials[i % len(trials)]._trial_id).should_prune()
    return (time.perf_counter() - start) / calls


def measure(quick: bool = False) -> list[dict]:
    trials, samples, epochs, runs, calls = (2, 512, 2, 1, 20) if quick else (8, 8192, 4, 5, 500)
    root = Path(tempfile.mkdtemp(prefix="traind-bench-sweep-", dir=Path(__file__).resolve().parent.parent))
    try:
        home, made, epoch_seconds = _sweep(root, trials, samples, epochs)
        alone = _alone(root, home, runs)
        pruner = _pruner_calls(home, calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours, theirs = statistics.median(made), statistics.median(alone)
    epoch = statistics.median(epoch_seconds) if epoch_seconds else float("nan")
    return [
        {"case": "sweep: trial made -> first step, p50 (s)", "traind": round(ours, 3), "baseline": round(theirs, 3),
         "ratio": round(ours / theirs, 3), "goal": "<= 1.1x + 1.5 s",
         "verdict": "met" if ours <= 1.1 * theirs + 1.5 else "missed",
         "detail": f"{trials} trials, one at a time; baseline: traind run of a trial's job file, {runs} runs "
                   "(the goal allows the driver's 1 s tick)"},
        {"case": "sweep: pruner call (ms)", "traind": round(pruner * 1e3, 2), "baseline": round(epoch * 1e3, 1),
         "ratio": round(pruner / epoch, 5), "goal": "-", "verdict": "-",
         "detail": f"should_prune on the SQLite study, {calls} calls, once per epoch per trial, in the daemon: "
                   f"the trial never waits for it; baseline: one epoch of a trial ({samples} samples)"},
    ]
