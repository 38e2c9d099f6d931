"""The processes a run trains in, and the one decision a run takes at each step boundary.

A `Decision` says what happens at a boundary: which save kinds are due (steps, epochs,
minutes, a quicksave), and whether the run stops, at once or after a save. It is taken
once per boundary, from the requests, the stop signals and the save policy, and then
acted on; with several processes (ranks) it is first *agreed*, so that every rank saves
or stops at the same step (a rank that stopped alone would hang the others in their next
collective).

`World` is who trains: rank, size, local rank. The single-process world (the default)
agrees with itself, costs nothing per step, and imports nothing of torch.distributed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from traind.store.retention import KINDS

STOPS = (None, "after_save", "now")
"""A boundary's ways to stop, weakest first: agreeing takes the strongest any rank wants."""


@dataclass
class Decision:
    """What the run does at one step boundary."""

    kinds: set[str] = field(default_factory=set)
    """Save kinds due here (retention.KINDS); empty: no save."""
    stop: str | None = None
    """None: go on; "after_save": save (an autosave if nothing else is due), then stop; "now": stop without saving."""
    note: str | None = None
    """The quicksave's note, if a quicksave is due."""
    request: str | None = None
    """The quicksave request's file name, kept in the save's manifest (exactly once across crashes)."""
    after: Callable[[], None] | None = None
    """Run once the save is committed (removes the quicksave's request). The main rank's only."""

    def stop_at(self, how: str | None) -> None:
        """Stop HOW, unless a stronger stop is already decided."""
        if STOPS.index(how) > STOPS.index(self.stop):
            self.stop = how

    def joined(self, other: Decision) -> Decision:
        """This decision and OTHER at once: both's saves, the stronger stop, this one's
        quicksave (OTHER's, if this has none)."""
        ask = self if self.request is not None else other
        joined = Decision(self.kinds | other.kinds, self.stop, ask.note, ask.request, ask.after)
        joined.stop_at(other.stop)
        return joined


@dataclass(frozen=True)
class World:
    """One process training alone: rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that reads requests and writes the job's files (saves, log, metrics)."""
        return self.rank == 0

    def agree(self, decision: Decision) -> Decision:
        """DECISION as every rank will act on it; alone, it is already agreed."""
        return decision

    def sum(self, values: list[float]) -> list[float]:
        """VALUES summed over every rank, elementwise."""
        return values

    def sum_tensor(self, values) -> None:
        """Sum the tensor VALUES over every rank, in place (on the device it is on)."""

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's VALUE, in rank order, on the main rank (None on the others)."""
        return [value]

    def share(self, value: Any) -> Any:
        """The main rank's VALUE, on every rank."""
        return value

    def close(self) -> None:
        """Leave the world (the process group), once the run ended cleanly."""


@dataclass(frozen=True)
class Ranks(World):
    """One rank of several, joined through torch.distributed (a process group that
    torchrun's environment describes). Each boundary costs one all-reduce of a few ints."""

    backend: str = "gloo"

    def agree(self, decision: Decision) -> Decision:
        """The main rank's save kinds (it alone reads the requests and the save policy's
        clock and list), and the strongest stop any rank wants (a signal may reach one)."""
        import torch
        import torch.distributed as dist

        wanted = [STOPS.index(decision.stop), *(int(k in decision.kinds) for k in KINDS)]
        flags = torch.tensor(wanted if self.is_main else [wanted[0], *[0] * len(KINDS)], dtype=torch.int32,
                             device=self._device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        decision.stop = STOPS[int(flags[0])]
        decision.kinds = {k for k, on in zip(KINDS, flags[1:].tolist()) if on}
        return decision

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return total.tolist()

    def sum_tensor(self, values) -> None:
        import torch.distributed as dist

        dist.all_reduce(values)

    def _device(self):
        """Where this backend's collectives take their tensors: nccl's on this rank's GPU."""
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def gather(self, value: Any) -> list[Any] | None:
        import torch.distributed as dist

        found = [None] * self.size if self.is_main else None
        dist.gather_object(value, found, dst=0)
        return found

    def share(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """After a clean end only: every rank waits for the others before the group goes
        (a rank that tears it down while another still uses it aborts in gloo's threads).
        After a failure the launcher ends the others; a barrier would wait for the dead."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def ranks_in_environment() -> int:
    """The world size the environment describes (1 without torchrun's variables)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_in_environment() -> bool:
    """Whether this process is the main rank, or alone (before joining any group)."""
    return int(os.environ.get("RANK", "0")) == 0


def from_environment(backend: str = "auto", cuda: bool = False) -> World:
    """The world torchrun (or srun, or traind's own launch) describes in the environment:
    RANK, WORLD_SIZE and LOCAL_RANK (MASTER_ADDR and MASTER_PORT for the rendezvous); one
    process alone without them. Joins the process group: BACKEND "auto" is nccl on CUDA
    (CUDA: the job trains on a GPU), gloo otherwise."""
    size = ranks_in_environment()
    if size <= 1:
        return World()
    import torch.distributed as dist

    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size)
    global _joined
    _joined = True
    return Ranks(rank, size, local, backend)


_joined = False
"""Whether this process joined a process group (it is, or was, one rank of several)."""


def joined() -> bool:
    return _joined


def end_rank(code: int) -> NoReturn:
    """End a rank's process with CODE now that its run has ended and its files are durable
    (every save commits with fsync; the records closed): logs and streams flushed, then
    `os._exit`, past the interpreter's teardown. There gloo's threads can still be torn
    down with the process group that DDP's reducer kept (destroy_process_group drops only
    c10d's own references), and a joinable thread destroyed aborts the process
    (std::terminate, SIGABRT: "terminate called without an active exception") after a
    clean run, which the launcher rightly reads as a failed rank."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say there
            pass
    os._exit(code)
