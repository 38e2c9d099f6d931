"""Reading a job's saves: list them, verify them against their manifests, quarantine the
ones that fail, and load the rest. Nothing here unpickles: tensors come from safetensors,
everything else from JSON."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import xxhash

from traind.store import commit
from traind.store.commit import FORMAT, HASH, MANIFEST, leftover
from traind.store.errors import CorruptSave, DiskFull, SaveFailed
from traind.store.fs import FileSystem

QUARANTINE = "quarantine"
CHUNK = 1 << 22


def save_id(seq: int, step: int) -> str:
    """A save's id: `SEQ-sSTEP`, SEQ counting every save ever made in its folder."""
    return f"{seq:06d}-s{step}"


def seq_of(name: str) -> int | None:
    """The SEQ of a save's id or folder name; None for any other name (a leftover, the
    quarantine folder, a stray)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def newest_on_disk(saves_dir: Path) -> Path | None:
    """The newest save's folder by its name alone (no manifest read: cheap enough for a
    scheduler's every tick); None when there is none. It may not verify."""
    try:
        names = [n for n in os.listdir(saves_dir) if seq_of(n) is not None]
    except OSError:
        return None
    return saves_dir / max(names, key=seq_of) if names else None


@dataclass(frozen=True)
class SaveInfo:
    """A committed save, as its manifest describes it."""

    id: str
    seq: int
    step: int
    epoch: int
    kinds: tuple[str, ...]
    metrics: dict
    created: str
    bytes: int
    note: str | None
    path: Path
    sizes: tuple[tuple[str, int], ...] = ()
    """Each file the manifest lists, with its size in bytes."""
    request: str | None = None
    """The request this save answered (a quicksave's), so that it is answered once."""

    @classmethod
    def from_manifest(cls, path: Path, m: dict) -> SaveInfo:
        return cls(m["id"], int(m["seq"]), int(m["step"]), int(m["epoch"]), tuple(m.get("kinds", ())),
                   dict(m.get("metrics", {})), str(m.get("created", "")), int(m.get("bytes", 0)),
                   m.get("note"), path, tuple((name, f.get("bytes")) for name, f in m["files"].items()),
                   m.get("request"))

    def looks_whole(self) -> bool:
        """Every file its manifest lists is there, a plain file of the listed size (a stat
        each; `verify` re-hashes them)."""
        for name, size in self.sizes:
            try:
                st = os.lstat(self.path / name)
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
        return True

    def as_json(self, verified: bool | None = None) -> dict:
        return {"id": self.id, "step": self.step, "epoch": self.epoch, "kinds": list(self.kinds),
                "metrics": self.metrics, "bytes": self.bytes, "created": self.created, "verified": verified,
                "note": self.note}


def read_manifest(save_dir: Path) -> dict:
    path = save_dir / MANIFEST
    if save_dir.is_symlink() or path.is_symlink():
        raise CorruptSave(f"{save_dir}: a symlink where a save's own folder and files belong")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptSave(f"{save_dir}: no readable {MANIFEST} ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CorruptSave(f"{save_dir}: {MANIFEST} is not a {FORMAT} manifest")
    for name in manifest["files"]:
        # a manifest names files inside its own folder, never a path elsewhere
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CorruptSave(f"{save_dir}: {MANIFEST} names {name!r}, which is not a file of this save")
    try:
        SaveInfo.from_manifest(save_dir, manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptSave(f"{save_dir}: {MANIFEST} lacks or garbles {e}") from e
    return manifest


def list_saves(saves_dir: Path) -> tuple[list[SaveInfo], list[tuple[Path, str]]]:
    """Committed saves, oldest first, and the folders that look like saves but are not."""
    good, bad = [], []
    if not saves_dir.is_dir():
        return good, bad
    for entry in saves_dir.iterdir():
        if not entry.is_dir() or leftover(entry.name) or entry.name == QUARANTINE:
            continue
        try:
            good.append(SaveInfo.from_manifest(entry, read_manifest(entry)))
        except CorruptSave as e:
            bad.append((entry, str(e)))
    good.sort(key=lambda s: s.seq)
    return good, bad


def verify(save_dir: Path, full: bool = True) -> list[str]:
    """Every way SAVE_DIR differs from its manifest: missing, resized or (FULL) re-hashed
    files. An empty list means the save is whole."""
    try:
        manifest = read_manifest(save_dir)
    except CorruptSave as e:
        return [str(e)]
    problems = []
    for name, entry in manifest["files"].items():
        path = save_dir / name
        if path.is_symlink():
            problems.append(f"{name}: a symlink; a save holds its own plain files only")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        elif full and _hash(path) != entry.get(HASH):
            problems.append(f"{name}: contents changed ({HASH} does not match the manifest)")
    return problems


def copy(fs: FileSystem, info: SaveInfo, saves_dir: Path) -> SaveInfo:
    """Commit a copy of the save INFO (of another folder) into SAVES_DIR under its own id,
    each file hashed as it is copied: one read that copies and verifies. CorruptSave when a
    file is not as INFO's manifest says (the copy is withdrawn: nothing of it stays)."""
    manifest = read_manifest(info.path)
    problems = verify(info.path, full=False)  # a stat each, to name a file missing or resized
    if problems:
        raise CorruptSave(f"{info.path}: {'; '.join(problems)}")
    parts = [commit.Part(name, int(entry.get("bytes", 0)), _reader(info.path / name))
             for name, entry in manifest["files"].items()]
    meta = {k: v for k, v in manifest.items() if k not in ("format", "id", "files", "bytes", "created")}
    try:
        made = commit.commit(fs, saves_dir, info.id, parts, {**meta, "copied_from": str(info.path)})
    except DiskFull:
        raise
    except SaveFailed as e:  # a file shorter or longer than its manifest says, or gone
        raise CorruptSave(f"{info.path}: cannot be copied whole ({e})") from e
    changed = [name for name, entry in manifest["files"].items() if made["files"][name][HASH] != entry.get(HASH)]
    if changed:
        commit.withdraw(fs, saves_dir, saves_dir / info.id)
        raise CorruptSave(f"{info.path}: {', '.join(changed)}: contents changed ({HASH} does not match the manifest)")
    return SaveInfo.from_manifest(saves_dir / info.id, made)


def _reader(path: Path):
    def write(sink) -> int:
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sink(memoryview(chunk))
                size += len(chunk)
        return size
    return write


def _hash(path: Path) -> str:
    hasher = getattr(xxhash, HASH)()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def quarantine(fs: FileSystem, saves_dir: Path, save_dir: Path) -> Path:
    """Move a bad save aside (kept for inspection, never loaded again)."""
    target_dir = saves_dir / QUARANTINE
    if not target_dir.exists():
        fs.mkdir(target_dir)
    target = target_dir / save_dir.name
    n = 1
    while target.exists():
        target, n = target_dir / f"{save_dir.name}.{n}", n + 1
    fs.rename(save_dir, target)
    fs.fsync_dir(saves_dir)
    return target


def quarantined(saves_dir: Path) -> list[str]:
    """The names of the saves moved aside as bad, sorted."""
    target_dir = saves_dir / QUARANTINE
    return sorted(p.name for p in target_dir.iterdir()) if target_dir.is_dir() else []


def load_tensors(save: SaveInfo, name: str) -> dict:
    from safetensors.torch import load_file  # torch, imported only when tensors are read

    return load_file(save.path / name)


def load_json(save: SaveInfo, name: str) -> dict:
    return json.loads((save.path / name).read_text())
