"""A sweep's trial tried again takes up the dead trial's saves (daemon/sweeps.py's retry).

Daemons of several homes working one study (PostgreSQL): a trial whose daemon went silent
is failed by its heartbeat and tried again by a daemon alive, as a new trial number in
that daemon's home (Optuna's RetryFailedTrialCallback; the dead trial's number is in the
new one's `retry_history`). Where the dead trial's job folder is reachable from here
(homes on shared storage; the study records each trial's home), its newest save that
copies whole is copied into the new job (store.saves.copy: hashed as copied, checked
against its manifest), with its records and thread count, so that the job resumes there.
"""

from __future__ import annotations

from pathlib import Path

from traind.daemon.home import Home
from traind.jobs.folder import METRICS_FILE, SAVES, THREADS_FILE
from traind.jobs.sweep import trial_name
from traind.store.errors import CorruptSave
from traind.store.fs import FileSystem, write_new
from traind.store.saves import copy as copy_save, list_saves


def take_up(fs: FileSystem, name: str, study, trial, stage: Path) -> dict:
    """For a trial that tries again one whose daemon went silent: the dead trial's newest
    save that copies whole, with its records and its thread count, copied into STAGE
    where its job folder is reachable from here (saves on shared storage); else nothing.
    What was done, for trial.json: {"retries", "taken_up": {"from", "save", "step"}} or
    {"retries", "started_again": why}; {} for a trial that tries none again."""
    storage = study._storage
    history = storage.get_trial_system_attrs(trial._trial_id).get("retry_history") or []
    if not history:
        return {}
    before = history[-1]
    dead = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, before))
    owner = dead.user_attrs.get("home")
    old = Home(Path(owner)).job_dir(trial_name(name, before)) if owner else None
    if old is None or not (old / SAVES).is_dir():
        return {"retries": before, "started_again": f"its saves ({old or 'no home recorded'}) are not "
                                                    "reachable from this machine"}
    found = list_saves(old / SAVES)[0]
    if not found:
        return {"retries": before, "started_again": f"it had made no save yet ({old})"}
    fs.mkdir(stage / SAVES)
    problems = []
    for info in reversed(found):
        try:
            copied = copy_save(fs, info, stage / SAVES)
        except CorruptSave as e:
            problems.append(str(e))
            continue
        for file in (METRICS_FILE, THREADS_FILE):  # its epochs so far, and the count its sums were split by
            if (old / file).is_file():
                write_new(fs, stage / file, (old / file).read_bytes())
        return {"retries": before, "taken_up": {"from": str(old), "save": copied.id, "step": copied.step}}
    return {"retries": before, "started_again": f"none of its saves copies whole ({'; '.join(problems)})"}
