"""How the supervisor judges a worker's end (driven directly, with the exit statuses a
real process leaves; the real kills are in test_supervisor.py)."""

import signal
import subprocess
import sys

import pytest

from traind.daemon.home import Home
from traind.daemon.jobstate import JobRecord, JobState, read_state, transition, write_state
from traind.daemon import supervisor
from traind.daemon.supervisor import BACKOFF, MAX_FAST, MAX_RESTARTS, Daemon, Worker
from traind.daemon.worker import Exit


@pytest.fixture
def daemon(tmp_path):
    home = Home(tmp_path)
    home.job_dir("j").mkdir(parents=True)
    write_state(home.job_dir("j"), JobRecord("j", JobState.RUNNING))
    return Daemon(home)


def dead(code):
    """A finished process with exit status CODE (negative: killed by that signal)."""
    script = f"import os, signal; os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"
    proc = subprocess.Popen([sys.executable, "-c", script])
    proc.wait()
    return proc


def end(daemon, code, started, now, oom_kills=None, saves_made=0):
    """A worker of job j that started at STARTED, made SAVES_MADE new saves and ended with CODE at NOW."""
    proc = dead(code)
    saves = daemon.home.job_dir("j") / "saves"
    saves.mkdir(exist_ok=True)
    seq = len(list(saves.iterdir()))
    for n in range(seq + 1, seq + 1 + saves_made):
        (saves / f"{n:06d}-s{n}").mkdir()
    daemon._ended(Worker("j", proc, started, "cpu0", oom_kills, seq), proc.returncode, now)
    return read_state(daemon.home.job_dir("j"))


def test_a_killed_worker_is_queued_again_after_a_growing_backoff(daemon):
    record = end(daemon, -signal.SIGKILL, started=0.0, now=100.0)
    assert record.state == JobState.QUEUED and record.restarts == 1
    assert "killed by SIGKILL (out of memory?" in record.last_error
    assert daemon.retry_at["j"] == 100.0 + BACKOFF[0]
    transition(daemon.home.job_dir("j"), JobState.RUNNING)
    end(daemon, -signal.SIGSEGV, started=200.0, now=300.0)
    assert daemon.retry_at["j"] == 300.0 + 2 * BACKOFF[0]


def test_a_worker_dying_within_seconds_of_each_start_is_failed_not_looped(daemon):
    for attempt in range(MAX_FAST):
        record = end(daemon, -signal.SIGABRT, started=10.0 * attempt, now=10.0 * attempt + 1)
        if attempt < MAX_FAST - 1:
            assert record.state == JobState.QUEUED
            transition(daemon.home.job_dir("j"), JobState.RUNNING)
    assert record.state == JobState.FAILED
    assert "died within seconds of each start" in record.last_error


def test_too_many_restarts_fail_the_job(daemon):
    for attempt in range(MAX_RESTARTS + 1):
        record = end(daemon, -signal.SIGKILL, started=1000.0 * attempt, now=1000.0 * attempt + 500)
        if record.state == JobState.QUEUED:
            transition(daemon.home.job_dir("j"), JobState.RUNNING)
    assert record.state == JobState.FAILED and f"{MAX_RESTARTS} restarts" in record.last_error


def test_a_worker_that_saves_between_deaths_is_never_given_up(daemon):
    for attempt in range(3 * MAX_RESTARTS):
        record = end(daemon, -signal.SIGKILL, started=1000.0 * attempt, now=1000.0 * attempt + 500, saves_made=1)
        assert record.state == JobState.QUEUED, record.last_error
        assert daemon.retry_at["j"] == 1000.0 * attempt + 500 + BACKOFF[0]  # the backoff starts anew too
        if attempt < 3 * MAX_RESTARTS - 1:
            transition(daemon.home.job_dir("j"), JobState.RUNNING)
    assert record.restarts == 3 * MAX_RESTARTS  # all of them counted for `ls`
    deaths = 0
    while record.state == JobState.QUEUED:  # then it stops making progress
        transition(daemon.home.job_dir("j"), JobState.RUNNING)
        record = end(daemon, -signal.SIGKILL, started=1e5 + 1000.0 * deaths, now=1e5 + 1000.0 * deaths + 500)
        deaths += 1
    assert deaths == MAX_RESTARTS  # the death after its last save counts as the first
    assert record.state == JobState.FAILED and f"{MAX_RESTARTS} restarts without a new save" in record.last_error


@pytest.mark.parametrize("code, state, cause", [
    (0, JobState.DONE, None), (76, JobState.PAUSED, None), (77, JobState.CANCELLED, None),
    (75, JobState.QUEUED, None), (2, JobState.FAILED, "bad_job"), (1, JobState.FAILED, "failed"),
    (Exit.OUT_OF_MEMORY, JobState.QUEUED, "out_of_memory"), (3, JobState.QUEUED, "crashed"),
    (-signal.SIGSEGV, JobState.QUEUED, "crashed"), (-signal.SIGABRT, JobState.QUEUED, "crashed"),
    (-signal.SIGTERM, JobState.QUEUED, "killed"), (-signal.SIGKILL, JobState.QUEUED, "killed")])
def test_each_way_a_worker_ends_has_its_state_and_cause(daemon, code, state, cause):
    record = end(daemon, code, started=0.0, now=100.0)
    assert (record.state, record.cause) == (state, cause)


def test_a_sigkill_while_the_kernels_oom_kill_count_rose_is_out_of_memory(daemon, monkeypatch):
    monkeypatch.setattr(supervisor, "oom_kills", lambda: 8)
    record = end(daemon, -signal.SIGKILL, started=0.0, now=100.0, oom_kills=7)
    assert record.cause == "out_of_memory" and "the kernel's OOM killer" in record.last_error
    transition(daemon.home.job_dir("j"), JobState.RUNNING)
    record = end(daemon, -signal.SIGKILL, started=200.0, now=300.0, oom_kills=8)  # no OOM kill since its start
    assert record.cause == "killed" and "out of memory" not in record.last_error


def test_the_oom_kill_count_is_read_from_the_kernel():
    count = supervisor.oom_kills()
    assert count is None or count >= 0
    if open("/proc/vmstat").read().find("oom_kill ") >= 0:
        assert isinstance(count, int)


def test_a_job_paused_or_removed_since_the_last_look_is_not_started(tmp_path):
    home = Home(tmp_path)
    for name in ("paused", "gone"):
        home.job_dir(name).mkdir(parents=True)
        write_state(home.job_dir(name), JobRecord(name, JobState.QUEUED))
    daemon = Daemon(home)
    daemon._refresh_states()
    assert {n: r.state for n, (_, r) in daemon._states.items()} == {"paused": JobState.QUEUED, "gone": JobState.QUEUED}
    transition(home.job_dir("paused"), JobState.PAUSED)  # `traind pause` between two looks
    home.job_dir("gone").rename(home.jobs / ".removing-gone")  # `traind rm`
    daemon._rescan_at = float("inf")  # the daemon still believes both queued
    daemon._schedule(now=0.0)
    assert not daemon.running
    assert read_state(home.job_dir("paused")).state == JobState.PAUSED
    daemon._refresh_states()
    assert {n: r.state for n, (_, r) in daemon._states.items()} == {"paused": JobState.PAUSED}


def test_a_job_running_but_not_here_is_queued_again(tmp_path):
    """A folder copied in from a machine where it ran says `running`; no worker of this
    daemon runs it, so it is queued to resume from its newest save."""
    home = Home(tmp_path)
    home.job_dir("copied").mkdir(parents=True)
    write_state(home.job_dir("copied"), JobRecord("copied", JobState.RUNNING))
    daemon = Daemon(home, workers=0)
    daemon._schedule(now=0.0)
    record = read_state(home.job_dir("copied"))
    assert record.state == JobState.QUEUED and "not here" in record.last_error


def test_a_job_folder_copied_in_is_adopted_once_it_is_still(tmp_path, monkeypatch):
    home = Home(tmp_path)
    folder = home.job_dir("from-elsewhere")
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text('{"priority": 3}')
    (home.jobs / "stray").mkdir()  # not a job: no spec
    (home.jobs / "bad name").mkdir()
    (home.jobs / "bad name" / "spec.json").write_text("{}")
    write_state(home.jobs / "bad name", JobRecord("bad name", JobState.QUEUED))  # not a job name: left alone
    daemon = Daemon(home, workers=0)
    monkeypatch.setattr(supervisor, "ADOPT_SETTLE", 3600.0)  # just copied: wait
    daemon._refresh_states()
    assert daemon._states == {} and read_state(folder) is None
    monkeypatch.setattr(supervisor, "ADOPT_SETTLE", 0.0)
    daemon._refresh_states()
    assert set(daemon._states) == {"from-elsewhere"}
    record = read_state(folder)
    assert record.state == JobState.QUEUED and record.priority == 3 and "adopted" in record.last_error


class FakeProc:
    """A worker that never ends by itself (the seam replaces subprocess.Popen)."""

    def __init__(self, argv, env):
        self.argv, self.env, self.pid, self.returncode = argv, env, 4242, None

    def poll(self):
        return self.returncode


def test_the_daemons_side_effects_go_through_its_seams(tmp_path):
    """Three fake GPUs: three slots, each job started on its own (CUDA_VISIBLE_DEVICES); a
    job stopped by a full disk waits until FREE_BYTES says there is room; adoption reads
    CLOCK. No GPU, no process, no disk filled."""
    home = Home(tmp_path)
    for name in ("a", "b", "c", "d", "full"):
        home.job_dir(name).mkdir(parents=True)
        (home.job_dir(name) / "spec.json").write_text("{}")
        write_state(home.job_dir(name), JobRecord(name, JobState.QUEUED, submitted=ord(name[0]),
                                                  cause="disk_full" if name == "full" else None))
    started, free = [], [0]

    def spawn(argv, out, env):
        started.append(FakeProc(argv, env))
        return started[-1]

    daemon = Daemon(home, gpus=lambda: ["cuda:0", "cuda:1", "cuda:2"], spawn=spawn, free_bytes=lambda path: free[0],
                    clock=lambda: 1e12)
    assert daemon.slots == ["cuda:0", "cuda:1", "cuda:2"]
    daemon._schedule(now=0.0)
    assert [p.argv[-1] for p in started] == ["a", "b", "c"]  # in submission order, one per GPU
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in started] == ["0", "1", "2"]
    assert read_state(home.job_dir("d")).state == JobState.QUEUED and daemon.waiting == 2
    started[0].returncode = Exit.DONE  # a finishes: its GPU goes to the next job that fits
    daemon.loop(now=1.0)
    assert [p.argv[-1] for p in started] == ["a", "b", "c", "d"] and started[-1].env["CUDA_VISIBLE_DEVICES"] == "0"
    started[1].returncode = Exit.DONE
    daemon.loop(now=2.0)
    assert len(started) == 4 and "full" in daemon.retry_at  # the disk is still full: it waits
    free[0] = 1 << 30
    daemon.retry_at.clear()
    daemon.loop(now=3.0)
    assert started[-1].argv[-1] == "full" and started[-1].env["CUDA_VISIBLE_DEVICES"] == "1"
    copied = home.job_dir("copied")
    copied.mkdir()
    (copied / "spec.json").write_text("{}")
    daemon._refresh_states()
    assert read_state(copied).submitted == 1e12  # adopted at the seam's time
