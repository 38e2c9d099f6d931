"""Intake, driven directly (the daemon's loop calls the same scan): every complete file
in inbox/ is taken exactly once, and nothing else is."""

import json
import shutil

import pytest
from click.testing import CliRunner

from tests.conftest import MLP
from tests.conftest import TINY as GOOD  # noqa: N811
from traind.daemon.cli import cli
from traind.daemon.intake import CLAIMED, MAX_DEATHS, Intake
from traind.daemon.jobstate import JobState, read_state
from traind.daemon.validator import Verdict
from traind.store.commit import FORMAT



def drop(home, name, text):
    path = home.inbox / name
    path.write_text(text)
    return path


def test_submit_validates_delivers_and_one_scan_accepts_it_once(home, write_job):
    result = CliRunner().invoke(cli, ["--home", str(home.root), "submit", str(write_job(MLP, name="small"))])
    assert result.exit_code == 0 and result.stdout == "small\n" and "no daemon serves" in result.stderr
    assert [p.name for p in home.inbox.iterdir() if not p.name.startswith(".")] == ["small.json"]
    intake = Intake(home)
    outcomes = intake.scan(delivered={"small.json"})
    assert [(o.job, o.error) for o in outcomes] == [("small", None)]
    folder = home.job_dir("small")
    record = read_state(folder)
    assert record.state == JobState.QUEUED and record.name == "small"
    assert json.loads((folder / "spec.json").read_text())["train"]["epochs"] == 3
    assert (folder / "job.json").exists()
    assert intake.scan(delivered={"small.json"}) == []
    assert [p.name for p in home.inbox.iterdir() if not p.name.startswith(".")] == []
    assert list((home.inbox / CLAIMED).iterdir()) == []


def test_a_daemon_killed_while_it_waits_for_the_validator_did_not_die_of_the_file(home):
    """The validator runs the job's code in its own process; while the daemon only waits
    for its answer (about 2 s when the validator is starting), a death is not counted."""
    (home.inbox / CLAIMED).mkdir()
    (home.inbox / CLAIMED / "slow.toml").write_text(GOOD)
    (home.inbox / CLAIMED / ".slow.toml.attempt").write_text("1")
    seen = []

    def check(path, base_dir):
        seen.append((home.inbox / CLAIMED / ".slow.toml.attempt").read_text())
        return Verdict(None, None, "slow.toml: rejected for the test")

    Intake(home, check=check).scan()
    assert seen == ["1"]  # not counted up while waiting


def test_a_file_whose_validation_was_cut_short_once_is_tried_again(home):
    """One daemon death mid-validation may be a `kill -9` or a power cut, not the file."""
    (home.inbox / CLAIMED).mkdir()
    (home.inbox / CLAIMED / "unlucky.toml").write_text(GOOD)
    (home.inbox / CLAIMED / ".unlucky.toml.attempt").write_text("1")
    outcome = Intake(home).scan()[0]
    assert outcome.error is None and outcome.job == "unlucky"
    assert list((home.inbox / CLAIMED).iterdir()) == []


def test_submit_of_an_invalid_file_delivers_nothing(home, write_job):
    good, bad = write_job(MLP, name="good"), write_job(MLP.replace('"Linear", 32, 10', '"Linaer", 32, 10'), name="bad")
    result = CliRunner().invoke(cli, ["--home", str(home.root), "submit", str(good), str(bad)])
    assert result.exit_code == 2
    assert "unknown layer 'Linaer'" in result.output and "nothing delivered: 1 of 2 files" in result.output
    assert list(home.inbox.iterdir()) == []


def test_a_slow_hand_copy_is_taken_only_once_complete(home):
    intake = Intake(home, settle=1.0)
    path = drop(home, "slow.toml", GOOD[:20])  # half a file, being copied
    assert intake.scan(now=0.0) == []
    path.write_text(GOOD[:40])
    assert intake.scan(now=0.5) == []  # it changed: not settled
    path.write_text(GOOD)
    assert intake.scan(now=1.2) == []  # changed again
    assert intake.scan(now=1.7) == []  # unchanged for 0.5 s only
    outcomes = intake.scan(now=2.3)
    assert [(o.job, o.error) for o in outcomes] == [("slow", None)]
    assert intake.scan(now=9.0) == []


def test_a_file_renamed_into_the_inbox_is_taken_at_once(home):
    drop(home, "quick.toml", GOOD)
    assert [o.job for o in Intake(home, settle=60).scan(now=0.0, delivered={"quick.toml"})] == ["quick"]


def test_a_file_still_open_for_writing_is_not_taken_however_long_it_is_still(home):
    path = drop(home, "open.toml", "")
    intake = Intake(home, settle=0.0)
    with open(path, "a") as writer:
        writer.write(GOOD[:30])
        writer.flush()
        assert intake.scan(now=0.0) == [] and intake.scan(now=100.0) == []  # the writer pauses, file open
        writer.write(GOOD[30:])
    assert intake.scan(now=200.0) == []  # closed now, but it changed: it settles first
    assert [(o.job, o.error) for o in intake.scan(now=201.0)] == [("open", None)]


def test_a_file_that_does_not_parse_yet_is_growing_until_it_was_still_for_a_while(home):
    import os

    path = drop(home, "half.json", '{"model": {"layers": [["Linear", 20')  # a writer paused between pieces
    intake = Intake(home, settle=0.0)
    assert intake.scan(now=0.0) == [] and intake.scan(now=5.0) == []
    assert path.exists()
    old = path.stat().st_mtime - 120
    os.utime(path, (old, old))  # still for two minutes: whole, and rejected as what it is
    outcomes = intake.scan(now=10.0) + intake.scan(now=11.0)
    assert [o.error is not None for o in outcomes] == [True]


def test_two_hundred_files_dropped_at_once_are_each_accepted_exactly_once(home):
    names = {f"job{i:03d}.toml" for i in range(200)}
    for name in names:
        drop(home, name, GOOD)
    intake = Intake(home)
    outcomes = intake.scan(delivered=names) + intake.scan(delivered=names)
    assert sorted(o.job for o in outcomes) == sorted(n[:-5] for n in names)
    assert all(o.error is None for o in outcomes)
    assert len(list(home.jobs.iterdir())) == 200


def test_a_bad_file_is_rejected_with_its_error_beside_it(home):
    drop(home, "bad.toml", GOOD + "[optimizer]\nlrr = 1\n")
    outcomes = Intake(home).scan(delivered={"bad.toml"})
    assert outcomes[0].job is None and "did you mean 'lr'" in outcomes[0].error
    assert (home.rejected / "bad.toml").read_text() == GOOD + "[optimizer]\nlrr = 1\n"
    error = (home.rejected / "bad.toml.error").read_text()
    assert error.startswith("bad.toml: invalid job file (1 problem)")
    assert "line 6, optimizer.lrr: unknown key 'lrr' in [optimizer]; did you mean 'lr'?" in error
    assert "fix:" in error
    assert not (home.inbox / "bad.toml").exists() and list(home.jobs.iterdir()) == []


def test_a_name_in_use_is_rejected(home):
    drop(home, "twin.toml", GOOD)
    Intake(home).scan(delivered={"twin.toml"})
    drop(home, "twin.toml", GOOD.replace("samples = 100", "samples = 200"))
    outcome = Intake(home).scan(delivered={"twin.toml"})[0]
    assert outcome.job is None and "a job named 'twin' exists already" in outcome.error
    assert (home.rejected / "twin.toml.error").exists()


@pytest.mark.parametrize("name", [".hidden.toml", "job.toml.tmp", "job.part", "job.toml~", "notes.txt"])
def test_hidden_temporary_and_partial_names_are_left_alone(home, name):
    drop(home, name, GOOD)
    assert Intake(home, settle=0).scan(now=100.0, delivered={name}) == []
    assert (home.inbox / name).exists() and list(home.jobs.iterdir()) == []


def test_a_claim_left_by_a_crash_is_finished_once(home):
    (home.inbox / CLAIMED).mkdir()
    (home.inbox / CLAIMED / "orphan.toml").write_text(GOOD)
    shutil.copy2(home.inbox / CLAIMED / "orphan.toml", home.root / "kept")
    intake = Intake(home)
    assert [o.job for o in intake.scan()] == ["orphan"]
    # crashed after accepting, before dropping the claim: finishing again adds nothing
    shutil.copy2(home.root / "kept", home.inbox / CLAIMED / "orphan.toml")
    assert [(o.job, o.error) for o in intake.scan()] == [("orphan", None)]
    assert list(home.jobs.iterdir()) == [home.job_dir("orphan")] and list(home.rejected.iterdir()) == []


def test_relative_paths_in_a_dropped_file_start_at_the_inbox(home):
    (home.inbox / "d.csv").write_text("a,b\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    drop(home, "csv.toml", '[model]\nlayers = [["Linear", 1, 2]]\n[data]\nsource = "csv"\npath = "d.csv"\n')
    outcome = Intake(home).scan(delivered={"csv.toml"})[0]
    assert outcome.error is None
    spec = json.loads((home.job_dir("csv") / "spec.json").read_text())
    assert spec["data"]["path"] == str((home.inbox / "d.csv").resolve())


def test_logs_and_rm_of_a_job_that_is_not_running(home, tmp_path):
    drop(home, "gone.toml", GOOD)
    Intake(home).scan(delivered={"gone.toml"})
    folder = home.job_dir("gone")
    (folder / "log").write_text("line one\nline two\n")
    (folder / "saves" / "000001-s1").mkdir(parents=True)
    run = lambda *a: CliRunner().invoke(cli, ["--home", str(home.root), *a])  # noqa: E731
    assert run("logs", "gone").output == "line one\nline two\n"
    assert run("logs", "nope").exit_code == 3
    result = run("rm", "gone", "--keep-saves")
    assert result.exit_code == 0 and "its saves are in" in result.output
    assert not folder.exists() and (home.root / "kept" / "gone" / "000001-s1").is_dir()
    assert run("ls", "--json").output.strip() == "[]"
    assert run("rm", "gone").exit_code == 3


def test_a_file_whose_validation_took_the_daemon_down_twice_is_rejected_not_retried(home):
    (home.inbox / CLAIMED).mkdir()
    (home.inbox / CLAIMED / "poison.toml").write_text(GOOD)
    (home.inbox / CLAIMED / ".poison.toml.attempt").write_text(str(MAX_DEATHS))  # left by the last daemon that died
    outcome = Intake(home).scan()[0]
    assert outcome.job is None and f"the daemon died {MAX_DEATHS} times while taking this file in" in outcome.error
    assert (home.rejected / "poison.toml.error").exists()
    assert list((home.inbox / CLAIMED).iterdir()) == []


def test_a_file_whose_stem_is_not_a_job_name_is_rejected_with_the_fix(home):
    drop(home, "name with spaces.toml", GOOD)
    outcome = Intake(home).scan(delivered={"name with spaces.toml"})[0]
    assert outcome.job is None and "is not a job name" in outcome.error and "rename the file" in outcome.error
    assert (home.rejected / "name with spaces.toml.error").exists()


def test_a_bug_on_one_file_rejects_it_and_intake_goes_on(home, monkeypatch):
    drop(home, "a.toml", GOOD.replace("samples = 100", "samples = 101"))
    drop(home, "b.toml", GOOD)
    real = Intake._accept

    def accept(self, job_file):
        if job_file.name == "a":
            raise KeyError("a bug")
        return real(self, job_file)

    monkeypatch.setattr(Intake, "_accept", accept)
    outcomes = {o.file: o for o in Intake(home).scan(delivered={"a.toml", "b.toml"})}
    assert "traind failed on this file (KeyError" in outcomes["a.toml"].error
    assert outcomes["b.toml"].job == "b"


def test_a_death_count_whose_file_was_taken_is_tidied_away(home):
    (home.inbox / CLAIMED).mkdir()
    (home.inbox / CLAIMED / ".gone.toml.attempt").write_text("1")  # its file became a job; a fault stopped the tidy-up
    (home.inbox / CLAIMED / ".gone.toml.tmp").write_text("")  # not a death count: left alone
    Intake(home).scan()
    assert sorted(p.name for p in (home.inbox / CLAIMED).iterdir()) == [".gone.toml.tmp"]


def test_a_file_that_repeats_an_accepted_job_is_rejected_with_the_reason_never_dropped(home):
    drop(home, "again.toml", GOOD)
    assert [o.job for o in Intake(home).scan(delivered={"again.toml"})] == ["again"]
    drop(home, "again.toml", GOOD)  # the very same text, dropped in a second time
    outcome = Intake(home).scan(delivered={"again.toml"})[0]
    assert outcome.job is None and "a job named 'again' exists already (the same file again" in outcome.error
    assert (home.rejected / "again.toml").read_text() == GOOD
    assert "exists already" in (home.rejected / "again.toml.error").read_text()


def test_submit_refuses_a_name_in_use_and_delivers_nothing(home, write_job):
    runner = CliRunner()
    first = write_job(MLP, name="taken")
    assert runner.invoke(cli, ["--home", str(home.root), "submit", str(first)]).exit_code == 0
    result = runner.invoke(cli, ["--home", str(home.root), "submit", str(first)])  # it waits in inbox/
    assert result.exit_code == 2 and "a file for a job named 'taken' waits in" in result.output
    Intake(home).scan(delivered={"taken.json"})
    assert home.job_dir("taken").is_dir()
    other = write_job(MLP, name="other")
    result = runner.invoke(cli, ["--home", str(home.root), "submit", str(first), str(other)])
    assert result.exit_code == 2 and "a job named 'taken' exists already" in result.output
    assert "`traind rm taken`" in result.output and "nothing delivered: 1 of 2" in result.output
    assert list(home.inbox.glob("*.json")) == []


def _manual_save(folder, seq=1):
    save = folder / "saves" / f"{seq:06d}-s{seq}"
    save.mkdir(parents=True)
    (save / "manifest.json").write_text(json.dumps({"format": FORMAT, "id": save.name, "seq": seq,
                                                   "step": seq, "epoch": 0, "kinds": ["manual"], "files": {}}))
    return save


def test_rm_keep_saves_of_a_second_job_of_the_same_name_keeps_both_and_leaves_nothing_half_done(home):
    run = lambda *a: CliRunner().invoke(cli, ["--home", str(home.root), *a])  # noqa: E731
    for n in range(2):
        drop(home, "twice.toml", GOOD.replace("samples = 100", f"samples = {100 + n}"))
        Intake(home).scan(delivered={"twice.toml"})
        (home.job_dir("twice") / "saves" / f"00000{n + 1}-s1").mkdir(parents=True)
        result = run("rm", "twice", "--keep-saves")
        assert result.exit_code == 0, result.output
    assert (home.root / "kept" / "twice" / "000001-s1").is_dir()
    assert (home.root / "kept" / "twice.1" / "000002-s1").is_dir()
    assert [p.name for p in home.jobs.iterdir()] == []


def test_a_removal_cut_short_is_finished_keeping_its_saves_and_verify_never_sees_it(home):
    (home.jobs / ".removing-old" / "saves" / "000001-s1").mkdir(parents=True)
    (home.jobs / ".new-half").mkdir()
    run = lambda *a: CliRunner().invoke(cli, ["--home", str(home.root), *a])  # noqa: E731
    result = run("verify")
    assert result.exit_code == 0 and ".removing" not in result.output and ".new" not in result.output
    drop(home, "other.toml", GOOD)
    Intake(home).scan(delivered={"other.toml"})
    assert run("rm", "other").exit_code == 0
    assert not (home.jobs / ".removing-old").exists() and (home.root / "kept" / "old" / "000001-s1").is_dir()


def test_rm_of_a_job_with_manual_saves_needs_force_or_keep_saves(home):
    run = lambda *a: CliRunner().invoke(cli, ["--home", str(home.root), *a])  # noqa: E731
    drop(home, "precious.toml", GOOD)
    Intake(home).scan(delivered={"precious.toml"})
    _manual_save(home.job_dir("precious"))
    result = run("rm", "precious")
    assert result.exit_code == 1 and "1 manual save(s)" in result.output and "--force" in result.output
    assert home.job_dir("precious").is_dir()
    assert run("rm", "precious", "--force").exit_code == 0 and not home.job_dir("precious").exists()
