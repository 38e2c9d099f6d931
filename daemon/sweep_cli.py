"""`traind sweep NAME`: a sweep's trials, as its study and its trials' jobs tell them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from traind.daemon.home import Home, NoSuchJob
from traind.daemon.jobs_cli import NotRunning
from traind.daemon.jobstate import BadTransition, JobState, read_state, transition
from traind.daemon.sweeps import (STUDY_FILE, objective_of, open_study, read_spec, retried_numbers, sweep_dir,
                                  sweep_names, trial_link)
from traind.jobs.folder import JOB_FILE
from traind.jobs.sweep import resolved_objective, trial_name


def folder_of_sweep(home: Home, name: str) -> Path:
    folder = sweep_dir(home, name)
    if not folder.is_dir():
        known = ", ".join(sweep_names(home)[:8]) or "none"
        raise NoSuchJob(f"no sweep '{name}' in {folder.parent}; sweeps there: {known}")
    return folder


def steer(home: Home, name: str, action: str) -> str:
    """pause, resume or cancel the sweep NAME: its state changed here; the daemon's driver
    makes its trials follow (daemon/sweeps.py). What happened, in words."""
    folder = folder_of_sweep(home, name)
    state = read_state(folder).state
    if action == "resume" and state == JobState.CANCELLED:
        raise NotRunning(f"sweep '{name}' was cancelled: its trials were told failed in its study; to search "
                         f"again, submit its file under another name")
    allowed = {"pause": {JobState.QUEUED, JobState.RUNNING}, "resume": {JobState.PAUSED},
               "cancel": {JobState.QUEUED, JobState.RUNNING, JobState.PAUSED}}.get(action)
    if allowed is None:
        raise NotRunning(f"'{name}' is a sweep, which has no saves of its own; quicksave one of its trials "
                         f"(`traind sweep {name}` lists them)")
    if state not in allowed:
        raise NotRunning(f"sweep '{name}' is {state.value}; only a sweep that is "
                         f"{' or '.join(sorted(s.value for s in allowed))} can be {action}d")
    target = {"pause": JobState.PAUSED, "resume": JobState.QUEUED, "cancel": JobState.CANCELLED}[action]
    try:
        transition(folder, target, allow_from=allowed)
    except BadTransition as e:  # the daemon ended it meanwhile
        raise NotRunning(str(e).replace("job", "sweep", 1)) from e
    home.poke()
    return {"pause": f"sweep {name}: paused; the daemon pauses its trials (each saves and stops) and asks for "
                     f"no new one until `traind resume {name}`",
            "resume": f"sweep {name}: queued; the daemon queues again the trials its pause paused",
            "cancel": f"sweep {name}: cancelled; the daemon cancels its trials (their saves stay)"}[action]


def trials(home: Home, name: str) -> dict:
    """The sweep NAME as `traind sweep --json` prints it."""
    folder = folder_of_sweep(home, name)
    spec = read_spec(folder)
    metric, direction = resolved_objective(spec)
    record = read_state(folder)
    found = {"name": name, "objective": metric, "direction": direction,
             "state": record.state.value if record else None, "trials": [], "best": None}
    if not spec.sweep.storage and not (folder / STUDY_FILE).exists():
        return found  # the daemon has not begun it
    try:
        study = open_study(folder, spec)
    except KeyError:  # the study is not made yet
        return found
    best_number = None
    every = study.get_trials(deepcopy=False)
    retried = retried_numbers(every)
    for t in every:
        if t.user_attrs.get("surplus") or t.user_attrs.get("orphan"):
            continue  # never a trial of the sweep's count
        job = trial_name(name, t.number)
        job_folder = home.job_dir(job)
        job_record = read_state(job_folder)
        value = t.value if t.value is not None else objective_of(job_folder, metric, direction)
        state = job_record.state.value if job_record else t.state.name.lower()
        if t.number in retried:
            state = "retried"  # its daemon went silent; a later trial has its values
        row = {"number": t.number, "job": job, "state": state, "study_state": t.state.name.lower(),
               "params": t.params, "objective": value, "epochs": len(t.intermediate_values),
               "home": t.user_attrs.get("home"), "retry_of": t.system_attrs.get("failed_trial")}
        found["trials"].append(row)
        if t.state.name == "COMPLETE" and t.value is not None:
            better = best_number is None or (t.value < found["best"]["objective"] if direction == "minimize"
                                             else t.value > found["best"]["objective"])
            if better:
                best_number = t.number
                found["best"] = {k: row[k] for k in ("number", "job", "params", "objective")}
    return found


def show(home: Home, name: str, as_json: bool) -> None:
    found = trials(home, name)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    best = found["best"]["number"] if found["best"] else None
    click.echo(f"sweep {name}: {found['state']}, {len(found['trials'])} trials; objective {found['objective']} "
               f"({found['direction']}){'; best: trial ' + str(best) if best is not None else ''}")
    head = ("", "trial", "job", "state", found["objective"], "epochs", "params")
    cells = [("*" if t["number"] == best else "", str(t["number"]), t["job"], t["state"],
              f"{t['objective']:.6g}" if t["objective"] is not None else "-", str(t["epochs"]),
              ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()))
             for t in found["trials"]]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    for row in [head, *cells]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def plot(home: Home, name: str, out: Path) -> Path:
    from traind.daemon.plot import PlotUnavailable, plot_sweep

    folder = folder_of_sweep(home, name)
    try:
        study = open_study(folder)
    except KeyError:
        raise PlotUnavailable(f"sweep {name} has not begun; plot again once a trial has finished") from None
    return plot_sweep(study, out, name)


def trial_spec_text(home: Home, name: str, number: int) -> str:
    """The full job file of trial NUMBER of sweep NAME."""
    folder_of_sweep(home, name)
    job = home.job_dir(trial_name(name, number))
    files = sorted(job.glob(f"{JOB_FILE}.*")) if job.is_dir() else []
    if not files or trial_link(job) is None:
        raise NoSuchJob(f"sweep '{name}' has no trial {number} yet; `traind sweep {name}` lists its trials")
    return files[0].read_text()


def best_job(home: Home, name: str) -> str:
    """The job of the best finished trial of sweep NAME."""
    best = trials(home, name)["best"]
    if best is None:
        raise NoSuchJob(f"sweep '{name}' has no finished trial yet; `traind sweep {name}` lists its trials")
    return best["job"]
