"""Real daemons under faults (polling with deadlines, never bare sleeps): a flood of files
and a kill mid-intake, a job out of memory, a full disk, a fuzzed inbox, and a job folder
copied in from elsewhere."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.daemon.live import JOB, Daemons, assert_equal, final_weights, rows, submit, traind, wait_for
from traind.daemon.cli import cli
from traind.store.saves import list_saves, verify


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
    assert "aliases (*name)" in (rejected / "bomb.yaml.error").read_text()  # refused as read (walked: 77 s)
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
