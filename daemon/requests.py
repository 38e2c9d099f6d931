"""Requests to a job (pause, cancel, a quicksave with a note, reload: stop without saving so
that a "load game" request takes effect) as files in its folder, so that they survive a
crash of the daemon or of the CLI that made them: written durably, taken by the process
that trains the job (a daemon's worker or `traind run`) at its next step boundary, and
acted on exactly once.

Exactly once, across crashes too: a process acts on each request file once; a quicksave's
request is removed as soon as its save is committed, and the save names the request
(`request` in its manifest), so that a crash between the two cannot make a second save.
The requests that end the run (pause, cancel, reload) are removed when it has ended; a
crash before that repeats them, which ends the run the same way again.

A run that ends (done, stopped, failed: anything but a crash) forgets every request
still pending: one that came too late for its last step boundary must not act on the
job's next run, a resume days later. After a crash they stay, and the next run takes
them: a pause sent while a killed worker waits to be restarted still pauses the job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from traind.jobs.folder import REQUESTS
from traind.jobs.world import Decision
from traind.store.fs import FileSystem, write_durably

KINDS = ("pause", "cancel", "save", "reload")
LOOK_EVERY = 0.2  # seconds between looks at the requests folder (one listing each)


@dataclass(frozen=True)
class Request:
    kind: str
    note: str | None
    path: Path


def send(folder: Path, kind: str, note: str | None = None) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown request {kind!r}; one of {', '.join(KINDS)}")
    inbox = folder / REQUESTS
    inbox.mkdir(exist_ok=True)
    path = inbox / f"{time.time_ns():020d}-{kind}.json"
    write_durably(FileSystem(), path, json.dumps({"kind": kind, "note": note}).encode())
    return path


def pending(folder: Path) -> list[Request]:
    """Requests not yet acted on, oldest first; unreadable ones are dropped."""
    inbox = folder / REQUESTS
    if not inbox.is_dir():
        return []
    found = []
    for path in sorted(inbox.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            found.append(Request(doc["kind"], doc.get("note"), path))
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
    return [r for r in found if r.kind in KINDS]


def done(request: Request) -> None:
    """Forget REQUEST: it was acted on."""
    request.path.unlink(missing_ok=True)


class JobRequests:
    """The job's side of the requests: at a step boundary it takes the pending ones into
    the boundary's Decision, each once; `ending` says which request ended the run
    ("paused", "cancelled" or "stopped"), if one did."""

    def __init__(self, folder: Path):
        self.folder, self.ending = folder, None
        self._acted: set[str] = set()
        self._ending_requests: list[Request] = []
        self._next_look = 0.0
        self._first = True

    def quiet(self) -> bool:
        """Whether `decide` would not look at the requests yet (their next look is later)."""
        return time.monotonic() < self._next_look

    @property
    def next_look(self) -> float:
        """The monotonic moment from which `decide` looks at the requests again."""
        return self._next_look

    def decide(self, store) -> Decision:
        """This boundary's Decision as the requests make it: a quicksave (one per boundary;
        another waits for the next), a pause (save, then stop), a cancel or a reload (stop
        without a save: one would be newer than a requested save, and win). STORE's saves
        tell which quicksaves a crash cut short after their commit."""
        decision = Decision()
        now = time.monotonic()
        if now < self._next_look:
            return decision
        self._next_look = now + LOOK_EVERY
        if self._first:  # quicksaves a crash cut short after their commit: their save exists
            self._first = False
            answered = {s.request for s in store.saves() if s.request}
        else:
            answered = set()
        for request in pending(self.folder):
            if request.path.name in self._acted:
                continue
            if request.kind == "save":
                if request.path.name in answered:
                    self._acted.add(request.path.name)
                    done(request)
                elif decision.request is not None:
                    self._next_look = 0.0  # one quicksave per boundary: look again at the next
                else:
                    self._acted.add(request.path.name)
                    decision.kinds.add("manual")
                    decision.note, decision.request = request.note, request.path.name
                    decision.after = lambda r=request: done(r)
                continue
            self._acted.add(request.path.name)
            self._ending_requests.append(request)
            if request.kind == "pause":
                self.ending = "paused"
                decision.stop_at("after_save")
            else:  # cancel: the saves stay as they are; reload: queued again, the next run loads
                self.ending = "cancelled" if request.kind == "cancel" else "stopped"
                decision.stop_at("now")
                if decision.request is not None:  # no save at all: that quicksave came too late
                    self._acted.discard(decision.request)
                    decision.kinds, decision.note, decision.request, decision.after = set(), None, None, None
                break
        return decision

    def ended(self) -> list[Request]:
        """The run has ended (its saves committed): forget the requests that ended it, and
        those it never acted on; return the latter."""
        for request in self._ending_requests:
            done(request)
        late = [r for r in pending(self.folder) if r.path.name not in self._acted]
        for request in late:
            done(request)
        return late
