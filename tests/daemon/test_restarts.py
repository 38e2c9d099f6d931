"""How the supervisor judges a worker's end (driven directly, with the exit statuses a
real process leaves; the real kills are in test_supervisor.py)."""

import signal
import subprocess
import sys

import pytest

from traind.daemon.home import Home
from traind.daemon.jobstate import JobRecord, JobState, read_state, transition, write_state
from traind.daemon.supervisor import BACKOFF, MAX_FAST, MAX_RESTARTS, Daemon, Worker


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


def end(daemon, code, started, now):
    proc = dead(code)
    daemon._ended(Worker("j", proc, started, "cpu0"), proc.returncode, now)
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


@pytest.mark.parametrize("code, state", [(0, JobState.DONE), (76, JobState.PAUSED), (77, JobState.CANCELLED),
                                         (75, JobState.QUEUED), (2, JobState.FAILED), (1, JobState.FAILED)])
def test_each_way_a_worker_ends_has_its_state(daemon, code, state):
    assert end(daemon, code, started=0.0, now=100.0).state == state
