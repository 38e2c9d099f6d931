"""Power loss in a job's history (its log and metrics.jsonl), as tests/store/test_commit.py
does for saves: record the I/O of a short run with rotating saves, appends to the history
included, build every state a crash could leave, and check that the history reaches at
least as far as the newest save that survived, and that every "saved ID" line the log kept
names a save the disk kept (or one a newer kept save replaced)."""

import errno
import os
import re
import shutil

import pytest

from tests.crashsim import RecordingFS, crash_state
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs.jobfile import parse_spec
from traind.jobs.folder import LOG_FILE, METRICS_FILE, SAVES
from traind.jobs.metrics import Recorder, read_metrics
from traind.jobs.train import Trainer
from traind.store.errors import SaveFailed
from traind.store.fs import FileSystem
from traind.store.saves import list_saves, verify
from traind.store.store import SaveStore

MODES = ["all", "drop", "torn", "lost-dirs"]

JOB = """
seed = 0
[model]
layers = [["Linear", 20, 16], ["ReLU"], ["Linear", 16, 10]]
[data]
samples = 96
batch_size = 32
val_fraction = 0.25
[train]
epochs = 3
log_every_steps = 1
[checkpoint]
every_epochs = 1
keep_last = 1
keep_best = 0
"""


def saved_ids(folder):
    """The saves the log acknowledged, in order (a torn line may read as anything)."""
    path = folder / LOG_FILE
    text = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
    return re.findall(r" saved (\d{6}-s\d+) \(", text)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A fresh job folder, and the I/O of training it to the end with a save per epoch,
    each rotating the one before out."""
    base = tmp_path_factory.mktemp("history") / "base"
    folder = base / "job"
    folder.mkdir(parents=True)  # (the daemon's intake made it, durably)
    before = base.parent / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    recorder = Recorder(folder, fs=fs)
    trainer = Trainer(build_job(parse_spec(JOB, "toml", folder / "job.toml"), "history"), recorder)
    checkpoints = Checkpointer(trainer, folder, recorder, fs=fs)
    try:
        assert trainer.fit(checkpoints.boundary)
    finally:
        checkpoints.close()
        recorder.close()
    return base, before, fs.log


@pytest.mark.parametrize("mode", MODES)
def test_the_history_up_to_every_save_a_crash_leaves_is_on_disk_with_it(recorded, tmp_path, mode):
    base, before, ops = recorded
    folder = base / "job"
    assert ("create", folder / METRICS_FILE) in ops and ("create", folder / LOG_FILE) in ops
    # appends, recorded: each epoch its step records (one write), its epoch record and its save record
    assert sum(1 for op in ops if op[0] == "write" and op[1] == folder / METRICS_FILE) >= 3 * 3
    newest = set()
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        job = state / "job"
        if not (job / SAVES).is_dir():
            assert not saved_ids(job), f"{where}: the log acknowledges a save in a saves/ folder the disk lost"
            continue
        SaveStore(job / SAVES)  # the next run's start-up sweep
        kept = [s for s in list_saves(job / SAVES)[0] if not verify(s.path)]
        records = read_metrics(job)
        for s in kept:  # all that led to the save is on disk with it
            epochs = {r["epoch"] for r in records if r.get("kind") == "epoch"}
            steps = {r["step"] for r in records if r.get("kind") == "step"}
            assert set(range(1, s.epoch + 1)) <= epochs, f"{where}: epochs before save {s.id} lost: {sorted(epochs)}"
            assert set(range(1, s.step + 1)) <= steps, f"{where}: steps before save {s.id} lost"
            assert any(r.get("kind") == "save" and r.get("id") == s.id for r in records), where
        acknowledged = saved_ids(job)
        if acknowledged:  # the newest acknowledged save, or one that replaced it, survived
            last = int(acknowledged[-1].split("-")[0])
            assert any(s.seq >= last for s in kept), f"{where}: save {acknowledged[-1]} was acknowledged, then lost"
        newest.add(max((s.seq for s in kept), default=0))
        shutil.rmtree(state)
    assert len(newest) >= 3  # crash points fall before the first save, and between the later ones


@pytest.mark.parametrize("mode", MODES)
def test_a_resume_rewriting_the_metrics_leaves_them_whole_wherever_a_crash_cuts_it(tmp_path, mode):
    """A resumed run forgets the records after its save (they will be written again) by
    rewriting metrics.jsonl: a crash in the rewrite keeps the old file or the new, never
    an empty or half one."""
    base = tmp_path / "base"
    folder = base / "job"
    old = Recorder(folder)
    for epoch in (1, 2, 3):
        old.metric({"kind": "epoch", "epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch})
    old.close()
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    resumed = Recorder(folder, fs=fs)
    resumed.keep_until(20, 2)
    resumed.close()
    ops = fs.log
    assert any(op[0] == "rename" for op in ops)
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        epochs = [r["epoch"] for r in read_metrics(state / "job")]
        assert epochs in ([1, 2, 3], [1, 2]), f"{where}: {epochs}"
        if k == len(ops):
            assert epochs == [1, 2], where


def test_a_line_a_crash_tore_is_ended_before_the_next_run_appends(tmp_path):
    (tmp_path / METRICS_FILE).write_bytes(b'{"kind": "epoch", "epoch": 1}\n{"kind": "ep\xff\xfe')  # torn, not UTF-8
    (tmp_path / LOG_FILE).write_bytes(b"2026-12-01 10:00:00,000 INFO saved 000001-s3 (auto)\n2026-12-01 10:00")
    recorder = Recorder(tmp_path)
    recorder.metric({"kind": "epoch", "epoch": 2})
    recorder.log("resumed")
    recorder.close()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / LOG_FILE).read_text("utf-8").splitlines()[-1].endswith("INFO resumed")


def test_a_save_is_not_acknowledged_when_its_history_cannot_be_made_durable(tmp_path):
    class HistoryFails(FileSystem):
        """EIO on fsyncing metrics.jsonl, as a failing disk gives."""

        def __init__(self):
            self.history = set()

        def open_append(self, path):
            fd = super().open_append(path)
            if path.name == METRICS_FILE:
                self.history.add(fd)
            return fd

        def fsync(self, fd):
            if fd in self.history:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            super().fsync(fd)

    folder = tmp_path / "job"
    fs = HistoryFails()
    recorder = Recorder(folder, fs=fs)
    trainer = Trainer(build_job(parse_spec(JOB, "toml", folder / "job.toml"), "history"), recorder)
    checkpoints = Checkpointer(trainer, folder, recorder, fs=fs)
    try:
        with pytest.raises(SaveFailed, match=r"metrics.jsonl .* could not be made durable \(Input/output error"):
            trainer.fit(checkpoints.boundary)
            checkpoints.close()
    finally:
        recorder.close()  # (its fsync fails again: the error that ended the run stands)
    assert list_saves(folder / SAVES) == ([], [])
    assert not saved_ids(folder)
