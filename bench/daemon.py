"""The daemon, side by side with `traind run`:

- latency: from a job file landing in inbox/ (renamed in there, as `traind submit` does) to
  the job's first training step, with warm workers (forked from the daemon's template,
  which imported torch once) and with --cold (a new Python per job), against `traind run`
  of the same file from its start to its first step (it imports torch);
- resume: from `traind resume NAME` of a job a warm daemon paused to its first step,
  against `traind run` of a folder holding a save, from its start to its first resumed
  step;
- intake: 10,000 files renamed into inbox/ at once, to their 10,000 job folders, by a
  daemon that starts no job (`--workers 0`), against validating the same files in-process
  (the work no intake can skip), per file;
- `ls`: `traind ls --json` with 10,000 job folders, as a user runs it (a new process),
  the first time (building the index) and after;
- `saves`: `traind saves NAME --json` of a job with 1,000 saves;
- two jobs at once: a daemon with two worker slots training two CPU jobs side by side
  (each with its share of the cores, as traind gives them), against the same two one
  after the other (one slot, every core each), and against two at once each taking every
  core (what traind did before it shared them: the threads fight over the cores).
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
from traind.daemon.jobstate import JobRecord, JobState
from traind.jobs.folder import METRICS_FILE, SAVES, SPEC_FILE, STATE_FILE
from traind.store.retention import Policy
from traind.store.saves import list_saves
from traind.store.store import SaveStore

JOB = """
name = "{name}"
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Linear", 64, 10]]
[data]
samples = 512
[train]
epochs = 1
log_every_steps = 1
"""


WIDE = """
name = "{name}"
seed = 1
[model]
layers = [["Linear", 20, 256], ["ReLU"], ["Linear", 256, 10]]
[data]
samples = 8192
batch_size = 256
[train]
epochs = {epochs}
"""


def _first_step(folder: Path, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    metrics = folder / METRICS_FILE
    while time.monotonic() < deadline:
        if metrics.exists() and '"kind": "step"' in metrics.read_text():
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError(f"no training step in {folder} within {timeout} s")


def _done(folder: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / STATE_FILE).read_text())["state"] == "done":
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{folder} did not finish within {timeout} s")


def _daemon(home: Home, *options: str) -> subprocess.Popen:
    """A daemon on HOME (OPTIONS: its flags), serving once its inbox is there."""
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "daemon", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not home.inbox.is_dir():
        time.sleep(0.01)
    return proc


def _stop(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(120)


def _latency(root: Path, runs: int, mode: str) -> list[float]:
    """Seconds from a job file renamed into a serving daemon's inbox/ to its first step,
    RUNS jobs one after the other; MODE: --warm or --cold."""
    home = Home(root / f"home{mode}")
    daemon = _daemon(home, mode)
    ours = []
    try:
        (home.inbox / "warmup.toml").write_text(JOB.format(name="warmup"))  # a serving daemon: validator started
        _done(home.job_dir("warmup"))
        for i in range(runs):
            staged = home.inbox / f".lat{i}.toml.tmp"  # as `traind submit` delivers: a rename in the inbox
            staged.write_text(JOB.format(name=f"lat{i}"))
            os.sync()
            start = time.monotonic()
            os.rename(staged, home.inbox / f"lat{i}.toml")
            ours.append(_first_step(home.job_dir(f"lat{i}")) - start)
            _done(home.job_dir(f"lat{i}"))  # the next job must not wait for this one's slot
    finally:
        _stop(daemon)
    return ours


def _run_latency(root: Path, runs: int) -> list[float]:
    """`traind run` of the same file: its process's start to its first step."""
    theirs = []
    for i in range(runs):
        path = root / f"run{i}.toml"
        path.write_text(JOB.format(name=f"lat{i}"))
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir",
                                 str(root / f"run{i}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.append(_first_step(root / f"run{i}") - start)
        proc.wait()
    return theirs


RESUMED = JOB.replace("samples = 512", "samples = 4096").replace("epochs = 1", "epochs = 10000")


def _step_after(folder: Path, start: float, timeout: float = 120) -> float:
    """The wall time of FOLDER's first training step recorded at or after START."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = []
        try:
            for line in (folder / METRICS_FILE).read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the line being written
                if record.get("kind") == "step" and record["time"] >= start:
                    times.append(record["time"])
        except FileNotFoundError:
            pass
        if times:
            return min(times)
        time.sleep(0.005)
    raise TimeoutError(f"no training step in {folder} after {start} within {timeout} s")


def _state(folder: Path) -> str:
    try:
        return json.loads((folder / STATE_FILE).read_text())["state"]
    except (OSError, ValueError):
        return ""


def _wait_state(folder: Path, state: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _state(folder) != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder} not {state} within {timeout} s")
        time.sleep(0.01)


def _resume(root: Path, reps: int) -> tuple[list[float], list[float]]:
    """Seconds from `traind resume NAME` (its process's start) to the job's first step,
    a paused job of a warm daemon; against `traind run` of a folder holding a save, from
    its process's start to its first resumed step."""
    home = Home(root / "resume-home")
    daemon = _daemon(home, "--warm", "--workers", "1")
    folder = home.job_dir("resumed")
    ours = []
    try:
        (home.inbox / "resumed.toml").write_text(RESUMED.format(name="resumed"))
        _first_step(folder)
        for _ in range(reps):
            _cli("--home", str(home.root), "pause", "resumed")
            _wait_state(folder, "paused")
            os.sync()
            start = time.time()
            _cli("--home", str(home.root), "resume", "resumed")
            ours.append(_step_after(folder, start) - start)
        _cli("--home", str(home.root), "cancel", "resumed")
        _wait_state(folder, "cancelled")
    finally:
        _stop(daemon)
    path, alone = root / "resumed.toml", root / "resumed-run"
    path.write_text(RESUMED.format(name="resumed"))
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(alone)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list_saves(alone / SAVES)[0]:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # it saves and stops: the folder each run below resumes
    proc.wait(120)
    theirs = []
    for _ in range(reps):
        os.sync()
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(alone)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.append(_step_after(alone, start) - start)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return ours, theirs


def _two_jobs(root: Path, workers: int, epochs: int, threads: int | None = None) -> float:
    """Seconds from two jobs landing in a daemon's inbox/ to both done."""
    home = Home(root / f"two-{workers}-{threads}")
    extra = ["--threads", str(threads)] if threads else []
    daemon = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "daemon",
                               "--workers", str(workers), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not home.inbox.is_dir():
            time.sleep(0.01)
        (home.inbox / "warmup.toml").write_text(JOB.format(name="warmup"))  # serving, its template warm by its end
        _done(home.job_dir("warmup"))
        for name in ("a", "b"):
            (home.inbox / f".{name}.tmp").write_text(WIDE.format(name=name, epochs=epochs))
        start = time.monotonic()
        for name in ("a", "b"):
            os.rename(home.inbox / f".{name}.tmp", home.inbox / f"{name}.toml")
        for name in ("a", "b"):
            _done(home.job_dir(name), timeout=1800)
        return time.monotonic() - start
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)


def _ls(root: Path, jobs: int) -> tuple[float, float]:
    """`traind ls --json` as a user runs it (a new process), with 10,000 job folders: the
    first time (no index yet) and then (the index read, every folder stat'ed)."""
    home = Home(root / "many")
    spec = json.dumps({"checkpoint": {"monitor": "val_loss", "mode": None}})
    metrics = "".join(json.dumps({"kind": k, "step": s, "epoch": 1, "loss": 0.5, "train_loss": 0.5,
                                  "val_loss": 0.4, "total_steps": 100, "device": "cpu"}) + "\n"
                      for k, s in (("start", 0), ("step", 10), ("epoch", 26)))
    for i in range(jobs):  # plain writes: the durability of these made-up folders is not measured
        folder = home.job_dir(f"job{i:05d}")
        folder.mkdir(parents=True)
        (folder / SPEC_FILE).write_text(spec)
        (folder / METRICS_FILE).write_text(metrics)
        record = JobRecord(folder.name, JobState.DONE, submitted=time.time())
        (folder / STATE_FILE).write_text(json.dumps(record.as_json()))
    command = [sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "ls", "--json"]
    times = []
    for _ in range(4):
        start = time.perf_counter()
        out = subprocess.run(command, check=True, capture_output=True).stdout
        times.append(time.perf_counter() - start)
        assert len(json.loads(out)) == jobs
    return times[0], statistics.median(times[1:])


def _cli(*args: str) -> bytes:
    return subprocess.run([sys.executable, "-m", "traind.daemon.cli", *args], check=True, capture_output=True).stdout


def _saves(root: Path, count: int) -> float:
    """`traind saves NAME --json` of a job with COUNT saves (small ones: the listing is measured)."""
    home = Home(root / "saves-home")
    folder = home.job_dir("many-saves")
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(json.dumps({"checkpoint": {"monitor": "val_loss", "mode": None}}))
    (folder / STATE_FILE).write_text(json.dumps(JobRecord("many-saves", JobState.DONE).as_json()))
    store = SaveStore(folder / SAVES, Policy(keep_last=count))
    import torch

    tensors = {"w": torch.zeros(16)}
    for step in range(1, count + 1):
        seq, save_id = store.reserve(step)
        store.write(seq, save_id, {"model.safetensors": (tensors, {})}, {"state.json": {"step": step}},
                    {"step": step, "epoch": 0, "batch": 0, "kinds": ["auto"], "metrics": {"val_loss": 1.0 / step}})
    times = []
    for _ in range(4):
        start = time.perf_counter()
        out = _cli("--home", str(home.root), "saves", "many-saves", "--json")
        times.append(time.perf_counter() - start)
        assert len(json.loads(out)) == count
    return statistics.median(times[1:])


INTAKE_JOB = '[model]\nlayers = [["Linear", 4, {width}]]\n[data]\nsamples = 16\nfeatures = 4\nclasses = 2\n'


def _intake(root: Path, count: int) -> tuple[float, float]:
    """Seconds per file: a daemon taking COUNT files renamed into inbox/ at once, and
    in-process validation (parse + dry build) of a sample of the same files."""
    from traind.daemon.intake import validate
    from traind.jobs.jobfile import load_job

    home = Home(root / "intake-home")
    staging = root / "intake-staging"
    staging.mkdir()
    for i in range(count):
        (staging / f"in{i:05d}.toml").write_text(INTAKE_JOB.format(width=2 + i % 7))
    sample = sorted(staging.iterdir())[:200]
    start = time.perf_counter()
    for path in sample:
        validate(load_job(path))
    validating = (time.perf_counter() - start) / len(sample)
    daemon = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home.root), "daemon",
                               "--workers", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not home.inbox.is_dir():
            time.sleep(0.01)
        (home.inbox / "warmup.toml").write_text(INTAKE_JOB.format(width=2))  # a serving daemon
        while not (home.jobs / "warmup").is_dir():
            time.sleep(0.01)
        start = time.perf_counter()
        for path in staging.iterdir():
            os.rename(path, home.inbox / path.name)
        while sum(1 for _ in os.scandir(home.jobs)) < count + 1:
            time.sleep(0.05)
        taking = (time.perf_counter() - start) / count
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
    assert not any((home.rejected).iterdir()), "intake rejected files it should take"
    return taking, validating


def measure(quick: bool = False) -> list[dict]:
    runs, baseline_runs, jobs, files, saves = (2, 1, 1000, 300, 100) if quick else (50, 20, 10_000, 10_000, 1000)
    resumes = 2 if quick else 10
    root = Path(tempfile.mkdtemp(prefix="traind-bench-", dir=Path(__file__).resolve().parent.parent))
    try:
        ours, cold_starts = _latency(root, runs, "--warm"), _latency(root, baseline_runs, "--cold")
        theirs = _run_latency(root, baseline_runs)
        resumed, resumed_run = _resume(root, resumes)
        cold, warm = _ls(root, jobs)
        listing = _saves(root, saves)
        taking, validating = _intake(root, files)
        epochs = 2 if quick else 60  # (warm, a job starts in 0.1 s: the training must dominate)
        shared, one_by_one = _two_jobs(root, 2, epochs), _two_jobs(root, 1, epochs)
        fighting = _two_jobs(root, 2, epochs, threads=os.cpu_count() or 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    p50, p50_run, p50_cold = statistics.median(ours), statistics.median(theirs), statistics.median(cold_starts)
    p99 = statistics.quantiles(ours, n=100)[98] if len(ours) >= 20 else max(ours)
    back, back_run = statistics.median(resumed), statistics.median(resumed_run)

    def warm_goal(ours: float, theirs: float) -> str:
        return "met" if ours <= 0.5 and ours <= 0.25 * theirs else "missed"

    return [
        {"case": "inbox -> first step, warm, p50 (s)", "traind": round(p50, 3), "baseline": round(p50_run, 3),
         "ratio": round(p50 / p50_run, 3), "goal": "<= 0.5 s and <= 0.25x", "verdict": warm_goal(p50, p50_run),
         "detail": f"daemon (warm workers), {runs} jobs, vs traind run, {baseline_runs} runs"},
        {"case": "inbox -> first step, warm, p99 (s)", "traind": round(p99, 3), "baseline": round(max(theirs), 3),
         "ratio": round(p99 / max(theirs), 3), "goal": "<= 0.5 s and <= 0.25x", "verdict": warm_goal(p99, max(theirs)),
         "detail": f"{runs} jobs (with fewer than 20, the worst); baseline: traind run's worst"},
        {"case": "inbox -> first step, --cold, p50 (s)", "traind": round(p50_cold, 3), "baseline": round(p50_run, 3),
         "ratio": round(p50_cold / p50_run, 3), "goal": "<= 1.1x + 0.5 s",
         "verdict": "met" if p50_cold <= 1.1 * p50_run + 0.5 else "missed",
         "detail": f"daemon --cold (a new Python per job), {baseline_runs} jobs"},
        {"case": "resume of a paused job -> first step, warm (s)", "traind": round(back, 3),
         "baseline": round(back_run, 3), "ratio": round(back / back_run, 3), "goal": "<= 0.25x",
         "verdict": "met" if back <= 0.25 * back_run else "missed",
         "detail": f"from `traind resume` (its process's start), {resumes} times; baseline: traind run on a folder "
                   "with a save, start to first resumed step"},
        {"case": f"traind ls, {jobs} jobs (s)", "traind": round(warm, 3), "baseline": 0.3,
         "ratio": round(warm / 0.3, 3), "goal": "< 0.3 s", "verdict": "met" if warm < 0.3 else "missed",
         "detail": f"a new process each time, index built; the first ls (no index) took {cold:.2f} s"},
        {"case": f"traind saves, {saves} saves (s)", "traind": round(listing, 3), "baseline": 0.3,
         "ratio": round(listing / 0.3, 3), "goal": "< 0.3 s", "verdict": "met" if listing < 0.3 else "missed",
         "detail": "a new process each time, --json (manifests read, sizes checked)"},
        {"case": f"intake of {files} dropped files (ms per file)", "traind": round(taking * 1e3, 2),
         "baseline": round(validating * 1e3, 2), "ratio": round(taking / validating, 3), "goal": "-", "verdict": "-",
         "detail": f"{files} files renamed in at once, {1 / taking:.0f} files/s to job folders; baseline: "
                   "in-process validation of 200 of them (parse + dry build)"},
        {"case": "two CPU jobs at once (s)", "traind": round(shared, 2), "baseline": round(one_by_one, 2),
         "ratio": round(shared / one_by_one, 3), "goal": "<= 1.0", "verdict": "met" if shared <= one_by_one else "missed",
         "detail": f"2 slots, the cores shared; baseline: the same two jobs one after the other ({epochs} epochs each)"},
        {"case": "two CPU jobs at once, every core each (s)", "traind": round(fighting, 2),
         "baseline": round(one_by_one, 2), "ratio": round(fighting / one_by_one, 3), "goal": "-", "verdict": "-",
         "detail": f"--threads {os.cpu_count()}: what two jobs cost before traind shared the cores"},
    ]
