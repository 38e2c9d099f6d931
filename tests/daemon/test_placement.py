"""Placement by resources, with fake GPU lists through the daemon's seams: a job gets as
many devices as it has ranks (CUDA_VISIBLE_DEVICES with that many), `device = "cuda:1"`
gets GPU 1, smaller jobs fill free devices behind a large one (backfill) but never
starve it, and a job no placement can ever satisfy is refused when it is taken in."""

import json

from tests.daemon.test_restarts import FakeProc
from traind.daemon.home import Home
from traind.daemon.jobstate import JobRecord, JobState, read_state, write_state
from traind.daemon.executor import Need, place
from traind.daemon.supervisor import Daemon
from traind.daemon.worker import Exit


def jobs(home: Home, **specs):
    """Queued jobs NAME=spec (processes, device), submitted in the order given."""
    for i, (name, (processes, device)) in enumerate(specs.items()):
        folder = home.job_dir(name)
        folder.mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps({"device": device, "distributed": {"processes": processes}}))
        write_state(folder, JobRecord(name, JobState.QUEUED, submitted=float(i)))


def daemon_on(home: Home, gpus: list[str], **kw):
    started = []

    def spawn(argv, out, env):
        started.append(FakeProc(argv, env))
        return started[-1]

    return Daemon(home, gpus=lambda: gpus, spawn=spawn, clock=lambda: 1e12, **kw), started


def visible(started):
    return {p.argv[-1]: p.env.get("CUDA_VISIBLE_DEVICES") for p in started}


EIGHT = [f"cuda:{i}" for i in range(8)]


def test_a_job_gets_as_many_gpus_as_it_has_ranks_and_a_pinned_one_its_gpu(tmp_path):
    home = Home(tmp_path)
    jobs(home, four=(4, "auto"), pinned=(1, "cuda:5"), two=(2, "auto"), one=(1, "auto"))
    daemon, started = daemon_on(home, EIGHT)
    daemon._schedule(now=0.0)
    assert visible(started) == {"four": "0,1,2,3", "pinned": "5", "two": "4,6", "one": "7"}
    assert started[1].env["TRAIND_PLACED_GPUS"] == "5"  # the worker sees it as cuda:0, and knows it is GPU 5
    assert daemon.waiting == 0


def test_smaller_jobs_fill_free_gpus_behind_a_large_one_but_never_starve_it(tmp_path):
    home = Home(tmp_path)
    jobs(home, running=(3, "auto"), large=(4, "auto"), small1=(1, "auto"), small2=(1, "auto"), small3=(1, "auto"))
    daemon, started = daemon_on(home, EIGHT[:4], reserve_after=60.0)
    daemon._schedule(now=0.0)
    assert visible(started) == {"running": "0,1,2", "small1": "3"}  # large does not fit: small1 backfills
    assert daemon.blocked == {"large": 0.0} and daemon.waiting == 3
    started[1].returncode = Exit.DONE  # small1 ends: still no room for large, so small2 backfills
    daemon.loop(now=30.0)
    assert list(visible(started)) == ["running", "small1", "small2"]
    started[2].returncode = Exit.DONE  # large has waited 61 s: the free GPU is kept for it
    daemon.loop(now=61.0)
    assert list(visible(started)) == ["running", "small1", "small2"] and daemon.waiting == 2
    started[0].returncode = Exit.DONE  # the 3-GPU job ends: large takes all four
    daemon.loop(now=62.0)
    assert visible(started)["large"] == "0,1,2,3" and daemon.blocked == {}
    started[-1].returncode = Exit.DONE
    daemon.loop(now=63.0)
    assert list(visible(started))[-1] == "small3"


def test_cpu_slots_are_devices_too(tmp_path):
    home = Home(tmp_path)
    jobs(home, pair=(2, "auto"), single=(1, "auto"), other=(1, "auto"))
    daemon, started = daemon_on(home, [], workers=3)
    daemon._schedule(now=0.0)
    assert [p.argv[-1] for p in started] == ["pair", "single"] and daemon.waiting == 1
    assert all("CUDA_VISIBLE_DEVICES" not in p.env for p in started)
    assert int(started[0].env["TRAIND_THREADS"]) == 2 * int(started[1].env["TRAIND_THREADS"])  # a share per slot


def test_what_can_never_be_placed_is_named_with_what_was_found():
    assert place(["cuda:0", "cuda:2"], Need(1, "cuda:1")) is None
    assert "this machine has 2 GPUs: cuda:0, cuda:1" in Need(1, "cuda:3").unfit(["cuda:0", "cuda:1"],
                                                                                 ["cuda:0", "cuda:1"])
    why = Need(4).unfit(["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"])
    assert "asks for 4 GPUs, and this daemon has 2: cuda:0, cuda:1" in why
    assert "--workers 2" in Need(2).unfit(["cpu0"], [])
    assert Need(2).unfit(["cpu0", "cpu1"], []) is None


def test_a_job_asking_for_more_gpus_than_the_daemon_has_is_refused_when_taken_in(tmp_path, write_job):
    from tests.conftest import MLP

    home = Home(tmp_path / "home")
    home.inbox.mkdir(parents=True)
    (home.inbox / "big.toml").write_text(MLP + "[distributed]\nprocesses = 4\n")
    daemon, started = daemon_on(home, [], workers=2)
    try:
        outcomes = daemon.intake.scan(now=1e9, delivered={"big.toml"})
    finally:
        daemon.validator.close()
    assert [o.job for o in outcomes] == [None]
    assert "asks for 4 CPU slots, and this daemon has 2 (start the daemon with --workers 4)" in outcomes[0].error
    assert read_state(home.job_dir("big")) is None
