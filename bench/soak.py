"""Kill soak: a live daemon SIGKILLed again and again, and every job still ends exactly.

    python -m bench.soak [--kills N] [--seed S] [--json OUT] [--keep]

It starts a daemon on a fresh home and feeds it job files (a few templates, many
names; one trains in two processes, DDP over gloo). Then, KILLS times, it SIGKILLs the
daemon, one of its workers or one rank of a two-process job, and lets the daemon come
back (a new daemon for a killed one; the daemon restarts a killed worker, and a job whose
rank was killed).
Jobs save every few steps and keep only the last two or three (retention removes a save
at nearly every commit), so kills meet removals as often as writes. Kill moments are
biased toward the dangerous ones: while a save is being written (a staging folder that
the live worker made; the kill lands a few ms into the commit, or into the removal of the
save it rotates out right after), right after a file lands in inbox/, or at a random time
(often while a worker starts).

At the end every job must hold, or the run fails (exit 1):
- it finished, and its final weights equal, bit for bit, those of its template run by
  `traind run` without interruption;
- every save its log acknowledged ("saved ID") or resumed from ("resumed from save ID")
  is there and verifies, or was rotated out: a newer save is there (retention keeps the
  newest); nothing was quarantined;
- `traind verify` (every job) exits 0, and each job's saves/ folder holds saves only: no staging folder,
  no half-removed save (`.deleting-`);
- every job file dropped became exactly one job: none lost, none twice, none rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from traind.jobs.folder import LOG_FILE, SAVES, STATE_FILE
from traind.store.commit import DELETING, STAGING

TEMPLATES = {
    "mlp": """
seed = {seed}
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Dropout", {{p = 0.1}}], ["Linear", 64, 10]]
[data]
samples = 4096
batch_size = 32
[optimizer]
name = "AdamW"
lr = 1e-3
[scheduler]
name = "StepLR"
step_size = 1
gamma = 0.7
[train]
epochs = 3
log_every_steps = 5
[checkpoint]
every_steps = 7
keep_last = 2
keep_best = 1
""",
    "tied": """
seed = {seed}
[model]
layers = [["Linear", 20, 32], "@shared", ["ReLU"], "@shared", ["Linear", 32, 10]]
[model.blocks]
shared = ["Linear", 32, 32]
[data]
samples = 3072
batch_size = 16
[optimizer]
name = "SGD"
lr = 0.01
momentum = 0.9
[train]
epochs = 2
grad_clip = 1.0
log_every_steps = 5
[checkpoint]
every_steps = 11
keep_last = 3
keep_best = 0
""",
}
TEMPLATES["ddp"] = TEMPLATES["mlp"].replace("samples = 4096", "samples = 2048") + """
[distributed]
processes = 2
"""  # two ranks, which the worker launches: a kill may land on the worker (their launcher) or on a rank
SAVED = re.compile(r"saved (\d+-s\d+) ")
RESUMED = re.compile(r"resumed from save (\d+-s\d+) ")
PYTHON = [sys.executable, "-m", "traind.daemon.cli"]



class Soak:
    def __init__(self, root: Path, seed: int):
        self.root, self.home, self.rng = root, root / "home", random.Random(seed)
        self.daemon: subprocess.Popen | None = None
        self.dropped: dict[str, str] = {}  # job name -> template
        self.kills = {"daemon": 0, "worker": 0, "rank": 0}
        self.ranks: set[int] = set()  # pids of ranks (of a 2-process job) among the workers found
        self.moments = {"save": 0, "intake": 0, "random": 0}
        self.in_save = 0  # kills that found a save being written
        self.removals_cut = 0  # kills that left a save half removed (a .deleting- folder), for the next start
        self.worker_in_save = 0  # of those, kills of the worker writing it (a killed daemon's worker gets
        # SIGTERM, and finishes its save before it stops)
        self.daemon_starts = 0
        self.seen: dict[tuple[int, str], float] = {}  # (worker pid, its start in ticks) -> when first seen
        self.resumed_failed = 0  # jobs the crash-loop guard failed, resumed by hand

    # processes
    def start_daemon(self) -> None:
        # two CPU slots (the two-process job takes both), one thread each: as the references train
        self.daemon = subprocess.Popen([*PYTHON, "--home", str(self.home), "daemon", "--workers", "2", "--threads", "1"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.daemon_starts += 1
        deadline = time.monotonic() + 60
        while not (self.home / "inbox").is_dir():
            assert time.monotonic() < deadline and self.daemon.poll() is None, "the daemon did not start"
            time.sleep(0.01)

    def workers(self) -> list[tuple[int, str, float]]:
        """(pid, job name, when first seen) of the daemon's live workers and the ranks they
        launched, from /proc."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                # its words: a warm worker's title is one string (setproctitle), a cold one's NUL-separated
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").split()
            except OSError:
                continue
            if (b"traind.daemon.worker" in cmd or b"traind.daemon.rank" in cmd) and str(self.home).encode() in cmd:
                try:  # pids are reused (pid_max may be 32768): know a process by its start time too
                    born = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[19]
                except OSError:
                    continue
                seen = self.seen.setdefault((int(entry.name), born), time.time())
                if b"traind.daemon.rank" in cmd:
                    self.ranks.add(int(entry.name))
                found.append((int(entry.name), cmd[-1].decode(), seen))
        return found

    # the jobs
    def drop(self, template: str) -> str:
        name = f"{template}-{len(self.dropped):04d}"
        staged = self.home / "inbox" / f".{name}.toml.tmp"
        staged.write_text(f'name = "{name}"\n' + TEMPLATES[template].format(seed=7))
        os.rename(staged, self.home / "inbox" / f"{name}.toml")
        self.dropped[name] = template
        return name

    def saving(self, workers: list[tuple[int, str, float]]) -> bool:
        """Whether one of WORKERS is writing a save: its job has a staging folder changed since
        that worker was first seen. (A staging folder left by a killed save stays until the
        next worker resumes and sweeps it; that one is not a save being written.)"""
        for _, name, since in workers:
            try:
                for entry in os.scandir(self.home / "jobs" / name / SAVES):
                    if entry.name.startswith(STAGING) and entry.stat().st_mtime >= since:
                        return True
            except OSError:
                continue
        return False

    def removing(self, names) -> bool:
        """Whether a job of NAMES has a save half removed: a kill cut its removal."""
        for name in names:
            try:
                if any(e.name.startswith(DELETING) for e in os.scandir(self.home / "jobs" / name / SAVES)):
                    return True
            except OSError:
                continue
        return False

    def unfinished(self) -> list[str]:
        left = []
        for name in self.dropped:
            try:
                state = json.loads((self.home / "jobs" / name / STATE_FILE).read_text())["state"]
            except (OSError, ValueError):
                state = None
            if state != "done":
                left.append(name)
        return left

    # one kill
    def kill_once(self) -> None:
        moment = self.rng.choices(["save", "intake", "random"], weights=[5, 2, 3])[0]
        if moment == "intake" or len(self.unfinished()) < 2:
            self.drop(self.rng.choice(list(TEMPLATES)))
        if moment == "intake":
            time.sleep(self.rng.uniform(0, 0.05))
        elif moment == "save":
            # a worker starts in about 2 s (it imports torch), then saves every few ms
            deadline, scanned, workers = time.monotonic() + 20, 0.0, []
            while time.monotonic() < deadline:
                if time.monotonic() - scanned > 0.05:  # reading /proc each ms would slow the workers
                    workers, scanned = self.workers(), time.monotonic()
                if self.saving(workers):
                    time.sleep(self.rng.uniform(0, 0.008))  # land anywhere in the commit (a save takes ms)
                    break
                time.sleep(0.001)
        else:
            time.sleep(self.rng.uniform(0, 4.0))
        workers = self.workers()
        in_save = self.saving(workers)
        if workers and self.rng.random() < 0.5:
            pid = self.rng.choice(workers)[0]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.kills["rank" if pid in self.ranks else "worker"] += 1
            self.worker_in_save += in_save
            self.removals_cut += self.removing(name for p, name, _ in workers if p == pid)
        else:
            self.daemon.kill()
            self.daemon.wait()
            self.kills["daemon"] += 1
            self.start_daemon()
        self.moments[moment] += 1
        self.in_save += in_save

    def finish(self, timeout: float) -> None:
        """Let every job end (kills faster than a worker starts may have tripped the daemon's
        crash-loop guard, which fails the job: resume those, as a user would)."""
        deadline = time.monotonic() + timeout
        while self.unfinished():
            assert time.monotonic() < deadline, f"jobs left unfinished: {self.unfinished()}"
            for name in self.unfinished():
                path = self.home / "jobs" / name / STATE_FILE
                if path.exists() and json.loads(path.read_text())["state"] == "failed":
                    subprocess.run([*PYTHON, "--home", str(self.home), "resume", name], capture_output=True)
                    self.resumed_failed += 1
            time.sleep(0.5)

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(300)


def references(root: Path) -> dict[str, dict]:
    """Each template trained by `traind run`, never interrupted: its final weights."""
    from safetensors.torch import load_file

    from traind.store.saves import list_saves

    runs = {}
    for template, text in TEMPLATES.items():  # all at once: one thread each, as the daemon's jobs train
        path = root / f"{template}.toml"
        path.write_text(f'name = "{template}"\n' + text.format(seed=7))
        runs[template] = subprocess.Popen([*PYTHON, "run", str(path), "--dir", str(root / f"ref-{template}")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          env={**os.environ, "TRAIND_THREADS": "1"})
    weights = {}
    for template, run in runs.items():
        _, err = run.communicate(timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"the reference run of {template} failed ({run.returncode}): {err.decode()[-2000:]}")
        weights[template] = load_file(list_saves(root / f"ref-{template}" / SAVES)[0][-1].path / "model.safetensors")
    return weights


def resumes(soak: Soak) -> dict:
    """How the kills spread over the jobs: resumes logged ("resumed from save ID")."""
    counts = []
    for name in soak.dropped:
        try:
            counts.append(len(RESUMED.findall((soak.home / "jobs" / name / LOG_FILE).read_text())))
        except OSError:
            counts.append(0)
    return {"resumes": sum(counts), "jobs_resumed": sum(c > 0 for c in counts), "most_resumes_of_a_job": max(counts)}


def rotated(soak: Soak) -> int:
    """Saves acknowledged and later removed by retention, over every job."""
    from traind.store.saves import list_saves

    count = 0
    for name in soak.dropped:
        folder = soak.home / "jobs" / name
        try:
            acknowledged = set(SAVED.findall((folder / LOG_FILE).read_text()))
        except OSError:
            continue
        count += len(acknowledged - {s.id for s in list_saves(folder / SAVES)[0]})
    return count


def check(soak: Soak, reference: dict[str, dict]) -> list[str]:
    import torch
    from safetensors.torch import load_file

    from traind.store.saves import QUARANTINE, list_saves, verify

    failures = []
    jobs = soak.home / "jobs"
    present = sorted(p.name for p in jobs.iterdir() if not p.name.startswith("."))
    if present != sorted(soak.dropped):
        failures.append(f"job folders {present} are not the files dropped {sorted(soak.dropped)}")
    verified = subprocess.run([*PYTHON, "--home", str(soak.home), "verify", "--json"], capture_output=True, text=True)
    if verified.returncode != 0:  # every job's every save, re-hashed, as a user's monitor would
        bad = [r for r in json.loads(verified.stdout or "[]") if not r.get("ok")]
        failures.append(f"traind verify exited {verified.returncode}: {bad or verified.stderr[-500:]}")
    rejected = soak.home / "rejected"
    if rejected.is_dir() and any(rejected.iterdir()):
        failures.append(f"rejected: {sorted(p.name for p in rejected.iterdir())}")
    for name, template in sorted(soak.dropped.items()):
        folder = jobs / name
        saves = {s.id: s for s in list_saves(folder / SAVES)[0]}
        log = (folder / LOG_FILE).read_text() if (folder / LOG_FILE).exists() else ""
        final = [s for s in saves.values() if "final" in s.kinds]
        if not final:
            failures.append(f"{name}: no final save")
            continue
        got = load_file(final[-1].path / "model.safetensors")
        want = reference[template]
        if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
            failures.append(f"{name}: final weights differ from the uninterrupted run")
        newest = max(s.seq for s in saves.values())
        for what, found in (("acknowledged", SAVED.findall(log)), ("resumed from", RESUMED.findall(log))):
            for save_id in set(found):
                if save_id in saves:
                    if verify(saves[save_id].path):
                        failures.append(f"{name}: {what} save {save_id} is corrupt")
                elif int(save_id.split("-")[0]) >= newest:
                    failures.append(f"{name}: {what} save {save_id} is lost (no newer save replaced it)")
        if (folder / SAVES / QUARANTINE).is_dir() and any((folder / SAVES / QUARANTINE).iterdir()):
            failures.append(f"{name}: a save was quarantined (a torn save was visible)")
        leftovers = sorted(p.name for p in (folder / SAVES).iterdir() if p.name not in saves and p.name != QUARANTINE)
        if leftovers:
            failures.append(f"{name}: leftovers in saves/: {leftovers}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs to deliver (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--json", type=Path, default=Path("bench/results/soak.json"), help="where to write results")
    parser.add_argument("--keep", action="store_true", help="keep the home folder for inspection")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="traind-soak-", dir=Path(__file__).resolve().parent.parent))
    started = time.monotonic()
    soak = Soak(root, args.seed)
    left = 0  # jobs not yet done after the last kill
    phases = {}  # seconds: the references, the kills, the jobs' ends after them, the checks

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - started - sum(phases.values()), 1)

    try:
        reference = references(root)
        phase("references")
        soak.start_daemon()
        for template in TEMPLATES:
            soak.drop(template)
        for i in range(args.kills):
            soak.kill_once()
            if (i + 1) % 50 == 0:
                print(f"{i + 1} kills, {len(soak.dropped)} jobs, {time.monotonic() - started:.0f} s", flush=True)
        left = len(soak.unfinished())
        phase("kills")
        try:
            soak.finish(timeout=600 + 20 * left)  # a queued job takes a few seconds; generous
        except AssertionError as e:
            failures = [str(e)]
        else:
            soak.stop()
            phase("finish")
            failures = check(soak, reference)
            phase("checks")
    finally:
        soak.stop()
    result = {"kills": sum(soak.kills.values()), "by_target": soak.kills, "by_moment": soak.moments,
              "kills_during_a_save": soak.in_save, "worker_kills_during_a_save": soak.worker_in_save,
              "removals_cut": soak.removals_cut,
              "daemon_starts": soak.daemon_starts, "jobs": len(soak.dropped),
              "jobs_by_template": {t: list(soak.dropped.values()).count(t) for t in TEMPLATES},
              "failed_jobs_resumed": soak.resumed_failed, "finished_during_kills": len(soak.dropped) - left,
              **resumes(soak), "saves_rotated_out": rotated(soak),
              "seconds": round(time.monotonic() - started, 1), "phases": phases,
              "failures": failures, "home": str(soak.home)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep and not failures:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
