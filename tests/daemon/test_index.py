import json
import os
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from traind.daemon.cli import cli
from traind.daemon.home import Home
from traind.daemon.index import INDEX_FILE, Index, row
from traind.daemon.jobstate import JobRecord, JobState, transition, write_state
from traind.jobs.folder import METRICS_FILE, SPEC_FILE


def record(kind, step, **values):
    return json.dumps({"kind": kind, "step": step, **values}) + "\n"


def make_job(home: Home, name: str, lines: str = "", monitor: str = "val_loss", mode=None):
    folder = home.job_dir(name)
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(json.dumps({"checkpoint": {"monitor": monitor, "mode": mode}}))
    (folder / METRICS_FILE).write_text(lines)
    write_state(folder, JobRecord(name, JobState.RUNNING, submitted=1.0))
    return folder


def append(folder, text):
    with open(folder / METRICS_FILE, "a") as f:
        f.write(text)


def fresh(home):
    return [row(home.job_dir(n)) for n in sorted(os.listdir(home.jobs))]


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path / "home")


START = record("start", 0, total_steps=100, device="cpu")


def test_rows_follow_appends_state_changes_and_new_jobs(home):
    a = make_job(home, "a", START + record("step", 10, loss=2.0))
    make_job(home, "b", START)
    index = Index(home)
    assert index.rows() == fresh(home)
    append(a, record("epoch", 20, epoch=1, train_loss=1.5, val_loss=1.2))
    append(a, record("epoch", 40, epoch=2, train_loss=1.1, val_loss=1.4))
    transition(a, JobState.DONE)
    make_job(home, "c", START + record("step", 5, loss=3.0))
    rows = index.rows()
    assert rows == fresh(home)
    assert rows[0] == {"name": "a", "state": "done", "epoch": 2, "step": 40, "total_steps": 100, "loss": 1.1,
                       "best": 1.2, "device": "cpu", "restarts": 0, "monitor": "val_loss", "priority": 0,
                       "submitted": rows[0]["submitted"], "elapsed": rows[0]["elapsed"], "steps_per_s": None,
                       "stopped": None}
    assert [r["name"] for r in rows] == ["a", "b", "c"]


def test_best_follows_the_monitor_and_its_direction(home):
    epochs = record("epoch", 1, epoch=1, val_acc=0.5) + record("epoch", 2, epoch=2, val_acc=0.8) + \
        record("epoch", 3, epoch=3, val_acc=0.6)
    make_job(home, "acc", START + epochs, monitor="val_acc")
    make_job(home, "least", START + epochs, monitor="val_acc", mode="min")
    assert [r["best"] for r in Index(home).rows()] == [0.8, 0.5]


def test_a_torn_last_line_counts_once_it_is_whole(home):
    folder = make_job(home, "a", START)
    index = Index(home)
    line = record("step", 10, loss=0.5)
    append(folder, line[:15])
    assert index.rows()[0]["step"] == 0
    append(folder, line[15:])
    assert index.rows()[0]["step"] == 10
    assert index.rows() == fresh(home)


def test_a_rewritten_metrics_file_is_read_again_from_its_start(home):
    """A resume rewrites the metrics file to the records up to its save (a new file), then
    appends: the index must not fold the new lines onto the old tally."""
    folder = make_job(home, "a", START + record("epoch", 20, epoch=1, val_loss=0.2)
                      + record("epoch", 40, epoch=2, val_loss=0.1))
    index = Index(home)
    assert index.rows()[0]["best"] == 0.1
    kept = START + record("epoch", 20, epoch=1, val_loss=0.2)
    (folder / "tmp").write_text(kept + record("epoch", 40, epoch=2, val_loss=0.3) + record("step", 45, loss=0.9))
    os.replace(folder / "tmp", folder / METRICS_FILE)
    rows = index.rows()
    assert rows == fresh(home)
    assert rows[0]["best"] == 0.2 and rows[0]["step"] == 45


def test_a_same_size_rewrite_in_place_is_noticed(home):
    folder = make_job(home, "a", START + record("step", 10, loss=0.5))
    index = Index(home)
    index.rows()
    text = (folder / METRICS_FILE).read_text()
    with open(folder / METRICS_FILE, "r+") as f:  # same inode, same size, other bytes
        f.write(text.replace('"total_steps": 100', '"total_steps": 900'))
    append(folder, record("step", 20, loss=0.4))
    rows = index.rows()
    assert rows == fresh(home) and rows[0]["total_steps"] == 900


def test_deleting_the_index_loses_nothing(home):
    for name in ("a", "b"):
        make_job(home, name, START + record("step", 7, loss=1.0))
    before = Index(home).rows()
    assert (home.root / INDEX_FILE).exists()
    for path in home.root.glob(f"{INDEX_FILE}*"):
        path.unlink()
    assert Index(home).rows() == before
    assert (home.root / INDEX_FILE).exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_version"])
def test_a_damaged_index_is_rebuilt(home, damage):
    make_job(home, "a", START + record("step", 7, loss=1.0))
    before = Index(home).rows()
    path = home.root / INDEX_FILE
    for extra in home.root.glob(f"{INDEX_FILE}-*"):
        extra.unlink()
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version=99")
        db.execute("UPDATE jobs SET row = '{\"name\": \"wrong\"}'")
        db.commit()
        db.close()
    assert Index(home).rows() == before
    assert Index(home).rows() == before
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    db.close()


def test_ls_works_where_no_index_can_be_kept(home):
    make_job(home, "a", START + record("step", 7, loss=1.0))
    (home.root / INDEX_FILE).mkdir()  # the index's path taken by a folder: cannot open, cannot discard
    assert Index(home).rows() == fresh(home)


def test_a_removed_job_leaves_the_index(home):
    make_job(home, "a", START)
    make_job(home, "b", START)
    Index(home).rows()
    os.rename(home.job_dir("b"), home.jobs / ".removing-b")
    assert [r["name"] for r in Index(home).rows()] == ["a"]
    db = sqlite3.connect(home.root / INDEX_FILE)
    assert [n for (n,) in db.execute("SELECT name FROM jobs")] == ["a"]
    db.close()


def test_ls_json_prints_the_contract_keys(home):
    make_job(home, "a", START + record("step", 7, loss=1.0))
    out = CliRunner().invoke(cli, ["--home", str(home.root), "ls", "--json"])
    assert out.exit_code == 0
    assert json.loads(out.output) == fresh(home)
    assert set(json.loads(out.output)[0]) >= {"name", "state", "epoch", "step", "total_steps", "loss", "best",
                                              "device", "restarts"}


def test_the_reading_commands_never_import_torch(home):
    """`ls`, `status`, `saves`, `logs` and the steering commands start in well under a
    second because they do not import torch (about 2 s on this machine)."""
    make_job(home, "a", START + record("step", 7, loss=1.0))
    program = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from traind.daemon.cli import cli\n"
        f"home = {str(home.root)!r}\n"
        "for args in (['ls'], ['ls', '--json'], ['status', 'a'], ['saves', 'a'], ['logs', 'a'], ['save', 'a'],\n"
        "             ['pause', 'a'], ['resume', 'a'], ['cancel', 'a'], ['--help']):\n"
        "    result = CliRunner().invoke(cli, ['--home', home, *args])\n"
        "    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.output)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_elapsed_adds_up_the_runs_and_steps_per_s_is_the_current_runs(home):
    timed = lambda kind, step, t, **more: json.dumps({"kind": kind, "step": step, "time": t, **more}) + "\n"  # noqa: E731
    make_job(home, "t", timed("start", 0, 1000.0, total_steps=100) + timed("step", 10, 1010.0, loss=1.0)
             + timed("start", 10, 2000.0, total_steps=100) + timed("step", 30, 2004.0, loss=0.5))
    row = Index(home).rows()[0]
    assert row["elapsed"] == 14.0 and row["steps_per_s"] == 5.0  # 10 s + 4 s; 20 steps in the last 4 s


def test_best_is_never_a_non_finite_value_nor_one_before_best_after_epoch(home):
    epochs = record("epoch", 1, epoch=1, val_loss=float("nan")) + record("epoch", 2, epoch=2, val_loss=0.1) + \
        record("epoch", 3, epoch=3, val_loss=0.7) + record("epoch", 4, epoch=4, val_loss=float("inf"))
    make_job(home, "nan-first", START + epochs)
    folder = make_job(home, "later", START + epochs)
    (folder / SPEC_FILE).write_text(json.dumps({"checkpoint": {"monitor": "val_loss", "mode": None,
                                                               "best_after_epoch": 3}}))
    assert {r["name"]: r["best"] for r in Index(home).rows()} == {"nan-first": 0.1, "later": 0.7}
