"""A job trained by two processes (DDP over gloo, real torchrun and torch's agent): killed
(the launcher, a rank, one of two machines), resumed, quicksaved, paused, loaded and
cancelled, it ends bitwise equal to the uninterrupted two-process run; a save of two
processes resumes in one and a save of one in two."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.daemon.live import wait_for
from traind.daemon import requests
from traind.jobs.loadgame import request_load
from traind.jobs.state import STATE
from traind.store.saves import list_saves, load_tensors

BIN = Path(sys.executable).parent
JOB = """
seed = 3
[model]
layers = [["Linear", 20, 32], ["ReLU"], ["Dropout", {p = 0.2}], ["Linear", 32, 10]]
[data]
samples = 1500
batch_size = 32
[train]
epochs = EPOCHS
[checkpoint]
every_steps = 6
keep_last = 100
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one count for every run: the result bits depend on it


def torchrun(job: Path, folder: Path, processes: int = 2, **kw) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N --no-python traind run JOB --dir FOLDER`, as a user types it."""
    return subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "--no-python",
                             str(BIN / "traind"), "run", str(job), "--dir", str(folder)], env=ENV, **kw)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_tensors(list_saves(folder / "saves")[0][-1], "model.safetensors")


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_of(folder: Path) -> str:
    return (folder / "log").read_text() if (folder / "log").exists() else ""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("job") / "ddp.toml"
    path.write_text(JOB.replace("EPOCHS", "6"))  # long enough for requests to land before its end
    return path


@pytest.fixture(scope="module")
def uninterrupted(job):
    folder = job.parent / "uninterrupted"
    out = finish(torchrun(job, folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "x 2 processes (gloo)" in out and out.count("done: step") == 1  # the main rank alone tells the end
    return weights(folder)


def test_a_two_process_job_killed_quicksaved_paused_and_loaded_under_torchrun_ends_bitwise_equal(job, uninterrupted,
                                                                                               tmp_path):
    """A kill of the launcher takes its ranks with it; each request is decided by the main
    rank and agreed at one boundary (a rank that stopped or saved alone would hang the
    other in its next all-reduce); every restart continues exactly."""
    folder = tmp_path / "run"
    proc = torchrun(job, folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: log_of(folder).count("saved ") >= 4, "four saves", timeout=120)
    proc.send_signal(signal.SIGKILL)  # the launcher: its ranks die with it (PR_SET_PDEATHSIG)
    proc.wait()
    wait_for(lambda: subprocess.run(["pgrep", "-f", "--", f"--dir {folder}"], capture_output=True).returncode == 1,
             "the ranks to die with their launcher", timeout=30)
    newest = list_saves(folder / "saves")[0][-1]
    ranks = json.loads((newest.path / STATE).read_text())["ranks"]
    assert ranks["size"] == 2 and len(ranks["rng"]) == 1  # rank 1's RNG streams are in the save too

    proc = torchrun(job, folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: "resumed from save" in log_of(folder), "the resume", timeout=120)
    requests.send(folder, "save", "both ranks")
    wait_for(lambda: "quicksave" in log_of(folder), "the quicksave", timeout=60)
    requests.send(folder, "pause")
    assert "paused at step" in finish(proc)
    manual = [s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds]
    assert [s.note for s in manual] == ["both ranks"]
    request_load(folder, manual[0].id)  # "load game": back to the quicksave, then on to the end
    finish(torchrun(job, folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    assert f"resumed from save {manual[0].id}" in log_of(folder)
    assert equal(weights(folder), uninterrupted)


def test_a_save_of_two_processes_resumes_in_one_and_one_of_one_in_two(tmp_path):
    """The same global batch and sample order at any world size: the run goes on where
    the save left it, equal up to the order of floating-point sums (no Dropout here, so
    that the RNG streams a new rank takes from the seed do not matter). Three batches a
    step (DDP all-reduces after the third only; an epoch's 38 batches end in a step of two,
    whose last batch is short)."""
    plain = JOB.replace('["Dropout", {p = 0.2}], ', "").replace("[train]\n", "[train]\naccumulate = 3\n")
    jobs = {}
    for epochs in (1, 2, 3):
        jobs[epochs] = tmp_path / f"e{epochs}.toml"
        jobs[epochs].write_text(plain.replace("EPOCHS", str(epochs)).replace("seed = 3", 'seed = 3\nname = "w"'))
    reference = tmp_path / "reference"
    finish(torchrun(jobs[3], reference, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    folder = tmp_path / "changing"
    finish(torchrun(jobs[1], folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    alone = subprocess.run([str(BIN / "traind"), "run", str(jobs[2]), "--dir", str(folder)], env=ENV,
                           capture_output=True, text=True, timeout=240)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "was made by 2 processes and this run has 1" in alone.stdout
    out = finish(torchrun(jobs[3], folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "was made by 1 process and this run has 2" in out and "ranks 1-1 have no RNG streams" in out
    a, b = weights(folder), weights(reference)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


LAUNCHED = JOB.replace("EPOCHS", "16") + "[distributed]\nprocesses = 2\n"  # long enough that a request lands mid-run


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A job of `processes = 2`, and its final weights when `traind run` launches its two
    ranks itself and nothing interrupts it."""
    tmp = tmp_path_factory.mktemp("launched")
    path = tmp / "ranks.toml"
    path.write_text(LAUNCHED)
    out = subprocess.run([str(BIN / "traind"), "run", str(path), "--dir", str(tmp / "run")], env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and "x 2 processes (gloo)" in out.stdout, out.stdout + out.stderr
    return path, weights(tmp / "run")


def test_traind_run_launches_the_ranks_and_a_sigterm_saves_and_stops_them_all(launched, tmp_path):
    path, reference = launched
    folder = tmp_path / "stopped"
    proc = subprocess.Popen([str(BIN / "traind"), "run", str(path), "--dir", str(folder)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: log_of(folder).count("saved ") >= 3, "three saves", timeout=120)
    proc.send_signal(signal.SIGTERM)  # the launcher: torch's agent passes it to both ranks
    out = finish(proc)
    assert "stopped by signal at step" in out
    stopped_at = list_saves(folder / "saves")[0][-1]
    assert "final" not in stopped_at.kinds
    finish(subprocess.Popen([str(BIN / "traind"), "run", str(path), "--dir", str(folder)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert f"resumed from save {stopped_at.id}" in log_of(folder)
    assert equal(weights(folder), reference)


# `traind run` whose launcher (torch's agent) gets its SIGTERM at the worst moment: on the
# first line of torch's metrics wrapper, `start = time.time()`, which the agent's handler
# leaves unassigned when it raises there; the wrapper's `finally` then raises
# UnboundLocalError in place of the signal (seen once in CI, on a preempted Slurm job).
SIGTERM_IN_A_WRAPPER = """
import os, signal, sys, time
from pathlib import Path

import torch.distributed.elastic.metrics.api as metrics

log = Path(sys.argv[2]) / "log"


class Clock:
    sent = False

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self):
        if not Clock.sent and sys._getframe(1).f_code.co_name == "wrapper" and log.exists() \\
                and log.read_text().count("saved ") >= 3:
            Clock.sent = True
            print("SIGTERM sent from a metrics wrapper's first line", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return time.time()


metrics.time = Clock()
sys.argv = ["traind", "run", sys.argv[1], "--dir", sys.argv[2]]
from traind.daemon.cli import main
main()
"""


def test_a_sigterm_that_lands_inside_the_agents_metrics_wrapper_still_saves_and_stops_the_ranks(launched, tmp_path):
    path, reference = launched
    folder = tmp_path / "stopped"
    out = finish(subprocess.Popen([sys.executable, "-c", SIGTERM_IN_A_WRAPPER, str(path), str(folder)], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "SIGTERM sent from a metrics wrapper's first line" in out  # where torch raises UnboundLocalError over it
    assert "Traceback" not in out
    assert "stopped by signal at step" in out
    stopped_at = list_saves(folder / "saves")[0][-1]
    assert "final" not in stopped_at.kinds
    finish(subprocess.Popen([str(BIN / "traind"), "run", str(path), "--dir", str(folder)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert f"resumed from save {stopped_at.id}" in log_of(folder)
    assert equal(weights(folder), reference)


def test_the_daemon_restarts_a_job_whose_rank_was_killed_and_tells_a_pause_or_cancel_from_a_failure(launched, tmp_path,
                                                                                            monkeypatch):
    from tests.daemon.live import Daemons, rows, traind

    path, reference = launched
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the daemon's workers train with the reference's thread count
    home = tmp_path / "home"
    daemons = Daemons(home)
    try:
        daemons.start("--workers", "2")  # two CPU slots: the job's two ranks take both
        assert traind(home, "submit", path).exit_code == 0
        folder = home / "jobs" / "ranks"
        wait_for(lambda: log_of(folder).count("saved ") >= 3, "three saves", timeout=120)
        ranks = subprocess.run(["pgrep", "-f", "traind.daemon.rank worker"], capture_output=True, text=True)
        os.kill(int(ranks.stdout.split()[-1]), signal.SIGKILL)  # one rank: the world fails, the worker dies of it
        wait_for(lambda: rows(home)["ranks"]["restarts"] >= 1, "the daemon to restart the job", timeout=120)
        assert "was killed by SIGKILL" in daemons.events()
        wait_for(lambda: log_of(folder).count("resumed from save") >= 1 and
                 log_of(folder).count("saved ") >= 5, "the restarted job to save", timeout=120)
        assert traind(home, "pause", "ranks").exit_code == 0
        wait_for(lambda: rows(home)["ranks"]["state"] in ("paused", "failed"), "the pause", timeout=120)
        assert rows(home)["ranks"]["state"] == "paused"  # exit 76 came through the launcher, not a failure
        assert traind(home, "resume", "ranks").exit_code == 0
        saves = log_of(folder).count("saved ")
        wait_for(lambda: log_of(folder).count("saved ") > saves, "a save after the resume", timeout=120)
        assert traind(home, "cancel", "ranks").exit_code == 0
        wait_for(lambda: rows(home)["ranks"]["state"] in ("cancelled", "failed"), "the cancel", timeout=120)
        assert rows(home)["ranks"]["state"] == "cancelled"  # exit 77, likewise
        assert traind(home, "resume", "ranks").exit_code == 0
        wait_for(lambda: rows(home)["ranks"]["state"] == "done", "the job to finish", timeout=240)
        assert rows(home)["ranks"]["device"] == "2 x cpu"
    finally:
        daemons.close()
    assert equal(weights(folder), reference)


def test_two_agents_on_loopback_train_one_job_and_resume_it_after_a_kill(tmp_path):
    """`nodes = 2` without a scheduler: `traind run --rdzv-endpoint` on each machine (two
    agents on 127.0.0.1 here, with the store not shared: the hang of pytorch#135712)."""
    path = tmp_path / "nodes.toml"
    path.write_text(JOB.replace("EPOCHS", "3") + "[distributed]\nprocesses = 1\nnodes = 2\n")
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def agents(folder):
        port = free_port()
        return [subprocess.Popen([str(BIN / "traind"), "run", str(path), "--dir", str(folder), "--rdzv-endpoint",
                                  f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]

    reference = tmp_path / "reference"
    outs = [finish(p) for p in agents(reference)]
    assert sum("x 2 processes on 2 machines (gloo)" in out for out in outs) == 1  # the main rank's agent tells
    folder = tmp_path / "killed"
    first, second = agents(folder)
    wait_for(lambda: log_of(folder).count("saved ") >= 4, "four saves", timeout=120)
    second.send_signal(signal.SIGKILL)  # one machine gone: its rank dies with it, the other fails for want of it
    second.wait()
    first.communicate(timeout=120)
    assert first.returncode != 0
    for agent in agents(folder):
        finish(agent)
    assert "resumed from save" in log_of(folder)
    assert equal(weights(folder), weights(reference))


NAN_ON_RANK_1 = """
import os

import torch
from torch import nn

calls = 0


def loss(output, target):
    \"\"\"Cross-entropy, but NaN once, on rank 1 alone, at its 20th call (a training step).\"\"\"
    global calls
    calls += 1
    value = nn.functional.cross_entropy(output, target)
    if os.environ.get("RANK") == "1" and calls == 20:
        return value * torch.tensor(float("nan"))
    return value
"""


def test_a_non_finite_loss_on_one_rank_rolls_every_rank_back_together(tmp_path):
    (tmp_path / "nanloss.py").write_text(NAN_ON_RANK_1)
    path = tmp_path / "nan.toml"
    path.write_text(JOB.replace("EPOCHS", "2").replace("[train]", '[train]\nloss = "nanloss:loss"')
                    .replace("seed = 3", 'seed = 3\npython_path = ["."]'))
    folder = tmp_path / "run"
    out = finish(torchrun(path, folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "done: step" in out
    log = log_of(folder)
    assert log.count("rolled back to save") == 1 and "will skip batch" in log  # both ranks, or the other would hang
