"""Real daemons, real workers, real signals (polling with deadlines, never bare sleeps)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.conftest import EXAMPLES
from traind.daemon.cli import cli
from traind.store.saves import list_saves, verify

JOB = (EXAMPLES / "tied.yaml").read_text().replace("samples: 1024", "samples: 6144").replace(
    "epochs: 5", "epochs: 8").replace("name: tied", "name: soak")


def traind(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *map(str, args)])


def rows(home):
    result = traind(home, "ls", "--json")
    assert result.exit_code == 0, result.output
    return {r["name"]: r for r in json.loads(result.output)}


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Daemons:
    """Starts daemons on one home; kills whatever is left at the end."""

    def __init__(self, home):
        self.home, self.procs = home, []

    def start(self):
        proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(self.home), "daemon"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stderr.close()


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path / "home")
    yield d
    d.close()
    wait_for(lambda: not any(p.name for p in (tmp_path / "home" / "jobs").glob("*/lock")
                             if _locked(p)), "workers to exit", 60)


def _locked(path):
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job trained by `traind run`, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "soak.yaml").write_text(JOB)
    result = CliRunner().invoke(cli, ["run", str(tmp / "soak.yaml"), "--dir", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return final_weights(tmp / "run")


def final_weights(folder):
    saves = list_saves(folder / "saves")[0]
    assert "final" in saves[-1].kinds
    return load_file(saves[-1].path / "model.safetensors")


def assert_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def submit(home, tmp_path, text=JOB, name="soak.yaml"):
    path = tmp_path / name
    path.write_text(text)
    result = traind(home, "submit", path)
    assert result.exit_code == 0, result.output


def test_a_submitted_job_trains_to_the_same_weights_as_traind_run(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "done", "the job to finish")
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)
    row = rows(daemons.home)["soak"]
    assert row["step"] == row["total_steps"] and row["restarts"] == 0 and row["device"] == "cpu"


def test_the_daemon_sigkilled_mid_run_again_and_again_loses_nothing(daemons, tmp_path, reference):
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    for kill in range(3):
        proc = daemons.start()
        before = rows(daemons.home).get("soak", {}).get("step", 0)
        wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > before + 40, f"progress ({kill})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not _locked(folder / "lock"), "the orphaned worker to save and exit", 60)
    daemons.start()
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    assert (folder / "log").read_text().count("resumed from save") == 3


def test_a_worker_sigkilled_is_restarted_and_finishes_the_same(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > 40, "progress")
    pid = int((folder / "lock").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    assert rows(daemons.home)["soak"]["restarts"] == 1
    status = json.loads(traind(daemons.home, "status", "soak", "--json").output)
    assert "killed by SIGKILL" in status["last_error"]


def test_pause_save_resume_and_cancel(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "running", "the job to start")
    assert "save requested" in traind(daemons.home, "save", "soak", "--note", "before lunch").output
    wait_for(lambda: any("manual" in s.kinds for s in list_saves(folder / "saves")[0]), "the quicksave")
    manual = next(s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds)
    assert manual.note == "before lunch"
    traind(daemons.home, "pause", "soak")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "paused", "the pause")
    paused_at = list_saves(folder / "saves")[0][-1].step
    assert traind(daemons.home, "save", "soak").exit_code == 1  # not running
    traind(daemons.home, "resume", "soak")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert f"at step {paused_at}" in (folder / "log").read_text()
    assert_equal(final_weights(folder), reference)  # a manual save and a pause change nothing
    assert traind(daemons.home, "resume", "soak").exit_code == 1  # done: nothing to resume
    submit(daemons.home, tmp_path, JOB.replace("name: soak", "name: other"), "other.yaml")
    wait_for(lambda: rows(daemons.home).get("other", {}).get("state") == "running", "the second job to start")
    traind(daemons.home, "cancel", "other")
    wait_for(lambda: rows(daemons.home)["other"]["state"] == "cancelled", "the cancel")


def test_sigterm_stops_with_jobs_queued_and_they_resume_at_the_next_start(daemons, tmp_path, reference):
    proc = daemons.start()
    submit(daemons.home, tmp_path)
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("step", 0) > 40, "progress")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert rows(daemons.home)["soak"]["state"] == "queued"
    daemons.start()
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)


def test_a_bad_file_is_rejected_while_the_daemon_serves_on(daemons, tmp_path):
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(lambda: inbox.is_dir(), "the inbox")
    (inbox / "broken.toml").write_text("[model\n")
    wait_for(lambda: (daemons.home / "rejected" / "broken.toml.error").exists(), "the rejection")
    assert "not valid TOML" in (daemons.home / "rejected" / "broken.toml.error").read_text()
    (inbox / "fine.toml").write_text('[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n'
                                     '[train]\nepochs = 1\n')
    wait_for(lambda: rows(daemons.home).get("fine", {}).get("state") == "done", "the good job")
    assert proc.poll() is None


def test_one_daemon_per_home(daemons):
    first = daemons.start()
    wait_for(lambda: (daemons.home / "daemon.lock").exists(), "the first daemon")
    second = daemons.start()
    assert second.wait(60) == 1
    assert "another traind daemon serves" in second.stderr.read()
    assert first.poll() is None


def test_sd_notify_says_ready_watchdog_and_stopping(tmp_path):
    import socket

    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "--home", str(tmp_path / "home"), "daemon"],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        seen = []

        def until(word):
            while not any(word in m for m in seen):
                seen.append(sock.recv(4096).decode())
            return True

        assert until("READY=1") and until("STATUS=0 running, 0 queued") and until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert until("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        sock.close()


def test_load_game_queues_a_finished_job_again_and_it_replays_to_the_same_end(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "done", "the job to finish")
    early = list_saves(folder / "saves")[0][0]
    result = traind(daemons.home, "load", "soak", early.id)
    assert result.exit_code == 0 and "queued again" in result.output
    wait_for(lambda: f"resumed from save {early.id}" in (folder / "log").read_text()
             and rows(daemons.home)["soak"]["state"] == "done", "the replay to finish")
    assert_equal(final_weights(folder), reference)
    assert early.id in {s.id for s in list_saves(folder / "saves")[0]}


def test_a_slow_hand_copy_into_a_live_daemon_is_taken_once_complete(daemons):
    daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(inbox.is_dir, "the inbox")
    text = '[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n[train]\nepochs = 1\n'
    with open(inbox / "slow.toml", "w") as f:  # a copy that pauses half-way, as cp over a slow disk does
        f.write(text[:25])
        f.flush()
        time.sleep(0.4)
        f.write(text[25:])
    wait_for(lambda: rows(daemons.home).get("slow", {}).get("state") == "done", "the job")
    assert list((daemons.home / "rejected").iterdir()) == []


def test_load_game_into_a_running_job(daemons, tmp_path, reference):
    daemons.start()
    submit(daemons.home, tmp_path)
    folder = daemons.home / "jobs" / "soak"
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "running", "the job to start")
    traind(daemons.home, "save", "soak")  # a quicksave: rotation never takes it away before the load
    wait_for(lambda: any("manual" in s.kinds for s in list_saves(folder / "saves")[0]), "the quicksave")
    wait_for(lambda: len(list_saves(folder / "saves")[0]) >= 3, "saves after it")
    early = next(s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds)
    result = traind(daemons.home, "load", "soak", early.id)
    assert result.exit_code == 0 and f"continues from save {early.id}" in result.output
    wait_for(lambda: f"resumed from save {early.id}" in (folder / "log").read_text(), "the reload")
    wait_for(lambda: rows(daemons.home)["soak"]["state"] == "done", "the job to finish")
    assert_equal(final_weights(folder), reference)
    watched = traind(daemons.home, "status", "soak", "--watch")
    assert watched.exit_code == 0 and "soak: done" in watched.output


def test_a_file_whose_code_kills_its_process_is_rejected_and_the_daemon_serves_on(daemons):
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(inbox.is_dir, "the inbox")
    (inbox / "poison.py").write_text("import os\ndef net():\n    os._exit(9)\n")
    (inbox / "poison.toml").write_text('python_path = ["."]\n[model]\ntarget = "poison:net"\n')
    wait_for(lambda: (daemons.home / "rejected" / "poison.toml.error").exists(), "the rejection")
    assert "ended the validating process" in (daemons.home / "rejected" / "poison.toml.error").read_text()
    assert proc.poll() is None


def test_two_hundred_files_dropped_into_a_live_daemon_killed_mid_intake_are_each_accepted_once(daemons, tmp_path):
    """200 files renamed into inbox/ at once; the daemon is SIGKILLed while it takes them
    and started again. Every file becomes exactly one job (none lost, none twice, none
    rejected), and deleting the index on the way loses nothing."""
    daemons.start()
    inbox, jobs = daemons.home / "inbox", daemons.home / "jobs"
    wait_for(lambda: inbox.is_dir(), "the inbox")
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"many{i:03d}" for i in range(200)]
    for i, name in enumerate(names):
        (staging / f"{name}.toml").write_text(f'[model]\nlayers = [["Linear", 4, {2 + i % 7}]]\n'
                                              '[data]\nsamples = 16\nfeatures = 4\nclasses = 2\n'
                                              '[train]\nepochs = 1\n')
    for name in names:
        os.rename(staging / f"{name}.toml", inbox / f"{name}.toml")
    accepted = lambda: [p for p in jobs.glob("*") if (p / "state.json").exists()] if jobs.is_dir() else []  # noqa: E731
    wait_for(lambda: len(accepted()) >= 40, "some files to be taken")
    daemons.procs[-1].kill()
    daemons.procs[-1].wait()
    (daemons.home / "index.sqlite").unlink(missing_ok=True)
    daemons.start()
    left = lambda: [p for p in inbox.iterdir() if p.name != ".claimed"] + list((inbox / ".claimed").iterdir())  # noqa: E731
    wait_for(lambda: len(accepted()) == 200 and not left(), "every file to be taken", timeout=120)
    listed = rows(daemons.home)
    assert sorted(listed) == names
    assert sorted(p.name for p in jobs.iterdir()) == names  # no second copies under other names
    assert not (daemons.home / "rejected").exists() or not any((daemons.home / "rejected").iterdir())
    for i, name in enumerate(names):
        spec = json.loads((jobs / name / "spec.json").read_text())
        assert spec["model"]["layers"][0][2] == 2 + i % 7  # each job holds its own file


GREEDY = '''
import torch
from torch import nn


class Greedy(nn.Module):
    """Trains a few steps, then asks for 128 TiB."""

    def __init__(self):
        super().__init__()
        self.lin, self.calls = nn.Linear(20, 10), 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls > 3:
            torch.empty(2 ** 45)
        return self.lin(x)
'''


def test_a_job_out_of_memory_is_told_apart_in_status_and_not_looped(daemons):
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(lambda: inbox.is_dir(), "the inbox")
    (inbox / "greedy.py").write_text(GREEDY)
    (inbox / "greedy.toml").write_text('python_path = ["."]\n[model]\ntarget = "greedy:Greedy"\n'
                                       '[data]\nsamples = 512\n[train]\nepochs = 2\n')
    wait_for(lambda: rows(daemons.home).get("greedy", {}).get("state") == "failed", "the job to fail", timeout=180)
    status = json.loads(traind(daemons.home, "status", "greedy", "--json").output)
    assert status["cause"] == "out_of_memory"
    assert "ran out of memory (out of memory at step 3" in status["last_error"]  # 1 dry forward + 2 steps
    assert status["restarts"] >= 1  # tried again: memory may have been taken by someone else
    assert proc.poll() is None


BIG_SAVES = """
name = "filler"
[model]
layers = [["Linear", 20, 1024], ["ReLU"], ["Linear", 1024, 1024], ["ReLU"], ["Linear", 1024, 10]]
[data]
samples = 2048
[train]
epochs = 3
[checkpoint]
every_steps = 4
keep_last = 2
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB filesystem of its own (tmpfs), where a job can fill the disk for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_job_loses_nothing_and_it_goes_on_when_space_returns(small_disk, tmp_path):
    (tmp_path / "filler.toml").write_text(BIG_SAVES)
    reference = CliRunner().invoke(cli, ["run", str(tmp_path / "filler.toml"), "--dir", str(tmp_path / "ref")])
    assert reference.exit_code == 0, reference.output
    d = Daemons(small_disk / "home")
    try:
        d.start()
        wait_for(lambda: (small_disk / "home" / "inbox").is_dir(), "the inbox")
        save_bytes = list_saves(tmp_path / "ref" / "saves")[0][-1].bytes  # about 13 MB a save
        ballast = small_disk / "ballast"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        ballast.write_bytes(b"\0" * (free - int(2.5 * save_bytes)))  # room for two saves, not three
        submit(d.home, tmp_path, BIG_SAVES, "filler.toml")
        status = lambda: json.loads(traind(d.home, "status", "filler", "--json").output)  # noqa: E731
        wait_for(lambda: "filler" in rows(d.home) and status()["cause"] == "disk_full", "the disk to fill",
                 timeout=180)
        info = status()
        assert info["state"] == "queued"
        assert "the disk is full" in info["last_error"] or "not enough disk space" in info["last_error"]
        assert "it continues once there is room" in info["last_error"]
        folder = d.home / "jobs" / "filler"
        kept = list_saves(folder / "saves")[0]
        assert kept and all(not verify(s.path) for s in kept)  # what was saved before is whole
        assert not list((folder / "saves").glob(".staging-*"))
        assert d.procs[-1].poll() is None  # the daemon serves on
        ballast.unlink()  # space returns
        wait_for(lambda: status()["state"] == "done", "the job to go on and finish", timeout=180)
        assert_equal(final_weights(folder), final_weights(tmp_path / "ref"))
    finally:
        d.close()


def test_a_fuzzed_inbox_never_kills_the_daemon(daemons):
    """Garbage of every kind dropped in at once: random bytes, broken and deep TOML, YAML
    bombs, huge numbers, NUL bytes, odd names. Each file is rejected with its error beside
    it, the good one among them trains, and the daemon serves on."""
    import random

    rng = random.Random(5)
    proc = daemons.start()
    inbox = daemons.home / "inbox"
    wait_for(lambda: inbox.is_dir(), "the inbox")
    garbage = {
        "bytes.toml": bytes(rng.randrange(256) for _ in range(4000)),
        "nul.json": b'{"model": {"layers": [["Linear\x00", 2, 2]]}}',
        "deep.json": b"[" * 50000 + b"]" * 50000,
        "deep.toml": b"a = " + b"[" * 5000 + b"]" * 5000,
        "bomb.yaml": b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
            f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},'
            f'*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n'.encode()
            for i in range(8)),
        "huge.toml": b'seed = 99999999999999999999999999\n[model]\nlayers = [["Linear", 1e308, 10]]\n',
        "empty.yaml": b"",
        "utf16.json": '{"model": {}}'.encode("utf-16"),
        "tag.yaml": b"!!python/object/apply:os.system ['touch /tmp/traind-pwned']\n",
        "a..b.json": b"{}",
        "name with spaces.toml": b'[model]\nlayers = [["Linear", 20, 10]]\n',
    }
    for i in range(40):
        garbage[f"random{i}.{rng.choice(['toml', 'yaml', 'json'])}"] = bytes(
            rng.choice(b'[]{}:=,"\'\n\t -#&*!abcdefxyz0123456789') for _ in range(rng.randrange(1, 300)))
    good = '[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n[train]\nepochs = 1\n'
    for name, data in garbage.items():
        (inbox / f".{name}.tmp").write_bytes(data)
        os.rename(inbox / f".{name}.tmp", inbox / name)
    (inbox / "good.toml").write_text(good)
    rejected = daemons.home / "rejected"
    wait_for(lambda: rows(daemons.home).get("good", {}).get("state") == "done", "the good job", timeout=180)
    wait_for(lambda: not [p for p in inbox.iterdir() if not p.name.startswith(".")], "every file to be taken")
    errors = sorted(p.name for p in rejected.glob("*.error")) if rejected.is_dir() else []
    accepted = set(rows(daemons.home))
    for name in garbage:
        assert f"{name}.error" in errors or Path(name).stem in accepted, f"{name}: neither rejected nor accepted"
    for error in rejected.glob("*.error"):
        assert error.read_text().strip(), f"{error.name} says nothing"
    assert not os.path.exists("/tmp/traind-pwned")
    assert proc.poll() is None


def test_a_job_folder_copied_in_from_traind_run_is_adopted_and_finishes_the_same(daemons, tmp_path, reference):
    """`traind run` stopped half-way elsewhere; its folder copied into a live daemon's
    jobs/ is picked up once the copy is still, and resumed to the same weights."""
    (tmp_path / "soak.yaml").write_text(JOB)
    run = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(tmp_path / "soak.yaml"), "--dir",
                            str(tmp_path / "elsewhere")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list_saves(tmp_path / "elsewhere" / "saves")[0]) >= 2, "two saves elsewhere")
    run.send_signal(signal.SIGTERM)  # it saves and stops
    assert run.wait(60) == 0
    assert "final" not in list_saves(tmp_path / "elsewhere" / "saves")[0][-1].kinds
    daemons.start()
    wait_for(lambda: (daemons.home / "jobs").is_dir(), "the daemon")
    shutil.copytree(tmp_path / "elsewhere", daemons.home / "jobs" / "soak")
    wait_for(lambda: rows(daemons.home).get("soak", {}).get("state") == "done", "the adopted job to finish")
    assert "resumed from save" in (daemons.home / "jobs" / "soak" / "log").read_text()
    assert_equal(final_weights(daemons.home / "jobs" / "soak"), reference)
