"""A run: one job trained in its folder by one process, from its newest good save to the
end or until something stops it. `traind run` and the daemon's worker both go through
`Run`, so that everything a run does is in one place: the folder's lock, the job file
and spec put in the folder, the build (spec, model, data, trainer), the checkpointer and
its store, the history, the stop signals, the job's side of the request protocol (pause,
cancel, quicksave, reload), and what is left to drop once the run has ended.

It lives in daemon/ rather than jobs/: it composes the daemon's request protocol and
folder lock with the jobs package's trainer and checkpointer (jobs/ knows what a job is,
not who runs it).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from traind.daemon import preempt, requests, threads
from traind.daemon.liveness import die_with_parent, holder, stamp
from traind.daemon.requests import Request, JobRequests
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs.errors import JobSpecError, NonFiniteLoss, OutOfMemory, TrainingError, is_out_of_memory
from traind.jobs.folder import LOCK_FILE, LOG_FILE, write_job
from traind.jobs import loadgame
from traind.jobs.jobfile import JobFile
from traind.jobs.metrics import Recorder, tensorboard_available
from traind.jobs.spec import JobSpec
from traind.jobs.train import Trainer
from traind.jobs import world
from traind.jobs.state import seed_rank
from traind.jobs.world import Decision, World
from traind.store.errors import StoreError, TraindError
from traind.store.fs import FileSystem

AGREE_EVERY = 8
"""Steps between the boundaries where the ranks of a job agree on its requests and signals."""

LAUNCHER_HOLDS = "TRAIND_LAUNCHER_HOLDS"
"""Set for ranks that traind launched: the pid of their launcher, which holds the folder's lock."""


def wants_cuda(spec: JobSpec) -> bool:
    import torch

    return spec.device != "cpu" and torch.cuda.is_available()


class JobBusy(TraindError):
    """Another process is training this job folder."""


class Run:
    """One run of the job SPEC (named NAME) in FOLDER. JOB_FILE, when given, is put into
    the folder first (`traind run`; the daemon's intake did it for its jobs). ECHO shows
    what the user should see (None: the log only); LOCATE points a job-file error at its
    line; WATCH is called at every step boundary (a progress line); LOCK_WAIT: how long
    to wait for another process to let go of the folder."""

    def __init__(self, spec: JobSpec, name: str, folder: Path, *, job_file: JobFile | None = None,
                 echo: Callable[[str], None] | None = None,
                 locate: Callable[[JobSpecError], JobSpecError] = lambda e: e,
                 watch: Callable[[Trainer], None] | None = None, lock_wait: float = 0.0, world: World | None = None):
        self.spec, self.name, self.folder, self.job_file, self.world = spec, name, folder, job_file, world
        self.echo, self.locate, self.watch, self.lock_wait = echo, locate, watch, lock_wait
        self.requests = JobRequests(folder)
        self.trainer: Trainer | None = None
        self.late: list[Request] = []
        self._ending: str | None = None
        """Requests that came after the run's last look: dropped when it ended."""

    @property
    def ending(self) -> str | None:
        """Which request ended the run ("paused", "cancelled", "stopped"), if one did."""
        return self._ending if self._ending is not None else self.requests.ending

    def go(self) -> bool:
        """Hold the folder, train until done (True) or stopped (False); a failure raises,
        as a TraindError saying what to do. Requests the run never acted on are dropped
        once it has ended, however it ended (a crash skips this: they stay).

        Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) this process is
        one rank of several: it joins their process group; the main rank holds the folder
        and writes its files, the others train beside it."""
        if self.world is None:
            if world.ranks_in_environment() > 1:  # a rank whose launcher is gone is a world that cannot finish a step
                die_with_parent(signal.SIGKILL)
                if os.getppid() == 1:
                    raise TrainingError("this rank's launcher ended before it started; the whole world stops")
            self.world = world.from_environment(self.spec.distributed.backend, cuda=wants_cuda(self.spec))
        with self._holding():
            try:
                if self.job_file is not None and self.world.is_main:
                    write_job(FileSystem(), self.folder, self.job_file)
                done = self._train()
            finally:
                if self.world.is_main:
                    self.late = self.requests.ended()
        self._ending = self.world.share(self.requests.ending)  # every rank ends as the main rank's requests say
        self.world.close()
        return done

    def _holding(self):
        """The folder's lock: this process's, or, for a rank, the main rank's; where traind
        launched the ranks, their launcher holds it (LAUNCHER_HOLDS names its pid)."""
        if not self.world.is_main:
            return nullcontext()
        launcher = os.environ.get(LAUNCHER_HOLDS)
        if launcher is None or self.world.size == 1:
            return holding(self.folder, wait=self.lock_wait)
        held_by = holder(self.folder / LOCK_FILE)
        if held_by != int(launcher):
            raise JobBusy(f"{self.folder}: the launcher of these ranks (pid {launcher}) does not hold the folder "
                          f"(held by {held_by or 'nobody'}); start the job with traind run or the daemon")
        return nullcontext()

    def _boundary(self, trainer: Trainer, checkpoints: Checkpointer) -> bool:
        """The one decision of a step boundary: taken from the requests, the stop signals
        and the save policy, agreed by every rank, then acted on; True stops the loop.
        Several ranks agree at every AGREE_EVERY-th step and at each epoch's end; between,
        each decides alone what all decide alike (the saves due by step count), so that a
        step costs no second all-reduce. A request or a signal waits for the next."""
        if self.watch is not None:
            self.watch(trainer)
        if self.world.size == 1 and self.requests.quiet():
            quiet = checkpoints.quiet(trainer)
            if quiet is not None:  # most steps: no request to look for yet, no save due, no signal
                trainer.quiet_until(quiet[0], min(quiet[1], self.requests.next_look))
                return False
        p = trainer.progress
        if self.world.size > 1 and p.batch != 0 and p.step % AGREE_EVERY:
            return checkpoints.act(trainer, checkpoints.due(trainer, Decision(), alike=True))
        decision = self.requests.decide(checkpoints.store) if self.world.is_main else Decision()
        return checkpoints.act(trainer, self.world.agree(checkpoints.due(trainer, decision)))

    def _train(self) -> bool:
        folder, name, main = self.folder, self.name, self.world.is_main
        recorder = Recorder(folder, self.echo, name, tensorboard=tensorboard_available()) if main else Recorder()
        try:
            threads.pin(self.spec.threads, folder, recorder.say, record=main)
            try:
                job = build_job(self.spec, name, self.world.local_rank if self.world.size > 1 else None)
            except JobSpecError as e:
                raise self.locate(e) from e
            except Exception as e:
                if is_out_of_memory(e):
                    raise OutOfMemory(f"out of memory building the job: {e} (lower the model's size or "
                                      "data.batch_size, or free the device)") from e
                raise
            trainer = self.trainer = Trainer(job, recorder, world=self.world)
            with stop_on_signals() as stop:
                checkpoints = Checkpointer(trainer, folder, recorder, stop, protect=lambda: loadgame.protected(folder))
                requested = loadgame.take(folder, checkpoints.store) if main else None
                if requested is not None:  # the reloads that asked for it (or an older load) are answered by this start
                    for request in requests.pending(folder):
                        if request.kind == "reload":
                            requests.done(request)
                if checkpoints.resume(requested) is None:
                    recorder.keep_until(0, 0)  # a fresh start: no records yet
                    seed_rank(self.spec.seed, self.world.rank)
                size = self.world.size
                recorder.metric({"kind": "start", "step": trainer.progress.step, "total_steps": job.total_steps,
                                 "device": str(job.device) if size == 1 else f"{size} x {job.device.type}",
                                 "processes": size})
                nodes = self.spec.distributed.nodes
                ranks = (f" x {self.world.size} processes{f' on {nodes} machines' if nodes > 1 else ''} "
                         f"({self.world.backend})") if self.world.size > 1 else ""
                if self.world.size != self.spec.distributed.world_size:
                    recorder.say(f"note: {self.world.size} process{'es' * (self.world.size > 1)} from the "
                                 f"environment (torchrun, srun); the job file asks for "
                                 f"{self.spec.distributed.world_size}: the environment wins")
                recorder.say(f"training '{job.name}' on {job.device}{ranks}: step {trainer.progress.step} of "
                             f"{job.total_steps} ({job.steps_per_epoch} per epoch); {job.splits.description}")
                done = _fit(trainer, checkpoints, lambda t: self._boundary(t, checkpoints), recorder, folder)
            p = trainer.progress
            recorder.log(f"{'done' if done else 'stopped'} at step {p.step}/{job.total_steps}")
            return done
        finally:
            recorder.close()


def _fit(trainer: Trainer, checkpoints: Checkpointer, boundary: Callable[[Trainer], bool], recorder: Recorder,
         folder: Path) -> bool:
    """Train to the end or a stop, rolling back after a non-finite loss; every failure
    leaves its traceback in the log and becomes one TraindError saying what to do."""
    try:
        while True:
            try:
                done = trainer.fit(boundary)
                break
            except NonFiniteLoss as e:
                checkpoints.rollback(e)
    except BaseException as e:
        try:
            checkpoints.close()
        except StoreError as late:  # the error in hand matters more; keep this one in the log
            recorder.log(f"the save in flight failed too: {late}", logging.ERROR)
        if isinstance(e, TraindError):
            recorder.log(str(e), logging.ERROR)
            raise
        if not isinstance(e, Exception):
            raise
        recorder.log(traceback.format_exc(), logging.ERROR)  # the job's code failed; one line on screen
        if is_out_of_memory(e):
            raise OutOfMemory(f"out of memory at step {trainer.progress.step + 1}: {e} (lower data.batch_size or "
                              f"the model's size, or free the device; traceback in {folder / LOG_FILE})") from e
        raise TrainingError(f"training failed at step {trainer.progress.step + 1}: {type(e).__name__}: {e} "
                            f"(traceback in {folder / LOG_FILE})") from e
    checkpoints.close()
    return done


@contextmanager
def holding(folder: Path, wait: float = 0.0):
    """An exclusive lock on FOLDER for as long as this process trains in it, waiting up to
    WAIT seconds for a holder to let go; the kernel drops it when the process ends,
    however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = (os.pread(fd, 32, 0).decode(errors="replace").split() or ["another process"])[0]
                    raise JobBusy(f"{folder} is being trained by pid {holder}; stop that run first, "
                                  "or use another --dir") from None
                time.sleep(0.1)
        stamp(fd)
        yield
    finally:
        os.close(fd)


@contextmanager
def stop_on_signals():
    """An Event set by the first SIGTERM or SIGINT, or by the cluster's warning where this
    process catches it (daemon/preempt.py; a warning that came before is taken now); the
    second SIGTERM or SIGINT gets the default action."""
    stop = threading.Event()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    warning = preempt.caught()

    def handler(signum, frame):
        stop.set()
        for s, h in saved.items():
            signal.signal(s, h)

    def warned(signum, frame):
        preempt.warned.set()
        stop.set()

    for s in saved:
        signal.signal(s, handler)
    if warning is not None:
        signal.signal(warning, warned)
        if preempt.warned.is_set():
            stop.set()
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        if warning is not None:
            preempt.catch()
