"""The commands on a job's saves: list, verify, export, load ("load game")."""

from __future__ import annotations

import json
from pathlib import Path

import click

from traind.daemon.home import Home, job_folder
from traind.daemon.index import best_policy
from traind.jobs.folder import SAVES, SPEC_FILE
from traind.jobs.loadgame import request_load
from traind.store import retention
from traind.store.commit import DELETING, leftover
from traind.store.errors import NoSuchSave, TraindError
from traind.store.fs import FileSystem
from traind.store.saves import SaveInfo, quarantined, list_saves, load_json, load_tensors, read_manifest, verify


class CorruptFound(TraindError):
    exit_code = 1


def saves_of(folder: Path) -> list[SaveInfo]:
    return list_saves(folder / SAVES)[0]


def show_saves(home: Home, name: str | None, folder: Path | None, as_json: bool, rehash: bool = False) -> None:
    """The saves of a job. `whole`: every file its manifest lists is there at its size (a
    stat each, fast). `verified`: re-hashed against the manifest, only with REHASH (it
    reads every byte); None without."""
    folder = job_folder(home, name, folder)
    found, broken = list_saves(folder / SAVES)
    rows = [{**s.as_json(verified=(not verify(s.path)) if rehash else None), "whole": s.looks_whole()}
            for s in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    checked = "verified " if rehash else ""
    click.echo(f"{'id':<14} {'step':>7} {'epoch':>5}  {'kinds':<24} {'bytes':>12}  {'created':<24} files  "
               f"{checked}metrics")
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        note = f"  ({r['note']})" if r["note"] else ""
        verdict = f"{'yes' if r['verified'] else 'CORRUPT':<8} " if rehash else ""
        click.echo(f"{r['id']:<14} {r['step']:>7} {r['epoch']:>5}  {','.join(r['kinds']):<24} {r['bytes']:>12,}  "
                   f"{r['created']:<24} {'whole' if r['whole'] else 'BAD':<6} {verdict}{metrics}{note}")
    for path, why in broken:
        click.echo(f"not a save: {path.name}: {why}")
    aside = quarantined(folder / SAVES)
    if aside:
        click.echo(f"quarantined (never loaded): {', '.join(aside)}")
    if not rehash:
        click.echo("files: every file there at its size (a stat each); `traind saves --verify` or "
                   "`traind verify` re-hash every byte")


def verify_saves(home: Home, name: str | None, folder: Path | None, quiet: bool = False,
                 as_json: bool = False) -> None:
    """Re-hash every save of one job (or of every job in HOME); CorruptFound if any fails.
    QUIET: print only the corrupt ones; AS_JSON: a list of {job, save, ok, problems}."""
    folders = [job_folder(home, name, folder)] if name or folder else home.job_folders()
    results = []
    leftovers = []  # not saves, and never loaded: a save being written, or one a crash cut short in its removal
    for job in folders:
        found, broken = list_saves(job / SAVES)
        results += [{"job": job.name, "save": s.id, "problems": verify(s.path)} for s in found]
        results += [{"job": job.name, "save": path.name, "problems": [why]} for path, why in broken]
        if (job / SAVES).is_dir():
            leftovers += [f"{job.name}/{p.name}" for p in sorted((job / SAVES).iterdir()) if leftover(p.name)]
    corrupt = sum(bool(r["problems"]) for r in results)
    if as_json:
        click.echo(json.dumps([{**r, "ok": not r["problems"]} for r in results], indent=2))
    for r in results if not as_json else ():
        if r["problems"] or not quiet:
            click.echo(f"{r['job']}/{r['save']}: " + ("CORRUPT: " + "; ".join(r["problems"]) if r["problems"] else "ok"))
    for name in leftovers if not (as_json or quiet) else ():
        what = "a save being removed" if f"/{DELETING}" in name else "a save being written"
        click.echo(f"{name}: not a save ({what}, or a crash's leftover of one; the job's next start removes it)")
    if corrupt:
        raise CorruptFound(f"{corrupt} corrupt save{'s' if corrupt != 1 else ''}; resume skips them "
                           "(and quarantines them when it meets them)")


def pick_save(folder: Path, save_id: str | None, best: bool) -> SaveInfo:
    found = saves_of(folder)
    if not found:
        raise NoSuchSave(f"{folder} has no saves yet")
    if save_id:
        match = [s for s in found if s.id == save_id]
        if not match:
            raise NoSuchSave(f"no save '{save_id}' in {folder / SAVES}; `traind saves` lists them")
        return match[0]
    if not best:
        return found[-1]
    policy = best_policy(folder)
    if policy is None:
        raise NoSuchSave(f"{folder / SPEC_FILE} cannot be read, so which save is best is unknown; "
                         "export one by id with --save ID")
    best = retention.best_save(policy, found)
    if best is None:
        raise NoSuchSave(f"no best save in {folder / SAVES} yet (best saves rank by {policy.monitor})")
    return best


def export(home: Home, name: str | None, folder: Path | None, save_id: str | None, best: bool, out: Path,
           fs: FileSystem | None = None, ema: bool = False) -> SaveInfo:
    """Write SAVE's weights (EMA: its moving average of them) to OUT, durably."""
    from safetensors.torch import save_file  # torch: imported by the commands that move tensors only

    from traind.jobs.state import EMA, MODEL, STATE, TIED_KEY

    folder = job_folder(home, name, folder)
    save = pick_save(folder, save_id, best)
    problems = verify(save.path)
    if problems:
        raise CorruptFound(f"save {save.id} is corrupt ({'; '.join(problems)}); export another with --save ID")
    doc = load_json(save, STATE)
    if ema and "ema" not in doc:
        raise NoSuchSave(f"save {save.id} holds no EMA of the weights (train.ema is 0 in the job that made it); "
                         "export without --ema")
    tied = doc["model"]["tied"]
    meta = {"job": read_manifest(save.path).get("job", folder.name), "save": save.id, "step": str(save.step),
            "epoch": str(save.epoch), "metrics": json.dumps(save.metrics), TIED_KEY: json.dumps(tied)}
    if ema:
        meta["traind.ema"] = str(doc["ema"]["decay"])
    fs = fs or FileSystem()
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(load_tensors(save, EMA if ema else MODEL), tmp, metadata=meta)
    fs.fsync_file(tmp)  # durable like every file traind writes: whole at OUT, or not there
    fs.rename(tmp, out)
    fs.fsync_dir(out.parent)
    return save


def load_game(home: Home, name: str | None, folder: Path | None, save_id: str) -> Path:
    folder = job_folder(home, name, folder)
    request_load(folder, save_id)
    return folder
