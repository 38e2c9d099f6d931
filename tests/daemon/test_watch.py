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
