"""Starting a job's ranks: torch's elastic agent (torch.distributed.launcher, what torchrun
runs), in this process, with a c10d rendezvous on a free loopback port and no restarts
of its own (`max_restarts = 0`: the daemon's supervisor is the one restart policy;
torchrun's restarts are known to hang across agents, pytorch/pytorch#135712).

Each rank is `python -m traind.daemon.rank ...` (a process the agent starts). How the run
ended (the worker's exit statuses: done, paused, stopped, a full disk...) comes back in a
file the main rank writes, and every rank exits 0 once it ended cleanly: an exit status
of its own would read as a failure to the agent, which would then stop the other ranks
before they had ended. A rank that died (a signal) or exited otherwise is a failure of the
whole world; the agent then stops the others.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from traind.daemon import threads
from traind.store.errors import TraindError

OUTCOME = "TRAIND_OUTCOME"
"""Set for ranks that traind launched: the file the main rank writes its ending into."""
GRACE = 60
"""Seconds the ranks get to save and stop after a SIGTERM or SIGINT, before SIGKILL."""


class RanksFailed(TraindError):
    """A rank of the job died or failed."""

    def __init__(self, message: str, signal_number: int | None = None, code: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number
        """The signal a rank died of, where one did (the first, by rank)."""
        self.code = code
        """Otherwise the exit status of the first rank that failed (the main rank's ending, if it was that)."""


class LauncherStopped(TraindError):
    """The launcher got SIGTERM or SIGINT: the ranks were told to save and stop."""


@dataclass(frozen=True)
class Launch:
    processes: int
    """Ranks on this machine."""
    nodes: int = 1
    endpoint: str | None = None
    """HOST:PORT of the rendezvous for several nodes; one node alone takes a free loopback port."""
    run_id: str = ""
    """The rendezvous's name: the same on every machine of the job (one machine: a fresh one)."""
    outcome: Path | None = None
    """The file the main rank writes its ending into: one every machine sees, for a launch
    on several that waits for it (a Slurm job's); by default one of this launch's own."""


def launch(argv: list[str], how: Launch) -> int:
    """Run `python -m traind.daemon.rank ARGV...` in HOW.processes ranks and return how the
    main rank's run ended; RanksFailed when a rank died or failed, LauncherStopped when
    this process was told to stop before the main rank told its ending."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[threads.ENV] = str(threads.per_rank(how.processes))  # this launcher's cores, shared by its ranks
    with tempfile.TemporaryDirectory(prefix="traind-ranks-") as scratch:  # the agent's files and the ending
        outcome = how.outcome or Path(scratch) / "outcome"
        os.environ[OUTCOME] = str(outcome)
        config = LaunchConfig(min_nodes=how.nodes, max_nodes=how.nodes, nproc_per_node=how.processes,
                              run_id=how.run_id or uuid.uuid4().hex, rdzv_backend="c10d",
                              rdzv_endpoint=how.endpoint or "127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                              start_method="spawn", shutdown_timeout=GRACE,
                              logs_specs=DefaultLogsSpecs(str(Path(scratch) / "agent")))
        try:
            elastic_launch(config, sys.executable)("-m", "traind.daemon.rank", *argv)
        except ChildFailedError as e:
            raise _failure(e, int(outcome.read_text()) if outcome.exists() else None) from e
        except Exception as e:
            stop = _raised_during(e, SignalException)
            if stop is None:
                raise
            if outcome.exists():  # the main rank saved and ended in time
                return int(outcome.read_text())
            raise LauncherStopped(f"stopped by {signal.Signals(stop.sigval).name}") from e
        if not outcome.exists():  # a main rank on another machine tells its own launcher
            return 0
        return int(outcome.read_text())


def _raised_during(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    """E, or the exception of KIND that E was raised while handling. The agent's SIGTERM
    handler raises SignalException wherever the agent's thread is; where that is the first
    line of one of torch's metrics wrappers (`start = time.time()`), the wrapper's `finally`
    raises UnboundLocalError over it (torch 2.13). The agent has stopped its ranks all the
    same (`run`'s `finally`): the signal is what ended the launch."""
    seen: set[int] = set()
    found: BaseException | None = e
    while found is not None and id(found) not in seen:
        if isinstance(found, kind):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def _failure(e, told: int | None) -> RanksFailed:
    """What the agent's failure report E means: a rank killed by a signal is a crash of the
    job; else the rank that failed first (a rank beside it may fail for want of it: a
    closed connection) says how, the main rank by the ending it TOLD."""
    failures = sorted(e.failures.items())
    # the agent ends the other ranks with SIGTERM once one failed: a death by another signal came first
    died = sorted(((rank, f) for rank, f in failures if f.exitcode < 0),
                  key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]))
    if died:
        rank, f = died[0]
        return RanksFailed(f"rank {rank} (pid {f.pid}) was killed by {signal.Signals(-f.exitcode).name}",
                           -f.exitcode)
    rank, f = min(failures, key=lambda item: (item[1].timestamp, item[0]))
    code = told if rank == 0 and told is not None else f.exitcode
    return RanksFailed(f"rank {rank} failed (exit {code}; see its output)", code=code)


def tell(code: int) -> None:
    """In the main rank of a launched job: how its run ended, for the launcher."""
    path = os.environ.get(OUTCOME)
    if path:
        Path(path).write_text(str(int(code)))
