"""Saves taken by the loop, and resuming from them: in one process, with fresh objects
built for each run as a new process would (the real-process kills are in tests/daemon)."""

import threading

import pytest
import torch

from tests.conftest import EXAMPLES
from traind.jobs.build import build_job
from traind.jobs.checkpoint import Checkpointer
from traind.jobs import loadgame
from traind.jobs.loadgame import request_load
from traind.jobs.errors import NonFiniteLoss
from traind.jobs.jobfile import load_job
from traind.jobs.metrics import Recorder, read_metrics
from traind.jobs.state import MODEL
from traind.jobs.train import Trainer
from traind.store.saves import list_saves, load_tensors

SMALL = {"mlp.toml": "samples = 2048", "tied.yaml": "samples: 1024"}


def job_file(name, tmp_path, every_steps=7):
    """An example, shrunk for speed, with frequent autosaves kept."""
    text = (EXAMPLES / name).read_text().replace(SMALL[name], SMALL[name].replace("2048", "640").replace("1024", "512"))
    if name.endswith(".toml"):
        text = text.replace("[checkpoint]\nevery_steps = 50\nkeep_last = 3", f"[checkpoint]\nevery_steps = {every_steps}\nkeep_last = 100")
    else:
        text = text.replace("checkpoint:\n  every_steps: 20", f"checkpoint:\n  every_steps: {every_steps}\n  keep_last: 100")
    path = tmp_path / name
    path.write_text(text)
    return load_job(path)


class Run:
    """One 'process': build the job, resume from FOLDER, train until STOP_AT (or the end)."""

    def __init__(self, jf, folder, stop_at=None):
        self.trainer = Trainer(build_job(jf.spec, jf.name), Recorder(folder))
        self.stop = threading.Event()
        self.ckpt = Checkpointer(self.trainer, folder, self.trainer.recorder, self.stop,
                                 protect=lambda: loadgame.protected(folder))  # as daemon/run.py does
        self.resumed = self.ckpt.resume(loadgame.take(folder, self.ckpt.store))
        self.stop_at = stop_at

    def boundary(self, trainer):
        if self.stop_at is None:
            return self.ckpt.boundary(trainer)
        if trainer.progress.step >= self.stop_at:
            self.stop.set()
        stops = self.ckpt.boundary(trainer)
        trainer.quiet_until(0, 0.0)  # asked again at the next step, so that the stop comes at its step
        return stops

    def go(self):
        try:
            while True:
                try:
                    return self.trainer.fit(self.boundary)
                except NonFiniteLoss as e:
                    self.ckpt.rollback(e)
        finally:
            self.ckpt.close()
            self.trainer.recorder.close()

    def weights(self):
        return {k: v.clone() for k, v in self.trainer.job.model.state_dict().items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    found = {}
    for name in SMALL:
        tmp = tmp_path_factory.mktemp(name.replace(".", "-"))
        run = Run(job_file(name, tmp), tmp / "run")
        assert run.go()
        found[name] = run.weights()
    return found


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("stops", [[3], [8, 21], [16, 17, 33, 60]])
def test_stopped_and_resumed_runs_end_bitwise_equal(tmp_path, uninterrupted, name, stops):
    """A scheduler (mlp) and Dropout with a tied layer (tied): stopped at steps mid-epoch
    and at epoch ends, each time resumed by a fresh build of the job."""
    jf, folder = job_file(name, tmp_path), tmp_path / "run"
    for stop_at in stops:
        run = Run(jf, folder, stop_at)
        assert not run.go()
    last = Run(jf, folder)
    assert last.resumed is not None and last.resumed.step == stops[-1]
    assert last.go()
    assert equal(last.weights(), uninterrupted[name])


def test_resume_from_an_older_save_when_the_newest_is_corrupt(tmp_path, uninterrupted):
    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    assert not Run(jf, folder, 30).go()
    newest = list_saves(folder / "saves")[0][-1]
    (newest.path / MODEL).write_bytes(b"garbage")
    last = Run(jf, folder)
    assert last.resumed.step < newest.step
    assert last.go()
    assert equal(last.weights(), uninterrupted["mlp.toml"])
    assert (folder / "saves" / "quarantine" / newest.id).exists()


def test_tied_parameters_are_stored_once_and_tied_again(tmp_path):
    jf, folder = job_file("tied.yaml", tmp_path), tmp_path / "run"
    Run(jf, folder, 10).go()
    save = list_saves(folder / "saves")[0][-1]
    stored = load_tensors(save, MODEL)
    assert "2.weight" in stored and "5.weight" not in stored  # "@shared" is layers 2 and 5
    run = Run(jf, folder)
    net = run.trainer.job.model
    assert net[2].weight is net[5].weight
    assert torch.equal(net[2].weight, stored["2.weight"])
    run.go()


def test_model_file_loads_with_plain_safetensors_into_the_module(tmp_path):
    from safetensors.torch import load_file

    jf, folder = job_file("tied.yaml", tmp_path), tmp_path / "run"
    run = Run(jf, folder)
    run.go()
    final = list_saves(folder / "saves")[0][-1]
    fresh = build_job(jf.spec, "fresh").model
    missing, unexpected = fresh.load_state_dict(load_file(final.path / MODEL), strict=False)
    assert unexpected == [] and missing == ["5.weight", "5.bias"]  # the tied aliases, filled by the tie itself
    assert equal(fresh.state_dict(), run.weights())


def test_saves_follow_the_policy(tmp_path):
    jf, folder = job_file("mlp.toml", tmp_path, every_steps=50), tmp_path / "run"
    Run(jf, folder).go()
    saves = list_saves(folder / "saves")[0]
    kinds = {s.step: set(s.kinds) for s in saves}
    assert {"final"} <= kinds[max(kinds)]
    # autosaves every 50 steps, and every epoch (8 steps); rotation keeps the newest 100
    assert {s.step for s in saves} == {*range(8, 65, 8), 50}
    bests = [s for s in saves if "best" in s.kinds]
    assert bests and all(0 < s.metrics["val_loss"] for s in bests)
    records = [r for r in read_metrics(folder) if r["kind"] == "save"]
    assert records and all(r["stall_s"] >= 0 for r in records)


def test_a_save_waited_for_is_written_on_the_training_thread_and_the_others_behind_it(tmp_path):
    """Autosaves are written by the writer thread while training goes on; the final save
    and a save before a stop, which training waits for at once, on the training thread
    itself (no thread to start and join)."""
    from traind.store.fs import FileSystem

    class Threads(FileSystem):
        def __init__(self):
            self.by = {}

        def create(self, path):
            if path.name == "manifest.json":
                self.by[path.parent.name.removeprefix(".staging-")] = threading.current_thread()
            return super().create(path)

    jf, folder = job_file("mlp.toml", tmp_path, every_steps=5), tmp_path / "run"
    for stop_at in (12, None):
        run = Run(jf, folder, stop_at)
        run.ckpt.store.fs = fs = Threads()
        run.go()
        saves = {s.id: s for s in list_saves(folder / "saves")[0] if s.id in fs.by}
        here = {s.step for i, s in saves.items() if fs.by[i] is threading.main_thread()}
        behind = {s.step for i, s in saves.items() if fs.by[i].name == "traind-writer"}
        assert here == ({12} if stop_at else {64})  # the stop's save; the final one (8 epochs of 8 steps)
        assert behind == {s.step for s in saves.values()} - here
        assert behind >= ({5, 8, 10} if stop_at else {15, 16, 20, 60})  # every 5 steps, every epoch of 8


def test_a_quiet_boundary_is_one_where_nothing_is_due_before_the_step_and_moment_it_names(tmp_path):
    """The shortcut of most steps: wherever `quiet` names a step and a moment, the full
    question finds no save and no stop, the step is the next one a save falls due at by
    count, and the moment is the clock's save or QUIET_SECONDS away, whichever is sooner; it
    is not quiet where a save falls due by count, by the clock, or a stop was signalled."""
    import time

    from traind.jobs.checkpoint import QUIET_SECONDS
    from traind.jobs.world import Decision

    jf, folder = job_file("mlp.toml", tmp_path, every_steps=5), tmp_path / "run"
    run, answers = Run(jf, folder), []

    def boundary(trainer):
        ckpt, p = run.ckpt, trainer.progress
        before = time.monotonic()
        quiet = ckpt.quiet(trainer)
        if quiet is not None:
            decision = ckpt.due(trainer, Decision())
            assert not decision.kinds and decision.stop is None, trainer.progress
            step, moment = quiet
            assert step == (p.step // 5 + 1) * 5 and before < moment <= time.monotonic() + QUIET_SECONDS
        answers.append((p.step, p.batch, quiet is not None))
        if p.step == 12 and p.batch:
            policy = ckpt.store.policy
            assert not (policy.every_steps and 12 % policy.every_steps == 0) and quiet
            ckpt.last_save -= policy.every_minutes * 60 - 0.01  # the clock's autosave falls due in 10 ms
            assert ckpt.quiet(trainer)[1] == ckpt.last_save + policy.every_minutes * 60
            ckpt.last_save -= 1  # and now it is due
            assert ckpt.quiet(trainer) is None and ckpt.due(trainer, Decision()).kinds == {"auto"}
            ckpt.last_save += policy.every_minutes * 60 + 1
            run.stop.set()
            assert ckpt.quiet(trainer) is None
            run.stop.clear()
        stops = ckpt.boundary(trainer)
        trainer.quiet_until(0, 0.0)  # this test asks at every step
        return stops

    run.trainer.fit(boundary)
    run.ckpt.close()
    run.trainer.recorder.close()
    assert all(not quiet for step, batch, quiet in answers if step % 5 == 0 or batch in (0, 8))
    assert sum(quiet for _, _, quiet in answers) > len(answers) / 2


def test_the_loop_asks_a_quiet_boundary_again_at_the_step_or_the_moment_it_named(tmp_path):
    """Where each batch is a step of its own, the loop calls a boundary that named a step
    and a moment (`Trainer.quiet_until`) again only there, whichever comes first, and one
    that named nothing at the next step; each epoch's end asks it as ever."""
    import math
    import time

    trainer = Run(job_file("mlp.toml", tmp_path), tmp_path / "run").trainer  # 8 epochs of 8 steps
    asked = []

    def every_third_step(t):
        p = t.progress
        asked.append((p.step, p.batch))
        if p.batch:
            t.quiet_until(p.step + 3, math.inf)
        return False

    assert trainer.alone and trainer.fit(every_third_step)
    inside = [step for step, batch in asked if batch]
    assert inside == [step for epoch in range(8) for step in range(8 * epoch + 1, 8 * epoch + 9, 3)]
    assert [step for step, batch in asked if not batch] == list(range(8, 65, 8))

    (tmp_path / "again").mkdir()
    trainer = Run(job_file("mlp.toml", tmp_path / "again"), tmp_path / "again" / "run").trainer
    asked.clear()

    def past_moment(t):  # a moment gone by: asked at the next step, whatever the step
        asked.append((t.progress.step, t.progress.batch))
        t.quiet_until(10**9, time.monotonic() - 1)
        return False

    assert trainer.fit(past_moment)
    assert len(asked) == 64 + 8  # each step, and each epoch's end


def test_load_game_continues_from_the_chosen_save_and_keeps_newer_ones(tmp_path, uninterrupted):
    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    Run(jf, folder).go()
    saves = list_saves(folder / "saves")[0]
    chosen = next(s for s in saves if s.step == 21)
    request_load(folder, chosen.id)
    run = Run(jf, folder)
    assert run.resumed.id == chosen.id
    assert run.go()
    assert equal(run.weights(), uninterrupted["mlp.toml"])  # deterministic replay from there
    after = {s.id for s in list_saves(folder / "saves")[0]}
    assert {s.id for s in saves} <= after  # newer saves stay
    later = Run(jf, folder)  # a continuation exists now: the request is done with
    assert later.resumed.id != chosen.id and not (folder / "load.json").exists()
    later.go()


def with_train(jf, **changes):
    spec = jf.spec.model_copy(update={"train": jf.spec.train.model_copy(update=changes)})
    return type(jf)(jf.path, jf.fmt, jf.text, spec)


def test_nonfinite_loss_rolls_back_and_skips_the_batch(tmp_path):
    from traind.jobs.data import EpochBatches

    jf, folder = with_train(job_file("mlp.toml", tmp_path), epochs=2), tmp_path / "run"
    assert not Run(jf, folder, 10).go()  # saved at step 10: epoch 2, batch 2
    run = Run(jf, folder)
    train = run.trainer.job.splits.train
    poisoned = int(list(EpochBatches(len(train), 64, jf.spec.seed, 1, True))[5][0])
    train.x[poisoned] = float("nan")  # in batch 6 of epoch 2 (step 14), and nowhere else still to come
    assert run.go()
    p = run.trainer.progress
    assert p.skip == [[1, 5]] and p.rollbacks == 0  # the final save came after the skip: healthy again
    assert p.step == 15  # 16 batches, one never trained on
    log = (folder / "log").read_text()
    assert "non-finite loss nan at step 14 (epoch 2, batch 6)" in log
    assert "rolled back to save 000003-s10 (try 1 of 3), and will skip batch 6 of epoch 2" in log
    assert all(torch.isfinite(v).all() for v in run.weights().values())


def test_a_rollback_survives_a_restart(tmp_path):
    from traind.jobs.data import EpochBatches

    jf, folder = with_train(job_file("mlp.toml", tmp_path, every_steps=1), epochs=2), tmp_path / "run"
    run = Run(jf, folder, 12)
    train = run.trainer.job.splits.train
    # one poisoned sample: batch 6 of epoch 1 (step 6) and batch 6 of epoch 2
    poisoned = int(list(EpochBatches(len(train), 64, jf.spec.seed, 1, True))[5][0])
    train.x[poisoned] = float("nan")
    assert not run.go()
    assert run.trainer.progress.skip == [[0, 5]]
    again = Run(jf, folder)
    again.trainer.job.splits.train.x[poisoned] = float("nan")  # the same data in the new "process"
    assert again.resumed.step == 12 and again.trainer.progress.skip == [[0, 5]]
    assert again.trainer.progress.rollbacks == 0  # saved past the skipped batch: the tries start anew
    assert again.go() and again.trainer.progress.skip == [[0, 5], [1, 5]]


def test_nonfinite_loss_gives_up_after_bounded_tries_or_stops(tmp_path):
    jf = job_file("mlp.toml", tmp_path)
    run = Run(jf, tmp_path / "a")
    run.trainer.job.splits.train.x[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="no healthy save to roll back to"):
        run.go()
    assert not Run(jf, tmp_path / "b", 10).go()
    run = Run(jf, tmp_path / "b")
    run.trainer.job.splits.train.x[:] = float("nan")  # every batch: each rollback meets another
    with pytest.raises(NonFiniteLoss, match="gave up after 3 rollbacks in a row"):
        run.go()
    assert not Run(with_train(jf, max_rollbacks=1), tmp_path / "d", 10).go()
    run = Run(with_train(jf, max_rollbacks=1), tmp_path / "d")
    run.trainer.job.splits.train.x[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="gave up after 1 rollbacks in a row"):
        run.go()
    assert not Run(with_train(jf, on_nonfinite="stop"), tmp_path / "c", 10).go()
    run = Run(with_train(jf, on_nonfinite="stop"), tmp_path / "c")
    run.trainer.job.splits.train.x[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="at step 11") as caught:
        run.go()
    assert "rollback" not in str(caught.value)


def test_metrics_after_the_resumed_save_are_forgotten(tmp_path):
    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    Run(jf, folder, 25).go()
    Run(jf, folder).go()
    records = read_metrics(folder)
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(1, 9))


def test_a_full_disk_stops_the_job_clearly_and_it_continues_once_space_returns(tmp_path, uninterrupted):
    import errno

    from tests.store.test_commit import FailingFS
    from traind.store.errors import SaveFailed

    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    run = Run(jf, folder)
    run.ckpt.store.fs = FailingFS(60, errno.ENOSPC)  # some saves in, the disk fills up
    with pytest.raises(SaveFailed, match="the disk is full; earlier saves are untouched"):
        run.go()
    kept = list_saves(folder / "saves")[0]
    assert kept and not list((folder / "saves").glob(".staging-*"))
    again = Run(jf, folder)  # space is back
    assert again.resumed.id == kept[-1].id
    assert again.go()
    assert equal(again.weights(), uninterrupted["mlp.toml"])


def test_too_little_space_for_the_next_save_stops_before_writing(tmp_path):
    from traind.store.errors import SaveFailed
    from traind.store.fs import FileSystem

    class AlmostFull(FileSystem):
        def free_bytes(self, path):
            return 4096

    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    run = Run(jf, folder)
    run.ckpt.store.fs = AlmostFull()
    with pytest.raises(SaveFailed, match="not enough disk space .* it needs .* bytes, 4,096 are free"):
        run.go()
    assert list((folder / "saves").iterdir()) == []


def test_a_save_that_no_longer_fits_the_job_is_a_clear_error(tmp_path):
    from traind.jobs.errors import JobSpecError

    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    Run(jf, folder, 5).go()
    path = tmp_path / "wider.toml"
    path.write_text(jf.text.replace('["Linear", 20, 256], ["ReLU"], ["Linear", 256, 10]',
                                    '["Linear", 20, 128], ["ReLU"], ["Linear", 128, 10]'))
    wider = load_job(path)
    with pytest.raises(JobSpecError, match="does not fit this job's model") as caught:
        Run(wider, folder)
    assert "start in a new folder" in caught.value.problems[0].fix


def test_saves_made_after_a_load_request_but_before_it_was_taken_do_not_cancel_it(tmp_path):
    jf, folder = job_file("mlp.toml", tmp_path), tmp_path / "run"
    Run(jf, folder, 30).go()
    chosen = list_saves(folder / "saves")[0][1]
    going = Run(jf, folder, 40)  # started before the request, still going when it comes
    request_load(folder, chosen.id)
    assert not going.go()  # it saves after the request
    taker = Run(jf, folder, 50)
    assert taker.resumed.id == chosen.id
    taker.go()
    assert Run(jf, folder).resumed.id != chosen.id  # once the taker saved, its saves win


def test_rotation_never_removes_a_save_a_load_request_waits_for(tmp_path):
    text = (EXAMPLES / "mlp.toml").read_text().replace("samples = 2048", "samples = 640").replace(
        "every_steps = 50\nkeep_last = 3", "every_steps = 3\nkeep_last = 2")
    path = tmp_path / "mlp.toml"
    path.write_text(text)
    jf, folder = load_job(path), tmp_path / "run"
    going = Run(jf, folder, 9)
    going.go()
    oldest = list_saves(folder / "saves")[0][0]
    going = Run(jf, folder, 40)  # still going when the request comes, saving every 3 steps
    request_load(folder, oldest.id)
    going.go()
    assert oldest.id in {s.id for s in list_saves(folder / "saves")[0]}
    assert Run(jf, folder).resumed.id == oldest.id


def test_rollbacks_far_apart_never_add_up_to_giving_up(tmp_path):
    from traind.jobs.data import EpochBatches

    jf, folder = with_train(job_file("mlp.toml", tmp_path, every_steps=1), epochs=2), tmp_path / "run"
    run = Run(jf, folder)
    train = run.trainer.job.splits.train
    first_epoch = list(EpochBatches(len(train), 64, jf.spec.seed, 0, True))
    for batch in (1, 3, 5, 7):  # four bad samples in batches of their own: a rollback each, 1 in a row
        train.x[int(first_epoch[batch][0])] = float("nan")
    assert run.go()  # once the run has saved past a skipped batch, the tries start anew
    assert len(run.trainer.progress.skip) > 3 and run.trainer.progress.rollbacks == 0  # more than 3 in all
