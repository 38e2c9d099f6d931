"""A job's checkpoint store: its saves/ folder, through commit, retention and verify.

It knows named tensors and JSON, not what they mean: the jobs package decides what a
save holds. Save ids are `SEQ-sSTEP` with SEQ counting every save ever made in the
folder, so ids never collide, even when a rollback replays steps that already have saves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from traind.store import commit, retention, saves, tensorfile
from traind.store.errors import CorruptSave, NoSuchSave
from traind.store.fs import FileSystem
from traind.store.saves import SaveInfo, save_id, seq_of


class SaveStore:
    """The saves of one folder. A READER (a rank beside the one that writes) only lists and
    reads: it makes nothing, sweeps nothing, quarantines nothing, and `get` looks afresh."""

    def __init__(self, saves_dir: Path, policy: retention.Policy | None = None, fs: FileSystem | None = None,
                 reader: bool = False):
        self.dir, self.policy, self.fs = Path(saves_dir), policy or retention.Policy(), fs or FileSystem()
        self.reader = reader
        if not self.dir.is_dir() and not reader:  # made durable: a lost saves/ would lose every save in it
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.fs.mkdir(self.dir)
            self.fs.fsync_dir(self.dir.parent)
        self.swept = [] if reader else commit.sweep_staging(self.fs, self.dir)
        self._lock = threading.Lock()  # the writer thread commits while the trainer reads the list
        self._saves, self.broken = saves.list_saves(self.dir)
        self._next_seq = max((s.seq for s in self._saves), default=0) + 1
        quarantined = self.dir / saves.QUARANTINE
        if quarantined.is_dir():  # a quarantined save keeps its seq: never reuse it
            seqs = [seq_of(p.name) for p in quarantined.iterdir() if seq_of(p.name) is not None]
            self._next_seq = max([self._next_seq, *(s + 1 for s in seqs)])

    def saves(self) -> list[SaveInfo]:
        """Committed saves, oldest first."""
        with self._lock:
            return list(self._saves)

    def get(self, save_id: str) -> SaveInfo:
        if self.reader:  # the writer may have committed it since
            with self._lock:
                self._saves, self.broken = saves.list_saves(self.dir)
        for s in self.saves():
            if s.id == save_id:
                return s
        known = ", ".join(s.id for s in self.saves()[-5:]) or "none"
        raise NoSuchSave(f"no save '{save_id}' in {self.dir}; the newest are: {known}")

    @property
    def next_seq(self) -> int:
        """The number the next save will get."""
        with self._lock:
            return self._next_seq

    def reserve(self, step: int) -> tuple[int, str]:
        """The seq and id of the next save (taken on the training thread, in order)."""
        with self._lock:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq, save_id(seq, step)

    def write(self, seq: int, save_id: str, tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
              documents: dict[str, dict], meta: dict, protect: Iterable[str] = ()) -> SaveInfo:
        """Commit one save (files of TENSORS with their metadata, and JSON DOCUMENTS), then
        let retention remove what no kind keeps any more. Runs on the writer thread."""
        parts = [commit.Part(name, tensorfile.file_size(t, m), _streamer(t, m)) for name, (t, m) in tensors.items()]
        parts += [commit.json_part(name, doc) for name, doc in documents.items()]
        manifest = commit.commit(self.fs, self.dir, save_id, parts, {**meta, "seq": seq})
        info = SaveInfo.from_manifest(self.dir / save_id, manifest)
        with self._lock:
            self._saves.append(info)
            self._saves.sort(key=lambda s: s.seq)
        self.purge(protect)
        return info

    def purge(self, protect: Iterable[str] = ()) -> list[str]:
        doomed = retention.to_purge(self.policy, self.saves(), protect)
        for s in doomed:
            with self._lock:
                self._saves.remove(s)
            commit.withdraw(self.fs, self.dir, s.path)
        return [s.id for s in doomed]

    def newest_good(self, wanted: Callable[[SaveInfo], bool] = lambda s: True,
                    report: Callable[[str], None] = lambda message: None) -> SaveInfo | None:
        """The newest save that WANTED accepts and that verifies; each that does not verify
        is quarantined (kept, never loaded) and REPORTed."""
        for info in reversed(self.saves()):
            if not wanted(info):
                continue
            problems = saves.verify(info.path)
            if not problems:
                return info
            self.quarantine(info, problems)
            report(f"save {info.id} is corrupt ({'; '.join(problems)}); quarantined, trying the one before")
        return None

    def quarantine(self, info: SaveInfo, problems: list[str]) -> Path:
        with self._lock:
            self._saves = [s for s in self._saves if s.id != info.id]
        return saves.quarantine(self.fs, self.dir, info.path)

    def checked(self, info: SaveInfo) -> SaveInfo:
        """INFO if it verifies, else CorruptSave naming what is wrong."""
        problems = saves.verify(info.path)
        if problems:
            raise CorruptSave(f"save {info.id} is corrupt: {'; '.join(problems)}")
        return info


def _streamer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    return lambda sink: tensorfile.write(tensors, metadata, sink)
