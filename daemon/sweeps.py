"""The daemon's sweeps: a hyperparameter search on Optuna, whose trials are jobs.

A sweep file (a job file with `[sweep]`, jobs/sweep.py) is accepted into
`HOME/sweeps/NAME/` (its file, spec.json, state.json); its study lives in an Optuna RDB
storage, by default `study.sqlite` in that folder (SQLite is safe there: the daemon is its
one writer). The daemon drives it through Optuna's ask-and-tell API, once a tick:

- **ask**: while the study has fewer than `trials` trials and fewer than `parallel` of them
  are under way, a new trial is asked for, its values suggested, and a job made of it,
  `NAME.tNNN` (its trial number), queued like any job (its `trial.json` links it to the
  sweep). A crash after the ask and before the job is there leaves a trial that is running
  in the study with no job: the next tick finishes its values (Optuna keeps those already
  suggested) and makes its job; so each trial number gets exactly one job, and the count
  of trials holds after any crash.
- **report**: each epoch a trial's job records (metrics.jsonl) is reported as the trial's
  intermediate value at that epoch, and its pruner asked; a trial to prune is marked
  (`pruned` in its folder, durably) and paused, and once its worker saved and stopped it
  is `pruned`: kept, resumable by hand, its device free.
- **tell**: a trial's job done is told COMPLETE with its objective, the best value of the
  objective metric over its epochs; pruned, PRUNED; failed or cancelled, FAIL. A tell
  already made is never made twice (the study's state is read first).

- **retry** (a study shared by daemons of several homes): a trial whose daemon went silent
  is failed by Optuna's heartbeat and tried again as a new trial; its job takes up the
  dead trial's newest save that copies whole where that trial's folder is reachable
  (daemon/takeup.py), else starts again, and says which in its trial.json.
- **steer**: the sweep paused (`traind pause NAME`) pauses its trials, marking each
  (`sweep.paused`) before the pause, and asks for none; resumed, it queues again the
  marked ones only; cancelled, it cancels them, which are then told failed.

Everything is read again from the folders and the study at each tick: a daemon killed
anywhere finds the sweep as it left it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traind.daemon import requests
from traind.daemon.home import Home
from traind.daemon.jobstate import BadTransition, JobRecord, JobState, read_state, transition, write_state
from traind.daemon.takeup import take_up
from traind.jobs.folder import METRICS_FILE, SPEC_FILE, write_job
from traind.jobs.jobfile import JobFile
from traind.jobs.spec import JobSpec
from traind.jobs.sweep import resolved_objective, trial_name, trial_spec, with_values
from traind.store.fs import FileSystem, write_durably, write_new

log = logging.getLogger("traind.daemon")

SWEEPS = "sweeps"
STUDY_FILE = "study.sqlite"
TRIAL_FILE = "trial.json"
"""In a trial's job folder: {"sweep", "number", "params"}, its link to its sweep."""
PRUNE_MARK = "pruned"
"""In a trial's job folder: its pruner stopped it (written before the pause that stops it)."""
HELD_MARK = "sweep.paused"
"""In a trial's job folder: its sweep's pause paused it (written before the pause), so that
the sweep's resume queues it again, and only it: a trial paused by hand stays paused."""
DRIVEN = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED, JobState.CANCELLED)
"""The states of a sweep its driver looks at: a paused one keeps its trials' heartbeats and
tells the trials that end; a cancelled one, until its trials are told."""
TICK = 1.0
"""Seconds between looks at the sweeps."""


def sweeps_dir(home: Home) -> Path:
    return home.root / SWEEPS


def sweep_dir(home: Home, name: str) -> Path:
    home.job_dir(name)  # the same names as jobs: BadJobName for one that is not
    return sweeps_dir(home) / name


def sweep_names(home: Home) -> list[str]:
    found = sweeps_dir(home)
    if not found.is_dir():
        return []
    return sorted(p.name for p in found.iterdir() if not p.name.startswith(".") and (p / SPEC_FILE).is_file())


def read_spec(folder: Path) -> JobSpec:
    return JobSpec.model_validate_json((folder / SPEC_FILE).read_text(), context={"imports": False})


def storage_url(folder: Path, spec: JobSpec) -> str:
    url = spec.sweep.storage or f"sqlite:///{folder / STUDY_FILE}"
    if url.startswith("postgresql://"):  # psycopg 3, whichever driver SQLAlchemy defaults to
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def open_study(folder: Path, spec: JobSpec | None = None, create: bool = False):
    """The Optuna study of the sweep in FOLDER, with its sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the daemon logs its own events
    spec = spec or read_spec(folder)
    sweep = spec.sweep
    epochs = spec.train.epochs or 1
    pruners = {"none": optuna.pruners.NopPruner,
               "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
               "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))}
    _, direction = resolved_objective(spec)
    if sweep.storage:  # shared by daemons: heartbeats tell a trial whose daemon died, tried again by another
        import inspect
        import warnings

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are, since 2.8
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        newer = "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        retry = (optuna.storages.RetryHeartbeatStaleTrialCallback if newer else
                 optuna.storages.RetryFailedTrialCallback)(max_retry=3)  # renamed in Optuna 4.9
        storage = optuna.storages.RDBStorage(storage_url(folder, spec), heartbeat_interval=sweep.heartbeat,
                                             grace_period=3 * sweep.heartbeat,
                                             **{"heartbeat_stale_trial_callback" if newer else
                                                "failed_trial_callback": retry})
    else:
        storage = optuna.storages.RDBStorage(storage_url(folder, spec))
    if create:
        return optuna.create_study(study_name=folder.name, storage=storage, sampler=sampler_for(spec, 0),
                                   pruner=pruners[sweep.pruner](), direction=direction, load_if_exists=True)
    return optuna.load_study(study_name=folder.name, storage=storage, sampler=sampler_for(spec, 0),
                             pruner=pruners[sweep.pruner]())


def sampler_for(spec: JobSpec, number: int):
    """The sweep's sampler, seeded for the trial NUMBER it is about to pick: the seed plus
    the number, so that a daemon started again does not begin the random stream anew and
    pick its first trials' values again (a sampler's state is in the study, its RNG is not)."""
    import optuna

    sweep = spec.sweep
    seed = (spec.seed if sweep.seed is None else sweep.seed) + number
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "grid": lambda: optuna.samplers.GridSampler(sweep.grid_space(), seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed)}[sweep.sampler]()


def suggest(trial, spec: JobSpec) -> dict[str, Any]:
    """The trial's value for each key of the sweep's space (those it has already, as they are)."""
    values = {}
    for path, dim in spec.sweep.space.items():
        if dim.kind == "choice":
            values[path] = trial.suggest_categorical(path, dim.choice)
        elif dim.kind == "int":
            values[path] = trial.suggest_int(path, dim.int_[0], dim.int_[1], step=int(dim.step or 1), log=dim.log)
        else:
            values[path] = trial.suggest_float(path, dim.float_[0], dim.float_[1], step=dim.step, log=dim.log)
    return values


def epoch_values(folder: Path, metric: str) -> dict[int, float]:
    """METRIC at the end of each epoch the job in FOLDER recorded (the last record of an
    epoch, where a resume recorded it again)."""
    found: dict[int, float] = {}
    try:
        with open(folder / METRICS_FILE, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"epoch"' not in line or '"kind": "epoch"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                value = record.get(metric)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    found[int(record["epoch"])] = float(value)
    except OSError:
        pass
    return found


def objective_of(folder: Path, metric: str, direction: str) -> float | None:
    """A trial's objective: the best value of METRIC over its epochs, or None if it has none."""
    values = list(epoch_values(folder, metric).values())
    if not values:
        return None
    return min(values) if direction == "minimize" else max(values)


def retried_numbers(trials: list) -> set[int]:
    """The trials failed by their heartbeat and tried again as another."""
    found = set()
    for t in trials:
        found.update(t.system_attrs.get("retry_history", []))
        if "failed_trial" in t.system_attrs:
            found.add(t.system_attrs["failed_trial"])
    return found


def counted(trials: list) -> list:
    """The trials that count toward the sweep's `trials`: not one failed by its heartbeat and
    tried again (its retry counts), nor one asked for beyond the count (a race of daemons),
    nor one its daemon died before it could own."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and not t.user_attrs.get("surplus")
            and not t.user_attrs.get("orphan")]


def trial_link(folder: Path) -> dict | None:
    try:
        return json.loads((folder / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Sweeps:
    """The daemon's driver of every sweep of its home."""

    home: Home
    fs: FileSystem = field(default_factory=FileSystem)
    _studies: dict[str, Any] = field(default_factory=dict)
    _settled: set[str] = field(default_factory=set)
    """Cancelled sweeps whose trials of this home are all told: nothing more to do."""
    _next: float = 0.0

    def wake(self) -> None:
        """Drive at the next tick, not a TICK later: a job ended (a trial's, maybe, whose
        place the next trial takes at once)."""
        self._next = 0.0

    def tick(self, now: float) -> bool:
        """Drive every sweep under way one step; True where a job was made or changed state."""
        if now < self._next:
            return False
        self._next = now + TICK
        changed = False
        for name in sweep_names(self.home):
            folder = sweeps_dir(self.home) / name
            record = read_state(folder)
            if record is None or record.state not in DRIVEN or \
                    (record.state == JobState.CANCELLED and name in self._settled):
                self._studies.pop(name, None)
                continue
            try:
                changed |= self._drive(name, folder, record)
            except Exception as e:  # the study's storage, a bug: this sweep waits, the daemon serves on
                log.exception("sweep %s: %s; trying again in %.0f s", name, e, TICK)
                self._studies.pop(name, None)
        return changed

    def _drive(self, name: str, folder: Path, record: JobRecord) -> bool:
        from optuna.trial import TrialState

        if name not in self._studies:
            spec = read_spec(folder)
            self._studies[name] = (spec, open_study(folder, spec, create=True))
        spec, study = self._studies[name]
        sweep_state = record.state
        if sweep_state == JobState.QUEUED:
            transition(folder, JobState.RUNNING)
            sweep_state = JobState.RUNNING
            log.info("sweep %s: %s (%d trials, %d at once)", name, "resumed" if record.changed > record.submitted
                     else "started", spec.sweep.trials, spec.sweep.parallel)
        metric, direction = resolved_objective(spec)
        shared = bool(spec.sweep.storage)
        me = str(self.home.root)
        changed = False
        if shared:
            import optuna

            optuna.storages.fail_stale_trials(study)  # another daemon's trials, silent too long: tried again
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials) if shared else set()
        under_way = 0
        for frozen in trials:
            if frozen.state != TrialState.RUNNING:
                if frozen.number in retried:
                    self._drop_job_of(name, frozen)
                continue
            owner = frozen.user_attrs.get("home")
            if shared and owner is None:
                self._orphan(study, frozen, spec.sweep.heartbeat)
                continue
            if shared and owner != me:
                continue  # another daemon's
            if shared:
                study._storage.record_heartbeat(frozen._trial_id)
            told = self._follow(name, spec, study, frozen, metric, direction, sweep_state)
            changed |= told is not None
            under_way += told is None
        if sweep_state != JobState.RUNNING:  # paused or cancelled: no trial asked for, none ends the sweep
            if sweep_state == JobState.CANCELLED and under_way == 0:
                self._settled.add(name)
                log.info("sweep %s: cancelled; its trials in this home are cancelled and told failed", name)
            return changed
        # a trial waiting (a retry Optuna made) counts once asked for: the next ask takes it first
        count = sum(t.state != TrialState.WAITING for t in counted(trials))
        while under_way < spec.sweep.parallel and count < spec.sweep.trials:
            study.sampler = sampler_for(spec, len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            trial.set_user_attr("home", me)
            if shared:
                study._storage.record_heartbeat(trial._trial_id)
                ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
                if len(ahead) >= spec.sweep.trials:  # another daemon asked for the last one at the same time
                    trial.set_user_attr("surplus", True)
                    study.tell(trial.number, state=TrialState.FAIL)
                    break
            self._make_job(name, spec, study, trial.number, trial)
            under_way, count, changed = under_way + 1, count + 1, True
        if count >= spec.sweep.trials and under_way == 0:
            finished = counted(study.get_trials(deepcopy=False))
            if len(finished) >= spec.sweep.trials and \
                    all(t.state not in (TrialState.RUNNING, TrialState.WAITING) for t in finished):
                best = _best(study)
                transition(folder, JobState.DONE,
                           last_error=None if best is not None else "no trial finished with a value")
                log.info("sweep %s: done, %d trials%s", name, len(finished),
                         f"; best {trial_name(name, best.number)}, {metric} {best.value:.6g}" if best else "")
                self._studies.pop(name, None)
                changed = True
        return changed

    def _follow(self, name: str, spec: JobSpec, study, frozen, metric: str, direction: str, sweep_state: JobState):
        """One trial under way: made into a job if it has none, held, let go or cancelled
        as its sweep is (SWEEP_STATE), its epochs reported, pruned where its pruner says, told
        once its job ended. The state it was told, or None."""
        from optuna.trial import Trial, TrialState

        job = trial_name(name, frozen.number)
        folder = self.home.job_dir(job)
        if not folder.exists():  # asked, and the daemon died before its job was made
            self._make_job(name, spec, study, frozen.number, Trial(study, frozen._trial_id))
            return None
        record = read_state(folder)
        if record is None:
            return None
        state = record.state
        if state == JobState.PAUSED and (folder / PRUNE_MARK).exists():
            transition(folder, JobState.PRUNED, allow_from={JobState.PAUSED}, last_error=None, cause=None)
            state = JobState.PRUNED
            log.info("%s: pruned (sweep %s)", job, name)
        state = self._steer(job, folder, state, sweep_state)
        values = epoch_values(folder, metric)
        new = {e: v for e, v in values.items() if e not in frozen.intermediate_values}
        if new:
            trial = Trial(study, frozen._trial_id)
            for epoch in sorted(new):
                trial.report(new[epoch], epoch)
            if state in (JobState.RUNNING, JobState.QUEUED) and not (folder / PRUNE_MARK).exists() \
                    and trial.should_prune():
                self._prune(job, folder, state, max(new))
                state = read_state(folder).state
        if state == JobState.DONE:
            value = objective_of(folder, metric, direction)
            if value is None:
                study.tell(frozen.number, state=TrialState.FAIL)
                log.warning("%s: done, and recorded no %s: told failed (sweep %s)", job, metric, name)
                return TrialState.FAIL
            study.tell(frozen.number, value)
            log.info("%s: done, %s %.6g (sweep %s)", job, metric, value, name)
            return TrialState.COMPLETE
        if state == JobState.PRUNED:
            study.tell(frozen.number, state=TrialState.PRUNED)
            return TrialState.PRUNED
        if state in (JobState.FAILED, JobState.CANCELLED):
            study.tell(frozen.number, state=TrialState.FAIL)
            log.info("%s: %s: told failed (sweep %s)", job, state.value, name)
            return TrialState.FAIL
        return None

    def _steer(self, job: str, folder: Path, state: JobState, sweep_state: JobState) -> JobState:
        """Make the trial's job in FOLDER (in STATE) follow its sweep: paused while the sweep
        is (HELD_MARK first, then the pause), queued again when it goes on, cancelled when it
        is. Idempotent: asked again each tick until the job is there. The job's state after."""
        held = folder / HELD_MARK
        if sweep_state == JobState.RUNNING:
            if held.exists() and state != JobState.RUNNING:  # running: its pause is still on its way
                if state == JobState.PAUSED:
                    transition(folder, JobState.QUEUED, allow_from={JobState.PAUSED}, restarts=0, last_error=None,
                               cause=None)
                    state = JobState.QUEUED
                    log.info("%s: queued again, its sweep goes on", job)
                self.fs.unlink(held)
            return state
        action, why = (("pause", "its sweep was paused") if sweep_state == JobState.PAUSED
                       else ("cancel", "its sweep was cancelled"))
        if state == JobState.RUNNING:
            from traind.daemon.liveness import trained

            # a run that ended (a pause by hand, taken) before the daemon saw it, or a worker
            # waiting to be restarted: asked at a later tick, once its state says which
            if trained(folder) and not any(r.kind == action for r in requests.pending(folder)):
                if action == "pause":
                    write_durably(self.fs, held, b"{}")
                requests.send(folder, action, why)
                log.info("%s: %s: %s requested", job, why, action)
            return state
        target = JobState.PAUSED if action == "pause" else JobState.CANCELLED
        if state in ({JobState.QUEUED} if action == "pause" else {JobState.QUEUED, JobState.PAUSED}):
            if action == "pause":
                write_durably(self.fs, held, b"{}")
            try:
                transition(folder, target, allow_from={state}, last_error=why, cause=None)
            except BadTransition:  # it started meanwhile: the next tick asks it as a running one
                return state
            log.info("%s: %s: %s", job, why, target.value)
            return target
        return state

    def _orphan(self, study, frozen, heartbeat: int) -> None:
        """A trial of shared storage that no daemon owns: asked for by one that died before
        it said so. Once older than the heartbeat's grace, it is failed and counts for nothing
        (a new trial is asked for in its place)."""
        from optuna.trial import TrialState

        started = frozen.datetime_start.timestamp() if frozen.datetime_start else time.time()
        if time.time() - started < 3 * heartbeat:
            return
        try:
            study._storage.set_trial_user_attr(frozen._trial_id, "orphan", True)
            study.tell(frozen.number, state=TrialState.FAIL)
            log.info("trial %d: asked for by a daemon that died before it took it; another is asked for",
                     frozen.number)
        except Exception:  # another daemon did it first
            pass

    def _drop_job_of(self, name: str, frozen) -> None:
        """A job of this home whose trial is over in the study while the job is not (failed by
        its heartbeat while this daemon was down, and tried again by another): cancelled."""
        if frozen.user_attrs.get("home") != str(self.home.root):
            return
        folder = self.home.jobs / trial_name(name, frozen.number)
        record = read_state(folder) if folder.is_dir() else None
        if record is None or record.state not in (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED):
            return
        why = "its trial was failed in the study (its daemon went silent) and tried again by a daemon alive"
        from traind.daemon.liveness import trained

        if record.state == JobState.RUNNING and trained(folder):
            requests.send(folder, "cancel", why)
        else:
            try:
                transition(folder, JobState.CANCELLED, last_error=why, cause=None)
            except BadTransition:
                return
        log.info("%s: %s: cancelled", folder.name, why)

    def _prune(self, job: str, folder: Path, state: JobState, epoch: int) -> None:
        write_durably(self.fs, folder / PRUNE_MARK, json.dumps({"epoch": epoch, "time": time.time()}).encode())
        if state == JobState.RUNNING:
            requests.send(folder, "pause", f"pruned after epoch {epoch}")
            log.info("%s: its pruner stops it after epoch %d: pausing", job, epoch)
            return
        try:
            transition(folder, JobState.PRUNED, allow_from={JobState.QUEUED})
            log.info("%s: pruned after epoch %d (it was queued)", job, epoch)
        except BadTransition:  # it started meanwhile: stopped as a running one
            requests.send(folder, "pause", f"pruned after epoch {epoch}")

    def _make_job(self, name: str, spec: JobSpec, study, number: int, trial) -> None:
        """The job of trial NUMBER, queued: made in a stage and renamed into place, so that
        it is there whole or not at all."""
        values = suggest(trial, spec)
        job = trial_name(name, number)
        folder = self.home.job_dir(job)
        if folder.exists():
            return
        job_spec = trial_spec(spec, job, values)
        # the job as written: what differs from the defaults, and the trial's values even where they do not
        text = json.dumps(with_values(json.loads(job_spec.model_dump_json(exclude_defaults=True)), values),
                          indent=2) + "\n"
        link = {"sweep": name, "number": number, "params": values}

        def fill(stage: Path) -> dict[str, bytes]:
            link.update(take_up(self.fs, name, study, trial, stage))
            return {TRIAL_FILE: json.dumps(link, indent=1).encode()}

        _make_queued(self.fs, folder, JobFile(Path(f"{job}.json"), "json", text, job_spec), fill=fill)
        log.info("%s: trial %d of sweep %s, %s", job, number, name,
                 ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items()))
        if "taken_up" in link:
            taken = link["taken_up"]
            log.info("%s: tries again trial %d, whose daemon went silent: taken up from its save %s (step %d) in %s",
                     job, link["retries"], taken["save"], taken["step"], taken["from"])
        elif "started_again" in link:
            log.info("%s: tries again trial %d, whose daemon went silent: started again, as %s",
                     job, link["retries"], link["started_again"])

def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no trial finished with a value
        return None


def accept(home: Home, fs: FileSystem, job_file: JobFile) -> Path:
    """Make the sweep of JOB_FILE in HOME/sweeps/NAME."""
    folder = sweep_dir(home, job_file.name)
    folder.parent.mkdir(exist_ok=True)
    _make_queued(fs, folder, job_file)
    return folder


def _make_queued(fs: FileSystem, folder: Path, job_file: JobFile,
                 fill: Callable[[Path], dict[str, bytes]] | None = None) -> None:
    """FOLDER with JOB_FILE (write_job), what FILL puts into it and the files it returns, and
    a queued state, made in a stage beside it and renamed into place: there whole or not at all."""
    stage = folder.parent / f".new-{folder.name}"
    fs.remove_tree(stage)
    fs.mkdir(stage)
    write_job(fs, stage, job_file, staged=True)
    for file, data in (fill(stage) if fill else {}).items():
        write_new(fs, stage / file, data)
    now = time.time()
    write_state(stage, JobRecord(folder.name, JobState.QUEUED, job_file.spec.priority, now, changed=now), fs,
                staged=True)
    fs.fsync_dir(stage)
    fs.rename(stage, folder)
    fs.fsync_dir(folder.parent)

