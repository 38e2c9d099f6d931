"""`traind run`: one job, in the foreground, in a job folder of its own (the run itself is
daemon/run.py's, shared with the daemon's worker): a progress line on a terminal, and
what happened in words at the end."""

from __future__ import annotations

import os
import signal
import time
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import click

from traind.daemon import preempt
from traind.daemon.launch import Launch, LauncherStopped, RanksFailed, launch
from traind.daemon.run import LAUNCHER_HOLDS, Run, holding
from traind.jobs import world
from traind.jobs.folder import write_job
from traind.jobs.jobfile import JobFile
from traind.jobs.train import Trainer
from traind.store.errors import TraindError
from traind.store.fs import FileSystem


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
        per_epoch = job.batches_per_epoch
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
    line = ProgressLine(progress) if progress is not None else None

    def say(text: str) -> None:
        if line is not None:
            line.clear()
        echo(text)

    run = Run(job_file.spec, job_file.name, folder, job_file=job_file, echo=say, locate=job_file.locate, watch=line)
    done = run.go()
    if line is not None:
        line.clear()
    if not run.world.is_main:  # the main rank tells how it ended
        return done
    for request in run.late:
        echo(f"request '{request.kind}' came as the run ended; dropped")
    p, total, ending = run.trainer.progress, run.trainer.job.total_steps, run.ending
    if done:
        echo(f"done: step {p.step}/{total}; folder {folder}")
    elif ending == "cancelled":
        echo(f"cancelled at step {p.step}/{total}; the saves stay")
    elif ending == "stopped":
        echo(f"stopped at step {p.step}/{total} for a load request; run again to continue from that save")
    elif ending is None and preempt.warned.is_set():
        not_requeued = preempt.requeue_self()  # under Slurm: the job comes back and continues from this save
        echo(f"warned by the cluster ({signal.Signals(preempt.warning_signal()).name}), saved at step "
             f"{p.step}/{total}; " + (f"Slurm job {os.environ['SLURM_JOB_ID']} requeued" if not_requeued is None
                                      else f"not requeued ({not_requeued}): run again to continue"))
    else:
        why = "paused" if ending == "paused" else "stopped by signal"
        echo(f"{why} at step {p.step}/{total}, saved; run again to continue")
    return done


def launch_run(job_file: JobFile, path: Path, folder: Path, how: Launch, echo: Callable[[str], None]) -> int:
    """`traind run` of a job of several processes: hold FOLDER and run `traind run` in each
    of the ranks that torch's agent launches here; the exit code of the main rank's. With
    several machines, which of them has the main rank is known only once they meet: its
    rank holds the folder then."""
    with holding(folder) if how.nodes == 1 else nullcontext():
        if how.nodes == 1:
            write_job(FileSystem(), folder, job_file)
            os.environ[LAUNCHER_HOLDS] = str(os.getpid())
        try:
            return launch(["run", str(path), str(folder)], how)
        except RanksFailed as e:
            if e.code is not None:
                return e.code  # the rank said why, on this terminal (a job file's problems: 2)
            echo(f"error: {e}; the saves stay, run again to continue from the newest")
            return 1
        except LauncherStopped as e:
            echo(f"{e}: the ranks saved and stopped; run again to continue")
            return 0


def rank_run(path: str, folder: str) -> int:
    """One rank of `traind run` (in a process of its own): the main rank alone speaks."""
    from traind.jobs.errors import JobSpecError
    from traind.jobs.jobfile import load_job

    main = world.main_in_environment()
    echo = click.echo if main else (lambda text: None)
    try:
        run_job(load_job(Path(path)), Path(folder), echo)
        return 0
    except TraindError as e:
        if main:
            click.echo(str(e) if isinstance(e, JobSpecError) else f"error: {e}", err=True)
        return e.exit_code
