"""A job's CPU thread count is part of the job: fixed at its first start, recorded in its
folder, and kept on every resume, under any daemon and by `traind run`."""

import json
import os
import signal
import subprocess
import sys

from tests.daemon.live import JOB, assert_equal, final_weights, rows, submit, traind, wait_for
from traind.daemon import threads

# Big batches: the weight gradient sums over 2,048 samples, and how BLAS splits that sum
# follows the thread count, so 1 and 2 threads end in other bits (checked below).
WIDE = """name = "wide"
seed = 1
[model]
layers = [["Linear", 20, 256], ["ReLU"], ["Linear", 256, 10]]
[data]
samples = 8192
batch_size = 2048
[train]
epochs = 50
[checkpoint]
every_steps = 10
"""


def test_the_count_is_recorded_at_the_first_start_and_kept_whatever_the_environment(tmp_path, monkeypatch):
    said = []
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.pin(None, tmp_path, said.append) == 3
    assert json.loads((tmp_path / "threads.json").read_text()) == {"threads": 3}
    monkeypatch.setenv(threads.ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.pin(None, tmp_path, said.append) == 3  # resumed elsewhere: the recorded count
    assert threads.pin(1, tmp_path, said.append) == 1  # the job's own key wins, and says what it costs
    assert any("results differ" in s for s in said) and threads.recorded(tmp_path) == 1


def test_a_daemon_shares_the_cores_among_its_slots_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.share(1) == threads.cores()
    assert threads.share(threads.cores() * 4) == 1
    assert threads.share(2, override=5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert threads.share(2) == 7


def start_daemon(home, log, *args):
    with open(log, "a") as err:
        return subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(home), "daemon", *args],
                                stdout=subprocess.DEVNULL, stderr=err)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0


def run(path, folder, n):
    """`traind run` of PATH in FOLDER on N threads, started now; the call it returns waits
    for it and gives its final weights."""
    env = dict(os.environ, OMP_NUM_THREADS=str(n))
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(folder)],
                            env=env, stdout=subprocess.DEVNULL)

    def weights():
        assert proc.wait(timeout=300) == 0
        return final_weights(folder)

    return weights


def test_a_job_resumed_beside_other_jobs_and_under_other_workers_ends_bitwise_equal(tmp_path):
    (tmp_path / "wide.toml").write_text(WIDE)
    half = max(1, threads.cores() // 2)  # what two slots give each job
    reference = run(tmp_path / "wide.toml", tmp_path / "reference", half)
    # (both at once: a run's bits follow its thread count, not what else runs)
    other = run(tmp_path / "wide.toml", tmp_path / "all-cores", threads.cores()) if threads.cores() > 1 else None
    expected = reference()
    if other is not None:
        found = other()
        assert any(not __import__("torch").equal(found[k], expected[k]) for k in expected)  # the count matters
    home, log = tmp_path / "home", tmp_path / "daemons.err"
    first = start_daemon(home, log, "--workers", "2")
    try:
        submit(home, tmp_path, WIDE, "wide.toml")
        submit(home, tmp_path, JOB.replace("samples: 6144", "samples: 30000"), "filler.yaml")
        folder = home / "jobs" / "wide"
        wait_for(lambda: rows(home).get("wide", {}).get("step", 0) > 40, "progress beside the filler")
        assert rows(home)["soak"]["state"] == "running"  # two at once
        assert threads.recorded(folder) == half
        os.kill(int((folder / "lock").read_text().split()[0]), signal.SIGKILL)  # restarted, beside the filler
        wait_for(lambda: rows(home)["wide"]["restarts"] == 1 and rows(home)["wide"]["state"] == "running",
                 "the restart")
        before = rows(home)["wide"]["step"]
        wait_for(lambda: rows(home)["wide"]["step"] > before + 20, "progress after the restart")
    finally:
        stop(first)
    assert rows(home)["wide"]["state"] == "queued"
    second = start_daemon(home, log, "--workers", "1")  # would give a new job every core
    try:
        wait_for(lambda: rows(home)["wide"]["state"] == "done", "the job to finish", 300)
    finally:
        stop(second)
    assert threads.recorded(folder) == half
    assert_equal(final_weights(folder), expected)
    assert traind(home, "ls").exit_code == 0


def test_in_a_slurm_job_the_cores_are_the_cpus_slurm_gave_the_task(monkeypatch):
    mask = len(os.sched_getaffinity(0))
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert threads.cores() == mask
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")  # a batch job given one CPU, on a node without CPU binding
    assert threads.cores() == 1
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "64")
    assert threads.cores() == mask  # never more than the mask allows
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert threads.cores() == 1


# What AdamW's `exp_avg_sq.sqrt()` does, in a process that has just set its thread count
# as every job process does (threads.pin), then the digest of the result's bits.
VML_PROBE = """
import hashlib, sys
from pathlib import Path
import torch
from traind.daemon import threads
threads.pin(2, Path(sys.argv[1]), print)
x = torch.rand(5120, generator=torch.Generator().manual_seed(0)) * 1e-3
print(hashlib.sha256(torch.sqrt(x).numpy().tobytes()).hexdigest())
"""


def test_vector_math_gives_the_same_bits_in_every_fresh_job_process(tmp_path):
    # Without threads.settle_vml about one fresh process in ten computes the second
    # thread's half of the tensor with another kernel (measured: 8 in 80 on the host of
    # docs/PERFORMANCE.md, "Exact resume and MKL"; an AMD EPYC host never showed it; an
    # Intel host, 1 in 32, and with only the mode call settle_vml once made, 1 in 40 in a
    # run of this test), so 40 fresh processes agreeing is what it takes; a forked
    # process never shows it.
    def start(i):
        folder = tmp_path / str(i)
        folder.mkdir()
        return subprocess.Popen([sys.executable, "-c", VML_PROBE, str(folder)], stdout=subprocess.PIPE, text=True)

    digests = []
    for wave in range(10):
        procs = [start(wave * 4 + i) for i in range(4)]
        digests += [p.communicate(timeout=120)[0].split()[-1] for p in procs]
        assert all(p.returncode == 0 for p in procs)
    assert len(digests) == 40 and len(set(digests)) == 1, sorted(set(digests))
