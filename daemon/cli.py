"""The `traind` command. Subcommands parse, call the library and print; nothing more.

Exit codes (CONTRACT §4): 0 success; 1 the operation failed; 2 bad usage or an invalid
job file; 3 no such job or save.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from traind.daemon import jobs_cli, saves_cli, spec_cli, units
from traind.daemon.completion import complete_job, complete_job_or_save, complete_save
from traind.daemon.home import Home, NoSuchJob, default_home, job_folder
from traind.jobs.errors import JobSpecError
from traind.jobs.folder import STATE_FILE
from traind.store.errors import TraindError

# Commands that build, validate or train import torch (about 2 s) inside their body; the
# ones that only read or steer job folders (ls, status, saves, pause...) never do.


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
@click.option("--json", "as_json", is_flag=True, help="Machine output: the summary, or {valid: false, problems}.")
@home_option
def validate(file: Path, as_json: bool) -> None:
    """Validate FILE and dry-build it: module tree, parameters and their optimizer groups,
    device, one forward pass, warnings.

    \b
    Example:  traind validate examples/mlp.toml"""
    spec_cli.validate(file, as_json)


@cli.command()
@job_file_argument
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="The job folder (default ./NAME): job file copy, log, metrics.")
@click.option("--rdzv-endpoint", "endpoint", metavar="HOST:PORT",
              help="Where the machines of a job with distributed.nodes > 1 meet: the same on each machine.")
@home_option
def run(file: Path, folder: Path | None, endpoint: str | None) -> None:
    """Train FILE in the foreground, without the daemon. SIGTERM or Ctrl-C stops it at
    the next step boundary. A job of several processes (`[distributed]`) launches its
    ranks here, unless it runs under torchrun already.

    \b
    Example:  traind run examples/mlp.toml --dir runs/mlp"""
    from traind.daemon.foreground import launch_run, run_job
    from traind.daemon.launch import Launch
    from traind.jobs import world
    from traind.jobs.jobfile import load_job

    job_file = load_job(file)
    if job_file.spec.sweep is not None:
        raise click.UsageError(f"{file} is a sweep ([sweep]): its trials are jobs the daemon makes; submit it with "
                               f"`traind submit {file}`, or run one trial's job file (`traind sweep NAME --trial N "
                               "--spec`)")
    folder = folder or Path(job_file.name)
    ranks = job_file.spec.distributed
    if ranks.world_size > 1 and world.ranks_in_environment() == 1:  # not under torchrun: launch the ranks here
        if ranks.nodes > 1 and not endpoint:
            raise click.UsageError(f"{file}: distributed.nodes = {ranks.nodes}: give --rdzv-endpoint HOST:PORT, the "
                                   "same on each machine (a port free on HOST, the first machine)")
        how = Launch(ranks.processes, ranks.nodes, endpoint, run_id=f"traind-{job_file.name}")  # the same on each machine
        sys.exit(launch_run(job_file, file, folder, how, click.echo))
    run_job(job_file, folder, click.echo, sys.stderr if sys.stderr.isatty() else None)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine output: [{file, name, delivered}] or {problems}.")
@home_option
@pass_home
def submit(home: Home, files: tuple[Path, ...], as_json: bool) -> None:
    """Validate FILES in full (a dry build each), then deliver them atomically into the
    home's inbox/ and print each job's name. If any is invalid, none is delivered.

    \b
    Example:  traind submit examples/mlp.toml examples/tied.yaml"""
    spec_cli.submit(home, files, as_json)


dir_option = click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
                          help="Act on this job folder (as `traind run --dir` made) instead of a job NAME.")
name_argument = click.argument("name", required=False, shell_complete=complete_job)


@cli.command()
@name_argument
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine output: a list of saves, oldest first.")
@click.option("--verify", "rehash", is_flag=True, help="Re-hash every file (reads every byte) to fill 'verified'.")
@home_option
@pass_home
def saves(home: Home, name: str | None, folder: Path | None, as_json: bool, rehash: bool) -> None:
    """Every save of a job: id, step, epoch, kinds, bytes, created, files whole, metrics
    (and verified, with --verify)."""
    saves_cli.show_saves(home, name, folder, as_json, rehash)


@cli.command()
@name_argument
@dir_option
@click.option("-q", "--quiet", is_flag=True, help="Print only corrupt saves (nothing when all are whole).")
@click.option("--json", "as_json", is_flag=True, help="Machine output: [{job, save, ok, problems}].")
@home_option
@pass_home
def verify(home: Home, name: str | None, folder: Path | None, quiet: bool, as_json: bool) -> None:
    """Re-hash saves (of NAME, or of every job) and list each corrupt one; exit 1 if any.

    \b
    Example (cron, a monitor):  traind verify --quiet || mail -s "traind: corrupt saves" me"""
    saves_cli.verify_saves(home, name, folder, quiet, as_json)


@cli.command()
@name_argument
@dir_option
@click.option("--save", "save_id", shell_complete=complete_save, help="The save to export (default: the newest).")
@click.option("--best", is_flag=True, help="The best save by the job's monitored metric.")
@click.option("--last", is_flag=True, help="The newest save (the default).")
@click.option("--ema", is_flag=True, help="The moving average of the weights (train.ema) instead of the weights.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the .safetensors file.")
@home_option
@pass_home
def export(home: Home, name: str | None, folder: Path | None, save_id: str | None, best: bool, last: bool,
           ema: bool, out: Path) -> None:
    """Write a save's model state_dict (or its EMA) as one safetensors file (job, step, metrics
    in its metadata). For a sweep, --best is its best trial's best save."""
    if sum(map(bool, (save_id, best, last))) > 1:
        raise click.UsageError("give at most one of --save, --best and --last")
    if name and folder is None and not home.job_dir(name).exists():
        from traind.daemon.sweeps import sweep_dir

        if sweep_dir(home, name).is_dir():
            if not best:
                raise click.UsageError(f"'{name}' is a sweep: give --best (its best trial's best save), or name a "
                                       f"trial's job (`traind sweep {name}` lists them)")
            from traind.daemon.sweep_cli import best_job

            name = best_job(home, name)
            click.echo(f"the best trial of the sweep is {name}")
    save = saves_cli.export(home, name, folder, save_id, best, out, ema=ema)
    click.echo(f"exported {'the EMA of ' if ema else ''}save {save.id} (step {save.step}) to {out}")


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[NAME] SAVE", shell_complete=complete_job_or_save)
@dir_option
@home_option
@pass_home
def load(home: Home, args: tuple[str, ...], folder: Path | None) -> None:
    """Roll back ("load game"): the job continues from SAVE when it runs next. Newer saves stay."""
    if len(args) != (1 if folder else 2):
        raise click.UsageError("give NAME SAVE, or --dir JOBDIR SAVE")
    if folder is None and (home.job_dir(args[0]) / STATE_FILE).exists():
        click.echo(jobs_cli.load(home, args[0], args[1]))
        return
    folder = saves_cli.load_game(home, None if folder else args[0], folder, args[-1])
    click.echo(f"{folder.name} continues from save {args[-1]} when it runs next")


@cli.command()
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=0),
              help="Jobs at once without a GPU (with GPUs: one per GPU); 0: take files in, start no job.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for each new job (default: OMP_NUM_THREADS, else the cores shared among the workers).")
@click.option("--warm/--cold", default=True, show_default=True,
              help="Start each job's worker as a fork of a process that imported torch once (--cold: a new Python each).")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="Where jobs run: worker processes on this machine, or sbatch jobs on a Slurm cluster.")
@click.option("--partition", help="Slurm: the partition jobs are submitted to (default: the cluster's).")
@click.option("--account", help="Slurm: the account jobs are charged to.")
@click.option("--sbatch-option", "sbatch_options", multiple=True, metavar="OPTION",
              help="Slurm: one more sbatch option, e.g. --sbatch-option=--qos=long (give it again for more).")
@click.option("--grace", default=120, show_default=True, type=click.IntRange(min=1),
              help="Slurm: seconds of warning before a preemption or the time limit (--signal=B:SIG@GRACE).")
@click.option("--warn-signal", default="USR2", show_default=True,
              help="Slurm: the warning signal (not USR1, which NCCL takes).")
@click.option("--cpus-per-process", default=1, show_default=True, type=click.IntRange(min=1),
              help="Slurm: CPUs for each training process of a job.")
@click.option("--gpus-per-process", default=0, show_default=True, type=click.IntRange(min=0),
              help="Slurm: GPUs for each training process of a job.")
@click.option("--max-jobs", default=64, show_default=True, type=click.IntRange(min=1),
              help="Slurm: this daemon's jobs in the queue or running at once.")
@click.option("--shared-home", is_flag=True,
              help="Slurm: the home is on storage every node sees, though its file system looks local (a bind mount).")
@home_option
@pass_home
def daemon(home: Home, workers: int, threads: int | None, warm: bool, executor: str, partition: str | None,
           account: str | None, sbatch_options: tuple[str, ...], grace: int, warn_signal: str,
           cpus_per_process: int, gpus_per_process: int, max_jobs: int, shared_home: bool) -> None:
    """Run the service in the foreground. The first SIGTERM or SIGINT: every running job
    saves at its next step boundary and stops (queued, to resume at the next start), then
    exit 0; a second one: stop at once. With --executor slurm, each job is a Slurm job,
    which goes on when the daemon stops; the next daemon finds it again. The Slurm options
    not given as flags come from the [slurm] table of HOME/config.toml (the same names,
    with underscores: partition, account, options, grace, warn_signal, cpus_per_process,
    gpus_per_process, max_jobs, shared_home), else their defaults."""
    from traind.daemon.supervisor import Daemon

    runner = None
    if executor == "slurm":
        from click.core import ParameterSource

        from traind.daemon.slurm import SlurmExecutor, read_config

        ctx = click.get_current_context()
        given = {field: value for field, value in (
            ("partition", partition), ("account", account), ("options", list(sbatch_options)), ("grace", grace),
            ("warn_signal", warn_signal.upper().removeprefix("SIG")), ("cpus_per_process", cpus_per_process),
            ("gpus_per_process", gpus_per_process), ("max_jobs", max_jobs), ("shared_home", shared_home))
            if ctx.get_parameter_source("sbatch_options" if field == "options" else field) == ParameterSource.COMMANDLINE}
        config = read_config(home.root, given)
        if not hasattr(signal, f"SIG{config.warn_signal.upper().removeprefix('SIG')}"):
            raise click.BadParameter(f"{config.warn_signal} is no signal (USR2, URG, ...)", param_hint="--warn-signal")
        runner = SlurmExecutor(config)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            os._exit(128 + signum)  # at once; the workers save on their own (they get SIGTERM)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # Events (accepted, rejected, started, restarted, finished, failed) go to stderr, and so
    # to the journal under systemd, which stamps the time itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=logging.INFO, format=f"{stamp}traind: %(message)s", stream=sys.stderr)
    click.echo(f"traind daemon serving {home.root}", err=True)
    Daemon(home, workers=workers, threads=threads, executor=runner, warm=warm).serve(stop)


STATES = ("queued", "running", "paused", "done", "failed", "cancelled")


@cli.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine output.")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only jobs in this state (give it again for more states).")
@click.option("--watch", is_flag=True, help="Refresh every second, until Ctrl-C.")
@home_option
@pass_home
def ls_command(home: Home, as_json: bool, states: tuple[str, ...], watch: bool) -> None:
    """A row per job, in queue order (running, then what runs next, then the rest): name,
    state, epoch, step of total, last loss, best by the monitored metric, steps/s, elapsed
    training time, device, restarts.

    \b
    Examples:  traind ls --state running --state queued
               traind ls --json | jq '.[] | select(.state == "failed") | .name'"""
    if watch:
        jobs_cli.watch_ls(home, states)
    else:
        jobs_cli.show_ls(home, as_json, states)


@cli.command()
@name_argument
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine output.")
@click.option("--watch", is_flag=True, help="Refresh every second, with an ETA, while the job runs.")
@home_option
@pass_home
def status(home: Home, name: str | None, folder: Path | None, as_json: bool, watch: bool) -> None:
    """One job in detail, with a progress bar."""
    folder = jobs_cli.folder_of(home, name, folder)
    if watch:
        jobs_cli.watch_status(home, folder)
    else:
        jobs_cli.show_status(home, folder, as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine output: [{file, why, rejected}], oldest first.")
@home_option
@pass_home
def rejected(home: Home, as_json: bool) -> None:
    """The job files the home turned down, each with why (the whole of it in rejected/FILE.error).

    \b
    Example:  traind rejected"""
    jobs_cli.show_rejected(home, as_json)


def _steering(action: str, doc: str):
    @name_argument
    @dir_option
    @home_option
    @pass_home
    def command(home: Home, name: str | None, folder: Path | None) -> None:
        try:
            job = jobs_cli.folder_of(home, name, folder)
        except NoSuchJob:
            from traind.daemon.sweeps import sweep_names

            if folder is not None or name not in sweep_names(home):
                raise
            from traind.daemon.sweep_cli import steer  # a sweep: its trials follow it

            click.echo(steer(home, name, action))
            return
        click.echo(jobs_cli.steer(home, job, action))

    command.__doc__ = doc
    return cli.command(name=action)(command)


_steering("pause", "Save at the next step boundary and stop, freeing the device.\n\n"
          "A sweep's name: no new trial is asked for, and its trials pause.")
_steering("resume", "Queue a paused (or failed, or cancelled) job again, continuing from its newest save.\n\n"
          "A paused sweep's name: it goes on, with the trials its pause paused.")
_steering("cancel", "Stop the job; its saves stay.\n\nA sweep's name: it ends, and its trials are cancelled.")


@cli.command(name="save")
@name_argument
@dir_option
@click.option("--note", help="Kept with the save.")
@home_option
@pass_home
def save_command(home: Home, name: str | None, folder: Path | None, note: str | None) -> None:
    """Quicksave: a manual save at the next step boundary, never rotated out."""
    click.echo(jobs_cli.steer(home, jobs_cli.folder_of(home, name, folder), "save", note))


@cli.command()
@name_argument
@dir_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the job runs.")
@click.option("-n", "--lines", type=click.IntRange(min=0), help="Only the last N lines (then follow, with -f).")
@home_option
@pass_home
def logs(home: Home, name: str | None, folder: Path | None, follow: bool, lines: int | None) -> None:
    """The job's log: epochs, saves, resumes, rollbacks, errors.

    \b
    Example:  traind logs mlp -n 20 -f"""
    jobs_cli.logs(jobs_cli.folder_of(home, name, folder), follow, lines)


@cli.command()
@name_argument
@dir_option
@click.option("--keep-saves", is_flag=True, help="Keep its saves (moved to HOME/kept/NAME).")
@click.option("--force", is_flag=True, help="Delete its manual saves too, without asking.")
@home_option
@pass_home
def rm(home: Home, name: str | None, folder: Path | None, keep_saves: bool, force: bool) -> None:
    """Forget a job that is not running."""
    click.echo(jobs_cli.remove(home, jobs_cli.folder_of(home, name, folder), keep_saves, force))


@cli.command()
@name_argument
@dir_option
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="The PNG to write (default NAME.png).")
@home_option
@pass_home
def plot(home: Home, name: str | None, folder: Path | None, out: Path | None) -> None:
    """Loss and metric curves as a PNG."""
    from traind.daemon.plot import plot as draw

    folder = job_folder(home, name, folder)
    click.echo(f"wrote {draw(folder, out or Path(f'{folder.name}.png'), folder.name)}")


@cli.command(name="systemd-unit")
@click.option("--user", is_flag=True, help="The unit for `systemctl --user` (the default home).")
@click.option("--home", "sub_home", type=click.Path(file_okay=False, path_type=Path), help=HOME_HELP)
@click.pass_context
def systemd_unit(ctx: click.Context, user: bool, sub_home: Path | None) -> None:
    """Print a systemd unit whose ExecStart is this installation of traind; with --home
    (or TRAIND_HOME), one that serves that home.

    \b
    Example:  traind systemd-unit --user > ~/.config/systemd/user/traind.service"""
    script = Path(sys.executable).parent / "traind"
    exe = str(script) if script.exists() else f"{sys.executable} -m traind.daemon.cli"
    home = sub_home or ctx.parent.params.get("home") or os.environ.get("TRAIND_HOME") or None
    click.echo(units.unit(user=user, exe=exe, home=str(Path(home).resolve()) if home else None), nl=False)


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine output: {name, objective, direction, trials, best}.")
@click.option("--trial", "number", type=click.IntRange(min=0), help="One trial, by its number (with --spec).")
@click.option("--spec", "show_spec", is_flag=True, help="With --trial: that trial's full job file.")
@click.option("--plot", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the optimisation history and the parameters' importances into this PNG.")
@home_option
@pass_home
def sweep(home: Home, name: str, as_json: bool, number: int | None, show_spec: bool, out: Path | None) -> None:
    """A sweep's trials: number, job, state, objective, epochs, values; the best marked *.

    \b
    Example:  traind sweep lr-search
              traind sweep lr-search --trial 3 --spec"""
    from traind.daemon import sweep_cli

    if show_spec != (number is not None):
        raise click.UsageError("give --trial N and --spec together")
    if show_spec:
        click.echo(sweep_cli.trial_spec_text(home, name, number), nl=False)
        return
    if out is not None:
        click.echo(f"wrote {sweep_cli.plot(home, name, out)}")
        return
    sweep_cli.show(home, name, as_json)


@cli.command()
@home_option
def schema() -> None:
    """Print the JSON Schema of job files."""
    from traind.jobs.spec import JobSpec

    click.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


# One example per command, shown at the end of its --help (those that have their own keep it).
EXAMPLES = {
    "run": "traind run examples/mlp.toml --dir runs/mlp",
    "saves": "traind saves mlp --verify",
    "export": "traind export mlp --best -o mlp.safetensors",
    "load": "traind load mlp 000012-s240",
    "daemon": "traind daemon --workers 2",
    "status": "traind status mlp --watch",
    "pause": "traind pause mlp",
    "resume": "traind resume mlp",
    "cancel": "traind cancel mlp",
    "save": "traind save mlp --note 'before the lr change'",
    "rm": "traind rm mlp --keep-saves",
    "plot": "traind plot mlp -o mlp.png",
    "schema": "traind schema > traind-job.schema.json",
}
for _name, _example in EXAMPLES.items():
    _command = cli.commands[_name]
    _command.help = (_command.help or "").rstrip() + f"\n\n\b\nExample:  {_example}"


def main() -> None:
    if "SLURM_JOB_ID" in os.environ:  # `traind run` in a Slurm job: the cluster's warning saves, never kills
        from traind.daemon import preempt

        preempt.catch()
    try:
        try:
            cli(prog_name="traind")
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a traceback
            click.echo("interrupted", err=True)
            sys.exit(130)
    except SystemExit as e:
        from traind.jobs import world

        if world.joined():  # one rank of several under torchrun or srun: end as world.end_rank says
            if isinstance(e.code, str):
                click.echo(e.code, err=True)
            world.end_rank(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise


if __name__ == "__main__":
    main()
