"""Who is alive: the daemon serving a home, and the process training a job folder. Both
hold an flock for as long as they live (the kernel drops it however they end), and
write their pid (and start time) into the locked file.

A look never takes a lock itself (that could make a daemon or a `traind run` starting at
that moment fail): it reads the kernel's table of locks, /proc/locks, and falls back to
a non-blocking try where that table cannot be read.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from traind.jobs.folder import LOCK_FILE

DAEMON_LOCK = "daemon.lock"  # in the home


def held_locks() -> dict[str, int] | None:
    """The flocks held now, as {'MAJOR:MINOR:INODE': pid}; None where /proc/locks is unreadable."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK":  # waiters are listed as "N: -> FLOCK ...": skipped
            try:
                found[parts[5]] = int(parts[4])
            except ValueError:
                continue
    return found


def holder(path: Path, locks: dict[str, int] | None = None) -> int | None:
    """The pid holding an flock on PATH (0 when it is held but the pid is unknown), or
    None when nobody holds one. LOCKS: a `held_locks()` taken once for many looks."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    locks = held_locks() if locks is None else locks
    if locks is not None:
        return locks.get(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return 0
    finally:
        os.close(fd)


def stamp(fd: int) -> None:
    """Write this process's pid and start time into the lock file FD, which it holds."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{time.time():.3f}\n".encode(), 0)


@dataclass(frozen=True)
class Daemon:
    pid: int
    started: float
    """When it started (seconds since the epoch)."""

    def uptime(self) -> str:
        left = int(time.time() - self.started)
        days, left = divmod(left, 86400)
        hours, left = divmod(left, 3600)
        return (f"{days}d" if days else "") + (f"{hours}h" if days or hours else "") + f"{left // 60:02d}m"


def serving(root: Path) -> Daemon | None:
    """The daemon that serves the home at ROOT, or None when none does."""
    path = root / DAEMON_LOCK
    pid = holder(path)
    if pid is None:
        return None
    try:
        lines = path.read_text().split()
        return Daemon(int(lines[0]), float(lines[1]))
    except (OSError, ValueError, IndexError):
        return Daemon(pid, os.stat(path).st_mtime)


def trained(folder: Path, locks: dict[str, int] | None = None) -> bool:
    """Whether some process (a daemon's worker, a `traind run`) trains the job in FOLDER now."""
    return holder(folder / LOCK_FILE, locks) is not None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send SIG to this process when its parent ends (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, sig)
