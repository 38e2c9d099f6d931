"""Shell completion of job names and save ids (click's shell_complete callbacks):
`eval "$(_TRAIND_COMPLETE=bash_source traind)"`."""

from __future__ import annotations

from pathlib import Path

import click

from traind.daemon.home import Home, default_home
from traind.jobs.folder import SAVES
from traind.store.saves import list_saves


def _completion_home(ctx: click.Context) -> Home:
    home = ctx.params.get("home") or ctx.find_root().params.get("home")
    return home if isinstance(home, Home) else Home(Path(home) if home else default_home())


def complete_job(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Job names of the home, for shell completion."""
    return [p.name for p in _completion_home(ctx).job_folders() if p.name.startswith(incomplete)]


def complete_save(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Save ids of the job named on the command line so far (or of every job), for shell completion."""
    home, named = _completion_home(ctx), [a for a in ctx.params.get("args", ()) or (ctx.params.get("name"),) if a]
    folders = [ctx.params["folder"]] if ctx.params.get("folder") else \
        [p for p in home.job_folders() if not named or p.name == named[0]]
    return [s.id for f in folders for s in list_saves(Path(f) / SAVES)[0] if s.id.startswith(incomplete)]


def complete_job_or_save(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """`traind load NAME SAVE`: a job name first, then its save ids."""
    given = ctx.params.get("args") or ()
    return complete_save(ctx, param, incomplete) if given or ctx.params.get("folder") else \
        complete_job(ctx, param, incomplete)
