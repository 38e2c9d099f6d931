import json
import os

import pytest

from tests.store.test_commit import save
from traind.store import saves
from traind.store.errors import NoSuchSave
from traind.store.retention import Policy
from traind.store.store import SaveStore


@pytest.fixture
def store(tmp_path):
    s = SaveStore(tmp_path / "saves", Policy(keep_last=10))
    for step, seed in ((10, 1), (20, 2), (30, 3)):
        save(s, step, seed)
    return s


def flip_a_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
@pytest.mark.parametrize("where", [0, 7, 500, -1])
def test_a_flipped_bit_anywhere_is_caught(store, name, where):
    newest = store.saves()[-1]
    assert saves.verify(newest.path) == []
    flip_a_bit(newest.path / name, where)
    problems = saves.verify(newest.path)
    assert problems == [f"{name}: contents changed (xxh3_128 does not match the manifest)"]
    assert saves.verify(newest.path, full=False) == []  # a size check alone cannot see it


@pytest.mark.parametrize("name", ["model.safetensors", "state.json"])
def test_truncation_and_loss_are_caught(store, name):
    newest = store.saves()[-1]
    path = newest.path / name
    size = path.stat().st_size
    os.truncate(path, size - 3)
    assert saves.verify(newest.path) == [f"{name}: {size - 3} bytes, the manifest says {size}"]
    path.unlink()
    assert saves.verify(newest.path) == [f"{name}: missing"]


def test_resume_skips_and_quarantines_a_corrupt_save(store):
    newest, before = store.saves()[-1], store.saves()[-2]
    flip_a_bit(newest.path / "model.safetensors", 1000)
    said = []
    found = store.newest_good(report=said.append)
    assert found.id == before.id
    assert said and f"save {newest.id} is corrupt" in said[0] and "quarantined" in said[0]
    assert not newest.path.exists()
    assert (store.dir / saves.QUARANTINE / newest.id / "model.safetensors").exists()
    again = SaveStore(store.dir)
    assert [s.id for s in again.saves()] == [s.id for s in store.saves()]
    assert newest.id not in [s.id for s in again.saves()]
    seq, save_id = again.reserve(40)
    assert seq > newest.seq  # a quarantined save's number is never reused


def test_a_save_without_manifest_is_not_a_save(store):
    newest = store.saves()[-1]
    (newest.path / "manifest.json").unlink()
    listed, broken = saves.list_saves(store.dir)
    assert newest.id not in [s.id for s in listed]
    assert broken and broken[0][0] == newest.path and "no readable manifest.json" in broken[0][1]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "a/b"])
def test_a_manifest_naming_a_file_outside_its_save_is_refused(store, name):
    newest = store.saves()[-1]
    manifest = json.loads((newest.path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": 1, "xxh3_128": "0"}
    (newest.path / "manifest.json").write_text(json.dumps(manifest))
    problems = saves.verify(newest.path)
    assert len(problems) == 1 and "which is not a file of this save" in problems[0]


def test_ids_are_ordered_and_never_collide_when_steps_repeat(tmp_path):
    s = SaveStore(tmp_path / "saves", Policy(keep_last=10))
    ids = [save(s, step, seed=step).id for step in (10, 20, 10, 20)]
    assert ids == ["000001-s10", "000002-s20", "000003-s10", "000004-s20"]
    assert [x.id for x in s.saves()] == ids


def test_get_unknown_save_says_what_exists(store):
    with pytest.raises(NoSuchSave, match="no save 'nope' .* the newest are: 000001-s10, 000002-s20, 000003-s30"):
        store.get("nope")
    assert NoSuchSave.exit_code == 3


def test_no_file_under_saves_is_a_pickle(store):
    for path in store.dir.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and not head.startswith(b"PK"), f"{path} looks like a pickle or zip"


def test_save_ids_are_made_and_read_in_one_place(tmp_path):
    from traind.store.saves import newest_on_disk, save_id, seq_of

    assert save_id(7, 123) == "000007-s123" and seq_of("000007-s123") == 7
    assert seq_of(".staging-000009-s5") is None and seq_of(".deleting-000009-s5") is None and seq_of("quarantine") is None
    for name in ("000002-s10", "000010-s50", ".staging-000011-s60", "quarantine", "000009-s45"):
        (tmp_path / name).mkdir()
    assert newest_on_disk(tmp_path) == tmp_path / "000010-s50"  # by number, not by the name's sort
    assert newest_on_disk(tmp_path / "none") is None


def test_a_copied_save_is_the_same_save_in_another_folder_and_loads_alike(store, tmp_path):
    from safetensors.torch import load_file

    source = store.saves()[-1]
    copied = saves.copy(store.fs, source, SaveStore(tmp_path / "other").dir)
    assert copied.id == source.id and copied.seq == source.seq and copied.step == source.step
    assert saves.verify(copied.path) == []
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (copied.path / name).read_bytes() == (source.path / name).read_bytes()
    assert json.loads((copied.path / "manifest.json").read_text())["copied_from"] == str(source.path)
    assert [s.id for s in SaveStore(tmp_path / "other").saves()] == [source.id]
    assert load_file(copied.path / "model.safetensors").keys() == load_file(source.path / "model.safetensors").keys()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_save_that_is_not_as_its_manifest_says_is_not_copied_and_leaves_nothing(store, tmp_path, damage):
    from traind.store.errors import CorruptSave

    source = store.saves()[-1]
    target = SaveStore(tmp_path / "other").dir
    path = source.path / "model.safetensors"
    if damage == "flip":
        flip_a_bit(path, 100)
    elif damage == "truncate":
        os.truncate(path, 10)
    else:
        path.unlink()
    with pytest.raises(CorruptSave, match="model.safetensors"):
        saves.copy(store.fs, source, target)
    assert os.listdir(target) == []  # neither the save nor a staging or deleting leftover
