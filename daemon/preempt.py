"""The warning a cluster gives before it takes a job's machine away (preemption, a time
limit): Slurm sends it as `--signal=B:USR2@GRACE` asks. USR2 by default, not USR1: NCCL
has swallowed USR1 (NVIDIA/nccl#704); TRAIND_WARN_SIGNAL names another.

A signal's default action ends the process, and a warning that arrives while torch is
still being imported would kill the job unsaved; so `catch` is called first thing, with
only the standard library imported. The run's own signal handling (daemon/run.py's
stop_on_signals) then takes the warning as a stop: save at the next step boundary, then
end, after which `requeue_self` puts the Slurm job back in the queue (a job that ends by
itself is not requeued by Slurm, even after a preemption warning: measured) and it
resumes from that save.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

SIGNAL_ENV = "TRAIND_WARN_SIGNAL"

warned = threading.Event()
"""Set once the warning came (before the run was ready for it, or during it)."""
_caught: int | None = None


def warning_signal() -> int:
    name = os.environ.get(SIGNAL_ENV, "USR2").upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


_forward: tuple[int, int] | None = None
_forwarded = False


def catch() -> None:
    """From now on the warning signal sets `warned` rather than ending the process (and,
    where `forward_as` or `forward_to` asked, passes it on, once)."""
    global _caught
    _caught = warning_signal()

    def on_warning(signum, frame):
        warned.set()
        pass_on()

    signal.signal(_caught, on_warning)


def forward_as(sig: int) -> None:
    """Take the warning as SIG from now on (a launcher of ranks: SIGTERM, which torch's
    agent passes on to them, and on which each saves and stops). A warning that came
    before is the caller's to act on (`warned`): sent now, SIG could meet its default
    action before the agent's handler is in place."""
    forward_to(os.getpid(), sig)


def forward_to(pid: int, sig: int) -> None:
    """Pass the warning on to process PID as SIG from now on (once, however many come)."""
    global _forward
    _forward = (pid, sig)


def pass_on() -> None:
    """Send the signal that forward_to asked for, unless it was sent already."""
    global _forwarded
    if _forward is not None and not _forwarded:
        _forwarded = True
        os.kill(*_forward)


def caught() -> int | None:
    """The warning signal, where this process catches it (a Slurm job's worker, `traind
    run` under Slurm), else None."""
    return _caught


def requeue_self() -> str | None:
    """Put this process's Slurm job back in the queue (`scontrol requeue`); Slurm then ends
    the job's processes (SIGTERM) and starts its batch script again. None where it worked,
    else why not (outside Slurm, or a job submitted without --requeue)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job (no SLURM_JOB_ID)"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's own SIGTERM: the run has ended already
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job}: {e}"
    return None if done.returncode == 0 else f"scontrol requeue {job}: {done.stderr.strip() or done.returncode}"
