"""The commands on a home's jobs: list them, show one, and steer it (pause, resume,
cancel, quicksave, load). Running jobs are steered by request files their worker takes
at the next step boundary; the others by a state change."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from traind.daemon import requests
from traind.daemon.home import KEPT, REMOVING, Home, NoSuchJob, finish_removal, finish_removals, job_folder
from traind.daemon.index import Index, row
from traind.daemon.jobstate import JobState, read_state, transition
from traind.daemon.liveness import serving, trained
from traind.daemon.slurm import SLURM_HOME
from traind.jobs.folder import JOB_FILE, LOG_FILE, SAVES, STATE_FILE
from traind.jobs.loadgame import request_load
from traind.store.errors import TraindError
from traind.store.fs import FileSystem
from traind.store.saves import list_saves

ENDED = {JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.PAUSED, JobState.PRUNED}


class NotRunning(TraindError):
    exit_code = 1


def folder_of(home: Home, name: str | None, folder: Path | None = None) -> Path:
    """The folder of job NAME in HOME, or FOLDER (`--dir`: any job folder, such as one
    `traind run --dir` made); NoSuchJob when there is none."""
    if folder is not None or not name:
        return job_folder(home, None, folder)
    folder = home.job_dir(name)
    if read_state(folder) is None:
        turned_down = [r for r in rejections(home) if r["file"].split(".")[0] == name]
        if turned_down:
            last = turned_down[-1]
            raise NoSuchJob(f"no job '{name}': its file was rejected ({last['why']}); the whole reason is in "
                            f"{home.rejected / (last['file'] + '.error')}")
        known = ", ".join(sorted(p.name for p in home.jobs.glob("*") if (p / STATE_FILE).exists())[:8]) or "none"
        raise NoSuchJob(f"no job '{name}' in {home.jobs}; jobs there: {known}")
    return folder


def rejections(home: Home) -> list[dict]:
    """The files in rejected/, oldest first, each with the first line of its reason."""
    found = []
    for error in home.rejected.glob("*.error") if home.rejected.is_dir() else ():
        try:
            text, when = error.read_text(errors="replace"), error.stat().st_mtime
        except OSError:
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        found.append({"file": error.name[:-len(".error")], "why": " ".join(lines[:2])[:300], "rejected": when})
    return sorted(found, key=lambda r: (r["rejected"], r["file"]))


def show_rejected(home: Home, as_json: bool) -> None:
    found = rejections(home)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no rejected files in {home.rejected}")
    for r in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["rejected"]))
        click.echo(f"{when}  {r['file']}: {r['why']}")


def _run_folder(folder: Path) -> bool:
    """Whether FOLDER is a job folder of `traind run` (no daemon's state.json): steered by
    requests to the process that trains it, or by running it again."""
    return read_state(folder) is None


def show_ls(home: Home, as_json: bool, states: tuple[str, ...] = ()) -> None:
    slurm = (home.root / SLURM_HOME).exists()  # a Slurm executor served this home
    if as_json and not states and not slurm:  # one row per line: cached rows are printed as stored, in queue order
        texts = Index(home).rows_json(queue=True)
        click.echo("[\n" + ",\n".join(f"  {t}" for t in texts) + "\n]" if texts else "[]")
        return
    rows = [r for r in Index(home).rows(queue=True) if not states or r["state"] in states]
    if slurm:  # jobs of the Slurm executor: their Slurm job beside traind's row
        from traind.daemon.slurm import slurm_states

        for name, found in slurm_states({r["name"]: home.job_dir(r["name"]) for r in rows}).items():
            next(r for r in rows if r["name"] == name)["slurm"] = found
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(daemon_line(home))
    click.echo(table(with_sweeps(home, rows)))


def with_sweeps(home: Home, rows: list[dict]) -> list[dict]:
    """ROWS with each sweep's trials together, under a line for the sweep (where its first
    trial was in the queue; a sweep without trials yet at the end)."""
    root = home.root / "sweeps"
    names = {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()
    if not names:
        return rows
    trials: dict[str, list[dict]] = {name: [] for name in names}
    placed: list[dict] = []
    for r in rows:
        base, sep, number = r["name"].rpartition(".t")
        if sep and number.isdigit() and base in trials:
            if not trials[base]:
                placed.append({"sweep": base})
            trials[base].append(r)
        else:
            placed.append(r)
    placed += [{"sweep": name} for name in sorted(names) if not trials[name]]
    grouped = []
    for r in placed:
        if "sweep" not in r:
            grouped.append(r)
            continue
        name = r["sweep"]
        record = read_state(root / name)
        try:
            total = json.loads((root / name / "spec.json").read_text())["sweep"]["trials"]
        except (OSError, ValueError, KeyError, TypeError):
            total = "?"
        counts: dict[str, int] = {}
        for t in trials[name]:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        said = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        grouped.append({"line": f"sweep {name}: {record.state.value if record else '?'}, "
                                f"{len(trials[name])} of {total} trials{': ' + said if said else ''}"})
        grouped += trials[name]
    return grouped


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def duration(seconds: float | None) -> str:
    """SECONDS as 45s, 12m05s, 3h20m or 2d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(rows: list[dict]) -> str:
    """The rows as columns as wide as their widest cell, long job names included (a row
    that is a "line", a sweep's, is printed as it is, between them)."""
    lines = {i: r["line"] for i, r in enumerate(rows) if "line" in r}
    rows = [r for r in rows if "line" not in r]
    head = ("name", "state", "epoch", "step", "loss", "best", "steps/s", "elapsed", "device", "restarts")
    cells = [(r["name"], r["state"], str(r["epoch"]), f"{r['step']}/{r['total_steps'] or '?'}", _num(r["loss"]),
              f"{r['monitor']} {_num(r['best'])}" if r.get("monitor") and r["best"] is not None else "-",
              _num(r.get("steps_per_s")) if r["state"] == "running" else "-", duration(r.get("elapsed")),
              r["device"] or "-", str(r["restarts"]))
             for r in rows]
    if any("slurm" in r for r in rows):  # the Slurm executor's jobs: id, Slurm state, node(s)
        head += ("slurm",)
        cells = [(*c, " ".join(x for x in (r["slurm"]["job_id"], r["slurm"]["state"], r["slurm"]["node"]) if x)
                  if "slurm" in r else "-") for c, r in zip(cells, rows)]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    right = {2, 3, 4, 6, 7, 9}  # numbers line up on the right
    line = lambda cs: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    out = [line(c) for c in cells]
    for i in sorted(lines):
        out.insert(i, lines[i])
    return "\n".join([line(head), *out])


def watch_ls(home: Home, states: tuple[str, ...]) -> None:
    """The table again every second, until Ctrl-C."""
    while True:
        click.clear()
        show_ls(home, False, states)
        time.sleep(1.0)


def daemon_line(home: Home) -> str:
    """Whether a daemon serves HOME, in one line."""
    daemon = serving(home.root)
    if daemon is None:
        return f"no daemon serves {home.root}: queued jobs wait (start one: `traind daemon`, or systemd)"
    return f"daemon pid {daemon.pid}, up {daemon.uptime()}, serving {home.root}"


STALE = ("it was running, but no process trains it now (the daemon stopped or died); it resumes from "
         "its newest save when a daemon serves this home")


def watch_status(home: Home, folder: Path) -> None:
    """show_status again every second while the job is queued or running."""
    while True:
        click.clear()
        show_status(home, folder, as_json=False)
        if row(folder)["state"] not in (JobState.RUNNING.value, JobState.QUEUED.value):
            return
        time.sleep(1.0)


def show_status(home: Home, folder: Path, as_json: bool) -> None:
    record = read_state(folder)
    info = {**row(folder), "saves": len(list_saves(folder / SAVES)[0]),
            "last_error": record.last_error if record else None, "cause": record.cause if record else None}
    if info.pop("stale", False):
        info["last_error"], info["cause"] = STALE, "interrupted"
    daemon = serving(home.root)
    info["daemon"] = None if daemon is None else {"pid": daemon.pid, "started": daemon.started}
    rate, left = info.get("steps_per_s"), (info["total_steps"] or 0) - (info["step"] or 0)
    info["eta_s"] = round(left / rate, 1) if info["state"] == JobState.RUNNING.value and rate and left > 0 else None
    from traind.daemon.slurm import slurm_status

    info["slurm"] = slurm_status(folder)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    total, step = info["total_steps"], info["step"]
    bar = ""
    if total:
        done = int(30 * min(step / total, 1))
        bar = f"  [{'#' * done}{'.' * (30 - done)}] {100 * step / total:.0f}%"
    eta = f"  ETA {duration(info['eta_s'])}" if info["eta_s"] is not None else ""
    click.echo(f"{info['name']}: {info['state']}, step {step}/{total or '?'}{bar}{eta}")
    if info["best"] is not None and info.get("monitor"):
        info["best"] = f"{info['monitor']} {_num(info['best'])}"
    info["elapsed"] = duration(info["elapsed"]) if info.get("elapsed") else None
    for key in ("epoch", "loss", "best", "stopped", "steps_per_s", "elapsed", "device", "restarts", "saves",
                "last_error", "cause"):
        if info.get(key) is not None:
            click.echo(f"  {key.replace('_per_', '/')}: {info[key]}")
    if info["slurm"] is not None:
        slurm = info["slurm"]
        where = f" on {slurm['node']}" if slurm["node"] else ""
        why = f" ({slurm['reason']})" if slurm["reason"] and slurm["reason"] != "None" else ""
        click.echo(f"  slurm: job {slurm['job_id']}, {slurm['state'] or 'no longer known to Slurm'}{where}{why}")
    click.echo(f"  {daemon_line(home)}")


def steer(home: Home, folder: Path, action: str, note: str | None = None) -> str:
    """pause, resume, cancel or save the job in FOLDER; what happened, in words."""
    name = folder.name
    if _run_folder(folder):
        return _steer_run(folder, action, note)
    state = read_state(folder).state
    if action == "resume":
        if state not in ENDED - {JobState.DONE}:
            raise NotRunning(f"job '{name}' is {state.value}; only a paused, failed, cancelled or pruned job resumes")
        transition(folder, JobState.QUEUED, restarts=0, last_error=None, cause=None)
        home.poke()
        return f"{name}: queued; it continues from its newest good save"
    if state == JobState.RUNNING:
        requests.send(folder, action, note)
        return f"{name}: {action} requested; the job acts on it at its next step boundary"
    if action == "save":
        raise NotRunning(f"job '{name}' is {state.value}, not running; its newest save is already its state")
    target = {"pause": JobState.PAUSED, "cancel": JobState.CANCELLED}[action]
    transition(folder, target, allow_from={JobState.QUEUED} | ({JobState.PAUSED} if action == "cancel" else set()))
    return f"{name}: {target.value}"


def _steer_run(folder: Path, action: str, note: str | None) -> str:
    """Steer a `traind run` folder: requests reach the process that trains it, if one does."""
    rerun = f"`traind run {folder}/{JOB_FILE}.* --dir {folder}`"
    if action == "resume":
        if trained(folder):
            raise NotRunning(f"{folder} is being trained now; there is nothing to resume")
        raise NotRunning(f"{folder} is a folder of `traind run`, not a daemon's job: run it again to continue "
                         f"from its newest save ({rerun})")
    if not trained(folder):
        raise NotRunning(f"no process trains {folder} now; its newest save is its state ({rerun} continues it)")
    requests.send(folder, action, note)
    return f"{folder.name}: {action} requested; the run acts on it at its next step boundary"


def load(home: Home, name: str, save_id: str) -> str:
    folder = folder_of(home, name)
    state = read_state(folder).state
    request_load(folder, save_id)
    if state == JobState.RUNNING:
        requests.send(folder, "reload")
        return f"{name}: stops at its next step boundary and continues from save {save_id}"
    if state in ENDED:
        transition(folder, JobState.QUEUED, restarts=0, last_error=None, cause=None)
        home.poke()
    return f"{name}: continues from save {save_id}" + (" (queued again)" if state in ENDED else "")


def logs(folder: Path, follow: bool, lines: int | None = None) -> None:
    """The job's log (its last LINES lines); with FOLLOW, keep printing what is added until
    the job stops running."""
    path = folder / LOG_FILE
    offset = 0
    if lines is not None and path.exists():
        with open(path, "rb") as f:
            data = f.read()
        offset = len(data)
        tail = data.splitlines(keepends=True)[-lines:] if lines else []
        click.echo(b"".join(tail).decode("utf-8", errors="replace"), nl=False)
    while True:
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                text = f.read()
                offset = f.tell()
            if text:
                click.echo(text, nl=False)
        if not follow or row(folder)["state"] not in (JobState.RUNNING.value, JobState.QUEUED.value):
            return
        time.sleep(0.2)


def remove(home: Home, folder: Path, keep_saves: bool, force: bool = False) -> str:
    """Forget the job in FOLDER: the folder goes (with KEEP_SAVES, its saves stay, in
    HOME/kept/NAME). Manual saves are never rotated out, so a job that has some is removed
    only with FORCE (or a yes at the terminal) unless its saves are kept."""
    finish_removals(home)
    name = folder.name
    if trained(folder):  # a state.json that says running with no trainer is a dead daemon's: removable
        raise NotRunning(f"job '{name}' is running; `traind cancel {name}` first")
    manual = [s.id for s in list_saves(folder / SAVES)[0] if "manual" in s.kinds]
    if manual and not (keep_saves or force):
        question = f"job '{name}' has {len(manual)} manual save(s) ({', '.join(manual[:3])}); delete them too?"
        if not (sys.stdin.isatty() and click.confirm(question)):
            raise NotRunning(f"job '{name}' has {len(manual)} manual save(s) ({', '.join(manual[:3])}); "
                             f"`traind rm {name} --keep-saves` keeps them in {home.root / KEPT}, --force deletes them")
    trash = folder.parent / f"{REMOVING}{name}"
    fs = FileSystem()
    if trash.exists():  # a removal beside a --dir folder cut short (the home's own were finished above)
        finish_removal(home, trash, keep_saves=True)
    fs.rename(folder, trash)  # the job is gone from the daemon's view at once, whole
    fs.fsync_dir(folder.parent)
    kept = finish_removal(home, trash, keep_saves)
    return f"{name}: removed" + (f"; its saves are in {kept}" if kept else "")
