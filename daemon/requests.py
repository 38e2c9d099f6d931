"""Requests to a job (pause, cancel, a quicksave with a note, reload: stop without saving so
that a "load game" request takes effect) as files in its folder,
so that they survive a crash of the daemon or of the CLI that made them: written
durably, taken by the job's worker at its next step boundary, removed once acted on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from traind.store.fs import FileSystem, write_durably

REQUESTS = "requests"
KINDS = ("pause", "cancel", "save", "reload")


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
    """Forget REQUEST once acted on (after a crash before this, it is acted on again:
    every kind of request may safely be)."""
    request.path.unlink(missing_ok=True)
