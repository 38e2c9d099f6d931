"""Warm workers (daemon/warm.py): a job's worker forked from a template that imported
torch once behaves as a cold one: a job that changes the process's global state changes
nothing of the next job; a killed template takes its running job's worker with it, which
saves and stops, and the daemon starts a new template, resumes the job and ends it
bitwise equal; a start never waits on a template that is not ready."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon.live import assert_equal, final_weights, rows, submit, wait_for
from traind.daemon.executor import worker_argv

MEDDLE = '''
import os, random, torch
def net():
    """Leaves the process changed every way a job can: a template must keep none of it (in
    its worker only, which the daemon's thread count marks: the validator's dry build must pass)."""
    if "TRAIND_THREADS" not in os.environ:
        return torch.nn.Linear(20, 10)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(999)
    torch.set_grad_enabled(False)
    random.seed(5)
    os.environ["TRAIND_MEDDLED"] = "1"
    os.chdir("/")
    raise RuntimeError("meddled")
'''

PROBE = '''
import hashlib, json, os, torch
def net():
    """What this process looks like to a job, once the job set itself up (its seed, threads)."""
    seen = {"dtype": str(torch.get_default_dtype()), "grad": torch.is_grad_enabled(),
            "meddled": os.environ.get("TRAIND_MEDDLED"), "cwd": os.getcwd(), "threads": torch.get_num_threads(),
            "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
            "omp": os.environ.get("OMP_NUM_THREADS")}
    with open(os.environ["TRAIND_PROBE_OUT"], "a") as f:
        f.write(json.dumps(seen) + "\\n")
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
'''

JOB = 'name = "NAME"\nseed = 4\npython_path = ["."]\nthreads = 1\n[model]\ntarget = "MODULE:net"\n' \
      '[data]\nsamples = 3000\n[train]\nepochs = 3\n'


def ready_templates(daemons) -> list[int]:
    """The pids of the templates the daemon's log has said ready, in order."""
    return [int(pid) for pid in re.findall(r"warm template pid (\d+) ready", daemons.events())]


def template_pids(daemons) -> list[int]:
    """The template processes of DAEMONS' live daemon (its children running traind.daemon.warm)."""
    found = subprocess.run(["pgrep", "-P", str(daemons.procs[-1].pid), "-f", "traind.daemon.warm"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def started_warm(daemons, job: str) -> bool:
    return f"{job}: started on cpu0 (warm worker pid" in daemons.events()


def test_a_job_that_changes_the_processs_global_state_changes_nothing_of_the_next_job(daemons, tmp_path,
                                                                                       monkeypatch):
    (tmp_path / "meddle.py").write_text(MEDDLE)
    (tmp_path / "probe.py").write_text(PROBE)
    probe_out = tmp_path / "probe.jsonl"
    monkeypatch.setenv("TRAIND_PROBE_OUT", str(probe_out))
    daemons.start("--workers", "1", "--warm")
    wait_for(lambda: ready_templates(daemons), "the template to be ready")
    inbox = daemons.home / "inbox"
    for module in ("meddle", "probe"):  # into the inbox (relative paths start there), never run in this process
        (inbox / f"{module}.py").write_text((tmp_path / f"{module}.py").read_text())
    for name, module in (("meddle", "meddle"), ("probe", "probe")):
        (inbox / f".{name}.tmp").write_text(JOB.replace("NAME", name).replace("MODULE", module))
        os.rename(inbox / f".{name}.tmp", inbox / f"{name}.toml")
        wait_for(lambda: rows(daemons.home).get(name, {}).get("state") in ("done", "failed"), f"{name} to end")
        assert started_warm(daemons, name), daemons.events()[-2000:]
    assert rows(daemons.home)["meddle"]["state"] == "failed" and rows(daemons.home)["probe"]["state"] == "done"
    warm = [json.loads(line) for line in probe_out.read_text().splitlines()]

    # the same job run cold, by `traind run` (its own Python)
    probe_out.unlink()
    (tmp_path / "alone.toml").write_text(JOB.replace("NAME", "probe").replace("MODULE", "probe"))
    ran = subprocess.run([sys.executable, "-m", "traind.daemon.cli", "run", str(tmp_path / "alone.toml"), "--dir",
                          str(tmp_path / "alone")], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    cold = [json.loads(line) for line in probe_out.read_text().splitlines()]
    # the last line each: the worker's build (the validator's dry build came before it)
    assert warm[-1] == cold[-1] and warm[-1]["meddled"] is None and warm[-1]["cwd"] == os.getcwd()
    assert warm[-1]["dtype"] == "torch.float32" and warm[-1]["grad"] is True
    assert_equal(final_weights(daemons.home / "jobs" / "probe"), final_weights(tmp_path / "alone"))


def test_a_killed_template_takes_its_running_worker_which_saves_and_the_job_resumes_and_ends_the_same(
        daemons, tmp_path, reference):
    from tests.daemon.live import JOB as SOAK

    daemons.start("--workers", "1", "--warm")
    first = wait_for(lambda: ready_templates(daemons), "the template to be ready")[0]
    assert template_pids(daemons) == [first]
    submit(daemons.home, tmp_path, SOAK)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > 40, "the job to train")
    assert started_warm(daemons, "soak")
    # ps and pgrep see it as the cold worker's command line
    pid = int(re.search(r"soak: started on cpu0 \(warm worker pid (\d+)\)", daemons.events()).group(1))
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
    assert title == worker_argv(daemons.home, "soak"), title
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to end", timeout=300)
    log = (daemons.home / "jobs" / "soak" / "log").read_text()
    assert "resumed from save" in log  # its worker saved on the SIGTERM its template's death sent
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)
    # the daemon saw it die and started another at once, which got ready
    assert f"warm template pid {first} ended (killed by SIGKILL); starting another" in daemons.events()
    again = wait_for(lambda: ready_templates(daemons)[1:], "a new template to be ready")
    assert again[0] != first and template_pids(daemons) == again
    submit(daemons.home, tmp_path, SOAK.replace("name: soak", "name: next"), name="next.yaml")
    wait_for(lambda: rows(daemons.home).get("next", {}).get("state") == "done", "the next job")
    assert started_warm(daemons, "next")
