"""Sweeps on Optuna (daemon/sweeps.py, jobs/sweep.py): a sweep file run by a real daemon,
its trials as jobs, pruned by a median pruner, the best one's objective as its own saves
tell it; the daemon and a trial killed mid-sweep and the study still ends with exactly
its trials, none twice, a finished one bitwise equal to the same trial run alone; a trial
asked for and never made into a job (a crash between the two) made on the next tick;
bad sweep files refused with the line and a fix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.daemon.live import Daemons, assert_equal, rows, traind, wait_for
from traind.daemon.home import Home
from traind.store.saves import list_saves

BIN = Path(sys.executable).parent
SWEEP = """
name = "sw"
seed = 3
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Linear", 64, 10]]
[data]
samples = SAMPLES
batch_size = 32
[train]
epochs = EPOCHS
[checkpoint]
every_steps = 100
[sweep]
trials = TRIALS
parallel = 2
pruner = "PRUNER"
[sweep.space]
"optimizer.lr" = { float = [1e-5, 3e-2], log = true }
"data.batch_size" = { choice = [32, 64] }
"""


def sweep_text(trials=12, pruner="median", samples=12000, epochs=6) -> str:
    return (SWEEP.replace("TRIALS", str(trials)).replace("PRUNER", pruner).replace("SAMPLES", str(samples))
            .replace("EPOCHS", str(epochs)))


def submit(home: Path, tmp_path: Path, text: str) -> None:
    path = tmp_path / "sw.toml"
    path.write_text(text)
    result = traind(home, "submit", path)
    assert result.exit_code == 0, result.output


def ended(home: Path) -> bool:
    result = traind(home, "sweep", "sw", "--json")  # exit 3 until the daemon took the file in
    return result.exit_code == 0 and json.loads(result.output)["state"] == "done"


def shown(home: Path) -> dict:
    result = traind(home, "sweep", "sw", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def pid_job(pid: int) -> str:
    """The job a daemon's worker process trains (the last word of its command line)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()[-1].decode()
    except (OSError, IndexError):
        return ""


def worker_pids(home: Path) -> dict[str, int]:
    """The daemon's worker processes of HOME, by the job each trains."""
    pids = subprocess.run(["pgrep", "-f", f"traind.daemon.worker --home {home} "], capture_output=True,
                          text=True).stdout.split()
    return {pid_job(int(pid)): int(pid) for pid in pids}


GATE = """
import os, time
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
calls = 0


def loss(output, target):
    \"\"\"Cross-entropy, held at its 21st call in this process while HERE/hold exists and
    HERE/go.PID does not (HERE/at.PID says it is held): a trial stopped mid-step.\"\"\"
    global calls
    calls += 1
    if calls == 21 and os.path.exists(os.path.join(HERE, "hold")):
        pid = os.getpid()
        open(os.path.join(HERE, f"at.{pid}"), "w").close()
        while os.path.exists(os.path.join(HERE, "hold")) and not os.path.exists(os.path.join(HERE, f"go.{pid}")):
            time.sleep(0.02)
    return F.cross_entropy(output, target)
"""


def gated(text: str, gate: Path) -> str:
    """TEXT, a sweep file whose trials' loss is GATE's (see `held`)."""
    gate.mkdir(exist_ok=True)
    (gate / "gate.py").write_text(GATE)
    return f"python_path = [{json.dumps(str(gate))}]\n" + text.replace("[train]\n", '[train]\nloss = "gate:loss"\n')


def held(home: Path, gate: Path, jobs: list[str]) -> dict[str, int]:
    """The worker pids of JOBS once each is held mid-step by GATE (its file `hold` made
    before they started): no trial of them can end, or take a request, until let go
    (`go.PID`, or `hold` removed). No signal, and no race with how fast they train."""
    def found():
        at = {pid_job(pid): pid for pid in (int(f.name[3:]) for f in gate.glob("at.*"))}
        return at if all(job in at for job in jobs) else None
    return wait_for(found, f"{', '.join(jobs)} to be held mid-step", timeout=240)


def let_go(gate: Path, pid: int | None = None) -> None:
    """Let the worker PID go on, or, with no PID, every worker: none held from then on."""
    if pid:
        (gate / f"go.{pid}").touch()
    else:
        (gate / "hold").unlink()


def state_of(home: Path, job: str) -> str:
    return rows(home).get(job, {}).get("state", "")


def wait_state(home: Path, job: str, state: str, what: str, timeout: float = 120) -> None:
    """Wait for JOB to reach STATE; failing, tell its state and its log's end."""
    try:
        wait_for(lambda: state_of(home, job) == state, what, timeout)
    except AssertionError as e:
        log = home / "jobs" / job / "log"
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"{e}: {job} is {state_of(home, job)!r}; its log ends:\n{tail}") from None


def test_a_sweep_runs_its_trials_as_jobs_prunes_the_poor_ones_and_its_best_agrees_with_its_saves(tmp_path):
    home = tmp_path / "home"
    daemons = Daemons(home)
    try:
        daemons.start("--workers", "2")
        submit(home, tmp_path, sweep_text())
        wait_for(lambda: ended(home), "the sweep to end", timeout=400)
    finally:
        daemons.close()
    found = shown(home)
    trials = found["trials"]
    assert [t["number"] for t in trials] == list(range(12)) and [t["job"] for t in trials] == \
        [f"sw.t{n:03d}" for n in range(12)]
    states = {t["job"]: t["state"] for t in trials}
    assert set(states.values()) <= {"done", "pruned"} and "pruned" in states.values(), states
    listed = rows(home)
    assert all(listed[job]["state"] == state for job, state in states.items())  # the jobs say what the study says
    for t in trials:
        if t["state"] == "pruned":  # stopped early, at a save, and kept
            assert t["study_state"] == "pruned" and t["epochs"] < 6
            assert list_saves(home / "jobs" / t["job"] / "saves")[0]
    best = found["best"]
    assert best["objective"] == min(t["objective"] for t in trials if t["state"] == "done")
    saves = json.loads(traind(home, "saves", best["job"], "--json").output)
    assert min(s["metrics"]["val_loss"] for s in saves if "val_loss" in s["metrics"]) == pytest.approx(
        best["objective"], rel=1e-12)
    assert best["params"] == json.loads((home / "jobs" / best["job"] / "trial.json").read_text())["params"]
    listed = traind(home, "ls").output.splitlines()  # the trials under a line for their sweep
    at = listed.index(next(line for line in listed if line.startswith("sweep sw: done, 12 of 12 trials: ")))
    assert sorted(line.split()[0] for line in listed[at + 1:at + 13]) == sorted(states)
    table = traind(home, "sweep", "sw").output
    assert f"*  {best['number']} " in table and "pruned" in table
    out = tmp_path / "best.safetensors"
    result = traind(home, "export", "sw", "--best", "-o", out)
    assert result.exit_code == 0 and f"the best trial of the sweep is {best['job']}" in result.output
    spec = traind(home, "sweep", "sw", "--trial", str(best["number"]), "--spec").output
    assert json.loads(spec)["optimizer"]["lr"] == best["params"]["optimizer.lr"]
    assert json.loads(spec)["data"]["batch_size"] == best["params"]["data.batch_size"]
    picture = tmp_path / "sweep.png"
    result = traind(home, "sweep", "sw", "--plot", picture)
    assert result.exit_code == 0 and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.output
    events = daemons.events()
    assert "its pruner stops it after epoch" in events and "sweep sw: done, 12 trials" in events


def test_sigkills_of_the_daemon_and_its_trials_at_random_moments_lose_nothing_and_sample_no_trial_twice(tmp_path):
    """Seven SIGKILLs at random moments (seeded), each of the daemon (started again) or of a
    running trial's worker (restarted by the daemon): the study ends with exactly its
    trials, one job each, all done; each trial a kill interrupted (and one it did not) bitwise
    equal to its job file run alone."""
    import random

    rng = random.Random(16)
    home = tmp_path / "home"
    daemons = Daemons(home)
    kills = {"daemon": 0, "worker": 0}
    killed: set[str] = set()
    try:
        daemons.start("--workers", "2")
        submit(home, tmp_path, sweep_text(trials=6, pruner="none", samples=48000, epochs=3))  # outlasts the kills
        wait_for(lambda: (home / "jobs").is_dir() and any((home / "jobs").iterdir()), "the first trial", timeout=120)
        for _ in range(7):
            time.sleep(rng.uniform(0.5, 2.5))  # (warm workers start a trial in a tenth of a second)
            if ended(home):
                break
            fresh = [pid for job, pid in worker_pids(home).items() if job not in killed]  # once each: three quick deaths fail a job
            if fresh and rng.random() < 0.5:
                pid = rng.choice(fresh)
                killed.add(pid_job(pid))
                os.kill(pid, signal.SIGKILL)
                kills["worker"] += 1
            else:
                daemons.procs[-1].kill()
                daemons.procs[-1].wait()
                kills["daemon"] += 1
                time.sleep(rng.uniform(0.0, 1.0))
                daemons.start("--workers", "2")
        if daemons.procs[-1].poll() is not None:
            daemons.start("--workers", "2")
        wait_for(lambda: ended(home), "the sweep to end", timeout=600)
    finally:
        daemons.close()
    assert kills["daemon"] >= 2 and kills["worker"] >= 1, kills
    trials = shown(home)["trials"]
    assert [t["number"] for t in trials] == list(range(6)) and all(t["state"] == "done" for t in trials), trials
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 6  # a daemon started again picks anew
    jobs = sorted(p.name for p in (home / "jobs").iterdir() if not p.name.startswith("."))
    assert jobs == [f"sw.t{n:03d}" for n in range(6)]
    interrupted = {job for job in jobs if "resumed from save" in (home / "jobs" / job / "log").read_text()}
    assert interrupted
    newest = lambda folder: load_file(list_saves(folder / "saves")[0][-1].path / "model.safetensors")  # noqa: E731
    compared = interrupted | set(sorted(set(jobs) - interrupted)[:1])  # and one that ran start to end, if any
    runs = {}  # each, its job file run alone, one thread each, all at once (the cores share them)
    for t in (t for t in trials if t["job"] in compared):
        spec = tmp_path / f"{t['job']}.json"
        spec.write_text(traind(home, "sweep", "sw", "--trial", str(t["number"]), "--spec").output)
        alone = tmp_path / f"{t['job']}-alone"
        runs[t["job"]] = subprocess.Popen([str(BIN / "traind"), "run", str(spec), "--dir", str(alone)],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    for job, proc in runs.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
        assert_equal(newest(home / "jobs" / job), newest(tmp_path / f"{job}-alone"))


def test_a_sweep_paused_holds_its_trials_and_asks_for_none_resumed_goes_on_and_cancelled_ends_them(tmp_path):
    """`traind pause SWEEP`: its running trials save and stop, no trial is asked for; a
    trial paused by hand before stays paused through the sweep's resume, which queues
    again only those the sweep's pause paused (they resume from their saves). `traind
    cancel SWEEP`: its trials are cancelled (saves kept) and told failed; it cannot resume."""
    import optuna

    home = tmp_path / "home"
    daemons = Daemons(home)
    job = lambda n: f"sw.t{n:03d}"  # noqa: E731
    gate = tmp_path / "gate"
    try:
        daemons.start("--workers", "2")
        text = gated(sweep_text(trials=3, pruner="none", samples=48000, epochs=2), gate)
        (gate / "hold").touch()
        submit(home, tmp_path, text)
        pids = held(home, gate, [job(0), job(1)])
        assert traind(home, "pause", job(0)).exit_code == 0  # by hand
        let_go(gate, pids[job(0)])
        wait_state(home, job(0), "paused", "trial 0 to pause")
        result = traind(home, "pause", "sw")
        assert result.exit_code == 0 and "sweep sw: paused" in result.output, result.output
        wait_for(lambda: f"{job(1)}: its sweep was paused: pause requested" in daemons.events(), "the sweep's pause")
        let_go(gate, pids[job(1)])
        wait_state(home, job(1), "paused", "the sweep's pause to pause trial 1")
        let_go(gate)  # none held from here on
        assert shown(home)["state"] == "paused" and sorted(rows(home)) == [job(0), job(1)]  # none asked for
        assert (home / "jobs" / job(1) / "sweep.paused").exists() and not (home / "jobs" / job(0) / "sweep.paused").exists()
        assert traind(home, "resume", "sw").exit_code == 0
        wait_state(home, job(1), "done", "trial 1 to go on and end")
        assert state_of(home, job(0)) == "paused" and shown(home)["state"] == "running"
        assert "resumed from save" in (home / "jobs" / job(1) / "log").read_text()
        assert traind(home, "resume", job(0)).exit_code == 0
        wait_for(lambda: ended(home), "the sweep to end")
        assert [t["state"] for t in shown(home)["trials"]] == ["done"] * 3

        for f in gate.glob("*.*"):
            if f.name != "gate.py":
                f.unlink()
        (gate / "hold").touch()
        submit(home, tmp_path, text.replace('"sw"', '"sx"'))
        held(home, gate, ["sx.t000", "sx.t001"])
        result = traind(home, "cancel", "sx")
        assert result.exit_code == 0 and "sweep sx: cancelled" in result.output, result.output
        wait_for(lambda: daemons.events().count("its sweep was cancelled: cancel requested") == 2, "the cancel")
        let_go(gate)
        wait_for(lambda: "sweep sx: cancelled; its trials" in daemons.events(), "the cancel to reach its trials")
        listed = rows(home)
        assert sorted(n for n in listed if n.startswith("sx.")) == ["sx.t000", "sx.t001"]
        assert all(listed[n]["state"] == "cancelled" for n in ("sx.t000", "sx.t001"))
        study = optuna.load_study(study_name="sx", storage=f"sqlite:///{home / 'sweeps' / 'sx' / 'study.sqlite'}")
        assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
        again = traind(home, "resume", "sx")
        assert again.exit_code == 1 and "was cancelled" in again.output and "another name" in again.output
        assert any(line.startswith("sweep sx: cancelled") for line in traind(home, "ls").output.splitlines())
    finally:
        (gate / "hold").unlink(missing_ok=True)  # a worker still held would keep its daemon from stopping
        daemons.close()


def test_a_trial_asked_for_whose_job_a_crash_kept_from_being_made_gets_it_on_the_next_tick(tmp_path):
    """The window between Optuna's ask and the job's folder: the trial is in the study, with
    some of its values or none; the driver finishes them and makes its one job."""
    from traind.daemon.intake import Intake
    from traind.daemon.sweeps import Sweeps, open_study, sweep_dir

    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs, home.rejected):
        d.mkdir(parents=True)
    (home.inbox / "sw.toml").write_text(sweep_text(trials=3, pruner="none"))
    Intake(home, settle=0.0).scan(now=1e12)
    assert (sweep_dir(home, "sw") / "spec.json").exists()
    driver = Sweeps(home)
    driver.tick(0.0)  # the sweep starts: two trials (parallel = 2)
    assert sorted(p.name for p in home.jobs.iterdir()) == ["sw.t000", "sw.t001"]
    study = open_study(sweep_dir(home, "sw"))
    for number in (0, 1):  # both end, as their jobs
        study.tell(number, 1.0 + number)
    orphan = study.ask()  # a daemon's ask, and its death before any value or job
    orphan.suggest_float("optimizer.lr", 1e-5, 3e-2, log=True)  # one value of two, even
    lr = orphan.params["optimizer.lr"]
    Sweeps(home).tick(0.0)  # the next daemon
    made = json.loads((home.jobs / "sw.t002" / "trial.json").read_text())
    assert made["number"] == 2 and made["params"]["optimizer.lr"] == lr and "data.batch_size" in made["params"]
    assert len(open_study(sweep_dir(home, "sw")).trials) == 3  # nothing asked for again
    assert sorted(p.name for p in home.jobs.iterdir()) == ["sw.t000", "sw.t001", "sw.t002"]


@pytest.mark.parametrize("case", ["unreachable", "newest_corrupt", "all_corrupt", "no_save"])
def test_a_trial_tried_again_takes_up_the_dead_trials_newest_whole_save_where_it_can_reach_it(tmp_path, case):
    """Shared storage: a trial failed by its heartbeat is tried again (Optuna's retry) by
    this daemon, which copies the dead trial's newest save that copies whole, its records
    and its thread count into the retry's job; where the dead trial's folder is not
    reachable, or no save of it is whole, the retry starts again and says why."""
    import optuna

    from tests.store.test_commit import save
    from traind.daemon.intake import Intake
    from traind.daemon.sweeps import Sweeps, open_study, sweep_dir
    from traind.store.store import SaveStore

    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs, home.rejected):
        d.mkdir(parents=True)
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    (home.inbox / "sw.toml").write_text(sweep_text(trials=1, pruner="none").replace(
        "[sweep]\n", f'[sweep]\nstorage = "{url}"\n').replace("parallel = 2", "parallel = 1"))
    Intake(home, settle=0.0).scan(now=1e12)
    study = open_study(sweep_dir(home, "sw"), create=True)
    dead = study.ask()  # another daemon's trial, and that daemon's death
    dead.suggest_float("optimizer.lr", 1e-5, 3e-2, log=True)
    dead.suggest_categorical("data.batch_size", [32, 64])
    other = tmp_path / ("gone" if case == "unreachable" else "other")
    dead.set_user_attr("home", str(other))
    if case != "unreachable":
        folder = Home(other).job_dir("sw.t000")
        store = SaveStore(folder / "saves")
        if case != "no_save":
            older, newest = save(store, 100, seed=1), save(store, 200, seed=2)
            for info in ([newest] if case == "newest_corrupt" else [older, newest]):
                (info.path / "state.json").write_text("{}")  # the size it had, or not: either way not whole
        (folder / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1, "val_loss": 0.5}\n')
        (folder / "threads.json").write_text('{"threads": 3}')
    study._storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # renamed in Optuna 4.9
    retry(max_retry=3)(study, study._storage.get_trial(dead._trial_id))  # as fail_stale_trials does
    Sweeps(home).tick(0.0)
    job = home.jobs / "sw.t001"
    link = json.loads((job / "trial.json").read_text())
    assert link["retries"] == 0 and link["params"] == dead.params
    if case == "newest_corrupt":
        assert link["taken_up"] == {"from": str(other / "jobs" / "sw.t000"), "save": older.id, "step": 100}
        assert [s.id for s in list_saves(job / "saves")[0]] == [older.id]
        assert (job / "state.json").is_file() and (job / "threads.json").read_text() == '{"threads": 3}'
        assert "val_loss" in (job / "metrics.jsonl").read_text()
        assert (other / "jobs" / "sw.t000" / "saves" / newest.id).is_dir()  # the dead home is only read
        return
    assert "taken_up" not in link and not list_saves(job / "saves")[0]
    assert not (job / "threads.json").exists()
    assert {"unreachable": "are not reachable from this machine", "all_corrupt": "none of its saves copies whole",
            "no_save": "it had made no save yet"}[case] in link["started_again"]


@pytest.mark.parametrize("change, line, said, fix", [
    ('"data.batch_size" = { choice = [32, 64] }', 19, "data has no key 'batchsize'; did you mean 'batch_size'?",
     "use a dotted path of the job file"),
    ('"data.val_fraction" = { float = [0.1, 1.5] }', 20, "1.5 does not make a valid job (data.val_fraction",
     "give values the key takes"),
    ('"optimizer.lr" = { float = [1e-5, 3e-2], log = true }', 18, "log = true needs low > 0",
     "see `traind schema`"),
    ('pruner = "median"', 16, "'meadian' is not one of none, median, successive_halving, hyperband; did you mean 'median'?", ""),
    ('parallel = 2', 19, "a grid needs a finite set of values, and this float range has no step",
     "give it a step, or make it a choice"),
])
def test_bad_sweep_files_are_refused_with_the_line_and_a_fix(tmp_path, change, line, said, fix):
    replacement = {
        '"data.batch_size" = { choice = [32, 64] }': '"data.batchsize" = { choice = [32, 64] }',
        '"data.val_fraction" = { float = [0.1, 1.5] }': '"data.val_fraction" = { float = [0.1, 1.5] }',
        '"optimizer.lr" = { float = [1e-5, 3e-2], log = true }': '"optimizer.lr" = { float = [0.0, 3e-2], log = true }',
        'pruner = "median"': 'pruner = "meadian"',
        'parallel = 2': 'parallel = 2\nsampler = "grid"',
    }[change]
    text = sweep_text()
    if change in text:
        text = text.replace(change, replacement)
    else:
        text += replacement + "\n"
    path = tmp_path / "sw.toml"
    path.write_text(text)
    result = traind(tmp_path / "home", "validate", path)
    assert result.exit_code == 2
    assert f"line {line}" in result.output and said in result.output and fix in result.output, result.output
    assert traind(tmp_path / "home", "submit", path).exit_code == 2
    assert not (tmp_path / "home" / "inbox").exists() or not list((tmp_path / "home" / "inbox").glob("*"))


@pytest.fixture
def postgres():
    """A PostgreSQL server of the test's own (scripts/postgres-server: Debian's package, a
    fresh cluster, a loopback port), stopped after."""
    import shutil
    import socket
    import tempfile

    script = Path(__file__).parents[2] / "scripts" / "postgres-server"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        why = "PostgreSQL is not installed (scripts/postgres-server install, as root)"
        if os.environ.get("CI"):
            pytest.fail(f"the PostgreSQL test needs Debian's postgresql, which .ci/run installs: {why}")
        pytest.skip(why)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="traind-pg-")  # in /tmp itself: the server's user must reach it
    env = {**os.environ, "TRAIND_PG_PORT": str(port)}
    started = subprocess.run([str(script), "start", folder], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([str(script), "stop", folder], env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_daemons_share_one_study_on_postgresql_and_one_killed_mid_trial_loses_no_trial(tmp_path, postgres):
    """Two homes (two machines), one study on a real PostgreSQL: each daemon runs trials on
    its own worker; one is SIGKILLed mid-trial, after a save, the other fails that trial
    once its heartbeat is silent and tries it again with its values, taking it up from the
    dead trial's newest save (both homes are on one disk here: shared storage), and ends
    bitwise equal to the trial run alone; the study ends with exactly its trials; the
    killed daemon, started again, cancels its dead trial's job rather than train it twice."""
    import optuna

    from traind.daemon.sweeps import counted

    text = sweep_text(trials=5, pruner="none", samples=16000, epochs=3).replace(
        "[sweep]\n", f'[sweep]\nstorage = "{postgres}"\nheartbeat = 2\n').replace("parallel = 2", "parallel = 1")
    a, b = Daemons(tmp_path / "a"), Daemons(tmp_path / "b")
    try:
        for daemons in (a, b):
            daemons.start("--workers", "1")
            submit(daemons.home, tmp_path, text)
        running = wait_for(lambda: next((n for n, r in rows(a.home).items() if r["state"] == "running"
                                         and list_saves(a.home / "jobs" / n / "saves")[0]), None),
                           "a trial of daemon a to save", timeout=180)
        number = int(running.split(".t")[1])
        a.procs[-1].kill()  # its worker dies with it
        a.procs[-1].wait()
        wait_for(lambda: ended(b.home), "daemon b to end the sweep", timeout=400)
        study = optuna.load_study(study_name="sw", storage=postgres.replace("postgresql://", "postgresql+psycopg://"))
        kept = counted(study.trials)
        assert len(kept) == 5 and all(t.state.name == "COMPLETE" for t in kept)
        dead = study.trials[number]
        assert dead.state.name == "FAIL" and dead.user_attrs["home"] == str(a.home)
        retry = next(t for t in kept if t.system_attrs.get("failed_trial") == number)
        assert retry.params == dead.params and retry.user_attrs["home"] == str(b.home)
        assert {t.user_attrs["home"] for t in kept} <= {str(a.home), str(b.home)}
        for t in kept:  # each trial's job in its own daemon's home, done
            home = Path(t.user_attrs["home"])
            assert rows(home)[f"sw.t{t.number:03d}"]["state"] == "done"
        shown_b = shown(b.home)
        assert next(t for t in shown_b["trials"] if t["number"] == number)["state"] == "retried"
        again = b.home / "jobs" / f"sw.t{retry.number:03d}"
        link = json.loads((again / "trial.json").read_text())
        taken = link["taken_up"]
        assert link["retries"] == number and taken["from"] == str(a.home / "jobs" / running)
        assert f"resumed from save {taken['save']} at step {taken['step']}" in (again / "log").read_text()
        assert "job file changed" not in (again / "log").read_text()  # another name, the same job
        spec = tmp_path / "alone.json"
        spec.write_text(traind(b.home, "sweep", "sw", "--trial", str(retry.number), "--spec").output)
        threads = json.loads((again / "threads.json").read_text())["threads"]  # daemon a's, taken up with the save
        done = subprocess.run([str(BIN / "traind"), "run", str(spec), "--dir", str(tmp_path / "alone")],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert done.returncode == 0, done.stdout + done.stderr
        newest = lambda folder: load_file(list_saves(folder / "saves")[0][-1].path / "model.safetensors")  # noqa: E731
        assert_equal(newest(again), newest(tmp_path / "alone"))
        a.start("--workers", "1")
        wait_for(lambda: ended(a.home), "daemon a, started again, to end its sweep too", timeout=120)
        wait_for(lambda: rows(a.home)[running]["state"] == "cancelled", "its dead trial's job to be cancelled")
        assert "tried again by a daemon alive" in traind(a.home, "status", running).output
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("sampler, pruner, space", [
    ("random", "successive_halving", '"optimizer.lr" = { float = [1e-4, 1e-2], log = true }'),
    ("grid", "hyperband", '"optimizer.lr" = { choice = [0.001, 0.01] }\n"data.batch_size" = { int = [32, 64], step = 32 }'),
    ("cmaes", "none", '"optimizer.lr" = { float = [1e-4, 1e-2] }\n"optimizer.weight_decay" = { float = [0.0, 0.1] }'),
    ("tpe", "median", '"train.epochs" = { int = [2, 4] }'),
])
def test_each_sampler_and_pruner_drives_trials_whose_jobs_hold_their_values(tmp_path, sampler, pruner, space):
    from traind.daemon.intake import Intake
    from traind.daemon.sweeps import Sweeps, open_study, sweep_dir

    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs, home.rejected):
        d.mkdir(parents=True)
    text = sweep_text(trials=4).replace('pruner = "median"', f'pruner = "{pruner}"\nsampler = "{sampler}"')
    text = text[:text.index("[sweep.space]")] + "[sweep.space]\n" + space + "\n"
    (home.inbox / "sw.toml").write_text(text)
    outcome = Intake(home, settle=0.0).scan(now=1e12)
    assert outcome[0].job == "sw", outcome[0].error
    Sweeps(home).tick(0.0)
    made = sorted(p.name for p in home.jobs.iterdir())
    assert made == ["sw.t000", "sw.t001"]
    study = open_study(sweep_dir(home, "sw"))
    assert type(study.sampler).__name__.lower().startswith({"random": "random", "grid": "grid", "cmaes": "cmaes",
                                                            "tpe": "tpe"}[sampler])
    for job in made:
        link = json.loads((home.jobs / job / "trial.json").read_text())
        spec = json.loads((home.jobs / job / "spec.json").read_text())
        for path, value in link["params"].items():
            section, key = path.split(".")
            assert spec[section][key] == value
