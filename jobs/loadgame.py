"""A "load game" request: a file in the job folder naming the save its next run continues
from. Written by the CLI, taken by the run (`take`, which hands the save to its
checkpointer), read by the daemon; no torch here, so that the CLI that writes it starts
fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

from traind.store.errors import CorruptSave, NoSuchSave
from traind.store.fs import FileSystem, write_durably
from traind.jobs.folder import LOAD_REQUEST, SAVES
from traind.store.saves import SaveInfo, list_saves, verify



def request_load(folder: Path, save_id: str) -> None:
    """Make the next run of the job in FOLDER continue from SAVE_ID ("load game").
    Reads only: a run may be writing in FOLDER right now."""
    found = list_saves(folder / SAVES)[0]
    chosen = [s for s in found if s.id == save_id]
    if not chosen:
        known = ", ".join(s.id for s in found[-5:]) or "none"
        raise NoSuchSave(f"no save '{save_id}' in {folder / SAVES}; the newest are: {known}")
    problems = verify(chosen[0].path)
    if problems:
        raise CorruptSave(f"save {save_id} is corrupt ({'; '.join(problems)}); load another")
    write_durably(FileSystem(), folder / LOAD_REQUEST, json.dumps({"save": save_id}).encode())


def take(folder: Path, store) -> SaveInfo | None:
    """The save a "load game" asked the job in FOLDER to continue from (STORE: its
    SaveStore), until the run that took it has saved. The request is stamped with the
    first save number of the run that takes it: saves older than that (a run still going
    when the request came) do not count."""
    path = folder / LOAD_REQUEST
    if not path.exists():
        return None
    request = json.loads(path.read_text())
    taken = request.get("taken_from_seq")
    if taken is not None and any(s.seq >= taken for s in store.saves()):
        os.unlink(path)  # the loaded game has saves of its own now: continue from those
        return None
    try:
        info = store.checked(store.get(request["save"]))
    except NoSuchSave as e:
        raise NoSuchSave(f"{e} (asked for by {path}; delete that file to resume from the newest save)") from e
    if taken is None:
        request["taken_from_seq"] = store.next_seq
        write_durably(store.fs, path, json.dumps(request).encode())
    return info


def requested_save(folder: Path) -> str | None:
    """The save a pending "load game" asks for, if any."""
    try:
        return json.loads((folder / LOAD_REQUEST).read_text())["save"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def protected(folder: Path) -> set[str]:
    """The saves of the job in FOLDER that retention must keep: the one a "load game"
    request names, until a run has taken it."""
    wanted = requested_save(folder)
    return set() if wanted is None else {wanted}


def load_pending(folder: Path) -> bool:
    """Whether a "load game" request waits for a run to take it."""
    try:
        return "taken_from_seq" not in json.loads((folder / LOAD_REQUEST).read_text())
    except (OSError, ValueError):
        return False
