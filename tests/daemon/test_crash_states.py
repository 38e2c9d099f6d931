"""Power loss in the daemon's own files, as tests/store/test_commit.py does for saves:
record the I/O of a job-state change and of taking a file from inbox/, build every state
a crash could leave (every prefix; unsynced data dropped or torn; unsynced directory
changes lost), and recover from each."""

import shutil

import pytest

from tests.conftest import MLP
from tests.crashsim import RecordingFS, crash_state
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
    base = tmp_path / "base"
    home = Home(base)
    Intake(home).scan()  # the folders
    (home.inbox / "job.toml").write_text(MLP)  # delivered (and durable) before the daemon takes it
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    outcome = Intake(home, fs=fs).scan(closed={"job.toml"})[0]
    assert outcome.job == "job"
    ops = fs.log
    endings = set()
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        where = f"crash after {k} of {len(ops)} operations ({mode})"
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
