"""The daemon's Slurm executor (`traind daemon --executor slurm`): each job the daemon
starts becomes one sbatch job, which Slurm queues, places, preempts and requeues; traind
keeps what Slurm does not do (exact resume from verified saves, rollback, the restart
policy). The job folder stays the truth, so the home must be on storage every node sees.

Submission: the batch script (`slurm.sh` in the job folder) `exec`s the job's worker
(daemon/slurm_job.py), so that Slurm's signals reach it; `--requeue`, and
`--signal=B:USR2@GRACE`: the warning before preemption or the time limit, on which the
worker saves at its next step boundary and requeues its Slurm job itself (one that ends
by itself would not be requeued: measured), and the requeued job resumes from that save.
The job's output goes to its `worker.out`, whatever node it ran on. A job of several
nodes is one Slurm job of that many, its worker on the first running srun, which starts
torch's elastic agent on each node (daemon/slurm_nodes.py).

State: read from `squeue` (every POLL seconds, one call for every job this daemon
watches) and, once a job has left it, `scontrol show job`; not `sacct` (many small
clusters run without accounting). How the worker ended comes from the `ending.json` it
wrote; where it wrote none (killed, its node gone), from what Slurm says. A job's id is
kept in `slurm.json`, written after sbatch answered; a daemon that died between the two
finds the job by its name and comment (the home) in `squeue`, so nothing is submitted
twice. Slurm jobs outlive the daemon: a daemon started again watches them again, and
leaves alone every Slurm job it does not know.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from traind.jobs.folder import ENDING_FILE, SLURM_RECORD, SLURM_SCRIPT, WORKER_ERROR, WORKER_OUT
from traind.store.errors import TraindError
from traind.store.fs import FileSystem, write_durably

if TYPE_CHECKING:
    from traind.daemon.executor import Need

log = logging.getLogger("traind.daemon")

POLL = 1.0
"""Seconds between looks at squeue."""
NICE_BASE = 10000
"""A job's Slurm nice is NICE_BASE minus its traind priority (at least 0): higher runs first."""
SLURM_HOME = "slurm.home"
"""In a home a Slurm executor served: `traind ls` then looks for its jobs' Slurm jobs (one
file to look at, not a slurm.json per job of 10,000)."""
COMMENT = "traind home "
"""The start of every Slurm job's comment, then the home: how a daemon knows its own jobs."""
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
"""Slurm job states of a job still under way (pending again after a requeue, too)."""
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs", "vfat", "ramfs"}


class SlurmError(TraindError):
    """A Slurm command failed; its own words, and what to check."""


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: install Slurm's client commands (slurm-client), or run the daemon "
                         "without --executor slurm") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv[:2])}: no answer in {timeout:.0f} s (is slurmctld up? `sinfo` tells)") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(argv[:2])}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as KEY=VALUE pairs; {} once slurmctld has forgotten it."""
    try:
        text = _run(["scontrol", "show", "job", "-o", job_id])
    except SlurmError:
        return {}
    return dict(pair.split("=", 1) for pair in text.split() if "=" in pair)


@dataclass
class SlurmConfig:
    """How jobs are submitted: `traind daemon --executor slurm` flags."""

    partition: str | None = None
    account: str | None = None
    options: list[str] = field(default_factory=list)
    """More sbatch options, as given (`--sbatch-option=--qos=high`)."""
    grace: int = 120
    """Seconds of warning before a preemption or the time limit: the signal comes that early."""
    warn_signal: str = "USR2"
    cpus_per_process: int = 1
    gpus_per_process: int = 0
    max_jobs: int = 64
    """Slurm jobs this daemon has in the queue or running at once."""
    shared_home: bool = False
    """The home is on storage every node sees, although its file system looks like this
    machine's own (a bind mount of shared storage; nodes that run on this machine)."""


CONFIG_FILE = "config.toml"
"""The home's config file: its [slurm] table holds defaults for the daemon's Slurm flags."""


def read_config(home_root: Path, flags: dict) -> SlurmConfig:
    """The Slurm options: FLAGS (those given on the command line: field name -> value)
    over the [slurm] table of HOME_ROOT/config.toml, over the defaults. A key the table
    should not have, or a value of the wrong type, is an error naming the file and key."""
    import dataclasses

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    path = home_root / CONFIG_FILE
    table: dict = {}
    if path.exists():
        try:
            table = tomllib.loads(path.read_text()).get("slurm", {})
        except (OSError, ValueError) as e:
            raise SlurmError(f"{path}: {e}") from e
    known = {f.name: f for f in dataclasses.fields(SlurmConfig)}
    defaults = SlurmConfig()
    for key, value in table.items():
        if key not in known:
            from traind.jobs.names import suggest

            raise SlurmError(f"{path}: unknown key '{key}' in [slurm]{suggest(key, known)}; the keys are "
                             f"{', '.join(known)}")
        want = type(getattr(defaults, key)) if getattr(defaults, key) is not None else str
        if want is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok or (want is int and value < (0 if key == "gpus_per_process" else 1)):
            kind = "a list of strings" if want is list else {int: "a positive whole number", str: "a string",
                                                                bool: "true or false"}[want]
            raise SlurmError(f"{path}: [slurm] {key} = {value!r}: it must be {kind}")
    config = SlurmConfig(**{**table, **flags})
    config.warn_signal = config.warn_signal.upper().removeprefix("SIG")
    return config


class SlurmJob:
    """A job's worker as a Slurm job: a Handle (executor.Handle) whose poll tells, once the
    Slurm job is over, how the worker ended (worker.Exit, or minus a signal)."""

    def __init__(self, executor: SlurmExecutor, job_id: str, folder: Path):
        self.executor, self.job_id, self.folder = executor, job_id, folder
        self.pid = int(job_id)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            state = self.executor.state(self.job_id)
            if state is not None and (state == "" or state not in ACTIVE):
                self.returncode = self._ending(state)
        return self.returncode

    def _ending(self, state: str) -> int | None:
        """How it ended: the worker's own word where it left one for this run of the job;
        else what Slurm still says of it. None where scontrol says it goes on after all."""
        from traind.daemon.worker import Exit

        shown = scontrol_job(self.job_id)
        state = shown.get("JobState", state)
        if state in ACTIVE:
            return None
        restarts = int(shown["Restarts"]) if shown.get("Restarts", "").isdigit() else None
        try:
            record = json.loads((self.folder / ENDING_FILE).read_text())
            if record.get("job_id") != self.job_id or (restarts is not None and record.get("restart") != restarts):
                record = None
        except (OSError, ValueError):
            record = None
        code = None if record is None else int(record["code"])
        if code == Exit.REQUEUED:  # it asked to be requeued, and yet the Slurm job is over (cancelled since): stopped
            code = Exit.STOPPED
        if state == "CANCELLED" and code not in (Exit.DONE, Exit.PAUSED, Exit.CANCELLED, Exit.BAD_JOB, Exit.FAILED):
            return self._died(signal.SIGTERM, f"its Slurm job {self.job_id} was cancelled outside traind (scancel)")
        if code is not None:
            return code
        if state == "OUT_OF_MEMORY":
            self._why(f"Slurm job {self.job_id} went over its memory")
            return Exit.OUT_OF_MEMORY
        if state == "NODE_FAIL":
            return self._died(signal.SIGKILL, f"the node of Slurm job {self.job_id} failed")
        if state in ("TIMEOUT", "DEADLINE"):
            return self._died(signal.SIGKILL, f"Slurm job {self.job_id} reached its time limit unsaved")
        exit_code = shown.get("ExitCode", "")
        status, _, sig = exit_code.partition(":")
        if sig.isdigit() and int(sig):
            return self._died(signal.Signals(int(sig)), f"Slurm job {self.job_id}, state {state}")
        if status.isdigit() and shown:
            return int(status)
        return self._died(signal.SIGKILL, f"Slurm job {self.job_id} ended, and no word of how reached traind "
                                          f"(Slurm state {state or 'forgotten'})")

    def _why(self, text: str) -> None:
        try:
            write_durably(FileSystem(), self.folder / WORKER_ERROR, text.encode())
        except OSError:
            pass

    def _died(self, sig: int, why: str) -> int:
        self._why(why)
        return -int(sig)

    def withdraw(self, code: int) -> None:
        """End the Slurm job before its worker started (a pause or cancel of a pending job):
        it ends as CODE (worker.Exit)."""
        self.executor.cancel(self.job_id, signal.SIGKILL)
        self.returncode = code

    def send_signal(self, sig: int) -> None:
        self.executor.cancel(self.job_id, sig)

    def kill(self) -> None:
        self.executor.cancel(self.job_id, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"Slurm job {self.job_id}", timeout)
            time.sleep(POLL)
            self.executor.states_at = 0.0
        return self.returncode


class SlurmExecutor:
    """Jobs as sbatch jobs on the cluster that SLURM_CONF (or the machine's slurm.conf)
    describes. Slots: at most config.max_jobs Slurm jobs of this daemon at once; each job
    takes one, whatever its size (Slurm places its processes and nodes)."""

    outlives_daemon = True

    def __init__(self, config: SlurmConfig | None = None, python: str = sys.executable):
        self.config = config or SlurmConfig()
        self.python = python
        self.slots = [f"slurm{i}" for i in range(self.config.max_jobs)]
        self.watched: set[str] = set()
        self._states: dict[str, str] | None = None
        self._asked: set[str] = set()
        self.states_at = 0.0
        self.home_root: Path | None = None

    def prepare(self, home_root: Path) -> None:
        """Refuse a home that the other nodes of the partition cannot see, where that can be
        told: a partition of several nodes, and the home on a file system that looks local
        to this machine (unless config.shared_home says it is shared all the same)."""
        self.home_root = home_root
        if not (home_root / SLURM_HOME).exists():
            write_durably(FileSystem(), home_root / SLURM_HOME, b"served by traind daemon --executor slurm\n")
        nodes = self.nodes()
        fstype = _fstype(home_root)
        if len(nodes) > 1 and fstype in LOCAL_FILESYSTEMS and not self.config.shared_home:
            where = f"partition {self.config.partition}" if self.config.partition else "the default partition"
            raise SlurmError(f"{home_root} is on {fstype}, a file system of this machine only, and {where} has "
                             f"{len(nodes)} nodes: put the home on storage every node mounts (NFS, Lustre...), "
                             "as job folders are read and written where each job runs; if it is shared all the "
                             "same (a bind mount of shared storage), say so with --shared-home")

    def nodes(self) -> set[str]:
        """The nodes of the partition jobs go to (the cluster's default one, where none is set)."""
        if self.config.partition:
            return {n for n in _run(["sinfo", "-h", "-N", "-p", self.config.partition, "-o", "%N"]).split() if n}
        found: set[str] = set()
        for line in _run(["sinfo", "-h", "-N", "-o", "%N %P"]).splitlines():
            node, _, partition = line.partition(" ")
            if partition.strip().endswith("*"):
                found.add(node)
        return found

    def need(self, spec: dict) -> Need:
        from traind.daemon.executor import Need

        return Need(1)

    def unfit(self, spec: dict) -> str | None:
        """Slurm itself judges the resources, at submission (sbatch's words go to the job's
        last_error): nothing is refused here."""
        return None

    def describe(self, handle: SlurmJob) -> str:
        return f"Slurm job {handle.job_id}"

    def tend(self) -> None:
        pass  # it keeps nothing running between its jobs

    def close(self) -> None:
        pass  # its Slurm jobs go on; the next daemon finds them

    def steer(self, handle: SlurmJob, folder: Path) -> None:
        """A pause or cancel of a job whose Slurm job waits in the queue (not started yet,
        or requeued and waiting to start again) ends it now: its worker would take the
        request only once Slurm starts it, hours later on a busy cluster."""
        if handle.returncode is not None or self.state(handle.job_id) != "PENDING":
            return
        from traind.daemon import requests
        from traind.daemon.worker import Exit

        for request in requests.pending(folder):
            if request.kind in ("pause", "cancel"):
                try:
                    handle.withdraw(Exit.PAUSED if request.kind == "pause" else Exit.CANCELLED)
                except SlurmError as e:
                    log.warning("%s: %s (the request waits for the job to start)", folder.name, e)
                    return
                requests.done(request)
                log.info("%s: %s while its Slurm job %s was pending: taken out of Slurm's queue", folder.name,
                         request.kind, handle.job_id)
                return

    def state(self, job_id: str) -> str | None:
        """The Slurm state of JOB_ID ("" once squeue no longer lists it), as of a look at
        squeue at most POLL seconds ago that asked for it; None when squeue does not answer
        (the job is taken to go on)."""
        now = time.monotonic()
        if self._states is None or now - self.states_at >= POLL or job_id not in self._asked:
            self.states_at = now
            self._asked = self.watched | {job_id}
            try:
                out = _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(sorted(self._asked))}",
                            "--format=%i|%T"])
                self._states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
            except SlurmError as e:
                if "Invalid job id" in str(e):  # every one of them is gone from slurmctld's memory
                    self._states = {}
                else:
                    log.warning("squeue: %s; the Slurm jobs are taken to go on", e)
                    self._states = None
                    return None
        return self._states.get(job_id, "")

    def start(self, home_root: Path, name: str, folder: Path, slots: list[str]) -> SlurmJob:
        spec = json.loads((folder / "spec.json").read_text())
        ranks = spec.get("distributed", {})
        processes, nodes = int(ranks.get("processes", 1)), int(ranks.get("nodes", 1))
        fs = FileSystem()
        script = folder / SLURM_SCRIPT
        write_durably(fs, script, (
            "#!/bin/sh\n"
            f"# The Slurm batch script of traind job {name} (traind daemon --executor slurm writes it).\n"
            f"exec {shlex.quote(self.python)} -m traind.daemon.slurm_job --home {shlex.quote(str(home_root))} "
            f"{shlex.quote(name)}\n").encode())
        for stale in (SLURM_RECORD, ENDING_FILE):  # a crash after sbatch finds the new job by name, never an old one
            (folder / stale).unlink(missing_ok=True)
        fs.fsync_dir(folder)
        c = self.config
        cpus = c.cpus_per_process * processes
        argv = ["sbatch", "--parsable", "--requeue", f"--signal=B:{c.warn_signal}@{c.grace}",
                f"--job-name=traind.{name}", f"--comment={COMMENT}{home_root}", f"--output={folder / WORKER_OUT}",
                "--open-mode=append", f"--chdir={folder}", f"--nodes={nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={cpus}", f"--nice={max(0, NICE_BASE - int(spec.get('priority', 0)))}"]
        argv += [f"--partition={c.partition}"] if c.partition else []
        argv += [f"--account={c.account}"] if c.account else []
        argv += [f"--gpus-per-node={c.gpus_per_process * processes}"] if c.gpus_per_process else []
        argv += [*c.options, str(script)]
        env = dict(os.environ, TRAIND_THREADS=str(cpus), TRAIND_WARN_SIGNAL=c.warn_signal)
        job_id = _run(argv, env=env).strip().split(";")[0]
        write_durably(fs, folder / SLURM_RECORD, json.dumps({"job_id": job_id, "submitted": time.time(),
                                                             "argv": argv}).encode())
        self.watched.add(job_id)
        return SlurmJob(self, job_id, folder)

    def reattach(self, name: str, folder: Path) -> SlurmJob | None:
        try:
            job_id = str(json.loads((folder / SLURM_RECORD).read_text())["job_id"])
        except (OSError, ValueError, KeyError, TypeError):
            job_id = self._find(name)
        if job_id is None:
            return None
        self.watched.add(job_id)
        return SlurmJob(self, job_id, folder)

    def _find(self, name: str) -> str | None:
        """The Slurm job of this home named for job NAME, submitted by a daemon that died
        before it wrote slurm.json."""
        try:
            out = _run(["squeue", "--noheader", f"--name=traind.{name}", "--format=%i|%k"])
        except SlurmError as e:
            log.warning("squeue: %s", e)
            return None
        mine = [line.split("|", 1)[0] for line in out.splitlines()
                if line.partition("|")[2] == f"{COMMENT}{self.home_root}"]
        return mine[0] if mine else None

    def cancel(self, job_id: str, sig: int = signal.SIGTERM) -> None:
        """End the Slurm job: SIG to its batch script's process (the worker saves on SIGTERM)."""
        _run(["scancel", f"--signal={signal.Signals(sig).name.removeprefix('SIG')}", "--batch", job_id]
             if sig != signal.SIGKILL else ["scancel", job_id])


def slurm_status(folder: Path) -> dict | None:
    """The Slurm job of the job in FOLDER, for `traind status`: its id, and its state, node
    and reason as squeue tells them now ("" where it no longer lists it); None for a job
    never submitted to Slurm."""
    try:
        job_id = str(json.loads((folder / SLURM_RECORD).read_text())["job_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found = {"job_id": job_id, "state": "", "node": "", "reason": ""}
    try:
        out = _run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T|%N|%r"], timeout=10)
    except SlurmError:
        return found
    for line in out.splitlines():
        state, node, reason = (line.split("|") + ["", ""])[:3]
        found.update(state=state, node=node, reason=reason)
    return found


def slurm_states(folders: dict[str, Path]) -> dict[str, dict]:
    """For `traind ls`: the Slurm job of each job in FOLDERS (name -> folder) that has one,
    as slurm_status tells it, from one squeue call for them all."""
    ids: dict[str, str] = {}
    for name, folder in folders.items():
        try:
            ids[name] = str(json.loads((folder / SLURM_RECORD).read_text())["job_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not ids:
        return {}
    shown: dict[str, list[str]] = {}
    try:
        out = _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(sorted(set(ids.values())))}",
                    "--format=%i|%T|%N|%r"], timeout=10)
        shown = {parts[0]: parts[1:] for parts in (line.split("|") for line in out.splitlines()) if len(parts) == 4}
    except SlurmError:
        pass  # Slurm does not answer, or has forgotten every one of them: the ids alone
    found = {}
    for name, job_id in ids.items():
        state, node, reason = shown.get(job_id, ["", "", ""])
        found[name] = {"job_id": job_id, "state": state, "node": node, "reason": reason}
    return found


def _fstype(path: Path) -> str:
    """The type of the file system PATH is on (the longest mount point above it)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1].replace("\\040", " ")
                if str(path.resolve()).startswith(mount.rstrip("/") + "/") or str(path.resolve()) == mount:
                    if len(mount) >= len(best):
                        best, kind = mount, parts[2]
    except OSError:
        pass
    return kind
