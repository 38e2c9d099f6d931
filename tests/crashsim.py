"""A crash simulator in the manner of ALICE and SQLite's crash tests: record the file
operations of some code through the I/O interface (`store/fs.py`), then build every
state a crash after any prefix of them could leave on disk.

The disk is modelled as it is: data not fsynced may be lost or torn, appends to a file
(the log, metrics.jsonl) as much as new files; a directory change (create, rename,
unlink, rmdir) not followed by an fsync of its folder may be lost; a folder's removal is
not one step but an unlink per file and an rmdir per folder, so a crash can leave it half
removed; and files other programs wrote are no safer than ours (`unsynced`)."""

import os
import shutil
from pathlib import Path

from traind.store.fs import FileSystem

DIR_OPS = ("mkdir", "create", "rename", "unlink", "rmdir")


class RecordingFS(FileSystem):
    """Does every operation for real and keeps a log of it."""

    def __init__(self):
        self.log, self.paths = [], {}

    def create(self, path):
        fd = super().create(path)
        self.paths[fd] = Path(path)
        self.log.append(("create", Path(path)))
        return fd

    def open_append(self, path):
        new = not Path(path).exists()
        fd = super().open_append(path)
        self.paths[fd] = Path(path)
        self.log.append(("create" if new else "open", Path(path)))
        return fd

    def write(self, fd, data):
        self.log.append(("write", self.paths[fd], bytes(data)))
        super().write(fd, data)

    def fsync(self, fd):
        self.log.append(("fsync", self.paths[fd]))
        super().fsync(fd)

    def fsync_file(self, path):
        self.log.append(("fsync", Path(path)))
        super().fsync_file(path)

    def mkdir(self, path):
        self.log.append(("mkdir", Path(path)))
        super().mkdir(path)

    def rename(self, src, dst):
        self.log.append(("rename", Path(src), Path(dst)))
        super().rename(src, dst)

    def fsync_dir(self, path):
        self.log.append(("fsync_dir", Path(path)))
        super().fsync_dir(path)

    def unlink(self, path):
        self.log.append(("unlink", Path(path)))
        super().unlink(path)

    def remove_tree(self, path):
        """As the real one does it: files one by one, then each folder, deepest first."""
        path = Path(path)
        if not path.exists():
            return
        for folder, dirs, files in os.walk(path, topdown=False):
            for name in files:
                self.log.append(("unlink", Path(folder) / name))
                os.unlink(Path(folder) / name)
            self.log.append(("rmdir", Path(folder)))
            os.rmdir(folder)


class FailingFS(FileSystem):
    """Fails the N-th crash-relevant operation with errno CODE."""

    def __init__(self, n, code):
        self.n, self.code, self.count = n, code, 0

    def _tick(self):
        self.count += 1
        if self.count - 1 == self.n:
            raise OSError(self.code, os.strerror(self.code))

    def create(self, path):
        self._tick()
        return super().create(path)

    def open_append(self, path):
        self._tick()
        return super().open_append(path)

    def write(self, fd, data):
        self._tick()
        super().write(fd, data)

    def fsync(self, fd):
        self._tick()
        super().fsync(fd)

    def fsync_file(self, path):
        self._tick()
        super().fsync_file(path)

    def mkdir(self, path):
        self._tick()
        super().mkdir(path)

    def rename(self, src, dst):
        self._tick()
        super().rename(src, dst)

    def fsync_dir(self, path):
        self._tick()
        super().fsync_dir(path)

    def unlink(self, path):
        self._tick()
        super().unlink(path)


def made_durable(ops):
    """Indexes of the directory operations that a later fsync of their folder made durable."""
    found = set()
    for i, op in enumerate(ops):
        if op[0] in DIR_OPS:
            parent = (op[2] if op[0] == "rename" else op[1]).parent
            if ("fsync_dir", parent) in ops[i + 1:]:
                found.add(i)
    return found


def crash_state(base: Path, before: Path, ops: list, mode: str, target: Path, unsynced=()) -> None:
    """The folder a crash after OPS could leave: `all` every operation happened; `drop`
    file data not fsynced is lost; `torn` that data is garbage; `lost-dirs` directory
    changes not fsynced are lost too, and unsynced data with them. UNSYNCED: files of
    BEFORE (paths under BASE) that another program wrote and nobody fsynced yet (a job file
    `cp` dropped in): their bytes are pending too, until an fsync in OPS."""
    shutil.copytree(before, target)
    durable = made_durable(ops) if mode == "lost-dirs" else None
    synced, pending, lost = {}, {}, set()
    for p in map(Path, unsynced):
        synced[p], pending[p] = b"", (before / p.relative_to(base)).read_bytes()

    def where(p: Path) -> Path:
        return target / p.relative_to(base)

    for i, op in enumerate(ops):
        kind, path = op[0], op[1]
        if any(d == path or d in path.parents for d in lost):
            continue
        if durable is not None and kind in DIR_OPS and i not in durable:
            lost.add(path)  # it never reached the disk; neither did anything beneath it
            continue
        if kind == "mkdir":
            where(path).mkdir()
        elif kind == "create":
            where(path).touch()
            synced[path], pending[path] = b"", b""
        elif kind == "open" and path not in synced:  # appended to: what it held before is on disk
            synced[path], pending[path] = where(path).read_bytes(), b""
        elif kind == "write":
            pending[path] += op[2]
        elif kind == "fsync":
            synced[path], pending[path] = synced[path] + pending[path], b""
        elif kind == "rename":
            for p in [p for p in synced if p == path or path in p.parents]:
                moved = op[2] / p.relative_to(path)
                synced[moved], pending[moved] = synced.pop(p), pending.pop(p)
            os.rename(where(path), where(op[2]))
        elif kind == "unlink":
            where(path).unlink(missing_ok=True)
            synced.pop(path, None)
            pending.pop(path, None)
        elif kind == "rmdir":
            try:
                where(path).rmdir()
            except OSError:
                pass  # not empty here (an unlink in it was lost): the real rmdir would have failed too
    for p, data in synced.items():
        if where(p).exists():
            tail = pending[p]
            if mode == "torn" and tail:
                tail = tail[:len(tail) // 2] + os.urandom(len(tail) - len(tail) // 2)
            elif mode != "all":
                tail = b""
            stamp = where(p).stat()
            where(p).write_bytes(data + tail)
            os.utime(where(p), ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # a crash rewrites no mtime
