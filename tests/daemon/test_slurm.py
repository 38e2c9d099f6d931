"""The daemon on a real Slurm cluster (`traind daemon --executor slurm`): Debian's slurmctld
and slurmd on this machine, as scripts/slurm-cluster starts them (.ci/run does, in CI).
A job trains to the end as a Slurm job; preempted by a job of the high partition it saves,
is requeued and resumes, and ends bitwise equal to the same job run without a stop; the
daemon killed while its Slurm jobs run is started again and finds them, submitting
nothing twice; a `scancel` from outside and a worker killed on its node are told by
their cause and retried; pause, resume, cancel, save and load go through the job folder
as on one machine."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.daemon.live import Daemons, rows, traind, wait_for
from traind.daemon.worker import Exit
from traind.store.saves import list_saves, load_tensors

BIN = Path(sys.executable).parent
JOB = """
name = "NAME"
seed = 3
[model]
layers = [["Linear", 20, 64], ["ReLU"], ["Dropout", {p = 0.2}], ["Linear", 64, 10]]
[data]
samples = SAMPLES
batch_size = 32
[train]
epochs = EPOCHS
[checkpoint]
every_steps = 25
keep_last = 4
"""


def slurm_up() -> str | None:
    """Why the cluster cannot be used, or None."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return "no Slurm cluster (SLURM_CONF unset or no sinfo)"
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or not done.stdout.strip():
        return f"sinfo: {done.stderr.strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = slurm_up()
    if why is not None:
        if os.environ.get("CI") or os.environ.get("TRAIND_REQUIRE_SLURM"):
            pytest.fail(f"the Slurm tests need a cluster, and CI starts one (.ci/run): {why}")
        pytest.skip(f"{why}: start one with `scripts/slurm-cluster install && scripts/slurm-cluster start` "
                    "and export the SLURM_CONF it prints")
    yield
    subprocess.run(["scancel", "--quiet", "--name=preemptor"], timeout=30)
    for proc in RUNNING_ALONE:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


MID = {"samples": 8000, "epochs": 40}  # about 10 s of training here
RANKS = {"samples": 8000, "epochs": 15}  # 3,000 steps: two ranks take 15 s and more, a preemption 2 s at most
PACED = """
import os
import time

from torch import nn


class Net(nn.Sequential):  # the job's MLP; in a Slurm job, each training step slowed while FLAG exists: the same math
    def __init__(self, flag: str):
        super().__init__(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))
        self.flag = flag

    def forward(self, x):
        if self.training and "SLURM_JOB_ID" in os.environ and os.path.exists(self.flag):
            time.sleep(0.02)
        return super().forward(x)
"""


def job_text(name: str, samples: int = 6000, epochs: int = 6) -> str:
    return JOB.replace("NAME", name).replace("SAMPLES", str(samples)).replace("EPOCHS", str(epochs))


def paced_job_text(tmp_path: Path, name: str, flag: Path, **size) -> str:
    """The job of SIZE with its MLP as a module of its own (PACED) that trains at 50 steps
    a second in a Slurm job while FLAG exists, and at full speed once it is gone (and
    outside Slurm: the reference run alone)."""
    (tmp_path / "paced.py").write_text(PACED)
    text = job_text(name, **size)
    model = f'[model]\ntarget = "paced:Net"\nkwargs = {{ flag = "{flag}" }}\n'
    return f'python_path = ["{tmp_path}"]\n' + text[:text.index("[model]")] + model + text[text.index("[data]"):]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_tensors(list_saves(folder / "saves")[0][-1], "model.safetensors")


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ALONE: dict[str, dict[str, torch.Tensor]] = {}
RUNNING_ALONE: list[subprocess.Popen] = []  # killed at the end if a failed test left one


def alone(tmp_path: Path, text: str, threads: int = 1) -> Callable[[], dict[str, torch.Tensor]]:
    """The job run by `traind run` in one go, with the thread count its Slurm job gets
    (once per job file, whatever its name: the name changes nothing of the result). It
    starts now, beside the Slurm job (each takes one of the cores), and the call it
    returns gives its final weights."""
    key = f"{threads} threads" + text.split("\n", 2)[2]
    if key in ALONE:
        return lambda: ALONE[key]
    path, folder = tmp_path / "alone.toml", tmp_path / "alone"
    path.write_text(text)
    proc = subprocess.Popen([str(BIN / "traind"), "run", str(path), "--dir", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    RUNNING_ALONE.append(proc)

    def result() -> dict[str, torch.Tensor]:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        ALONE[key] = weights(folder)
        return ALONE[key]

    return result


@pytest.fixture
def daemons(tmp_path, cluster):
    d = Daemons(tmp_path / "home")
    yield d
    d.close()
    for name in ("traind.a", "traind.b", "traind.c", "traind.d"):
        subprocess.run(["scancel", "--quiet", f"--name={name}"], timeout=30)


def slurm_record(home: Path, name: str) -> dict:
    path = home / "jobs" / name / "slurm.json"
    return json.loads(path.read_text()) if path.exists() else {}


def step_of(home: Path, name: str) -> int:
    return rows(home).get(name, {}).get("step") or 0


def submit(home: Path, tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    result = traind(home, "submit", path)
    assert result.exit_code == 0, result.output


def state(home: Path, name: str) -> str | None:
    return rows(home).get(name, {}).get("state")


def test_a_job_runs_as_a_slurm_job_to_the_end_and_ends_as_it_would_alone(tmp_path, daemons):
    home = daemons.home
    text = job_text("a", samples=1500, epochs=3)
    reference = alone(tmp_path, text)
    daemons.start("--executor", "slurm")
    submit(home, tmp_path, "a", text)
    wait_for(lambda: state(home, "a") == "done", "the Slurm job to finish", timeout=180)
    record = slurm_record(home, "a")
    assert record["job_id"].isdigit() and "--requeue" in record["argv"] and "--signal=B:USR2@120" in record["argv"]
    shown = subprocess.run(["scontrol", "show", "job", "-o", record["job_id"]], capture_output=True, text=True)
    assert "JobName=traind.a" in shown.stdout and "JobState=COMPLETED" in shown.stdout
    assert f"Slurm job {record['job_id']}" in daemons.events()
    status = json.loads(traind(home, "status", "a", "--json").output)["slurm"]
    assert status["job_id"] == record["job_id"] and status["state"] == "COMPLETED" and status["node"]
    assert f"slurm: job {record['job_id']}, COMPLETED on {status['node']}" in traind(home, "status", "a").output
    listed = traind(home, "ls").output.splitlines()
    assert listed[1].split()[-1] == "slurm" and listed[2].endswith(f"{record['job_id']} COMPLETED {status['node']}")
    assert equal(weights(home / "jobs" / "a"), reference())


def node_cpus() -> str:
    return subprocess.run(["sinfo", "-h", "--partition=high", "-o", "%c"], capture_output=True,
                          text=True).stdout.split()[0]


def preempt() -> None:
    """Submit a job to the high partition that needs every CPU of the node."""
    subprocess.run(["sbatch", "--quiet", "--partition=high", f"--cpus-per-task={node_cpus()}", "--job-name=preemptor",
                    "--output=/dev/null", "--wrap", "sleep 2"], check=True, timeout=30)


def test_preempted_then_warned_of_its_time_limit_it_saves_requeues_resumes_and_ends_bitwise_equal(tmp_path, daemons):
    """Preemption by a job of the high partition, then the time limit's warning (the
    limit cut to a minute, under the 120 s grace, and lifted once it has requeued): each
    time the worker saves and requeues its Slurm job, which resumes from that save. The
    job trains slowly (PACED) until then: slurmctld looks at time limits only every 20 to
    30 s after a restart, and the job at full speed could end first."""
    home, flag = daemons.home, tmp_path / "slow"
    text = paced_job_text(tmp_path, "b", flag, **MID)
    reference = alone(tmp_path, text)
    flag.touch()
    daemons.start("--executor", "slurm")
    submit(home, tmp_path, "b", text)
    ending = home / "jobs" / "b" / "ending.json"

    def requeued(times: int) -> bool:
        record = json.loads(ending.read_text()) if ending.exists() else {}
        return record.get("code") == Exit.REQUEUED and record.get("restart") == times - 1

    wait_for(lambda: step_of(home, "b") >= 200, "the job to train a while", timeout=180)
    job_id = slurm_record(home, "b")["job_id"]
    preempt()
    wait_for(lambda: requeued(1), "the preempted job to requeue itself", timeout=60)
    log = home / "jobs" / "b" / "log"
    wait_for(lambda: "JobState=RUNNING" in subprocess.run(["scontrol", "show", "job", "-o", job_id],
                                                          capture_output=True, text=True).stdout
             and log.read_text().count("resumed from save") == 1, "its restart", timeout=120)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True, timeout=30)
    wait_for(lambda: requeued(2), "the job warned of its time limit to requeue itself", timeout=120)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=UNLIMITED"], check=True, timeout=30)
    flag.unlink()
    wait_for(lambda: state(home, "b") == "done", "the job to finish", timeout=300)
    record = json.loads(ending.read_text())
    assert (record["code"], record["restart"]) == (0, 2) and slurm_record(home, "b")["job_id"] == job_id
    assert log.read_text().count("resumed from save") == 2
    assert "restart" not in daemons.events()  # Slurm requeued it: the daemon never saw it end
    assert equal(weights(home / "jobs" / "b"), reference())


def started(tmp_path: Path, daemons: Daemons, name: str, size: dict) -> tuple[Path, Callable]:
    """A daemon on the Slurm executor, and the job NAME of SIZE submitted to it and
    trained a while; the home, and the job's weights run alone (see `alone`)."""
    text = job_text(name, **size)
    reference = alone(tmp_path, text)
    daemons.start("--executor", "slurm")
    submit(daemons.home, tmp_path, name, text)
    wait_for(lambda: step_of(daemons.home, name) >= 100, "the job to train a while", timeout=180)
    return daemons.home, reference


def test_the_daemon_killed_while_its_slurm_job_runs_finds_it_again_and_submits_nothing_twice(tmp_path, daemons):
    home, reference = started(tmp_path, daemons, "c", MID)
    first = daemons.procs[-1]
    job_id = slurm_record(home, "c")["job_id"]
    first.kill()
    first.wait()
    assert state(home, "c") == "running"  # the Slurm job goes on without the daemon
    daemons.start("--executor", "slurm")
    wait_for(lambda: state(home, "c") == "done", "the job to finish under the second daemon", timeout=300)
    assert slurm_record(home, "c")["job_id"] == job_id
    events = daemons.events()
    assert events.count("c: started on") == 1 and f"c: found running again (Slurm job {job_id})" in events
    assert equal(weights(home / "jobs" / "c"), reference())


def worker_pid(home: Path, name: str) -> int | None:
    done = subprocess.run(["pgrep", "-f", f"traind.daemon.slurm_job --home {home} {name}$"], capture_output=True,
                          text=True)
    pids = done.stdout.split()
    return int(pids[0]) if pids else None


def test_a_scancel_from_outside_and_a_worker_killed_on_its_node_are_told_and_retried(tmp_path, daemons):
    home, reference = started(tmp_path, daemons, "d", MID)
    first = slurm_record(home, "d")["job_id"]
    subprocess.run(["scancel", first], check=True, timeout=30)
    wait_for(lambda: "cancelled outside traind (scancel)" in daemons.events(), "the scancel to be told")
    wait_for(lambda: slurm_record(home, "d").get("job_id") not in (None, first), "a new submission", timeout=60)
    assert rows(home)["d"]["restarts"] == 1
    wait_for(lambda: step_of(home, "d") >= 400 and worker_pid(home, "d"), "the retry to train", timeout=180)
    os.kill(worker_pid(home, "d"), signal.SIGKILL)  # the worker dies on its node, unsaved
    wait_for(lambda: "the worker was killed by SIGKILL" in daemons.events(), "the crash to be told")
    wait_for(lambda: state(home, "d") == "done", "the job to finish after its retries", timeout=400)
    assert rows(home)["d"]["restarts"] == 2
    assert equal(weights(home / "jobs" / "d"), reference())


def test_pause_resume_save_load_and_cancel_work_on_a_slurm_job_through_the_cli(tmp_path, daemons):
    home, reference = started(tmp_path, daemons, "a", MID)
    assert traind(home, "save", "a", "--note", "on slurm").exit_code == 0
    manual = wait_for(lambda: [s for s in json.loads(traind(home, "saves", "a", "--json").output)
                               if "manual" in s["kinds"]], "the quicksave")[0]
    assert traind(home, "pause", "a").exit_code == 0
    wait_for(lambda: state(home, "a") == "paused", "the pause")
    paused_job, paused_at = slurm_record(home, "a")["job_id"], step_of(home, "a")
    shown = subprocess.run(["squeue", "-h", f"--jobs={paused_job}", "--states=PENDING,RUNNING"], capture_output=True,
                           text=True)
    assert shown.stdout.strip() == ""  # its Slurm job ended, and was not requeued
    assert traind(home, "resume", "a").exit_code == 0
    wait_for(lambda: slurm_record(home, "a").get("job_id") not in (None, paused_job) and state(home, "a") == "running",
             "a new Slurm job")
    wait_for(lambda: step_of(home, "a") > paused_at + 50, "it to train on from the pause", timeout=180)
    assert traind(home, "load", "a", manual["id"]).exit_code == 0
    wait_for(lambda: f"from save {manual['id']}" in (home / "jobs" / "a" / "log").read_text(), "the load game",
             timeout=180)
    assert traind(home, "cancel", "a").exit_code == 0
    wait_for(lambda: state(home, "a") == "cancelled", "the cancel", timeout=120)
    assert traind(home, "resume", "a").exit_code == 0
    wait_for(lambda: state(home, "a") == "done", "the job to finish", timeout=400)
    assert any(s["id"] == manual["id"] for s in json.loads(traind(home, "saves", "a", "--json").output))
    assert equal(weights(home / "jobs" / "a"), reference())


SBATCH = """#!/bin/sh
#SBATCH --job-name=traind.b
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --open-mode=append
exec {traind} run {job} --dir {folder}
"""


def test_traind_run_in_a_hand_written_batch_script_is_preempted_requeued_and_ends_bitwise_equal(tmp_path, cluster):
    """The README's batch script, no daemon: the warning saves, the job requeues itself."""
    text = job_text("b", **MID)
    reference = alone(tmp_path, text)
    job, folder = tmp_path / "b.toml", tmp_path / "b"
    job.write_text(text)
    script = tmp_path / "b.sh"
    script.write_text(SBATCH.format(traind=BIN / "traind", job=job, folder=folder))
    out = tmp_path / "b.out"
    job_id = subprocess.run(["sbatch", "--parsable", f"--output={out}", str(script)], capture_output=True, text=True,
                            check=True, timeout=30).stdout.strip().split(";")[0]
    try:
        wait_for(lambda: folder.exists() and len(list_saves(folder / "saves")[0]) >= 4, "saves", timeout=180)
        preempt()

        def shown():
            return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout

        wait_for(lambda: "JobState=COMPLETED" in shown(), "the batch job to complete", timeout=400)
        assert "Restarts=1" in shown() or "Restarts=2" in shown()
        said = out.read_text()
        assert "saved at step" in said and f"Slurm job {job_id} requeued" in said and "done: step" in said
        assert equal(weights(folder), reference())
    finally:
        subprocess.run(["scancel", "--quiet", job_id], timeout=30)


def test_a_pause_or_cancel_of_a_job_pending_in_slurms_queue_takes_it_out_of_the_queue(tmp_path, daemons):
    home = daemons.home
    holder = subprocess.run(["sbatch", "--parsable", "--partition=high", f"--cpus-per-task={node_cpus()}",
                             "--job-name=preemptor", "--output=/dev/null", "--wrap", "sleep 300"], capture_output=True,
                            text=True, check=True, timeout=30).stdout.strip()
    try:
        daemons.start("--executor", "slurm")
        submit(home, tmp_path, "c", job_text("c", **MID))
        wait_for(lambda: slurm_record(home, "c"), "its submission")
        job_id = slurm_record(home, "c")["job_id"]
        wait_for(lambda: json.loads(traind(home, "status", "c", "--json").output)["slurm"]["state"] == "PENDING",
                 "it to wait behind the node's holder")
        assert traind(home, "pause", "c").exit_code == 0
        wait_for(lambda: state(home, "c") == "paused", "the pause of a pending job", timeout=30)
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        assert "JobState=CANCELLED" in shown and not list((home / "jobs" / "c" / "requests").glob("*"))
        assert traind(home, "resume", "c").exit_code == 0
        wait_for(lambda: slurm_record(home, "c").get("job_id") not in (None, job_id), "a new submission")
        assert traind(home, "cancel", "c").exit_code == 0
        wait_for(lambda: state(home, "c") == "cancelled", "the cancel of a pending job", timeout=30)
        assert list_saves(home / "jobs" / "c" / "saves")[0] == []  # it never ran
    finally:
        subprocess.run(["scancel", holder], timeout=30)


def test_a_two_process_job_preempted_on_slurm_stops_both_ranks_at_a_save_and_ends_bitwise_equal(tmp_path, daemons):
    """The warning reaches the worker, which launched the ranks: it stops them as a SIGTERM
    does (each saves at the same step), then requeues the Slurm job."""
    home = daemons.home
    text = job_text("a", **RANKS).replace("[checkpoint]", "[distributed]\nprocesses = 2\n[checkpoint]")
    reference = alone(tmp_path, text, threads=2)
    daemons.start("--executor", "slurm")
    submit(home, tmp_path, "a", text)
    wait_for(lambda: step_of(home, "a") >= 100, "the job to train a while", timeout=180)
    preempt()
    ending = home / "jobs" / "a" / "ending.json"
    wait_for(lambda: ending.exists() and json.loads(ending.read_text())["code"] == Exit.REQUEUED,
             "the ranks to save, requeued")
    wait_for(lambda: state(home, "a") == "done", "the job to finish", timeout=400)
    assert json.loads(ending.read_text())["restart"] == 1
    log = (home / "jobs" / "a" / "log").read_text()
    assert "x 2 processes (gloo)" in log and "resumed from save" in log
    assert equal(weights(home / "jobs" / "a"), reference())


def test_the_homes_config_gives_the_slurm_options_that_flags_do_not_and_a_wrong_key_is_named(tmp_path):
    from traind.daemon.slurm import SlurmConfig, SlurmError, read_config

    assert read_config(tmp_path, {}) == SlurmConfig()  # no config.toml: the defaults
    (tmp_path / "config.toml").write_text('[slurm]\npartition = "gpu"\ngrace = 300\noptions = ["--time=1:00:00"]\n'
                                          'warn_signal = "sigusr2"\n')
    config = read_config(tmp_path, {"grace": 60})
    assert (config.partition, config.grace, config.options, config.warn_signal) == ("gpu", 60, ["--time=1:00:00"],
                                                                                     "USR2")
    for text, said in (("partiton = 'gpu'", "unknown key 'partiton' in [slurm]; did you mean 'partition'?"),
                       ("grace = '300'", "[slurm] grace = '300': it must be a positive whole number"),
                       ("options = '--qos=x'", "[slurm] options = '--qos=x': it must be a list of strings"),
                       ("max_jobs = 0", "it must be a positive whole number")):
        (tmp_path / "config.toml").write_text(f"[slurm]\n{text}\n")
        with pytest.raises(SlurmError) as e:
            read_config(tmp_path, {})
        assert str(tmp_path / "config.toml") in str(e.value) and said in str(e.value)


@pytest.fixture
def pair(cluster):
    """The cluster's two nodes in network namespaces (partitions pair and pairhigh)."""
    nodes = subprocess.run(["sinfo", "-h", "--partition=pair", "-o", "%D"], capture_output=True, text=True).stdout
    if nodes.split()[:1] != ["2"]:
        why = "the cluster has no partition 'pair' of two nodes (scripts/slurm-cluster makes one in network namespaces)"
        if os.environ.get("CI") or os.environ.get("TRAIND_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)


def test_a_job_of_two_nodes_trains_on_both_through_srun_and_resumes_bitwise_equal_after_preemption(
        tmp_path, pair, daemons):
    """distributed.nodes = 2: one Slurm job of two nodes, a launcher (torch's agent) on each
    by srun, a rank on each; a job of the high partition takes one node: the warning
    reaches both ranks through the worker and srun, they save at the same step, the job
    requeues, and it ends bitwise equal to the same world of two ranks run on one machine."""
    home = daemons.home
    body = job_text("d", **RANKS)
    text = body.replace("[checkpoint]", "[distributed]\nprocesses = 1\nnodes = 2\n[checkpoint]")
    reference = alone(tmp_path, body.replace("[checkpoint]", "[distributed]\nprocesses = 2\n[checkpoint]"), threads=2)
    refused = subprocess.run([str(BIN / "traind"), "--home", str(home), "daemon", "--executor", "slurm",
                              "--partition", "pair"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "partition pair has 2 nodes" in refused.stderr and "--shared-home" in refused.stderr
    daemons.start("--executor", "slurm", "--partition", "pair", "--shared-home")
    submit(home, tmp_path, "d", text)
    wait_for(lambda: step_of(home, "d") >= 100, "the job to train a while", timeout=180)
    job_id = slurm_record(home, "d")["job_id"]
    shown = subprocess.run(["squeue", "-h", f"--jobs={job_id}", "-o", "%D %N"], capture_output=True, text=True).stdout
    assert shown.split() == ["2", "traind[1-2]"]
    assert f"{job_id} RUNNING traind[1-2]" in traind(home, "ls").output
    assert json.loads(traind(home, "ls", "--json").output)[0]["slurm"] == {
        "job_id": job_id, "state": "RUNNING", "node": "traind[1-2]", "reason": "None"}
    subprocess.run(["sbatch", "--quiet", "--partition=pairhigh", "--nodes=1", "--job-name=preemptor",
                    "--output=/dev/null", "--wrap", "sleep 2"], check=True, timeout=30)
    ending = home / "jobs" / "d" / "ending.json"
    wait_for(lambda: ending.exists() and json.loads(ending.read_text())["code"] == Exit.REQUEUED,
             "both ranks to save, requeued", timeout=120)
    wait_for(lambda: state(home, "d") == "done", "the job to finish", timeout=400)
    record = json.loads(ending.read_text())
    assert (record["code"], record["restart"]) == (0, 1) and slurm_record(home, "d")["job_id"] == job_id
    log = (home / "jobs" / "d" / "log").read_text()
    assert log.count("x 2 processes on 2 machines (gloo)") == 2 and log.count("resumed from save") == 1
    assert equal(weights(home / "jobs" / "d"), reference())


def test_a_job_of_several_nodes_outside_a_slurm_job_of_as_many_fails_with_what_to_do(monkeypatch):
    from traind.daemon.slurm_nodes import in_allocation

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    why = in_allocation(2)
    assert "distributed.nodes = 2" in why and "--executor slurm" in why and "set nodes = 1" in why
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert in_allocation(2) == "distributed.nodes = 2, and Slurm job 7 has 1 nodes"
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert in_allocation(2) is None
