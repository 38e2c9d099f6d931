import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import MLP
from traind.daemon.cli import cli
from traind.store.saves import list_saves

JOB = MLP + "[checkpoint]\nevery_steps = 5\nkeep_last = 100\n"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saves-cli")
    path = tmp / "small.toml"
    path.write_text(JOB)
    result = invoke("run", path, "--dir", tmp / "small")
    assert result.exit_code == 0, result.output
    return tmp / "small"


def test_saves_json_has_the_contract_keys_oldest_first(folder):
    rows = json.loads(invoke("saves", "--dir", folder, "--json").output)
    assert rows and all({"id", "step", "epoch", "kinds", "metrics", "bytes", "created", "verified"} <= r.keys()
                        for r in rows)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert all(r["whole"] is True and r["verified"] is None for r in rows)  # not re-hashed: not claimed
    assert "final" in rows[-1]["kinds"] and set(rows[-1]["kinds"]) <= {"auto", "best", "manual", "milestone", "final"}


def test_saves_table_for_people(folder):
    out = invoke("saves", "--dir", folder).output
    assert out.splitlines()[0].split()[:4] == ["id", "step", "epoch", "kinds"]
    assert "auto,best,final" in out


def test_saves_by_name_in_a_home(folder):
    result = invoke("--home", folder.parent.parent, "saves", "nope")
    assert result.exit_code == 3 and "no job folder" in result.output


def test_verify_ok_then_corrupt_exits_1(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    ok = invoke("verify", "--dir", copy)
    assert ok.exit_code == 0 and ok.output.count(": ok") == len(list_saves(copy / "saves")[0])
    victim = list_saves(copy / "saves")[0][1]
    data = bytearray((victim.path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (victim.path / "optimizer.safetensors").write_bytes(bytes(data))
    rows = {r["id"]: r for r in json.loads(invoke("saves", "--dir", copy, "--json", "--verify").output)}
    assert rows[victim.id]["whole"] is True and rows[victim.id]["verified"] is False  # same size, other bytes
    assert all(r["verified"] for i, r in rows.items() if i != victim.id)
    table = invoke("saves", "--dir", copy).output
    assert " yes " not in table and "re-hash every byte" in table  # the plain table claims no verification
    assert "CORRUPT" in invoke("saves", "--dir", copy, "--verify").output
    bad = invoke("verify", "--dir", copy)
    assert bad.exit_code == 1
    assert f"copy/{victim.id}: CORRUPT: optimizer.safetensors: contents changed" in bad.output
    assert "1 corrupt save" in bad.output


def test_export_last_best_and_by_id(folder, tmp_path):
    saves = list_saves(folder / "saves")[0]
    for args, expected in ((["--last"], saves[-1]), (["--save", saves[2].id], saves[2]), ([], saves[-1])):
        out = tmp_path / "model.safetensors"
        result = invoke("export", "--dir", folder, *args, "-o", out)
        assert result.exit_code == 0, result.output
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        assert meta["save"] == expected.id and meta["step"] == str(expected.step) and meta["job"] == "small"
        assert json.loads(meta["metrics"]) == expected.metrics
        assert load_file(out).keys() == load_file(expected.path / "model.safetensors").keys()
    best = invoke("export", "--dir", folder, "--best", "-o", tmp_path / "b.safetensors")
    assert best.exit_code == 0
    bests = [s for s in saves if "best" in s.kinds]
    chosen = min(bests, key=lambda s: s.metrics["val_loss"])
    assert f"exported save {chosen.id}" in best.output
    assert invoke("export", "--dir", folder, "--save", "nope", "-o", tmp_path / "x").exit_code == 3
    assert invoke("export", "--dir", folder, "--best", "--last", "-o", tmp_path / "x").exit_code == 2


def test_load_then_run_continues_from_that_save(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    chosen = list_saves(copy / "saves")[0][3]
    result = invoke("load", "--dir", copy, chosen.id)
    assert result.exit_code == 0 and f"continues from save {chosen.id}" in result.output
    assert invoke("load", "--dir", copy, "nope").exit_code == 3
    path = tmp_path / "small.toml"
    path.write_text(JOB)
    rerun = invoke("run", path, "--dir", copy)
    assert rerun.exit_code == 0
    assert f"resumed from save {chosen.id} at step {chosen.step}" in rerun.output
    final_a = load_file(list_saves(folder / "saves")[0][-1].path / "model.safetensors")
    final_b = load_file(list_saves(copy / "saves")[0][-1].path / "model.safetensors")
    assert all((final_a[k] == final_b[k]).all() for k in final_a)


def test_a_reload_request_that_a_start_answers_by_taking_its_load_does_not_stop_that_run(folder, tmp_path):
    """A load game sent while the job was between runs (a daemon's worker starting, a Slurm
    job pending): the next run takes the load at its start, and the reload request that
    came with it must not stop that run again (a needless restart)."""
    import shutil

    from traind.daemon import requests
    from traind.jobs.loadgame import request_load

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    chosen = list_saves(copy / "saves")[0][3]
    request_load(copy, chosen.id)
    requests.send(copy, "reload")
    path = tmp_path / "small.toml"
    path.write_text(JOB)
    rerun = invoke("run", path, "--dir", copy)
    assert rerun.exit_code == 0 and f"resumed from save {chosen.id}" in rerun.output
    assert "done: step" in rerun.output and "for a load request" not in rerun.output
    assert requests.pending(copy) == []


def test_plot_writes_a_png_of_the_curves(folder, tmp_path):
    out = tmp_path / "curves.png"
    result = invoke("plot", "--dir", folder, "-o", out)
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    empty = tmp_path / "empty"
    (empty / "saves").mkdir(parents=True)
    result = invoke("plot", "--dir", empty, "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "has no metrics yet" in result.output


def test_verify_tells_a_removal_cut_short_from_a_corrupt_save(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    victim = list_saves(copy / "saves")[0][0]
    half = copy / "saves" / f".deleting-{victim.id}"
    victim.path.rename(half)  # removal cut short: renamed out, some files already gone
    (half / "model.safetensors").unlink()
    result = invoke("verify", "--dir", copy)
    assert result.exit_code == 0 and "CORRUPT" not in result.output
    assert f".deleting-{victim.id}: not a save (a save being removed" in result.output
    assert invoke("verify", "--dir", copy, "--quiet").output == ""


def test_export_best_takes_the_save_retention_keeps_as_best(tmp_path):
    """One rule for "best" (store/retention.py): a tie goes to the older save, a non-finite
    value is never best, a save before best_after_epoch does not count."""
    import torch

    from traind.store.retention import Policy
    from traind.store.store import SaveStore

    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps({"checkpoint": {"monitor": "val_loss", "mode": None,
                                                                 "best_after_epoch": 2}}))
    store = SaveStore(folder / "saves", Policy(keep_last=10, keep_best=5))
    for epoch, loss in ((1, 0.1), (2, float("nan")), (3, 0.4), (4, 0.4)):
        seq, save_id = store.reserve(epoch * 10)
        store.write(seq, save_id, {"model.safetensors": ({"w": torch.zeros(2)}, {})},
                    {"state.json": {"model": {"tied": {}}}},
                    {"step": epoch * 10, "epoch": epoch, "kinds": ["auto", "best"], "metrics": {"val_loss": loss}, "job": "job"})
    assert len(store.saves()) == 4
    kept_as_best = store.saves()[2].id  # epoch 3: 0.4, the first of the tie
    result = invoke("export", "--dir", folder, "--best", "-o", tmp_path / "best.safetensors")
    assert result.exit_code == 0, result.output
    assert f"exported save {kept_as_best}" in result.output


def test_export_is_durable_before_it_is_reported(folder, tmp_path):
    from tests.crashsim import RecordingFS
    from traind.daemon.home import Home
    from traind.daemon.saves_cli import export

    fs = RecordingFS()
    out = tmp_path / "model.safetensors"
    export(Home(tmp_path / "home"), None, folder, None, False, out, fs=fs)
    tmp = out.with_name(f".{out.name}.tmp")
    assert fs.log == [("fsync", tmp), ("rename", tmp, out), ("fsync_dir", tmp_path)]
    assert load_file(out).keys() == load_file(list_saves(folder / "saves")[0][-1].path / "model.safetensors").keys()


def test_export_ema_writes_the_moving_average_and_a_job_without_one_says_so(folder, tmp_path):
    job = tmp_path / "ema.toml"
    job.write_text(MLP.replace("epochs = 3", "epochs = 1\nema = 0.9"))
    assert invoke("run", job, "--dir", tmp_path / "run").exit_code == 0
    newest = list_saves(tmp_path / "run" / "saves")[0][-1]
    result = invoke("export", "--dir", tmp_path / "run", "--ema", "-o", tmp_path / "ema.safetensors")
    assert result.exit_code == 0 and f"exported the EMA of save {newest.id}" in result.output
    exported, ema = load_file(tmp_path / "ema.safetensors"), load_file(newest.path / "ema.safetensors")
    assert exported.keys() == ema.keys() and all(exported[k].equal(ema[k]) for k in ema)
    assert not all(exported[k].equal(v) for k, v in load_file(newest.path / "model.safetensors").items())
    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert f.metadata()["traind.ema"] == "0.9"
    plain = invoke("export", "--dir", folder, "--ema", "-o", tmp_path / "none.safetensors")
    assert plain.exit_code == 3 and "holds no EMA" in plain.output
