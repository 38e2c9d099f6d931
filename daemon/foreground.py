"""`traind run`: one job, in the foreground, in a job folder of its own."""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError, NonFiniteLoss, TrainingError
from traind.jobs.jobfile import JobFile
from traind.jobs.metrics import LOG_FILE, METRICS_FILE, Recorder
from traind.jobs.train import Trainer

SPEC_FILE = "spec.json"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_folder(job_file: JobFile, folder: Path) -> None:
    """The job folder holds the file as written and the spec as resolved (paths absolute,
    defaults filled in): what ran can always be read back."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"job{job_file.path.suffix.lower()}", job_file.text.encode())
    write_atomic(folder / SPEC_FILE, job_file.spec.model_dump_json(indent=2).encode())
    (folder / METRICS_FILE).unlink(missing_ok=True)  # a fresh start; resume arrives with the store


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


def run_job(job_file: JobFile, folder: Path, echo: Callable[[str], None]) -> bool:
    """Train JOB_FILE to the end (True) or until a signal stops it (False)."""
    prepare_folder(job_file, folder)
    recorder = Recorder(folder, echo, job_file.name)
    try:
        try:
            job = build_job(job_file.spec, job_file.name)
        except JobSpecError as e:
            raise job_file.locate(e) from e
        recorder.say(f"training '{job.name}' on {job.device}: {job.total_steps} steps "
                     f"({job.steps_per_epoch} per epoch); {job.splits.description}")
        trainer = Trainer(job, recorder)
        with stop_on_signals() as stop:
            try:
                done = trainer.fit(lambda t: stop.is_set())
            except NonFiniteLoss as e:
                recorder.log(str(e), logging.ERROR)
                raise
            except Exception as e:  # the job's code failed; say so in one line, keep the traceback in the log
                recorder.log(traceback.format_exc(), logging.ERROR)
                raise TrainingError(f"training failed at step {trainer.progress.step + 1}: {type(e).__name__}: {e} "
                                    f"(traceback in {folder / LOG_FILE})") from e
        p = trainer.progress
        if done:
            recorder.say(f"done: step {p.step}/{job.total_steps}; folder {folder}")
        else:
            recorder.say(f"stopped by signal at step {p.step}/{job.total_steps}")
        return done
    finally:
        recorder.close()
