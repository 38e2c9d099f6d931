"""The commit protocol under crashes and faults, in the manner of SQLite's crash tests
and ALICE: record the I/O of a save, build every state a crash could leave, recover."""

import errno
import os
import shutil

import pytest
import torch

from traind.store import commit, retention
from traind.store.errors import SaveFailed
from tests.crashsim import FailingFS, RecordingFS, crash_state
from traind.store.fs import FileSystem
from traind.store.saves import list_saves, load_tensors, verify
from traind.store.store import SaveStore

def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model.safetensors": ({"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
                                  {"job": "t"}),
            "optimizer.safetensors": ({"m": torch.randn(64, 32, generator=g)}, {})}


def save(store, step, seed):
    seq, save_id = store.reserve(step)
    return store.write(seq, save_id, tensors(seed), {"state.json": {"step": step, "seed": seed}},
                       {"step": step, "epoch": 0, "kinds": ["auto"], "metrics": {}})


@pytest.fixture
def recorded(tmp_path):
    """A store with one acknowledged save, its folder as it was, and the I/O of a second save."""
    base = tmp_path / "base"
    first = save(SaveStore(base / "saves"), 10, seed=1)
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    second = save(SaveStore(base / "saves", fs=fs), 20, seed=2)
    return base, before, fs.log, first, second


@pytest.mark.parametrize("mode", ["all", "drop", "torn", "lost-dirs"])
def test_every_crash_state_recovers_the_new_save_whole_or_the_one_before(recorded, tmp_path, mode):
    base, before, ops, first, second = recorded
    outcomes = set()
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        store = SaveStore(state / "saves")
        found = store.newest_good()
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        assert found is not None and found.id in (first.id, second.id), where
        assert not verify(store.dir / first.id), f"{where}: the acknowledged save was damaged"
        expected = tensors(2 if found.id == second.id else 1)["model.safetensors"][0]
        loaded = load_tensors(found, "model.safetensors")
        assert all(torch.equal(loaded[n], t) for n, t in expected.items()), f"{where}: loaded torn data"
        assert not list(store.dir.glob(".staging-*")), f"{where}: staging left behind"
        if k == len(ops):
            assert found.id == second.id, f"{where}: a save reported as committed did not survive"
        outcomes.add(found.id)
    assert outcomes == {first.id, second.id}  # the crash points reach both outcomes


@pytest.mark.parametrize("mode", ["all", "drop", "torn", "lost-dirs"])
def test_a_save_rotated_out_leaves_by_one_step_wherever_a_crash_cuts_its_removal(tmp_path, mode):
    """keep_last = 1: the second save's commit removes the first. A folder's removal is many
    steps (an unlink per file, an rmdir); a crash in the middle must never leave a half
    save behind, for `traind verify` to call corrupt or for retention to never list again."""
    policy = retention.Policy(keep_last=1, keep_best=0)
    base = tmp_path / "base"
    first = save(SaveStore(base / "saves", policy), 10, seed=1)
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    second = save(SaveStore(base / "saves", policy, fs=fs), 20, seed=2)
    ops = fs.log
    assert [op[0] for op in ops].count("unlink") >= 4  # the first save's files, one by one
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        store = SaveStore(state / "saves", policy)  # the next run's start-up sweep
        found, broken = list_saves(store.dir)
        assert broken == [], f"{where}: a half-removed save is left: {broken}"
        assert all(not verify(s.path) for s in found), f"{where}: a listed save does not verify"
        assert {s.id for s in found} <= {first.id, second.id} and found, where
        assert sorted(p.name for p in store.dir.iterdir()) == sorted(s.id for s in found), f"{where}: leftovers"
        if k == len(ops):
            assert [s.id for s in found] == [second.id], where


def test_states_are_built_from_the_whole_protocol(recorded):
    _, _, ops, _, second = recorded
    kinds = [op[0] for op in ops]
    created = [op[1].name for op in ops if op[0] == "create"]
    assert created[-1] == commit.MANIFEST  # the manifest is written last
    rename = kinds.index("rename")
    assert kinds.count("fsync") == len(created)
    assert max(i for i, k in enumerate(kinds) if k == "fsync") < rename  # every file durable before the rename
    assert ops[rename - 1] == ("fsync_dir", ops[rename][1])  # and the staging folder's entries too
    assert ops[rename + 1] == ("fsync_dir", second.path.parent)  # the rename made durable before reporting


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_fault_at_any_operation_fails_the_save_and_loses_nothing(tmp_path, code):
    first = save(SaveStore(tmp_path / "saves"), 10, seed=1)
    counting = RecordingFS()
    (tmp_path / "count" / "saves").mkdir(parents=True)  # (as the faulted store's folder is there)
    save(SaveStore(tmp_path / "count" / "saves", fs=counting), 10, seed=2)
    operations = sum(1 for op in counting.log if op[0] != "remove_tree")
    for n in range(operations):
        store = SaveStore(tmp_path / "saves", fs=FailingFS(n, code))
        with pytest.raises(SaveFailed) as caught:
            save(store, 20, seed=2)
        assert ("the disk is full" in str(caught.value)) == (code == errno.ENOSPC)
        assert "earlier saves are untouched" in str(caught.value)
        reopened = SaveStore(tmp_path / "saves")
        assert [s.id for s in reopened.saves()] == [first.id], f"fault at operation {n}"
        assert not verify(first.path)
        assert not list(reopened.dir.glob(".staging-*")), f"fault at operation {n} left its staging"


@pytest.mark.parametrize("mode", ["all", "drop", "torn", "lost-dirs"])
def test_a_save_whose_commit_failed_after_its_rename_is_taken_back_by_one_step(tmp_path, mode):
    """The rename into place happened and the fsync of saves/ failed: the save was never
    acknowledged and must go; a crash in its removal must not leave half a save."""
    class FailsCommitting(RecordingFS):
        def fsync_dir(self, path):
            if path.name == "saves" and any(op[0] == "rename" for op in self.log):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            super().fsync_dir(path)

    base = tmp_path / "base"
    first = save(SaveStore(base / "saves"), 10, seed=1)
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = FailsCommitting()
    with pytest.raises(SaveFailed, match="Input/output error"):
        save(SaveStore(base / "saves", fs=fs), 20, seed=2)
    ops = fs.log
    assert [op[0] for op in ops].count("unlink") >= 3  # taken back file by file, after a rename out
    for k in range(len(ops) + 1):
        state = tmp_path / f"state-{k}"
        crash_state(base, before, ops[:k], mode, state)
        where = f"crash after {k} of {len(ops)} operations ({mode})"
        store = SaveStore(state / "saves")
        found, broken = list_saves(store.dir)
        assert broken == [], f"{where}: a half-removed save is left: {broken}"
        assert first.id in {s.id for s in found} and all(not verify(s.path) for s in found), where
        assert sorted(p.name for p in store.dir.iterdir()) == sorted(s.id for s in found), f"{where}: leftovers"


def test_too_little_free_space_fails_before_writing(tmp_path):
    class Full(FileSystem):
        def free_bytes(self, path):
            return 1000

    with pytest.raises(SaveFailed, match="not enough disk space .* free some space"):
        save(SaveStore(tmp_path / "saves", fs=Full()), 1, seed=1)
    assert list((tmp_path / "saves").iterdir()) == []


def test_leftover_staging_is_swept_at_start(tmp_path):
    stage = tmp_path / "saves" / ".staging-000007-s3"
    stage.mkdir(parents=True)
    (stage / "model.safetensors").write_bytes(b"half")
    assert SaveStore(tmp_path / "saves").swept == [stage.name]
    assert list((tmp_path / "saves").iterdir()) == []


def test_the_first_save_of_a_new_store_survives_with_the_folder_it_made(tmp_path):
    """A new saves/ folder is a directory change like any other: lost in a crash unless its
    parent is fsynced, and every save in it with it."""
    base = tmp_path / "base"
    base.mkdir()
    before = tmp_path / "before"
    shutil.copytree(base, before)
    fs = RecordingFS()
    first = save(SaveStore(base / "saves", fs=fs), 10, seed=1)
    crash_state(base, before, fs.log, "lost-dirs", tmp_path / "state")
    assert [s.id for s in list_saves(tmp_path / "state" / "saves")[0]] == [first.id]
