"""When to save and what to keep: the whole checkpoint policy, as pure functions.

Kinds of save (one save may be several at once, and is stored once):
- auto: every N steps, epochs or minutes; the newest `keep_last` are kept;
- best: a monitored metric among the top `keep_best` so far (from `best_after_epoch`);
- milestone: every `keep_every_epochs` epochs, kept for good;
- manual: asked for by a person, kept for good;
- final: the end of training, kept for good.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from traind.store.saves import SaveInfo

KINDS = ("auto", "best", "manual", "milestone", "final")
KEPT_FOR_GOOD = {"manual", "milestone", "final"}


@dataclass(frozen=True)
class Policy:
    every_steps: int = 0
    """Autosave every this many steps; 0 = off."""
    every_epochs: int = 1
    """Autosave every this many epochs; 0 = off."""
    every_minutes: float = 10.0
    """Autosave when this many minutes passed since the last save; 0 = off."""
    keep_last: int = 3
    """Autosaves kept."""
    keep_best: int = 1
    """Best saves kept."""
    monitor: str = "val_loss"
    """The metric ranking best saves."""
    mode: str = "min"
    """min or max: which way `monitor` is better."""
    best_after_epoch: int = 0
    """Best candidates before this epoch (counted from 1) are ignored."""
    keep_every_epochs: int = 0
    """Milestones every this many epochs; 0 = off."""

    def __post_init__(self):
        if self.keep_last < 1:
            raise ValueError("keep_last must be at least 1: the newest autosave is the one to resume from")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


def autosave_due(policy: Policy, step: int, seconds_since_save: float) -> bool:
    """Whether an autosave is due after STEP, by the step count or the clock."""
    return bool(policy.every_steps and step % policy.every_steps == 0) or \
        bool(policy.every_minutes and seconds_since_save >= policy.every_minutes * 60)


def due_at_step(policy: Policy, step: int, seconds_since_save: float) -> set[str]:
    """Kinds due after STEP inside an epoch."""
    return {"auto"} if autosave_due(policy, step, seconds_since_save) else set()


def due_at_epoch_end(policy: Policy, epochs_done: int, step: int, seconds_since_save: float,
                     metric: float | None, saves: Iterable[SaveInfo]) -> set[str]:
    """Kinds due once epoch EPOCHS_DONE (from 1) is finished and measured."""
    kinds = due_at_step(policy, step, seconds_since_save)
    if policy.every_epochs and epochs_done % policy.every_epochs == 0:
        kinds.add("auto")
    if policy.keep_every_epochs and epochs_done % policy.keep_every_epochs == 0:
        kinds.add("milestone")
    if _best_candidate(policy, epochs_done, metric, saves):
        kinds.add("best")
    return kinds


# "Best", defined once: retention, `traind export --best`, and the best value `ls` and
# `status` show all use these. A value counts only if it is a finite number measured at
# an epoch at or after `best_after_epoch`; one is better than another only strictly, so a
# tie goes to the older: it was best first.

def counts(policy: Policy, value, epoch: int) -> bool:
    """Whether VALUE of the monitored metric, measured after epoch EPOCH, may be a best."""
    return _finite(value) and epoch >= policy.best_after_epoch


def improves(policy: Policy, value, epoch: int, best: float | None) -> bool:
    """Whether VALUE (after epoch EPOCH) is the new best over BEST (None: none yet)."""
    return counts(policy, value, epoch) and (best is None or policy.better(value, best))


def ranked_bests(policy: Policy, saves: Iterable[SaveInfo]) -> list[SaveInfo]:
    """The best saves, best first; among equals, the older first."""
    bests = [s for s in saves if "best" in s.kinds and counts(policy, s.metrics.get(policy.monitor), s.epoch)]
    return sorted(bests, key=lambda s: (s.metrics[policy.monitor] * (1 if policy.mode == "min" else -1), s.seq))


def best_save(policy: Policy, saves: Iterable[SaveInfo]) -> SaveInfo | None:
    ranked = ranked_bests(policy, saves)
    return ranked[0] if ranked else None


def _best_candidate(policy: Policy, epochs_done: int, metric: float | None, saves: Iterable[SaveInfo]) -> bool:
    if policy.keep_best == 0 or not counts(policy, metric, epochs_done):
        return False
    ranked = ranked_bests(policy, saves)
    return len(ranked) < policy.keep_best or policy.better(metric, ranked[policy.keep_best - 1].metrics[policy.monitor])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def to_purge(policy: Policy, saves: list[SaveInfo], protect: Iterable[str] = ()) -> list[SaveInfo]:
    """The saves no kind keeps any more. Never the newest, never one in PROTECT (the save
    being resumed from), never a manual, milestone or final save."""
    if not saves:
        return []
    keep = set(protect) | {max(saves, key=lambda s: s.seq).id}
    keep |= {s.id for s in saves if KEPT_FOR_GOOD & set(s.kinds)}
    autos = sorted((s for s in saves if "auto" in s.kinds), key=lambda s: s.seq)
    keep |= {s.id for s in autos[-policy.keep_last:]}
    keep |= {s.id for s in ranked_bests(policy, saves)[:policy.keep_best]}
    return [s for s in saves if s.id not in keep]
