import threading
import time

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent

from traind.daemon.watch import InboxWatch, _Handler


def test_a_file_written_wakes_the_loop_and_one_renamed_in_counts_as_complete(tmp_path):
    wake = threading.Event()
    watch = InboxWatch(tmp_path, wake)
    watch.ensure_running()
    try:
        (tmp_path / "job.toml").write_text("x")
        assert wake.wait(10)
        deadline = time.monotonic() + 10
        found = set()
        (tmp_path / ".job2.toml.tmp").write_text("y")
        (tmp_path / ".job2.toml.tmp").rename(tmp_path / "job2.toml")
        while "job2.toml" not in found and time.monotonic() < deadline:
            found |= watch.take_complete()
            time.sleep(0.01)
        assert "job2.toml" in found
        assert "job.toml" not in found  # closed after writing is no sign of a whole file (`>>` closes each piece)
    finally:
        watch.stop()


def test_the_handler_never_raises():
    class Broken:
        wake = threading.Event()

        def complete(self, name):
            raise RuntimeError("boom")

    handler = _Handler(Broken())
    handler.on_any_event(FileClosedEvent("/x/a.toml"))
    handler.on_any_event(FileMovedEvent("/x/.a", "/x/a.toml"))
    handler.on_any_event(FileSystemEvent("/x/b"))
    assert Broken.wake.is_set()


def test_a_dead_observer_is_started_again(tmp_path):
    watch = InboxWatch(tmp_path, threading.Event())
    watch.ensure_running()
    try:
        watch._observer.stop()
        watch._observer.join(5)
        watch.ensure_running()
        assert watch.restarts == 1 and watch._observer.is_alive()
    finally:
        watch.stop()


def test_a_resume_pokes_the_daemon_which_looks_at_its_jobs_at_once_not_at_its_next_rescan(tmp_path):
    """`traind resume` (a state changed by the CLI) renames inbox/.poke in: the watch sees
    it, and the daemon's loop given it reads every job's state now, a second before its
    rescan was due; the poke is no job file (nothing is taken in or rejected)."""
    import json
    import subprocess
    import sys

    from click.testing import CliRunner

    from traind.daemon.cli import cli
    from traind.daemon.home import POKE, Home
    from traind.daemon.jobstate import JobRecord, JobState, read_state, write_state
    from traind.daemon.supervisor import Daemon
    from traind.jobs.folder import SPEC_FILE

    home = Home(tmp_path / "home")
    folder = home.job_dir("j")
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(json.dumps({}))
    write_state(folder, JobRecord("j", JobState.PAUSED))
    started = []

    def spawn(argv, out, env):
        started.append(argv[-1])
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    daemon = Daemon(home, spawn=spawn)
    daemon.start()
    wake = threading.Event()
    watch = InboxWatch(home.inbox, wake)
    watch.ensure_running()
    try:
        daemon.loop(100.0)  # its rescan: the job is paused
        assert started == []
        result = CliRunner().invoke(cli, ["--home", str(home.root), "resume", "j"])
        assert result.exit_code == 0, result.output
        deadline, seen = time.monotonic() + 10, set()
        while POKE not in seen and time.monotonic() < deadline:
            seen |= watch.take_complete()
            time.sleep(0.01)
        assert POKE in seen
        daemon.loop(100.1)  # no poke given: its next rescan is not due, so it has not seen the resume
        assert started == []
        daemon.loop(100.2, frozenset(seen))
        assert started == ["j"] and read_state(folder).state == JobState.RUNNING
        assert not any(home.rejected.iterdir()) and sorted(p.name for p in home.jobs.iterdir()) == ["j"]
    finally:
        watch.stop()
        for worker in daemon.running.values():
            worker.proc.kill()
            worker.proc.wait()
        daemon.validator.close()
