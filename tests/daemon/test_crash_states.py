"""Power loss in the daemon's own files, as tests/store/test_commit.py does for saves:
record the I/O of a job-state change and of taking a file from inbox/, build every state
a crash could leave (every prefix; unsynced data dropped or torn; unsynced directory
changes lost), and recover from each."""

import errno
import shutil

import pytest

from tests.conftest import MLP
from tests.crashsim import FailingFS, RecordingFS, crash_state
from traind.daemon.home import Home
from traind.daemon.intake import Intake
from traind.daemon.jobstate import JobRecord, JobState, read_state, transition, write_state

MODES = ["all", "drop", "torn", "lost-dirs"]


@pytest.mark.parametrize("mode", MODES)
def test_a_state_change_cut_anywhere_leaves_the_old_state_or_the_new(tmp_path, mode):
    base = tmp_path / "base"
    folder = base / "jobs" / "j"
    folder.mkdir(parents=True)
    write_state(folder, JobRecord("j", JobState.QUEUED, restarts=2))
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    transition(folder, JobState.RUNNING, fs=fs)
    ops = fs.log
    assert [op[0] for op in ops][-2:] == ["rename", "fsync_dir"]
    seen = set()
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        record = read_state(state / "jobs" / "j")
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        assert record is not None and record.state in (JobState.QUEUED, JobState.RUNNING), where
        assert record.restarts == 2, where
        if k == len(ops):
            assert record.state == JobState.RUNNING, f"{where}: the acknowledged change was lost"
        seen.add(record.state)
    assert seen == {JobState.QUEUED, JobState.RUNNING}


@pytest.mark.parametrize("mode", MODES)
def test_a_file_taken_from_the_inbox_cut_anywhere_becomes_exactly_one_job(tmp_path, mode):
    """The job file was dropped in by a program that never fsynced it (`cp`, an editor):
    its bytes are as unsafe as any unsynced data until intake fsyncs them, which it must
    do before its claim renames the file (else a crash leaves an empty claimed file,
    rejected, and the user's file is gone)."""
    base = tmp_path / "base"
    home = Home(base)
    Intake(home).scan()  # the folders
    dropped = home.inbox / "job.toml"
    dropped.write_text(MLP)  # by another program, not fsynced
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    outcome = Intake(home, fs=fs).scan(delivered={"job.toml"})[0]
    assert outcome.job == "job"
    ops = fs.log
    synced_at = next((i for i, op in enumerate(ops) if op == ("fsync", dropped)), -1)  # -1: never made durable
    endings = set()
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state, unsynced=[dropped])
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        if k <= synced_at and mode != "all":
            continue  # cut before intake touched its bytes: lost with the writer's own unsynced data
        recovered = Home(state)
        durable_job = (recovered.job_dir("job") / "state.json").exists()
        outcomes = Intake(recovered, settle=0.0).scan(now=1e9)  # the next daemon's first scan
        assert [o.error for o in outcomes if o.error] == [], where
        assert sorted(p.name for p in recovered.jobs.iterdir() if not p.name.startswith(".new-")) == ["job"], where
        assert read_state(recovered.job_dir("job")).state == JobState.QUEUED, where
        assert (recovered.job_dir("job") / "job.toml").read_text() == MLP, where
        assert [p.name for p in recovered.inbox.iterdir() if p.name != ".claimed"] == [], where
        assert not [p for p in (recovered.inbox / ".claimed").iterdir() if not p.name.startswith(".")], where
        assert not any(recovered.rejected.iterdir()), where
        if k == len(ops):
            assert durable_job, f"{where}: the job the scan reported was not durable"
        endings.add(durable_job)
    assert endings == {False, True}  # crash points before and after the job became durable
    assert 0 <= synced_at < next(i for i, op in enumerate(ops) if op[0] == "rename" and op[1] == dropped)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_fault_at_any_step_of_intake_loses_nothing_and_the_next_scan_takes_the_file(tmp_path, code):
    counting = RecordingFS()
    probe = Home(tmp_path / "probe")
    Intake(probe).scan()
    (probe.inbox / "job.toml").write_text(MLP)
    Intake(probe, fs=counting).scan(delivered={"job.toml"})
    steps = len(counting.log)
    assert steps >= 10
    for n in range(steps):
        home = Home(tmp_path / f"home-{n}")
        Intake(home).scan()
        (home.inbox / "job.toml").write_text(MLP)
        failed = Intake(home, fs=FailingFS(n, code)).scan(delivered={"job.toml"})  # never raises
        assert all(o.error is None for o in failed), f"fault at step {n}: the file was rejected for our own I/O error"
        outcomes = failed + Intake(home, settle=0.0).scan(now=1e9)
        assert [o.job for o in outcomes if o.job] in (["job"], []), f"fault at step {n}"
        assert sorted(p.name for p in home.jobs.iterdir() if not p.name.startswith(".")) == ["job"], f"step {n}"
        assert (home.job_dir("job") / "job.toml").read_text() == MLP
        assert not any(home.rejected.iterdir()), f"fault at step {n}"
        assert not [p for p in (home.inbox / ".claimed").iterdir()], f"fault at step {n}: left behind"


def test_an_fsync_that_failed_is_never_retried_into_success(tmp_path):
    """After a failed fsync the kernel may have dropped the data while marking the pages
    clean; a second fsync would then succeed on lost data. Intake starts the job folder
    over from the job file instead."""
    home = Home(tmp_path / "home")
    Intake(home).scan()
    (home.inbox / "job.toml").write_text(MLP)
    ops = _ops_of_one_file(tmp_path)
    first_fsync = next(i for i, op in enumerate(ops) if op[0] == "fsync" and op[1].parent.name != "inbox")  # staged
    Intake(home, fs=FailingFS(first_fsync, errno.EIO)).scan(delivered={"job.toml"})
    again = RecordingFS()
    Intake(home, fs=again).scan()
    stage_files = [op[1] for op in again.log if op[0] == "create"]
    assert stage_files, "the retry rewrote nothing"
    assert all(op[0] != "fsync" or op[1] in stage_files for op in again.log)  # each fsync is of a file it wrote anew
    assert (home.job_dir("job") / "job.toml").read_text() == MLP


def _ops_of_one_file(tmp_path):
    home = Home(tmp_path / "ops")
    Intake(home).scan()
    (home.inbox / "job.toml").write_text(MLP)
    fs = RecordingFS()
    Intake(home, fs=fs).scan(delivered={"job.toml"})
    return fs.log
