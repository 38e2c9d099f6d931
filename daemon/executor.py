"""Where the daemon's jobs run: its executors. The supervisor (daemon/supervisor.py) owns
the policy (which job next, restarts, how an ending changes a job's state); an executor
owns the mechanism: the slots jobs are placed on, starting a job's worker, and a handle
that says when and how the worker ended (the worker.Exit protocol: an Exit, or minus the
signal that killed it).

- `LocalExecutor`: a worker process per job on this machine, one per device slot (GPUs,
  else `--workers` CPU slots), killed with the daemon (PR_SET_PDEATHSIG); with --warm a
  fork of a warm template that paid the imports once (daemon/warm.py).
- `SlurmExecutor` (daemon/slurm.py): an sbatch job per job; Slurm places it, and it
  outlives the daemon, which finds it again when it starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from traind.daemon import liveness, threads
from traind.jobs import devices
from traind.jobs.devices import try_all_gpus
from traind.jobs.folder import WORKER_OUT


class Handle(Protocol):
    """A running job's worker, as the supervisor sees it (subprocess.Popen is one)."""

    pid: int

    def poll(self) -> int | None:
        """How the worker ended (worker.Exit, or minus a signal), or None while it runs."""

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class Need:
    """What a job asks of the daemon's devices: COUNT of them (GPUs, or CPU slots), or
    the one GPU it names (`device = "cuda:1"`)."""

    count: int = 1
    pinned: str | None = None

    @staticmethod
    def of(spec: dict) -> Need:
        """The need of a job's spec (spec.json's JSON, or a JobSpec's dump)."""
        device = spec.get("device", "auto")
        pinned = device if device.startswith("cuda:") else None
        return Need(int(spec.get("distributed", {}).get("processes", 1)), pinned)

    def unfit(self, slots: list[str], found: list[str]) -> str | None:
        """Why no placement on SLOTS can ever give this need (FOUND: the GPUs seen), or None."""
        gpus = bool(found)
        kind = "GPU" if gpus else "CPU slot"
        if self.pinned and self.pinned not in slots:
            return (f"device = '{self.pinned}', and this machine has {len(found)} GPU{'s' * (len(found) != 1)}"
                    f"{': ' + ', '.join(found) if found else ''}; use device = 'auto' or one of those")
        if self.count > len(slots):
            how = "" if gpus else f" (start the daemon with --workers {self.count})"
            return (f"distributed.processes = {self.count} asks for {self.count} {kind}s, and this daemon has "
                    f"{len(slots)}{': ' + ', '.join(found) if gpus else ''}{how}; lower distributed.processes")
        return None


def place(free: list[str], need: Need) -> list[str] | None:
    """The slots of FREE that NEED takes (the lowest), or None when they do not suffice now."""
    if need.pinned:
        return [need.pinned] if need.pinned in free else None
    return free[:need.count] if len(free) >= need.count else None


class Executor(Protocol):
    slots: list[str]
    """Where jobs are placed: each running job holds some of them."""
    outlives_daemon: bool
    """Whether a job's worker goes on when the daemon stops (found again by `reattach`)."""

    def prepare(self, home_root: Path) -> None:
        """Before the daemon serves HOME_ROOT: a TraindError where this executor cannot."""

    def need(self, spec: dict) -> Need:
        """What a job (its spec.json) takes of the slots."""

    def unfit(self, spec: dict) -> str | None:
        """Why this executor can never run the job of SPEC (a JobSpec's dump): the job is
        refused when it is taken in, with these words; or None."""

    def start(self, home_root: Path, name: str, folder: Path, slots: list[str]) -> Handle:
        """Start the worker of job NAME (its folder FOLDER) on SLOTS."""

    def reattach(self, name: str, folder: Path) -> Handle | None:
        """The worker of job NAME that a daemon before this one started and that runs
        still, or None (a job marked running without one is queued again)."""

    def describe(self, handle: Handle) -> str:
        """The worker in words, for the daemon's log: "worker pid 12", "Slurm job 7"."""

    def steer(self, handle: Handle, folder: Path) -> None:
        """Act for a worker that cannot take its job's requests yet (a Slurm job still
        pending): a pause or a cancel then ends it at once."""

    def tend(self) -> None:
        """At each turn of the daemon's loop: look after what PREPARE started (a warm
        template that died is replaced before the next job needs it)."""

    def close(self) -> None:
        """The daemon stops: free what PREPARE took (its workers are stopped already)."""


def worker_argv(home_root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "traind.daemon.worker", "--home", str(home_root), name]


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the daemon dies, so that a worker never
    trains on unsupervised (it saves and exits on SIGTERM)."""
    liveness.die_with_parent(signal.SIGTERM)


def visible_gpus() -> list[str]:
    """The GPUs this machine shows (cuda:0, cuda:1...); none without CUDA."""
    return [str(d) for d in try_all_gpus() if d.type == "cuda"]


def spawn_worker(argv: list[str], out: IO[bytes], env: dict[str, str]) -> subprocess.Popen:
    """A worker process, its output into OUT, killed when the daemon dies."""
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)


class LocalExecutor:
    """A worker process per job on this machine: one per GPU (a job of N ranks takes N),
    else WORKERS CPU slots; WORKERS = 0 starts nothing. GPUS and SPAWN are the seams tests
    replace (the GPU list, the process)."""

    outlives_daemon = False

    def __init__(self, workers: int = 1, threads_per_worker: int | None = None,
                 gpus: Callable[[], list[str]] = visible_gpus,
                 spawn: Callable[[list[str], IO[bytes], dict[str, str]], subprocess.Popen] = spawn_worker,
                 warm: bool = False):
        self.found_gpus = gpus()
        self.slots = [] if workers == 0 else self.found_gpus or [f"cpu{i}" for i in range(workers)]
        self.threads = threads_per_worker
        self.warm = None
        if warm and self.slots:  # workers forked from a template that paid the imports (daemon/warm.py)
            from traind.daemon.warm import WarmWorkers

            self.warm = WarmWorkers(spawn)
        self.spawn = self.warm or spawn

    def prepare(self, home_root: Path) -> None:
        if self.warm is not None:
            self.warm.prepare()  # warm by the time the first job starts

    def tend(self) -> None:
        if self.warm is not None:
            self.warm.tend()

    def close(self) -> None:
        if self.warm is not None:
            self.warm.close()

    def need(self, spec: dict) -> Need:
        return Need.of(spec)

    def unfit(self, spec: dict) -> str | None:
        return self.need(spec).unfit(self.slots, self.found_gpus) if self.slots else None

    def start(self, home_root: Path, name: str, folder: Path, slots: list[str]) -> Handle:
        env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")
        # a new job's count (see threads.py): a share of the cores for each of its slots, which its ranks divide
        env[threads.ENV] = str(threads.share(len(self.slots), self.threads) * len(slots))
        gpus = [s.split(":")[1] for s in slots if s.startswith("cuda:")]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            env[devices.PLACED] = ",".join(gpus)  # device = "cuda:N" is the first of those it sees
        with open(folder / WORKER_OUT, "ab") as out:
            return self.spawn(worker_argv(home_root, name), out, env)

    def reattach(self, name: str, folder: Path) -> Handle | None:
        return None  # a worker dies with the daemon that started it

    def describe(self, handle: Handle) -> str:
        return f"{'warm ' if getattr(handle, 'warm', False) else ''}worker pid {handle.pid}"

    def steer(self, handle: Handle, folder: Path) -> None:
        pass  # a local worker starts at once, and takes its requests itself
