import dataclasses
import math
import time

import pytest
import torch

from tests.conftest import MLP
from traind.jobs import data, train
from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError, NonFiniteLoss
from traind.jobs.metrics import Recorder, read_metrics
from traind.jobs.train import Progress, Trainer


def trainer_for(spec_of, text=MLP, folder=None):
    spec = spec_of(text)
    return Trainer(build_job(spec, "t"), Recorder(folder))


class Spy(Trainer):
    """A Trainer that remembers the targets of every batch it trained on (those its loss
    function sees with gradients on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        loss_fn = getattr(self.job.loss_fn, "spied", self.job.loss_fn)  # (a job another Spy trained)

        def spying(out, y):
            if torch.is_grad_enabled():
                self.seen.append(y.tolist())
            return loss_fn(out, y)

        spying.spied = loss_fn
        self.job.loss_fn = spying


def stop_at_step(k):
    """A boundary callback that stops the loop after step K, its losses looked at (as a
    save's boundary does)."""
    def boundary(trainer):
        if trainer.progress.step == k:
            trainer.look()
            return True
        return False
    return boundary


def weights(trainer):
    return {k: v.clone() for k, v in trainer.job.model.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_runs_of_one_job_give_bitwise_equal_weights(spec_of):
    runs = []
    for _ in range(2):
        t = trainer_for(spec_of)
        assert t.fit()
        runs.append(weights(t))
    assert_bitwise_equal(*runs)
    other = trainer_for(spec_of, MLP.replace("seed = 0", "seed = 1"))
    other.fit()
    assert not all(torch.equal(runs[0][k], v) for k, v in weights(other).items())


@pytest.mark.parametrize("switch", ["", "precision = 'bf16'\n", "grad_clip = 0.5\n", "ema = 0.9\n",
                                    "[scheduler]\nname = 'StepLR'\nstep_size = 5\ngamma = 0.5\ninterval = 'step'\n"])
def test_a_batch_stepped_alone_is_the_grouped_step(spec_of, tmp_path, switch):
    """With accumulate 1 on one rank `fit` steps batch by batch (`Trainer.alone`, in
    `_run_alone`), past the grouping of `step`: the same weights, losses and records, to the
    bit (the last batch short), with each switch that changes what a step runs."""
    text = MLP.replace("epochs = 3", "epochs = 3\nlog_every_steps = 3\n" + switch)
    runs = []
    for alone in (True, False):
        t = trainer_for(spec_of, text, tmp_path / str(alone))
        assert t.alone and len(t.job.splits.train) % t.spec.data.batch_size
        t.alone = alone
        assert t.fit()
        t.recorder.close()
        runs.append((weights(t), t.progress.as_dict(), [{k: v for k, v in r.items() if "time" not in k and
                                                         "seconds" not in k} for r in read_metrics(tmp_path / str(alone))]))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:] and len(runs[0][2]) == 3 + 24 // 3


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_steps_first_forward_pass_finds_the_last_steps_gradients_gone_and_its_others_find_its_own(spec_of,
                                                                                                   accumulate):
    """The last step's gradients are let go before the forward pass (1-2% of a small
    model's step, docs/PERFORMANCE.md), and only before a step's first batch: the others
    of an accumulated step add to its gradients."""
    t = trainer_for(spec_of, MLP.replace("epochs = 3", f"epochs = 1\naccumulate = {accumulate}"))
    weight = next(t.job.model.parameters())
    found = []
    t.job.model.register_forward_pre_hook(
        lambda module, args: found.append(weight.grad is None) if torch.is_grad_enabled() else None)
    assert t.fit()
    assert len(found) == 8  # one epoch of 8 batches (validation's passes, without grad, not counted)
    assert found == [i % accumulate == 0 for i in range(8)]


@pytest.mark.parametrize("stop_at", [1, 5, 7, 8, 13])
def test_loop_continued_at_step_k_sees_the_same_batches_and_ends_equal(spec_of, stop_at):
    """Stop at step k, then continue with a fresh Trainer and fresh loaders from the
    Progress alone: the batches from step k on, and the final weights (Dropout drawing
    from the global RNG all along), equal those of the uninterrupted run."""
    whole = Spy(build_job(spec_of(MLP), "t"), Recorder())
    whole.fit()
    assert len(whole.seen) == 24  # 3 epochs of 8 batches (240 samples, batch 32)

    first = Spy(build_job(spec_of(MLP), "t"), Recorder())
    assert not first.fit(stop_at_step(stop_at))
    progress = dataclasses.replace(first.progress)
    second = Spy(first.job, Recorder(), progress)
    assert second.fit()
    assert second.seen == whole.seen[stop_at:]
    assert first.seen + second.seen == whole.seen
    assert_bitwise_equal(weights(whole), weights(second))
    assert second.progress.best == whole.progress.best


def test_stop_between_last_step_and_epoch_end_validates_once(spec_of, tmp_path):
    t = trainer_for(spec_of, folder=tmp_path)
    assert not t.fit(lambda t: t.progress.step == 8 and t.progress.batch == 8)
    assert t.progress.epoch == 0 and t.progress.batch == 8
    assert Trainer(t.job, t.recorder, t.progress).fit()
    t.recorder.close()
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]


def test_max_steps_stops_mid_epoch_and_validates(spec_of, tmp_path):
    t = trainer_for(spec_of, MLP.replace("epochs = 3", "max_steps = 11\nlog_every_steps = 5"), tmp_path)
    assert t.job.total_steps == 11
    assert t.fit()
    t.recorder.close()
    assert t.progress.step == 11
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "step"] == [5, 10]
    assert [(r["epoch"], r["step"]) for r in records if r["kind"] == "epoch"] == [(1, 8), (2, 11)]
    resumed = Trainer(t.job, Recorder(), t.progress)
    assert resumed.finished() and resumed.fit()
    assert resumed.progress.step == 11


def _step_records(folder):
    return [r for r in read_metrics(folder) if r["kind"] == "step"]


def test_a_step_record_is_written_when_its_loss_is_looked_at(spec_of, tmp_path, monkeypatch):
    """One process: a logged step's record waits for the next look at the losses (before a
    save, at an epoch's end, at a logged step a second after the last look, or after
    LOOK_EVERY batches), and carries that step's loss and the time it was taken."""
    def run(look_seconds, folder):
        monkeypatch.setattr(train, "LOOK_SECONDS", look_seconds)
        t = trainer_for(spec_of, MLP.replace("epochs = 3", "epochs = 1\nlog_every_steps = 2"), folder)
        written = []

        def boundary(trainer):
            written.append((trainer.progress.step, [r["step"] for r in _step_records(folder)]))
            return False

        started = time.time()
        assert t.fit(boundary)
        t.recorder.close()
        records, steps = read_metrics(folder), _step_records(folder)
        assert [r["kind"] for r in records] == ["step"] * 4 + ["epoch"]
        times = [r["time"] for r in steps]
        assert started - 0.001 <= times[0] and times == sorted(times) and times[-1] <= records[-1]["time"]
        assert all(math.isfinite(r["loss"]) for r in steps)
        return written, [r["loss"] for r in steps]

    later, later_losses = run(1e9, tmp_path / "later")
    # nothing looked at before the epoch's end: 8 batches, fewer than LOOK_EVERY
    assert later == [(s, []) for s in range(1, 9)] + [(8, [2, 4, 6, 8])]
    at_once, at_once_losses = run(0.0, tmp_path / "at-once")
    assert at_once == [(s, list(range(2, s + 1, 2))) for s in range(1, 9)] + [(8, [2, 4, 6, 8])]
    assert later_losses == at_once_losses  # the same run either way: the same losses, whenever read


def test_the_records_of_the_steps_before_a_non_finite_loss_are_written(spec_of, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LOOK_SECONDS", 1e9)
    t = trainer_for(spec_of, MLP.replace("epochs = 3", "epochs = 1\nlog_every_steps = 1"), tmp_path)

    def boundary(trainer):
        if trainer.progress.step == 5:
            trainer._losses[-1] = torch.tensor(math.nan)  # step 5's loss, not looked at yet
            trainer.look()
        return False

    with pytest.raises(NonFiniteLoss) as caught:
        t.fit(boundary)
    t.recorder.close()
    assert caught.value.step == 5
    assert [r["step"] for r in _step_records(tmp_path)] == [1, 2, 3, 4]


def test_epoch_metrics_are_recorded(spec_of, tmp_path):
    t = trainer_for(spec_of, folder=tmp_path)
    t.fit()
    t.recorder.close()
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert len(epochs) == 3
    for r in epochs:
        assert {"train_loss", "val_loss", "val_acc", "lr", "time"} <= r.keys()
        assert 0 <= r["val_acc"] <= 1 and r["train_loss"] > 0
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert t.progress.last == {k: epochs[-1][k] for k in ("train_loss", "val_loss", "val_acc")}
    assert t.progress.best == min(r["val_loss"] for r in epochs)


def test_best_ignores_epochs_before_best_after_epoch(spec_of):
    t = trainer_for(spec_of, MLP + "[checkpoint]\nmonitor = 'val_acc'\nbest_after_epoch = 3\n")
    seen = []
    t.fit(lambda t: seen.append(t.progress.best) or False)
    assert t.progress.best == t.progress.last["val_acc"]
    assert set(seen[:-1]) == {None}


def test_step_and_epoch_schedulers(spec_of):
    per_step = trainer_for(spec_of, MLP + "[optimizer]\nname = 'SGD'\nlr = 1.0\n"
                           "[scheduler]\nname = 'StepLR'\nstep_size = 1\ngamma = 0.5\ninterval = 'step'\n")
    per_step.fit(lambda t: t.progress.step == 3)
    assert per_step.lr() == 0.125
    per_epoch = trainer_for(spec_of, MLP + "[optimizer]\nname = 'SGD'\nlr = 1.0\n"
                            "[scheduler]\nname = 'StepLR'\nstep_size = 1\ngamma = 0.5\n")
    per_epoch.fit()
    assert per_epoch.lr() == 0.125


def test_reduce_on_plateau_follows_the_monitored_metric(spec_of):
    text = MLP.replace("epochs = 3", "epochs = 4") + ("[optimizer]\nname = 'SGD'\nlr = 1e-6\n"
            "[scheduler]\nname = 'ReduceLROnPlateau'\npatience = 0\nfactor = 0.5\nthreshold = 0.5\n")
    t = trainer_for(spec_of, text)
    t.fit()
    # with lr 1e-6 val_loss never improves by the 50% threshold: halved after every epoch but the first
    assert t.lr() == pytest.approx(1e-6 * 0.5 ** 3)


def test_no_decay_puts_matching_parameters_in_a_zero_decay_group(spec_of):
    t = trainer_for(spec_of, MLP + "[optimizer]\nweight_decay = 0.1\nno_decay = ['bias']\n")
    groups = t.job.optimizer.param_groups
    names = {id(p): n for n, p in t.job.model.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["0.bias", "3.bias"]
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["0.weight", "3.weight"]


def test_no_decay_pattern_matching_nothing_is_an_error(spec_of):
    with pytest.raises(JobSpecError, match="pattern 'biass' matches no parameter") as caught:
        trainer_for(spec_of, MLP + "[optimizer]\nno_decay = ['biass']\n")
    assert "0.weight, 0.bias" in caught.value.problems[0].fix


def test_grad_clip_bounds_the_update(spec_of):
    text = MLP + "[optimizer]\nname = 'SGD'\nlr = 1.0\n"
    t = trainer_for(spec_of, text.replace("epochs = 3", "epochs = 3\ngrad_clip = 0.001"))
    before = torch.cat([p.detach().flatten().clone() for p in t.job.model.parameters()])
    x, y = next(iter(t.job.splits.train.x.split(32))), next(iter(t.job.splits.train.y.split(32)))
    t.step([(0, x, y)])
    after = torch.cat([p.detach().flatten() for p in t.job.model.parameters()])
    assert (after - before).norm() <= 0.001 * (1 + 1e-4)
    free = trainer_for(spec_of, text)
    free.step([(0, x, y)])
    moved = torch.cat([p.detach().flatten() for p in free.job.model.parameters()])
    assert (moved - before).norm() > 0.01


def test_non_finite_loss_is_found_at_the_next_look_naming_its_step_and_batch(spec_of):
    """The losses stay on the device until the loop looks (here at the epoch's end): the
    NaN of step 1 is found then, with the step and batch that gave it."""
    t = trainer_for(spec_of)
    t.job.splits.train.x[40] = float("nan")
    order = data.EpochBatches(len(t.job.splits.train), 32, 0, 0, True).order()
    batch = int((order == 40).nonzero()) // 32
    with pytest.raises(NonFiniteLoss) as caught:
        t.fit()
    assert math.isnan(caught.value.loss)
    assert (caught.value.step, caught.value.epoch, caught.value.batch) == (batch + 1, 0, batch)
    assert f"at step {batch + 1} (epoch 1, batch {batch + 1})" in str(caught.value)
    assert t.progress.step == 8 and t.progress.loss_sum == 0.0  # found at epoch 1's end; nothing counted


def test_progress_is_plain_json():
    import json

    p = Progress(step=3, epoch=1, batch=2, loss_sum=1.5, best=0.25, last={"val_loss": 0.3})
    assert Progress(**json.loads(json.dumps(p.as_dict()))) == p
