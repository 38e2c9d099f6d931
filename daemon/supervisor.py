"""The daemon: takes job files from inbox/, runs queued jobs in worker processes, one per
device slot, and acts on how each ended. Its body is one `loop(now)` call (tests drive it
directly); `serve` repeats it until a signal, which only sets a flag.

Restarts: a worker that dies (a signal, an OOM kill, a crash) is started again from the
job's newest good save after a capped exponential backoff; one that dies within
FAST_FAIL seconds of each of MAX_FAST starts, or more than MAX_RESTARTS times without
making a new save in between, is failed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from traind.daemon import liveness, notify
from traind.daemon.executor import Executor, Handle, LocalExecutor, Need, place, spawn_worker, visible_gpus
from traind.daemon.home import POKE, Home, check_private, finish_removals
from traind.daemon.intake import SETTLE, Intake
from traind.daemon.jobstate import BadTransition, JobRecord, JobState, read_state, signature, transition, write_state
from traind.daemon.sweeps import Sweeps
from traind.daemon.validator import Validator
from traind.daemon.watch import InboxWatch
from traind.daemon.worker import Exit
from traind.jobs.folder import SAVES, SPEC_FILE, STATE_FILE, WORKER_ERROR
from traind.jobs.jobname import is_job_name
from traind.jobs.loadgame import load_pending
from traind.jobs.spec import JobSpec
from traind.store.errors import TraindError
from traind.store.saves import newest_on_disk, seq_of

log = logging.getLogger("traind.daemon")
MAX_RESTARTS = 5
FAST_FAIL = 5.0
MAX_FAST = 3
BACKOFF = (1.0, 60.0)  # first delay, cap
TICK = 0.25
ADOPT_SETTLE = 5.0  # seconds a job folder copied in must stay unchanged before it is adopted
DISK_RETRY = 5.0  # seconds between looks at the free space, for jobs a full disk stopped
START_RETRY = 30.0  # seconds before a job whose start the executor refused (sbatch failed) is tried again
RESCAN = 1.0  # seconds between looks at every job's state (the CLI changes some: resume, load)
RESERVE_AFTER = 300.0  # seconds a job waiting for devices lets smaller ones behind it start (see Daemon)
DAEMON_LOCK_FILE = liveness.DAEMON_LOCK


CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (cgroup ones included), or None where
    /proc/vmstat does not tell."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _newest_seq(folder: Path) -> int:
    """The number of the newest save of the job in FOLDER (0 if none)."""
    newest = newest_on_disk(folder / SAVES)
    return 0 if newest is None else seq_of(newest.name)


def _newest_bytes(folder: Path) -> int:
    """The size of the newest save of the job in FOLDER (0 if none)."""
    newest = newest_on_disk(folder / SAVES)
    try:
        return sum(f.stat().st_size for f in os.scandir(newest) if f.is_file()) if newest else 0
    except OSError:
        return 0


def _judge(code: int, why: str | None, oom_kills_at_start: int | None) -> tuple[str, str]:
    """How a worker that neither finished nor failed cleanly ended, in words, and its cause."""
    if code == Exit.OUT_OF_MEMORY:
        return f"ran out of memory ({why or 'an allocation failed'})", "out_of_memory"
    if code >= 0:
        return f"crashed (exit {code})", "crashed"
    sig = signal.Signals(-code)
    said = f": {why}" if why else ""  # (a Slurm job's end, in Slurm's words)
    if sig == signal.SIGKILL:
        now = oom_kills()
        if now is not None and oom_kills_at_start is not None and now > oom_kills_at_start:
            return "was killed by the kernel's OOM killer (out of memory; its OOM kill count rose)", "out_of_memory"
        unknown = (now is None or oom_kills_at_start is None) and not why
        return f"was killed by SIGKILL{' (out of memory? see `dmesg`)' if unknown else said}", "killed"
    if sig in CRASH_SIGNALS:
        return f"crashed ({sig.name}){said}", "crashed"
    return f"was killed by {sig.name}{said}", "killed"


class DaemonBusy(TraindError):
    pass


@dataclass
class Worker:
    name: str
    proc: Handle
    started: float
    slots: list[str]
    oom_kills: int | None = None
    """The kernel's OOM kill count when it started: a SIGKILL after it rose was the OOM killer."""
    seq_at_start: int = 0
    """The newest save's number when it started: a worker that saved since made progress."""


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class Daemon:
    """The service. Its side effects on the machine go through seams that tests replace:
    EXECUTOR (where workers run: by default a LocalExecutor of WORKERS slots, with the
    seams GPUS, the GPU list, and SPAWN, a worker process), FREE_BYTES (disk space), CLOCK
    (the wall clock) and WATCH (the inbox's watcher)."""

    home: Home
    workers: int = 1
    threads: int | None = None
    """CPU threads per worker (`--threads`); default an explicit OMP_NUM_THREADS, else the cores shared among the slots."""
    settle: float = SETTLE
    running: dict[str, Worker] = field(default_factory=dict)
    fast_fails: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    unproductive: dict[str, int] = field(default_factory=dict)
    """Per job, worker deaths since its last new save: the restart limit counts these."""
    gpus: Callable[[], list[str]] = visible_gpus
    spawn: Callable[[list[str], IO[bytes], dict[str, str]], subprocess.Popen] = spawn_worker
    free_bytes: Callable[[Path], int] = disk_free
    clock: Callable[[], float] = time.time
    watch: Callable[[Path, threading.Event], InboxWatch] = InboxWatch
    executor: Executor | None = None
    warm: bool = False
    """Workers forked from a warm template (daemon/warm.py) rather than started cold."""

    reserve_after: float = RESERVE_AFTER
    """Seconds a job may wait for devices while smaller jobs behind it start on the free
    ones (backfill); then nothing behind it starts until it has its devices."""

    def __post_init__(self):
        if self.executor is None:
            # one device per rank: the GPUs; without one, --workers CPU slots; --workers 0 takes files in, runs nothing
            self.executor = LocalExecutor(self.workers, self.threads, gpus=self.gpus, spawn=self.spawn,
                                          warm=self.warm)
        self.slots = self.executor.slots
        self.validator = Validator()
        self.intake = Intake(self.home, settle=self.settle, check=self.validator.check, fits=self._unfit)
        self._needs: dict[str, Need] = {}
        self.blocked: dict[str, float] = {}
        """Jobs due that did not fit on the free devices, and since when."""
        self._lock_fd: int | None = None
        self.waiting = 0
        self._states: dict[str, tuple[str, JobRecord]] = {}  # name -> (state.json's signature, its record)
        self._rescan_at = 0.0  # 0: now (the daemon itself changed a state, or took a file in)
        self.sweeps = Sweeps(self.home)

    def start(self) -> None:
        """Take the home (one daemon each). The jobs a crash left running are queued again
        by the first `_schedule`, as every job marked running with no worker here is."""
        for d in (self.home.inbox, self.home.jobs, self.home.rejected):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        check_private(self.home)
        finish_removals(self.home)
        self._lock_fd = os.open(self.home.root / DAEMON_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonBusy(f"another traind daemon serves {self.home.root}") from None
        liveness.stamp(self._lock_fd)  # `traind ls` tells who serves the home, and since when
        self.executor.prepare(self.home.root)
        self.validator.start()  # ready by the time a file lands

    def loop(self, now: float, delivered: frozenset = frozenset()) -> None:
        if POKE in delivered:  # the CLI changed a job's or a sweep's state: look now
            self._rescan_at = 0.0
            self.sweeps.wake()
        outcomes = self.intake.scan(now, delivered)
        for outcome in outcomes:
            if outcome.job is not None:
                log.info("%s: accepted from inbox/%s", outcome.job, outcome.file)
            else:
                log.warning("rejected inbox/%s (`traind rejected` lists it): %s", outcome.file, outcome.error)
        if outcomes:
            self._rescan_at = 0.0
        for name, worker in list(self.running.items()):
            self.executor.steer(worker.proc, self.home.job_dir(name))
            code = worker.proc.poll()
            if code is not None:
                del self.running[name]
                self._ended(worker, code, now)
                self._rescan_at = 0.0
                self.sweeps.wake()
        self.executor.tend()
        if self.sweeps.tick(now):  # new trials' jobs, or trials pruned
            self._rescan_at = 0.0
        self._schedule(now)

    def _refresh_states(self) -> None:
        """Every job's record, read again only where its state.json changed: with 10,000
        jobs, a stat each instead of a read and a parse each."""
        jobs, states = str(self.home.jobs), {}
        for entry in os.scandir(jobs):
            if not is_job_name(entry.name) or not entry.is_dir():  # hidden (being made or removed), or stray
                continue
            sig = signature(f"{jobs}/{entry.name}/{STATE_FILE}")
            known = self._states.get(entry.name)
            if known and known[0] == sig:
                states[entry.name] = known
            elif sig is not None and (record := read_state(Path(entry.path))) is not None:
                states[entry.name] = (sig, record)
            elif sig is None and (record := self._adopt(Path(entry.path))) is not None:
                states[entry.name] = (signature(f"{jobs}/{entry.name}/{STATE_FILE}"), record)
        self._states = states

    def _adopt(self, folder: Path) -> JobRecord | None:
        """A job folder copied in from elsewhere (as `traind run --dir` made it: a spec and
        saves, no state) becomes a queued job of this home, once nothing in it has changed
        for ADOPT_SETTLE seconds (a copy still running would have its saves quarantined)."""
        if not (folder / SPEC_FILE).is_file():
            return None
        try:
            changed = max(os.lstat(os.path.join(d, n)).st_ctime for d, dirs, files in os.walk(folder)
                          for n in [".", *dirs, *files])
            priority = int(json.loads((folder / SPEC_FILE).read_text()).get("priority", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if self.clock() - changed < ADOPT_SETTLE:
            return None
        log.info("adopting %s, a job folder copied in", folder.name)
        now = self.clock()
        return write_state(folder, JobRecord(folder.name, JobState.QUEUED, priority, now, changed=now,
                                             last_error="adopted: a job folder copied into this home",
                                             cause="interrupted"))

    def _schedule(self, now: float) -> None:
        """Start the queued jobs that are due on the free slots; count those left waiting."""
        if now >= self._rescan_at:
            self._refresh_states()
            self._rescan_at = now + RESCAN
        for name, (_, record) in list(self._states.items()):
            if record.state == JobState.RUNNING and name not in self.running:
                if self._reattach(name, now):
                    continue
                try:
                    record = transition(self.home.job_dir(name), JobState.QUEUED, allow_from={JobState.RUNNING},
                                        last_error="it was running, but not here: the daemon stopped while it ran, "
                                                   "or its folder was copied in",
                                        cause="interrupted")
                except (BadTransition, FileNotFoundError):
                    continue
                self._states[name] = (signature(str(self.home.job_dir(name) / STATE_FILE)), record)
        queued = [r for _, r in self._states.values() if r.state == JobState.QUEUED]
        due = sorted((r for r in queued if r.name not in self.running and self.retry_at.get(r.name, 0.0) <= now
                      and self._room_for(r, now)), key=lambda r: (-r.priority, r.submitted))
        used = {s for w in self.running.values() for s in w.slots}
        free = [s for s in self.slots if s not in used]
        started = 0
        for record in due:
            if not free:
                break
            need = self._need(record.name)
            taken = place(free, need)
            if taken is None:  # it waits for devices; the jobs behind it may use the free ones, for a while
                if now - self.blocked.setdefault(record.name, now) >= self.reserve_after:
                    break  # its turn: the devices that free up are kept for it
                continue
            self.blocked.pop(record.name, None)
            self._launch(record.name, taken, now)
            free = [s for s in free if s not in taken]
            started += 1
            self._rescan_at = 0.0
        self.blocked = {n: t for n, t in self.blocked.items() if n in {r.name for r in due} and n not in self.running}
        self.waiting = len(queued) - started

    def _room_for(self, record: JobRecord, now: float) -> bool:
        """A job stopped by a full disk waits until the disk has room for its next save and
        half again (looked at every DISK_RETRY seconds); any other job may go."""
        if record.cause != "disk_full":
            return True
        folder = self.home.job_dir(record.name)
        if self.free_bytes(folder) >= 1.5 * _newest_bytes(folder) + (1 << 20):
            return True
        self.retry_at[record.name] = now + DISK_RETRY
        return False

    def _need(self, name: str) -> Need:
        """What the job NAME asks for, from its spec.json (read once: it never changes)."""
        if name not in self._needs:
            try:
                self._needs[name] = self.executor.need(json.loads((self.home.job_dir(name) / SPEC_FILE).read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                return Need()  # unreadable: its worker says why
        return self._needs[name]

    def _unfit(self, spec: JobSpec) -> str | None:
        return self.executor.unfit(spec.model_dump())

    def _launch(self, name: str, slots: list[str], now: float) -> None:
        folder = self.home.job_dir(name)
        try:
            transition(folder, JobState.RUNNING, allow_from={JobState.QUEUED})
        except (BadTransition, FileNotFoundError):
            return  # paused, cancelled or removed since the last look at it
        (folder / WORKER_ERROR).unlink(missing_ok=True)
        count = oom_kills()
        try:
            proc = self.executor.start(self.home.root, name, folder, slots)
        except TraindError as e:  # the cluster refused it, or did not answer (sbatch's own words): later
            self.retry_at[name] = now + START_RETRY
            transition(folder, JobState.QUEUED, last_error=f"{e}; trying again in {START_RETRY:.0f} s", cause="failed")
            log.warning("%s: could not start: %s; trying again in %.0f s", name, e, START_RETRY)
            return
        self.running[name] = Worker(name, proc, now, slots, count, _newest_seq(folder))
        log.info("%s: started on %s (%s)", name, ",".join(slots), self.executor.describe(proc))

    def _reattach(self, name: str, now: float) -> bool:
        """Whether the job NAME, marked running, has a worker still running that an earlier
        daemon started (a Slurm job outlives the daemon): it is watched again, on a slot."""
        folder = self.home.job_dir(name)
        proc = self.executor.reattach(name, folder)
        if proc is None:
            return False
        used = {s for w in self.running.values() for s in w.slots}
        free = [s for s in self.slots if s not in used]
        self.running[name] = Worker(name, proc, now, free[:1], None, _newest_seq(folder))
        log.info("%s: found running again (%s)", name, self.executor.describe(proc))
        return True

    def _ended(self, worker: Worker, code: int, now: float) -> None:
        folder = self.home.job_dir(worker.name)
        error_file = folder / WORKER_ERROR
        why = error_file.read_text().strip() if error_file.exists() else None
        self._say_ended(worker.name, code, why)
        if code in (Exit.DONE, Exit.STOPPED) and load_pending(folder):
            transition(folder, JobState.QUEUED)  # a "load game" came in as it ended: play it
        elif code == Exit.DONE:
            transition(folder, JobState.DONE, last_error=None, cause=None)  # the log and `restarts` keep the history
        elif code == Exit.PAUSED:
            transition(folder, JobState.PAUSED)
        elif code == Exit.CANCELLED:
            transition(folder, JobState.CANCELLED)
        elif code == Exit.STOPPED:
            transition(folder, JobState.QUEUED)
        elif code == Exit.DISK_FULL:
            self.retry_at[worker.name] = now + DISK_RETRY
            transition(folder, JobState.QUEUED, cause="disk_full",
                       last_error=f"{why or 'a save did not fit on the disk'}; it continues once there is room")
        elif code in (Exit.BAD_JOB, Exit.FAILED):
            transition(folder, JobState.FAILED, last_error=why or f"the worker failed (exit {code})",
                       cause="bad_job" if code == Exit.BAD_JOB else "failed")
        else:
            self._crashed(worker, code, now, folder, why)
            return
        self.fast_fails.pop(worker.name, None)

    @staticmethod
    def _say_ended(name: str, code: int, why: str | None) -> None:
        """One line to the daemon's log (stderr, the journal) of how a worker ended; deaths
        are told by `_crashed`, with what follows."""
        said = {Exit.DONE: "finished", Exit.PAUSED: "paused", Exit.CANCELLED: "cancelled",
                Exit.STOPPED: "stopped (queued, to resume)"}
        if code in said:
            log.info("%s: %s", name, said[code])
        elif code in (Exit.BAD_JOB, Exit.FAILED, Exit.DISK_FULL):
            log.warning("%s: %s: %s", name, "waits for disk space" if code == Exit.DISK_FULL else "failed", why)

    def _crashed(self, worker: Worker, code: int, now: float, folder: Path, why: str | None) -> None:
        """Out of memory, killed or crashed: try again from the newest good save, after a backoff."""
        how, cause = _judge(code, why, worker.oom_kills)
        record = read_state(folder)
        restarts = (record.restarts if record else 0) + 1
        if _newest_seq(folder) > worker.seq_at_start:  # it saved since it started: not a loop, start counting anew
            self.fast_fails.pop(worker.name, None)
            self.unproductive.pop(worker.name, None)
        fast = self.fast_fails.get(worker.name, 0) + (now - worker.started < FAST_FAIL)
        self.fast_fails[worker.name] = fast
        tries = self.unproductive[worker.name] = self.unproductive.get(worker.name, 0) + 1
        if tries > MAX_RESTARTS or fast >= MAX_FAST:
            reason = ("it died within seconds of each start" if fast >= MAX_FAST
                      else f"{tries - 1} restarts without a new save")
            transition(folder, JobState.FAILED, restarts=restarts - 1, cause=cause,
                       last_error=f"the worker {how}; given up after {reason}")
            log.warning("%s: failed: the worker %s; given up after %s", worker.name, how, reason)
            return
        delay = min(BACKOFF[0] * 2 ** (tries - 1), BACKOFF[1])
        log.warning("%s: the worker %s; restarting in %.0f s (restart %d)", worker.name, how, delay, restarts)
        self.retry_at[worker.name] = now + delay
        transition(folder, JobState.QUEUED, restarts=restarts, cause=cause, last_error=f"the worker {how}; restarting")

    def stop(self, timeout: float = 600.0) -> None:
        """Every worker saves at its next step boundary and stops; their jobs stay queued.
        Workers that outlive the daemon (Slurm jobs) go on; the next daemon finds them."""
        if self.executor.outlives_daemon:
            self.running.clear()
        for worker in self.running.values():
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, worker in list(self.running.items()):
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
            del self.running[name]
            self._ended(worker, code, time.monotonic())
        self.executor.close()
        self.validator.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def status_line(self) -> str:
        """Counts as of the last loop (which read every job's state once)."""
        return f"{len(self.running)} running, {self.waiting} queued"

    def serve(self, stop: threading.Event, stop_timeout: float = 600.0) -> None:
        """Loop until STOP is set (a signal handler sets it); then stop the workers. Speaks
        sd_notify: READY after the first rescan, STATUS, WATCHDOG from the loop itself,
        and STOPPING with more time while the workers save."""
        self.start()
        interval, last_ping, status = notify.watchdog_interval(), 0.0, None
        wake = threading.Event()
        watch = self.watch(self.home.inbox, wake)
        try:
            watch.ensure_running()
            self.loop(time.monotonic())
            notify.notify(f"READY=1\nSTATUS={self.status_line()}")
            while not stop.is_set():
                now = time.monotonic()
                watch.ensure_running()
                try:
                    self.loop(now, watch.take_complete())
                except Exception:  # a bug, or the disk full under state.json: log it, serve on, look again
                    log.exception("the daemon's loop failed; trying again")
                if interval is not None and now - last_ping >= interval:
                    notify.notify("WATCHDOG=1")
                    last_ping = now
                line = self.status_line()
                if line != status:
                    notify.notify(f"STATUS={line}")
                    status = line
                wake.wait(TICK)  # a new file in inbox/ wakes the loop early
                wake.clear()
        finally:
            watch.stop()
            notify.notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={int(stop_timeout * 1e6)}\n"
                          f"STATUS=saving {len(self.running)} running jobs")
            self.stop(stop_timeout)
