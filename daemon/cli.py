"""The `traind` command. Subcommands parse, call the library and print; nothing more.

Exit codes (CONTRACT §4): 0 success; 1 the operation failed; 2 bad usage or an invalid
job file; 3 no such job or save.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from traind.daemon import intake, saves_cli
from traind.daemon.foreground import run_job
from traind.daemon.home import Home, default_home
from traind.jobs import devices
from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError
from traind.jobs.jobfile import load_job
from traind.jobs.model import count_parameters
from traind.jobs.spec import JobSpec
from traind.store.errors import TraindError


class TraindGroup(click.Group):
    """Turns every TraindError into its message and exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TraindError as e:
            click.echo(str(e) if isinstance(e, JobSpecError) else f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _set_home(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.obj = Home(value)


HOME_HELP = "Home folder (env TRAIND_HOME; default $XDG_STATE_HOME/traind)."
home_option = click.option("--home", type=click.Path(file_okay=False, path_type=Path), expose_value=False,
                           callback=_set_home, help=HOME_HELP)
pass_home = click.make_pass_decorator(Home)
job_file_argument = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))


@click.group(cls=TraindGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), help=HOME_HELP)
@click.version_option(package_name="traind")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """traind: a training daemon that keeps crash-safe saves and resumes exactly."""
    ctx.obj = Home(home or default_home())


@cli.command()
@job_file_argument
@home_option
def validate(file: Path) -> None:
    """Validate FILE and dry-build it: module tree, parameters, device, one forward pass."""
    job_file = load_job(file)
    try:
        job = build_job(job_file.spec, job_file.name)
    except JobSpecError as e:
        raise job_file.locate(e) from e
    (x_shape, out_shape), d = job.sample_shapes, job.spec.data
    click.echo(f"{file}: valid job '{job.name}'")
    click.echo(str(job.model))
    unique = count_parameters(job.model)
    uses = sum(p.numel() for _, p in job.model.named_parameters(remove_duplicate=False))
    click.echo(f"parameters: {unique:,}" + (f" (tied: {uses - unique:,} reused, counted once)" if uses > unique else ""))
    click.echo(f"device: {devices.describe(job.device)}")
    click.echo(f"data: {job.splits.description}; batch {d.batch_size}, {job.steps_per_epoch} steps per epoch")
    click.echo(f"forward: input {x_shape} -> output {out_shape}")
    epochs = job.spec.train.epochs
    click.echo(f"training: {job.total_steps} steps" + (f" ({epochs} epochs)" if epochs else ""))


@cli.command()
@job_file_argument
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="The job folder (default ./NAME): job file copy, log, metrics.")
@home_option
def run(file: Path, folder: Path | None) -> None:
    """Train FILE in the foreground, without the daemon. SIGTERM or Ctrl-C stops it at
    the next step boundary."""
    job_file = load_job(file)
    run_job(job_file, folder or Path(job_file.name), click.echo)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@home_option
@pass_home
def submit(home: Home, files: tuple[Path, ...]) -> None:
    """Validate FILES in full (a dry build each), then deliver them atomically into the
    home's inbox/ and print each job's name. If any is invalid, none is delivered."""
    valid, problems = [], []
    for path in files:
        try:
            valid.append(intake.validate(load_job(path)))
        except JobSpecError as e:
            problems.append(e)
    names = [j.name for j in valid]
    twice = sorted({n for n in names if names.count(n) > 1})
    if problems or twice:
        for e in problems:
            click.echo(str(e), err=True)
        if twice:
            click.echo(f"job names given twice: {', '.join(twice)}; name each job once (name = \"...\")", err=True)
        click.echo(f"nothing delivered: {len(problems) + len(twice)} of {len(files)} files cannot be accepted", err=True)
        raise click.exceptions.Exit(2)
    for job_file in valid:
        intake.deliver(home, job_file)
        click.echo(job_file.name)


dir_option = click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
                          help="Act on this job folder (as `traind run --dir` made) instead of a job NAME.")
name_argument = click.argument("name", required=False)


@cli.command()
@name_argument
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine output: a list of saves, oldest first.")
@home_option
@pass_home
def saves(home: Home, name: str | None, folder: Path | None, as_json: bool) -> None:
    """Every save of a job: id, step, epoch, kinds, bytes, created, verified, metrics."""
    saves_cli.show_saves(home, name, folder, as_json)


@cli.command()
@name_argument
@dir_option
@home_option
@pass_home
def verify(home: Home, name: str | None, folder: Path | None) -> None:
    """Re-hash saves (of NAME, or of every job) and list each corrupt one; exit 1 if any."""
    saves_cli.verify_saves(home, name, folder)


@cli.command()
@name_argument
@dir_option
@click.option("--save", "save_id", help="The save to export (default: the newest).")
@click.option("--best", is_flag=True, help="The best save by the job's monitored metric.")
@click.option("--last", is_flag=True, help="The newest save (the default).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the .safetensors file.")
@home_option
@pass_home
def export(home: Home, name: str | None, folder: Path | None, save_id: str | None, best: bool, last: bool,
           out: Path) -> None:
    """Write a save's model state_dict as one safetensors file (job, step, metrics in its metadata)."""
    if sum(map(bool, (save_id, best, last))) > 1:
        raise click.UsageError("give at most one of --save, --best and --last")
    save = saves_cli.export(home, name, folder, save_id, best, out)
    click.echo(f"exported save {save.id} (step {save.step}) to {out}")


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[NAME] SAVE")
@dir_option
@home_option
@pass_home
def load(home: Home, args: tuple[str, ...], folder: Path | None) -> None:
    """Roll back ("load game"): the job continues from SAVE when it runs next. Newer saves stay."""
    if len(args) != (1 if folder else 2):
        raise click.UsageError("give NAME SAVE, or --dir JOBDIR SAVE")
    folder = saves_cli.load_game(home, None if folder else args[0], folder, args[-1])
    click.echo(f"{folder.name} continues from save {args[-1]} when it runs next")


@cli.command()
@home_option
def schema() -> None:
    """Print the JSON Schema of job files."""
    click.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


def main() -> None:
    try:
        cli(prog_name="traind")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a traceback
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
