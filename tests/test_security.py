"""Bad input that is an attack, not a mistake: names that would escape the home, pickles
and symlinks placed in saves, manifests pointing elsewhere, and a home others can write to."""

import json
import os
import pickle
import shutil

import pytest
import xxhash
from click.testing import CliRunner

from tests.conftest import MLP
from traind.daemon.cli import cli
from traind.daemon.home import Home, UnsafeHome, check_private
from traind.daemon.intake import Intake
from traind.daemon.jobstate import JobRecord, JobState, write_state
from traind.daemon.supervisor import Daemon
from traind.store.commit import MANIFEST
from traind.store.saves import list_saves, verify

JOB = MLP + "[checkpoint]\nevery_steps = 5\nkeep_last = 100\n"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "small.toml").write_text(JOB)
    result = invoke("run", tmp / "small.toml", "--dir", tmp / "small")
    assert result.exit_code == 0, result.output
    return tmp / "small"


@pytest.fixture
def home(tmp_path, trained):
    """A home with one job, `small`, and a folder `victim` beside its jobs/."""
    home = Home(tmp_path / "home")
    home.jobs.mkdir(parents=True)
    shutil.copytree(trained, home.job_dir("small"))
    write_state(home.job_dir("small"), JobRecord("small", JobState.DONE))
    (home.root / "victim").mkdir()
    (home.root / "victim" / "precious").write_text("keep me")
    write_state(home.root / "victim", JobRecord("victim", JobState.DONE))  # looks like a job, outside jobs/
    return home


ESCAPES = ["..", "../victim", "../../victim", "small/../../victim", "/etc", ".", "a\0b", "small/saves"]


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("command", [["status"], ["pause"], ["cancel"], ["resume"], ["save"], ["logs"],
                                     ["rm"], ["rm", "--keep-saves"], ["saves"], ["plot"], ["load", "SAVE"],
                                     ["export", "-o", "OUT"]])
def test_a_name_that_would_leave_the_home_is_refused(home, tmp_path, command, name):
    args = [a.replace("OUT", str(tmp_path / "out.safetensors")) for a in command]
    head, rest = args[0], args[1:]
    if head == "load":
        args = [head, name, "000001-s5"]
    else:
        args = [head, name, *rest]
    result = invoke("--home", home.root, *args)
    assert result.exit_code == 2, result.output
    assert "is not a job name" in result.output
    assert (home.root / "victim" / "precious").read_text() == "keep me"
    assert not (home.root / "victim" / "requests").exists() and not (home.root / "victim" / "load.json").exists()
    assert (home.job_dir("small") / "state.json").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x" * 65])
def test_a_job_file_naming_itself_outside_the_home_is_rejected(tmp_path, name):
    home = Home(tmp_path / "home")
    home.inbox.mkdir(parents=True)
    (home.inbox / "attack.toml").write_text(f"name = {json.dumps(name)}\n" + MLP)
    outcome = Intake(home).scan(delivered={"attack.toml"})[0]
    assert outcome.job is None and "name" in outcome.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert list(home.jobs.iterdir()) == []


class Bomb:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def _touch(path):
    with open(path, "w") as f:
        f.write("unpickled!")


def _bless(save_dir):
    """Make the manifest agree with the files as they are now (an attacker with write access could)."""
    manifest = json.loads((save_dir / MANIFEST).read_text())
    for name in list(manifest["files"]):
        data = (save_dir / name).read_bytes()
        manifest["files"][name].update(bytes=len(data), xxh3_128=xxhash.xxh3_128_hexdigest(data))
    (save_dir / MANIFEST).write_text(json.dumps(manifest))


def test_a_pickle_placed_in_a_save_is_never_unpickled(home, tmp_path):
    folder = home.job_dir("small")
    marker = tmp_path / "marker"
    newest = list_saves(folder / "saves")[0][-1].path
    payload = pickle.dumps({"model": Bomb(str(marker))})
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        (newest / name).write_bytes(payload)  # each file in turn a pickle, its manifest made to agree
    (newest / "extra.pt").write_bytes(payload)
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"]["extra.pt"] = {"bytes": 0}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    _bless(newest)
    assert verify(newest) == []  # whole, as far as its manifest goes
    job_file = home.job_dir("small") / "job.toml"
    resumed = invoke("run", job_file, "--dir", folder)  # resume: the newest save first
    assert f"resumed from save {newest.name}" not in resumed.output
    assert (folder / "saves" / "quarantine" / newest.name).is_dir()  # could not be read: set aside, never loaded
    assert f"quarantined (never loaded): {newest.name}" in invoke("saves", "--dir", folder).output
    shutil.move(folder / "saves" / "quarantine" / newest.name, newest)
    for args in (["verify", "small"], ["saves", "small", "--json"], ["status", "small"],
                 ["export", "small", "--save", newest.name, "-o", tmp_path / "out.safetensors"],
                 ["load", "small", newest.name]):
        invoke("--home", home.root, *args)
    loaded = invoke("run", job_file, "--dir", folder)  # a "load game" of it, asked for by name
    assert loaded.exit_code == 1 and f"save {newest.name} cannot be read back" in loaded.output
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/dir.bin", "..", ""])
def test_a_manifest_naming_a_file_outside_its_save_is_refused(home, name):
    save = list_saves(home.job_dir("small") / "saves")[0][-1].path
    manifest = json.loads((save / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": 1, "xxh3_128": "0"}
    (save / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(save)
    assert problems and "not a file of this save" in problems[0]
    assert save.name not in [s.id for s in list_saves(home.job_dir("small") / "saves")[0]]


def test_a_symlink_in_a_save_is_refused(home, tmp_path):
    save = list_saves(home.job_dir("small") / "saves")[0][-1].path
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(save / "model.safetensors", outside)
    (save / "model.safetensors").unlink()
    (save / "model.safetensors").symlink_to(outside)
    assert any("symlink" in p for p in verify(save))
    linked = home.job_dir("small") / "saves" / "999999-s1"
    linked.symlink_to(list_saves(home.job_dir("small") / "saves")[0][0].path)
    assert "999999-s1" not in [s.id for s in list_saves(home.job_dir("small") / "saves")[0]]


def _shared_gid():
    """A group with a member other than this user (nobody's, on most systems), or None."""
    import pwd

    for p in pwd.getpwall():
        if p.pw_uid != os.getuid() and p.pw_gid != os.getgid():
            return p.pw_gid
    return None


@pytest.mark.parametrize("where, mode", [("root", 0o777), ("inbox", 0o777), ("jobs", 0o773), ("root", 0o775),
                                         ("jobs", 0o775)])
def test_the_daemon_refuses_a_home_others_can_write_to(tmp_path, where, mode):
    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs):
        d.mkdir(parents=True)
    os.chmod(home.root, 0o755)
    target = {"root": home.root, "inbox": home.inbox, "jobs": home.jobs}[where]
    os.chmod(target, mode)
    if not mode & 0o002:  # group-writable only: unsafe only where the group has other members
        gid = _shared_gid()
        if gid is None or os.getuid() != 0:
            pytest.skip("needs root and a group shared with another user")
        os.chown(target, os.getuid(), gid)
    with pytest.raises(UnsafeHome, match="writable by other users"):
        check_private(home)
    result = invoke("--home", home.root, "daemon")
    assert result.exit_code == 2 and "chmod go-w" in result.output
    os.chmod(target, 0o755)
    check_private(home)
    Daemon(home)  # and a private home is served


def test_a_group_writable_home_of_a_private_group_is_fine(tmp_path):
    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs):
        d.mkdir(parents=True)
    os.chmod(home.root, 0o775)  # umask 002 with a group of one's own, as many systems set up users
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    private = set(grp.getgrgid(os.getgid()).gr_mem) <= {me.pw_name} and not any(
        p.pw_gid == os.getgid() and p.pw_uid != os.getuid() for p in pwd.getpwall())
    if not private:
        pytest.skip("this user's group is shared")
    check_private(home)


def test_a_home_owned_by_another_user_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give a folder away")
    home = Home(tmp_path / "home")
    for d in (home.inbox, home.jobs):
        d.mkdir(parents=True)
    os.chmod(home.root, 0o755)
    os.chown(home.jobs, 65534, 65534)
    with pytest.raises(UnsafeHome, match="belongs to another user"):
        check_private(home)
