"""`traind run`: one job, in the foreground, in a job folder of its own."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from traind.daemon import threads
from traind.daemon.liveness import stamp
from traind.daemon.requests import RequestHook
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs.errors import JobSpecError, NonFiniteLoss, OutOfMemory, TrainingError, is_out_of_memory
from traind.jobs.folder import LOCK_FILE, LOG_FILE, write_job
from traind.jobs.jobfile import JobFile
from traind.jobs.spec import JobSpec
from traind.jobs.metrics import Recorder, tensorboard_available
from traind.jobs.train import Trainer
from traind.store.errors import StoreError, TraindError
from traind.store.fs import FileSystem



def prepare_folder(job_file: JobFile, folder: Path) -> None:
    """The job folder holds the file as written and the spec as resolved (paths absolute,
    defaults filled in): what ran can always be read back."""
    folder.mkdir(parents=True, exist_ok=True)
    write_job(FileSystem(), folder, job_file)


@contextmanager
def stop_on_signals():
    """An Event set by the first SIGTERM or SIGINT; the second gets the default action."""
    stop = threading.Event()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        stop.set()
        for s, h in saved.items():
            signal.signal(s, h)

    for s in saved:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


class JobBusy(TraindError):
    """Another process is training this job folder."""


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


# A check at each step boundary, before the checkpointer's: True stops at once (no save);
# setting the stop event stops after a save.
Hook = Callable[[Trainer, Checkpointer, threading.Event], bool]


class ProgressLine:
    """A progress bar on one terminal line, within the epoch, with steps/s: redrawn at most
    twice a second from the step-boundary hook, and cleared before any other line."""

    def __init__(self, stream: TextIO):
        self.stream, self.shown, self._next = stream, False, 0.0
        self._seen: list[tuple[float, int]] = []

    def __call__(self, trainer: Trainer) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.5
        p, job = trainer.progress, trainer.job
        self._seen = [*self._seen[-20:], (now, p.step)]
        (t0, s0), (t1, s1) = self._seen[0], self._seen[-1]
        rate = f", {(s1 - s0) / (t1 - t0):.1f} steps/s" if t1 > t0 else ""
        per_epoch = job.steps_per_epoch
        done = int(20 * min(p.batch / per_epoch, 1)) if per_epoch else 0
        epochs = f"/{job.spec.train.epochs}" if job.spec.train.epochs else ""
        self.stream.write(f"\r\x1b[Kepoch {p.epoch + 1}{epochs} [{'#' * done}{'.' * (20 - done)}] batch "
                          f"{p.batch}/{per_epoch}, step {p.step}/{job.total_steps}{rate}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def run_job(job_file: JobFile, folder: Path, echo: Callable[[str], None], progress: TextIO | None = None) -> bool:
    """Train JOB_FILE to the end (True) or until a signal stops it (False), continuing from
    FOLDER's newest good save if it has one; a progress line on PROGRESS (a terminal)."""
    requests_hook = RequestHook(folder)  # `traind pause --dir FOLDER` and the like reach this run too
    line = ProgressLine(progress) if progress is not None else None

    def hook(trainer: Trainer, checkpoints: Checkpointer, stop: threading.Event) -> bool:
        if line is not None:
            line(trainer)
        return requests_hook(trainer, checkpoints, stop)

    def say(text: str) -> None:
        if line is not None:
            line.clear()
        echo(text)

    with holding(folder):
        try:
            prepare_folder(job_file, folder)
            done, trainer = train_in_folder(job_file.spec, job_file.name, folder, say, job_file.locate, hook)
        finally:
            late = requests_hook.ended()  # too late for this run: they do not act on the next
    if line is not None:
        line.clear()
    for request in late:
        echo(f"request '{request.kind}' came as the run ended; dropped")
    p, total, ending = trainer.progress, trainer.job.total_steps, requests_hook.ending
    if done:
        echo(f"done: step {p.step}/{total}; folder {folder}")
    elif ending == "cancelled":
        echo(f"cancelled at step {p.step}/{total}; the saves stay")
    elif ending == "stopped":
        echo(f"stopped at step {p.step}/{total} for a load request; run again to continue from that save")
    else:
        why = "paused" if ending == "paused" else "stopped by signal"
        echo(f"{why} at step {p.step}/{total}, saved; run again to continue")
    return done


def train_in_folder(spec: JobSpec, name: str, folder: Path, echo: Callable[[str], None] | None,
                    locate: Callable[[JobSpecError], JobSpecError] = lambda e: e,
                    hook: Hook | None = None) -> tuple[bool, Trainer]:
    """Build the job, continue from FOLDER's newest good save, train until done (True) or
    stopped; the caller holds FOLDER's lock."""
    recorder = Recorder(folder, echo, name, tensorboard=tensorboard_available())
    try:
        threads.pin(spec.threads, folder, recorder.say)
        try:
            job = build_job(spec, name)
        except JobSpecError as e:
            raise locate(e) from e
        except Exception as e:
            if is_out_of_memory(e):
                raise OutOfMemory(f"out of memory building the job: {e} (lower the model's size or "
                                  "data.batch_size, or free the device)") from e
            raise
        trainer = Trainer(job, recorder)
        with stop_on_signals() as stop:
            checkpoints = Checkpointer(trainer, folder, recorder, stop)
            if checkpoints.resume() is None:
                recorder.keep_until(0, 0)  # a fresh start: no records yet
            recorder.metric({"kind": "start", "step": trainer.progress.step, "total_steps": job.total_steps,
                             "device": str(job.device)})
            recorder.say(f"training '{job.name}' on {job.device}: step {trainer.progress.step} of "
                         f"{job.total_steps} ({job.steps_per_epoch} per epoch); {job.splits.description}")

            def boundary(t: Trainer) -> bool:
                return (hook is not None and hook(t, checkpoints, stop)) or checkpoints.boundary(t)

            done = _train(trainer, checkpoints, boundary, recorder, folder)
        p = trainer.progress
        recorder.log(f"{'done' if done else 'stopped'} at step {p.step}/{job.total_steps}")
        return done, trainer
    finally:
        recorder.close()


def _train(trainer: Trainer, checkpoints: Checkpointer, boundary: Callable[[Trainer], bool], recorder: Recorder,
           folder: Path) -> bool:
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
