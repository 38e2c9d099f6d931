"""The atomic commit of a save: the one place that decides when a save exists.

    saves/.staging-ID/          made on the same filesystem as saves/
        FILE...                 each written, hashed as written, fsynced, closed
        manifest.json           last: every file's size and xxh3-128, then fsynced
    fsync(.staging-ID/)         the folder's entries are durable
    rename -> saves/ID/         atomic: the save appears whole or not at all
    fsync(saves/)               the rename is durable; only now is the save reported

A crash before the rename leaves a staging folder that the next start sweeps away; a
crash after it leaves a complete save, or, if the rename was not yet durable, none.
Any failed operation (EIO, ENOSPC, a failed fsync, which is never retried) removes the
staging folder and raises SaveFailed: earlier saves are never touched.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from traind.store.errors import DiskFull, SaveFailed
from traind.store.fs import FileSystem

FORMAT = "traind-save/1"
MANIFEST = "manifest.json"
STAGING = ".staging-"
DELETING = ".deleting-"  # a save being removed: renamed out of the listing first, whole, then its files go
HASH = "xxh3_128"


@dataclass(frozen=True)
class Part:
    """One file of a save: its name, its exact size, and how to stream its bytes."""

    name: str
    size: int
    write: Callable[[Callable[[memoryview], None]], int]


def json_part(name: str, value: dict) -> Part:
    """VALUE as a JSON file of one top-level key a line, each value compact: readable, and
    written by json's C encoder throughout (an indent sends json to its pure-Python
    encoder, which took 1.7 ms a save of the seed MLP, most of it on the RNG states'
    1,250 ints, on the writer thread and holding the GIL that training needs)."""
    data = ("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(value[k], sort_keys=True)}" for k in sorted(value))
            + "\n}\n").encode()
    return Part(name, len(data), lambda sink: sink(memoryview(data)) or len(data))


def commit(fs: FileSystem, saves_dir: Path, save_id: str, parts: list[Part], meta: dict) -> dict:
    """Write PARTS as the save SAVE_ID under SAVES_DIR; return its manifest once durable."""
    needed = sum(p.size for p in parts) + (1 << 20)
    free = fs.free_bytes(saves_dir)
    if free < needed:
        raise DiskFull(f"not enough disk space for save {save_id} in {saves_dir}: it needs {needed:,} bytes, "
                         f"{free:,} are free; free some space (or delete old saves) and run again")
    stage, final = saves_dir / f"{STAGING}{save_id}", saves_dir / save_id
    renamed = False
    try:
        fs.mkdir(stage)
        files = {p.name: _write_part(fs, stage / p.name, p) for p in parts}
        manifest = {**meta, "format": FORMAT, "id": save_id, "files": files,
                    "bytes": sum(f["bytes"] for f in files.values()),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_part(fs, stage / MANIFEST, json_part(MANIFEST, manifest))
        fs.fsync_dir(stage)
        fs.rename(stage, final)
        renamed = True
        fs.fsync_dir(saves_dir)
    except SaveFailed:  # a part of another size than it said
        fs.remove_tree(stage)
        raise
    except OSError as e:
        # The save never existed as far as anyone was told: remove every trace of it (once
        # renamed into place, by one step out of every listing first, as `withdraw` does).
        if renamed:
            _discard(fs, saves_dir, final)
        else:
            fs.remove_tree(stage)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"save {save_id} failed in {saves_dir}: the disk is full; earlier saves are untouched; "
                           "free some space (or delete old saves)") from e
        raise SaveFailed(f"save {save_id} failed in {saves_dir}: {e.strerror or e} (errno {e.errno}); "
                         "earlier saves are untouched") from e
    return manifest


def _write_part(fs: FileSystem, path: Path, part: Part) -> dict:
    fd = fs.create(path)
    try:
        hasher = getattr(xxhash, HASH)()

        def sink(view: memoryview) -> None:
            hasher.update(view)
            fs.write(fd, view)

        size = part.write(sink)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    if size != part.size:
        raise SaveFailed(f"{path.name}: wrote {size} bytes, expected {part.size} (a bug in traind)")
    return {"bytes": size, HASH: hasher.hexdigest()}


def withdraw(fs: FileSystem, saves_dir: Path, save_dir: Path) -> None:
    """Remove a committed save in one atomic step, then its files: renamed to DELETING
    (out of every listing, whole) and made durable, only then deleted file by file. A crash
    part-way leaves a DELETING folder, which the next sweep removes, never a half save."""
    doomed = saves_dir / f"{DELETING}{save_dir.name}"
    fs.rename(save_dir, doomed)
    fs.fsync_dir(saves_dir)
    fs.remove_tree(doomed)


def _discard(fs: FileSystem, saves_dir: Path, save_dir: Path) -> None:
    """Take back a save whose commit failed after its rename: renamed out first, so that a
    crash in the removal leaves a leftover to sweep, never a half save. If even that
    rename fails, the save stays, whole (its files and folder were fsynced), though never
    acknowledged: the next resume may take it, as it may any save it finds whole."""
    doomed = saves_dir / f"{DELETING}{save_dir.name}"
    try:
        fs.rename(save_dir, doomed)
    except OSError:
        return
    fs.remove_tree(doomed)


def leftover(name: str) -> bool:
    """Whether NAME in a saves folder is a leftover of a crash: a save being written
    (never one) or being removed (no longer one)."""
    return name.startswith((STAGING, DELETING))


def sweep_staging(fs: FileSystem, saves_dir: Path) -> list[str]:
    """Remove what a crash left behind: staging folders (they were never saves) and saves
    that were being removed."""
    swept = [p.name for p in saves_dir.iterdir() if leftover(p.name)] if saves_dir.is_dir() else []
    for name in swept:
        fs.remove_tree(saves_dir / name)
    if swept:
        fs.fsync_dir(saves_dir)
    return swept
