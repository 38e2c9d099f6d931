"""A sweep's cost per trial, side by side with running the trial's job alone, on a
100-trial sweep of a small job under a daemon with warm workers:

- trial made -> first step: from the daemon's driver making a trial's job (its state's
  `submitted`) to the job's first training step, against `traind run` of the same trial's
  job file from its process's start to its first step (it starts a Python process that
  imports torch; a trial's worker is forked from the daemon's template);
- a trial's end to the next one's first step: the study told, the next trial asked for,
  its job made and started (the driver wakes when a job ends, not at its 1 s tick);
- the daemon's CPU time per trial: the daemon's own, its validator's and its template's
  (the trials' processes excluded), against the sweep's wall time per trial;
- pruner call: the daemon's time to ask the pruner about a trial (Optuna's
  `should_prune`, which reads the study from its SQLite storage), against one epoch of the
  trial's training: the share of an epoch it costs the daemon, which runs beside the
  trials (a trial never waits for it: the verdict comes as a pause request).
"""

from __future__ import annotations

import json
import os
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


def _cpu_seconds(pid: int) -> float:
    """The CPU seconds (user + system) process PID spent itself, its children excluded."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _helpers(daemon: int) -> list[int]:
    """The daemon's own helper processes: its validator and its warm template."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == daemon:
                words = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()  # (a title: one string)
                if any(w in (b"traind.daemon.validator", b"traind.daemon.warm") for w in words):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _sweep(root: Path, trials: int, samples: int, epochs: int) -> dict:
    """Run the sweep under a real daemon (warm workers): each trial's seconds from made to
    first step, from the trial before it ending to its first step, its epochs' seconds;
    the CPU seconds of the daemon and its helpers over the sweep, and its wall seconds."""
    home = Home(root / "home")
    daemon = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "daemon"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not home.inbox.is_dir():
            time.sleep(0.01)
        deadline = time.monotonic() + 60
        while len(_helpers(daemon.pid)) < 2 and time.monotonic() < deadline:  # validator and template up
            time.sleep(0.05)
        helpers = _helpers(daemon.pid)
        cpu = sum(_cpu_seconds(pid) for pid in (daemon.pid, *helpers))
        started = time.time()
        (home.inbox / "bench.toml").write_text(SWEEP.format(samples=samples, epochs=epochs, trials=trials))
        state = home.root / "sweeps" / "bench" / STATE_FILE
        deadline = time.monotonic() + 1800
        while not (state.exists() and json.loads(state.read_text())["state"] == "done"):
            if time.monotonic() > deadline:
                raise TimeoutError("the bench sweep did not end in 1800 s")
            time.sleep(0.1)
        wall = time.time() - started
        cpu = sum(_cpu_seconds(pid) for pid in (daemon.pid, *helpers)) - cpu
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
    made, gaps, epoch_seconds, ended = [], [], [], None
    for n in range(trials):
        folder = home.job_dir(f"bench.t{n:03d}")
        submitted = json.loads((folder / STATE_FILE).read_text())["submitted"]
        first = _first_step_time(folder)
        made.append(first - submitted)
        if ended is not None:
            gaps.append(first - ended)
        records = read_metrics(folder)
        ended = max(r["time"] for r in records)
        ends = [r["time"] for r in records if r.get("kind") == "epoch"]
        epoch_seconds += [b - a for a, b in zip(ends, ends[1:])]
    return {"home": home, "made": made, "gaps": gaps, "epochs": epoch_seconds, "cpu": cpu, "wall": wall,
            "helpers": len(helpers)}


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


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 20 else max(values)


def measure(quick: bool = False) -> list[dict]:
    trials, samples, epochs, runs, calls = (3, 512, 2, 1, 20) if quick else (100, 2048, 3, 10, 500)
    root = Path(tempfile.mkdtemp(prefix="traind-bench-sweep-", dir=Path(__file__).resolve().parent.parent))
    try:
        run = _sweep(root, trials, samples, epochs)
        alone = _alone(root, run["home"], runs)
        pruner = _pruner_calls(run["home"], calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    made, gaps = run["made"], run["gaps"]
    ours, theirs = statistics.median(made), statistics.median(alone)
    gap = statistics.median(gaps)
    epoch = statistics.median(run["epochs"]) if run["epochs"] else float("nan")
    per_trial = run["cpu"] / trials
    return [
        {"case": "sweep: trial made -> first step, p50 (s)", "traind": round(ours, 3), "baseline": round(theirs, 3),
         "ratio": round(ours / theirs, 3), "goal": "<= 0.25x", "verdict": "met" if ours <= 0.25 * theirs else "missed",
         "detail": f"{trials} trials, one at a time, warm workers (p99 {_p99(made):.3f} s); baseline: traind run "
                   f"of a trial's job file, process start to first step, {runs} runs"},
        {"case": "sweep: a trial's end -> the next one's first step, p50 (s)", "traind": round(gap, 3),
         "baseline": round(theirs, 3), "ratio": round(gap / theirs, 3), "goal": "-", "verdict": "-",
         "detail": f"p99 {_p99(gaps):.3f} s: told, the next trial asked for, its job made and started; "
                   f"{trials} trials of {samples} samples, {epochs} epochs, in {run['wall']:.0f} s"},
        {"case": "sweep: the daemon's CPU time per trial (s)", "traind": round(per_trial, 4),
         "baseline": round(run["wall"] / trials, 3), "ratio": round(per_trial / (run["wall"] / trials), 3),
         "goal": "-", "verdict": "-",
         "detail": f"user + system CPU of the daemon and its {run['helpers']} helpers (validator, template), "
                   "the trials' own processes excluded; baseline: wall seconds per trial"},
        {"case": "sweep: pruner call (ms)", "traind": round(pruner * 1e3, 2), "baseline": round(epoch * 1e3, 1),
         "ratio": round(pruner / epoch, 5), "goal": "-", "verdict": "-",
         "detail": f"should_prune on the SQLite study, {calls} calls, once per epoch per trial, in the daemon: "
                   f"the trial never waits for it; baseline: one epoch of a trial ({samples} samples)"},
    ]
