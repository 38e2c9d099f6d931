"""The commands on job files: validate one (a dry build), submit some into a home."""

from __future__ import annotations

import json
from pathlib import Path

import click

from traind.daemon.home import Home
from traind.daemon.liveness import serving
from traind.jobs.errors import JobSpecError, field_name

# Commands that build import torch inside their body (about 2 s); the CLI's others never do.


def problems_json(e: JobSpecError) -> list[dict]:
    return [{"path": field_name(p.path), "line": p.line, "message": p.message, "fix": p.fix} for p in e.problems]


def validate(file: Path, as_json: bool) -> None:
    """Validate FILE in full and print what was built (or every problem: exit 2)."""
    from traind.jobs.build import build_job, summary
    from traind.jobs.jobfile import load_job

    try:
        job_file = load_job(file)
        try:
            job = build_job(job_file.spec, job_file.name)
        except JobSpecError as e:
            raise job_file.locate(e) from e
    except JobSpecError as e:
        if not as_json:
            raise
        click.echo(json.dumps({"file": str(file), "valid": False, "problems": problems_json(e)}, indent=2))
        raise click.exceptions.Exit(2) from e
    info = summary(job)
    if as_json:
        click.echo(json.dumps({"file": str(file), "valid": True, **info}, indent=2))
        return
    click.echo(f"{file}: valid job '{info['name']}'")
    click.echo(info["model"])
    tied = f" (tied: {info['tied']:,} reused, counted once)" if info["tied"] else ""
    click.echo(f"parameters: {info['parameters']:,}{tied}")
    for i, g in enumerate(info["param_groups"]):
        more = ", ..." if g["tensors"] > len(g["names"]) else ""
        click.echo(f"  optimizer group {i}: {g['tensors']} tensors, {g['parameters']:,} parameters, lr {g['lr']}, "
                   f"weight_decay {g['weight_decay']} ({', '.join(g['names'])}{more})")
    click.echo(f"device: {info['device']}")
    accumulate = f" x {info['accumulate']} a step" if info.get("accumulate", 1) > 1 else ""
    click.echo(f"data: {info['data']}; batch {info['batch_size']}{accumulate}, {info['steps_per_epoch']} steps per epoch")
    click.echo(f"forward: input {tuple(info['input_shape'])} -> output {tuple(info['output_shape'])}")
    epochs = info["epochs"]
    click.echo(f"training: {info['total_steps']} steps" + (f" ({epochs} epochs)" if epochs else ""))
    for warning in info["warnings"]:
        click.echo(f"warning: {warning}")


def submit(home: Home, files: tuple[Path, ...], as_json: bool) -> None:
    """Validate FILES, then deliver them all into HOME's inbox/, or none (exit 2)."""
    from traind.daemon import intake
    from traind.jobs.jobfile import load_job

    valid, refused = [], []  # refused: (file, its problems as JSON, the text a person reads)
    for path in files:
        try:
            valid.append(intake.validate(load_job(path)))
        except JobSpecError as e:
            refused.append((str(path), problems_json(e), str(e)))
    names = [j.name for j in valid]
    for job_file in valid:
        why = intake.name_in_use(home, job_file.name)
        if names.count(job_file.name) > 1:
            why = f"job name '{job_file.name}' given twice; name each job once (name = \"...\")"
        if why:
            refused.append((str(job_file.path), [{"path": "name", "line": None, "message": why, "fix": None}],
                            f"{job_file.path}: {why}"))
    if refused:
        if as_json:
            click.echo(json.dumps({"delivered": [], "problems": [{"file": f, "problems": p} for f, p, _ in refused]},
                                  indent=2))
        else:
            for _, _, text in refused:
                click.echo(text, err=True)
            click.echo(f"nothing delivered: {len({f for f, _, _ in refused})} of {len(files)} files cannot be "
                       "accepted", err=True)
        raise click.exceptions.Exit(2)
    delivered = [{"file": str(j.path), "name": j.name, "delivered": str(intake.deliver(home, j))} for j in valid]
    click.echo(json.dumps(delivered, indent=2) if as_json else "\n".join(d["name"] for d in delivered))
    if serving(home.root) is None:
        click.echo(f"warning: no daemon serves {home.root}; the jobs wait in its inbox/ until one starts "
                   "(`traind daemon`, or `systemctl start traind`)", err=True)
