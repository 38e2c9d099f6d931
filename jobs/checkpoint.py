"""RPG saves for a Trainer: saves as the policy asks at step boundaries, resume from the
newest good save (or the one a "load game" request names, handed in by the run), and
roll back after a non-finite loss.

Training waits only for the copy of its state (the stall, recorded per save); the write
runs behind it, one at a time. A save is acknowledged (logged as "saved ID") only once
committed.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from traind.jobs import state
from traind.jobs.folder import SAVES
from traind.jobs.errors import NonFiniteLoss
from traind.jobs.metrics import Recorder
from traind.jobs.spec_train import CheckpointSpec
from traind.jobs.train import Trainer
from traind.jobs.world import Decision
from traind.store import retention
from traind.store.errors import CorruptSave, SaveFailed, StoreError
from traind.store.fs import FileSystem
from traind.store.saves import SaveInfo
from traind.store.snapshot import Snapshot, Writer
from traind.store.store import SaveStore


QUIET_SECONDS = 0.05
"""The longest a quiet boundary lets the loop step without asking it again (`Checkpointer.quiet`)."""


def policy_of(spec: CheckpointSpec) -> retention.Policy:
    return retention.Policy(spec.every_steps, spec.every_epochs, spec.every_minutes, spec.keep_last, spec.keep_best,
                            spec.monitor, spec.direction, spec.best_after_epoch, spec.keep_every_epochs)


class Checkpointer:
    """The saves of one run. PROTECT: the ids that retention must keep whatever its policy
    says, asked at every save (the run's: a save that a "load game" request names); the
    save resumed from is kept too.

    With several ranks (the trainer's world), the main rank alone decides which saves are
    due, picks the save to resume or roll back to, and writes; every rank's RNG state
    reaches each save, so a save is one that every rank reached."""

    def __init__(self, trainer: Trainer, folder: Path, recorder: Recorder, stop: threading.Event | None = None,
                 fs: FileSystem | None = None, protect: Callable[[], set[str]] = set):
        self.trainer, self.folder, self.recorder, self.stop = trainer, folder, recorder, stop
        self.protect, self.world = protect, trainer.world
        self.store = SaveStore(folder / SAVES, policy_of(trainer.spec.checkpoint), fs, reader=not self.world.is_main)
        self.snapshot, self.writer = Snapshot(), Writer()
        self.resumed_from: str | None = None
        self.last_save = time.monotonic()
        self.carried: Decision | None = None
        """A decision a non-finite loss interrupted, to act on after the rollback."""

    # -- saving ---------------------------------------------------------------------

    def boundary(self, trainer: Trainer) -> bool:
        """The loop's callback between steps, for a run with no requests and one process:
        save what is due; True stops the loop."""
        quiet = self.quiet(trainer)
        if quiet is not None:
            trainer.quiet_until(*quiet)
            return False
        return self.act(trainer, self.due(trainer, Decision()))

    def quiet(self, trainer: Trainer) -> tuple[int, float] | None:
        """None where something may be due at this boundary of one process; elsewhere (inside
        an epoch, no save due by the step count or the clock, no stop signalled, no decision
        carried: most steps' answer, taken without building a Decision) until when nothing
        can be, for `Trainer.quiet_until`: the step at which the next save falls due by count,
        and the moment the clock's does, or QUIET_SECONDS from now if sooner (a signal's
        stop waits at most that long). At a small model's step, the full question costs
        about 1% of it, and even this one shows (bench/loop.py's step_cost)."""
        p = trainer.progress
        if not 0 < p.batch < trainer.batches_per_epoch or self.carried is not None \
                or (self.stop is not None and self.stop.is_set()):
            return None
        policy, now = self.store.policy, time.monotonic()
        if retention.autosave_due(policy, p.step, now - self.last_save):
            return None
        step = (p.step // policy.every_steps + 1) * policy.every_steps if policy.every_steps else sys.maxsize
        moment = now + QUIET_SECONDS
        if policy.every_minutes:
            moment = min(moment, self.last_save + policy.every_minutes * 60)
        return step, moment

    def due(self, trainer: Trainer, decision: Decision, alike: bool = False) -> Decision:
        """DECISION with the save kinds the policy asks for here, and a stop after a save
        if a signal asked for one. ALIKE: only what every rank decides the same without a
        word (saves due by the step count, inside an epoch), for the boundaries where the
        ranks do not agree; the clock and the signals wait for the next that does."""
        p = trainer.progress
        if alike:
            if 0 < p.batch < trainer.batches_per_epoch:
                decision.kinds |= retention.due_at_step(self.store.policy, p.step, 0.0)
            return decision
        if self.stop is not None and self.stop.is_set():
            decision.stop_at("after_save")
        if not self.world.is_main:  # the main rank's policy decides, with its list of saves and its clock
            return decision
        policy = self.store.policy
        elapsed = time.monotonic() - self.last_save
        if p.batch == 0:  # an epoch just ended and was measured
            decision.kinds |= retention.due_at_epoch_end(policy, p.epoch, p.step, elapsed, p.last.get(policy.monitor),
                                                         self.store.saves())
            if trainer.finished():
                decision.kinds.add("final")
        elif p.batch < trainer.batches_per_epoch:  # (after the last batch, the epoch's end comes next)
            decision.kinds |= retention.due_at_step(policy, p.step, elapsed)
        return decision

    def act(self, trainer: Trainer, decision: Decision) -> bool:
        """Do what the (agreed) DECISION says; True stops the loop. A decision that met a
        non-finite loss before its save is carried over the rollback to the first boundary
        after it (a pause or a quicksave is not lost; the save is of healthy weights)."""
        if self.carried is not None:
            decision, self.carried = self.carried.joined(decision), None
        if decision.stop == "now":
            return True
        kinds = decision.kinds or ({"auto"} if decision.stop else set())
        blocking = bool(decision.stop) or "final" in kinds  # waited for at once: its save is written on this thread
        if kinds:
            try:
                trainer.look()  # the losses up to here are finite, or no save is made of these weights
            except NonFiniteLoss:
                self.carried = decision
                raise
            save_id = self.save(kinds, decision.note, decision.request, decision.after, here=blocking)
            if decision.request is not None and save_id is not None:
                self.recorder.say(f"quicksave {save_id} at step {trainer.progress.step}"
                                  + (f": {decision.note}" if decision.note else ""))
        if blocking:
            self.writer.wait()
        return decision.stop is not None

    def save(self, kinds: set[str], note: str | None = None, request: str | None = None,
             after: Callable[[], None] | None = None, here: bool = False) -> str | None:
        """Snapshot now, persist in the background (HERE: on this thread, when the caller
        waits for it next); return the save's id (None on a rank that does not write).
        REQUEST names what asked for it (kept in its manifest); AFTER runs once it is
        committed. Every rank calls it at the same boundary."""
        ranks_rng = self.world.gather(state.rng_state()) if self.world.size > 1 else None
        if not self.world.is_main:
            return None
        started = time.perf_counter()
        self.writer.wait()  # the previous save's buffers are about to be reused
        waited = time.perf_counter() - started
        p = self.trainer.progress
        if p.rollbacks and p.skip and [p.epoch, p.batch] > p.skip[-1]:
            p.rollbacks = 0  # trained past the batch it skipped: healthy again, the tries start anew
        files, doc = state.capture(self.trainer, self.snapshot.capture, ranks_rng)
        seq, save_id = self.store.reserve(p.step)
        meta = {"step": p.step, "epoch": p.epoch, "batch": p.batch, "kinds": sorted(kinds, key=retention.KINDS.index),
                "metrics": dict(p.last), "note": note, "job": self.trainer.job.name}
        if request is not None:
            meta["request"] = request
        protect = ({self.resumed_from} | self.protect()) - {None}  # never rotate these out
        stall = time.perf_counter() - started
        self.recorder.metric({"kind": "save", "id": save_id, "step": p.step, "kinds": meta["kinds"],
                              "stall_s": round(stall, 6), "waited_s": round(waited, 6)})
        self.writer.submit(lambda: self._persist(seq, save_id, files, doc, meta, protect, stall, after), here)
        self.last_save = time.monotonic()
        return save_id

    def _persist(self, seq: int, save_id: str, files: dict, doc: dict, meta: dict, protect: set[str],
                 stall: float, after: Callable[[], None] | None) -> SaveInfo:
        try:  # the history up to this save is on disk before the save is
            self.recorder.sync()
        except OSError as e:
            raise SaveFailed(f"save {save_id} failed: the job's log and metrics.jsonl in {self.folder} could not be "
                             f"made durable ({e.strerror or e}, errno {e.errno}); earlier saves are untouched") from e
        info = self.store.write(seq, save_id, files, {state.STATE: doc}, meta, protect)
        self.recorder.log(f"saved {info.id} ({', '.join(info.kinds)}) at step {info.step}, {info.bytes:,} bytes; "
                          f"training waited {stall * 1e3:.1f} ms")
        try:  # the acknowledgement too
            self.recorder.sync()
        except OSError as e:
            raise StoreError(f"save {save_id} is committed, but the job's log in {self.folder} could not be made "
                             f"durable ({e.strerror or e}, errno {e.errno}); check the disk") from e
        if after is not None:
            after()
        return info

    def close(self) -> None:
        """Wait for the save in flight; its failure is raised here."""
        self.writer.wait()

    # -- resuming ---------------------------------------------------------------------

    def resume(self, requested: SaveInfo | None = None) -> SaveInfo | None:
        """Continue from REQUESTED (a "load game"), else from the newest save that
        verifies; None when there is no save to continue from."""
        if not self.world.is_main:
            return self._follow()
        info = requested
        if info is not None:
            self._restore(info)  # asked for by name: if it cannot be read, say so, never load another
        while info is None:
            info = self.store.newest_good(report=self.recorder.say)
            if info is None:
                for path, why in self.store.broken:
                    self.recorder.say(f"ignored {path.name}: {why}")
                return self.world.share(None)
            try:
                self._restore(info)  # a restore overwrites all state, so one that failed half-way leaves nothing
            except CorruptSave as e:  # whole by its manifest, yet not a save (a manifest rewritten to fit)
                self.store.quarantine(info, [str(e)])
                self.recorder.say(f"{e}; quarantined, trying the one before")
                info = None
        self.world.share(info.id)
        p = self.trainer.progress
        where = f"epoch {p.epoch + 1}, batch {p.batch}" if p.batch else f"after epoch {p.epoch}"
        self.recorder.say(f"resumed from save {info.id} at step {p.step} ({where})")
        self._tell_ranks(info)
        return info

    def _follow(self) -> SaveInfo | None:
        """A rank beside the main one: restore the save the main rank chose (None: none)."""
        chosen = self.world.share(None)
        if chosen is None:
            return None
        info = self.store.get(chosen)
        self._restore(info)
        return info

    def _tell_ranks(self, info: SaveInfo) -> None:
        """Say what resuming INFO at this world size means, when the save was made by another."""
        made_by = state.ranks_of(info)
        if made_by == self.world.size:
            return
        self.recorder.say(f"save {info.id} was made by {made_by} process{'es' if made_by > 1 else ''} and this run "
                          f"has {self.world.size}: the same samples in the same order, the same global batch, equal "
                          "up to the order of floating-point sums")
        if made_by < self.world.size:
            self.recorder.say(f"ranks {made_by}-{self.world.size - 1} have no RNG streams in save {info.id}: "
                              "derived from the job's seed")

    def _restore(self, info: SaveInfo) -> None:
        self.trainer.forget()
        state.restore(self.trainer, info)
        self.resumed_from = info.id
        p = self.trainer.progress
        self.recorder.keep_until(p.step, p.epoch)
        if state.spec_hash(self.trainer) != state.load_json(info, state.STATE)["spec_sha256"]:
            self.recorder.say(f"note: the job file changed since save {info.id}; continuing with the new one")

    def rollback(self, error: NonFiniteLoss) -> None:
        """After a non-finite loss: reload the newest healthy save and never train on the
        batch that produced it; re-raise when not allowed or out of tries."""
        p, most = self.trainer.progress, self.trainer.spec.train.max_rollbacks
        if self.trainer.spec.train.on_nonfinite == "stop":
            raise error
        if p.rollbacks >= most:
            raise NonFiniteLoss(error.step, error.epoch, error.batch, error.loss,
                                f"gave up after {most} rollbacks in a row") from error
        self.writer.wait()
        if self.world.is_main:
            healthy = self.store.newest_good(lambda s: all(_finite(v) for v in s.metrics.values()), self.recorder.say)
            self.world.share(healthy.id if healthy is not None else None)
        else:  # the main rank picks; every rank rolls back to the same save
            chosen = self.world.share(None)
            healthy = self.store.get(chosen) if chosen is not None else None
        if healthy is None:
            raise NonFiniteLoss(error.step, error.epoch, error.batch, error.loss,
                                "no healthy save to roll back to") from error
        skip, tries = [*p.skip, [error.epoch, error.batch]], p.rollbacks + 1
        self._restore(healthy)
        self.trainer.progress.skip, self.trainer.progress.rollbacks = skip, tries
        self.recorder.say(f"{error}; rolled back to save {healthy.id} (try {tries} of {most}), "
                          f"and will skip batch {error.batch + 1} of epoch {error.epoch + 1}")


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
