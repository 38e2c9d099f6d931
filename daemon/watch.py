"""watchdog events as wake-ups for the daemon's loop, and nothing more.

The periodic rescan of inbox/ is the truth; events only make it come sooner. Since an
exception in a handler kills watchdog's dispatcher for good, and events can be lost,
the handler only records a name and sets an Event, and the loop restarts an observer
that died.
"""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class _Handler(FileSystemEventHandler):
    def __init__(self, watch: InboxWatch):
        self.watch = watch

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.is_directory:
                return
            # renamed in (as `traind submit` does): complete. A close is not: `>>` closes
            # after every piece; it only wakes the loop, whose rescan judges the file.
            if event.event_type == "moved":
                self.watch.complete(Path(event.dest_path).name)
            self.watch.wake.set()
        except Exception:  # noqa: BLE001 - a handler must never raise (it would kill the dispatcher)
            self.watch.wake.set()


class InboxWatch:
    def __init__(self, inbox: Path, wake: threading.Event):
        self.inbox, self.wake = inbox, wake
        self._delivered: set[str] = set()
        self._lock = threading.Lock()
        self._observer = None
        self.restarts = -1

    def complete(self, name: str) -> None:
        with self._lock:
            self._delivered.add(name)

    def take_complete(self) -> frozenset:
        with self._lock:
            names, self._delivered = frozenset(self._delivered), set()
        return names

    def ensure_running(self) -> None:
        """Start the observer, or start it again if it died (its events are lost; the rescan is not)."""
        if self._observer is not None and self._observer.is_alive():
            return
        self.stop()
        observer = Observer()
        observer.schedule(_Handler(self), str(self.inbox), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer, self.restarts = observer, self.restarts + 1

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(5)
            self._observer = None
