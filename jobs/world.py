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

from collections.abc import Callable
from dataclasses import dataclass, field

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

    def stop_at(self, how: str) -> None:
        """Stop HOW, unless a stronger stop is already decided."""
        if STOPS.index(how) > STOPS.index(self.stop):
            self.stop = how


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
