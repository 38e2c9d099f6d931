"""The switches of a GPU-box loop ([train] precision, accumulate, compile, ema, early_stop;
chained schedulers; 0/1 targets), each checked against what it means and for exact resume
in one process (the real-process kills are in tests/daemon/test_kill.py)."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLES, MLP
from tests.jobs.test_checkpoint import Run, equal
from traind.jobs import data
from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError
from traind.jobs.jobfile import load_job
from traind.jobs.metrics import Recorder, read_metrics
from traind.jobs.state import EMA, MODEL
from traind.jobs.train import Trainer
from traind.store.saves import list_saves

BOX = (EXAMPLES / "gpubox.toml").read_text().replace("samples = 4096", "samples = 640") \
    .replace("every_steps = 40\nkeep_last = 3", "every_steps = 3\nkeep_last = 100") \
    .replace("patience = 3, min_delta = 0.001", "patience = 2, min_delta = 0.01").replace("ema = 0.99", "ema = 0.9")
"""The example's switches (bf16, accumulate 4, EMA, warmup then cosine, early stop, one logit), made small
(it stops early at epoch 10 of 12)."""

MULTI = """
seed = 3
[model]
layers = [["Linear", 6, 32], ["ReLU"], ["Linear", 32, 3]]
[data]
source = "npz"
path = "labels.npz"
batch_size = 20
[optimizer]
lr = 0.02
[scheduler]
name = "ChainedScheduler"
interval = "step"
schedulers = [{ name = "ConstantLR", factor = 0.5, total_iters = 10 }, { name = "ExponentialLR", gamma = 0.99 }]
[train]
epochs = 8
loss = "BCEWithLogitsLoss"
accumulate = 2
[checkpoint]
every_steps = 2
keep_last = 100
"""
"""Three 0/1 labels per sample (multi-label), an odd accumulation and a ChainedScheduler."""


def multilabel_file(folder):
    g = np.random.default_rng(0)
    x = g.normal(size=(250, 6)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] * x[:, 4] > 0], axis=1).astype(np.int64)
    np.savez(folder / "labels.npz", x=x, y=y)


def job_at(tmp_path, text, name="job"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_job(path)


def trained(tmp_path, text, **replace):
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    tmp_path.mkdir(exist_ok=True)
    jf = job_at(tmp_path, text)
    t = Trainer(build_job(jf.spec, jf.name), Recorder(tmp_path / "run"))
    assert t.fit()
    t.recorder.close()
    return t


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Each job run without a stop."""
    found = {}
    for name, text in (("box", BOX), ("multi", MULTI)):
        tmp = tmp_path_factory.mktemp(name)
        multilabel_file(tmp)
        run = Run(job_at(tmp, text, name), tmp / "run")
        assert run.go()
        found[name] = run
    return found


@pytest.mark.parametrize("name, stops", [("box", [1, 7, 40]), ("box", [13, 26, 27]), ("multi", [3, 13, 14, 30])])
def test_stopped_and_resumed_runs_end_bitwise_equal_with_every_switch(tmp_path, whole, name, stops):
    """Stops inside an epoch, at its end, mid-warmup: each resumed by a fresh build, the
    weights, the EMA, the schedule and the early stop end as in the run never stopped."""
    multilabel_file(tmp_path)
    jf, folder = job_at(tmp_path, BOX if name == "box" else MULTI, name), tmp_path / "run"
    for stop_at in stops:
        run = Run(jf, folder, stop_at)
        assert not run.go()
    last = Run(jf, folder)
    assert last.resumed.step == stops[-1]
    assert last.go()
    expected = whole[name]
    assert equal(last.weights(), expected.weights())
    assert last.trainer.progress.as_dict() == expected.trainer.progress.as_dict()
    assert last.trainer.lr() == expected.trainer.lr()
    if name == "box":
        assert equal(last.trainer.job.ema.module.state_dict(), expected.trainer.job.ema.module.state_dict())
        assert last.trainer.progress.stopped == "early stop at epoch 10"


def test_accumulated_batches_make_the_step_of_their_whole(tmp_path):
    """Four batches of 8 accumulated step as one batch of 32 (SGD, no shuffle): the weights
    agree to rounding; a step counts optimizer steps, an epoch's last step takes what is left."""
    text = MLP.replace("[train]", "[optimizer]\nname = 'SGD'\nlr = 0.5\n[train]\nmax_steps = 5") \
        .replace("batch_size = 32", "batch_size = 32\nshuffle = false")
    text = text.replace('["Dropout", {p = 0.2}], ', "")
    one = trained(tmp_path / "one", text)
    four = trained(tmp_path / "four", text, **{"batch_size = 32": "batch_size = 8", "max_steps = 5":
                                               "max_steps = 5\naccumulate = 4"})
    assert one.progress.step == four.progress.step == 5
    for k, v in one.job.model.state_dict().items():
        torch.testing.assert_close(four.job.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert four.job.steps_per_epoch == 8 and four.job.batches_per_epoch == 30  # 240 samples: 30 batches, 8 steps
    tail = trained(tmp_path / "tail", text, **{"max_steps = 5": "accumulate = 7", "epochs = 3": "epochs = 1"})
    assert tail.progress.step == 2 and tail.job.steps_per_epoch == 2  # 8 batches: 7, then 1


def test_bf16_autocasts_the_forward_pass_and_fp16_is_refused_on_a_cpu(tmp_path, spec_of):
    seen = []
    t = Trainer(build_job(spec_of(MLP.replace("epochs = 3", "epochs = 1\nprecision = 'bf16'")), "t"), Recorder())
    t.job.model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    assert t.fit()
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in t.job.model.parameters())  # the weights stay fp32
    with pytest.raises(JobSpecError) as caught:
        build_job(spec_of(MLP.replace("epochs = 3", "epochs = 1\nprecision = 'fp16'")), "t")
    assert caught.value.problems[0].path == ("train", "precision")
    assert "bf16" in caught.value.problems[0].fix


def test_the_ema_follows_its_formula_is_validated_on_and_saved(tmp_path):
    jf = job_at(tmp_path, MLP.replace("epochs = 3", "epochs = 1\nema = 0.9").replace('["Dropout", {p = 0.2}], ', ""))
    job = build_job(jf.spec, jf.name)
    t = Trainer(job, Recorder(tmp_path / "run"))
    x, y = job.splits.train.x[:32], job.splits.train.y[:32]
    t.step([(0, x, y)])
    first = {k: v.clone() for k, v in job.model.state_dict().items()}
    assert equal(job.ema.module.state_dict(), first)  # the first update copies the weights
    t.step([(1, x, y)])
    for k, v in job.model.state_dict().items():
        torch.testing.assert_close(job.ema.module.state_dict()[k], 0.9 * first[k] + 0.1 * v)
    run = Run(jf, tmp_path / "saved")
    assert run.go()
    save = list_saves(tmp_path / "saved" / "saves")[0][-1]
    assert equal(load_file(save.path / EMA), run.trainer.job.ema.module.state_dict())
    assert not equal(load_file(save.path / EMA), load_file(save.path / MODEL))
    epochs = [r for r in read_metrics(tmp_path / "saved") if r["kind"] == "epoch"]
    assert epochs and all(r["validated"] == "ema" for r in epochs)
    assert epochs[-1]["val_loss"] == pytest.approx(_val_loss(run.trainer, run.trainer.job.ema.module))


def _val_loss(trainer, model):
    val = trainer.job.splits.val
    with torch.no_grad():
        return float(trainer.job.loss_fn(model.eval()(val.x), val.y))


def test_early_stop_ends_the_job_done_with_its_reason(tmp_path):
    text = MLP.replace("epochs = 3", "epochs = 40\nearly_stop = { patience = 2, min_delta = 0.5 }")
    jf = job_at(tmp_path, text)
    run = Run(jf, tmp_path / "run")
    assert run.go()
    p = run.trainer.progress
    assert p.stopped == f"early stop at epoch {p.epoch}" and p.epoch < 40 and p.stale == 2
    epochs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epochs[-1]["stopped"] == p.stopped and all("stopped" not in r for r in epochs[:-1])
    assert "final" in list_saves(tmp_path / "run" / "saves")[0][-1].kinds
    assert f"{p.stopped}: val_loss has not improved" in (tmp_path / "run" / "log").read_text()


def test_sequential_lr_warms_up_then_decays_as_torch_builds_it(tmp_path):
    t = trained(tmp_path, BOX, **{"early_stop = { patience = 2, min_delta = 0.01 }": ""})
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    warm = torch.optim.lr_scheduler.LinearLR(reference, start_factor=0.05, total_iters=20)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=600)
    chain = torch.optim.lr_scheduler.SequentialLR(reference, [warm, cosine], milestones=[20])
    for _ in range(t.progress.step):
        reference.step()
        chain.step()
    assert t.lr() == reference.param_groups[0]["lr"]
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert steps[0]["lr"] < steps[1]["lr"] == 3e-3 > steps[2]["lr"] > steps[-1]["lr"]  # up for 20 steps, then down


@pytest.mark.parametrize("scheduler, path, words", [
    ("name = 'SequentialLR'\nschedulers = [{ name = 'LinearLR' }, { name = 'StepLR', step_size = 2 }]",
     "scheduler.milestones", "SequentialLR needs milestones"),
    ("name = 'SequentialLR'\nmilestones = [3, 5]\nschedulers = [{ name = 'LinearLR' }, { name = 'StepLR', step_size = 2 }]",
     "scheduler.milestones", "2 schedulers need 1 increasing milestones"),
    ("name = 'SequentialLR'\nmilestones = [3]\nschedulers = [{ name = 'LinearLR' }, { name = 'Cosine', T_max = 2 }]",
     "scheduler.schedulers[1].name", "Cosine"),
    ("name = 'ChainedScheduler'\nschedulers = [{ name = 'StepLR', step_sise = 2 }]",
     "scheduler.schedulers[0].step_sise", "unknown key 'step_sise'"),
    ("name = 'ChainedScheduler'", "scheduler.schedulers", "needs the schedulers it runs"),
    ("name = 'StepLR'\nstep_size = 2\nschedulers = [{ name = 'LinearLR' }]", "scheduler.schedulers", "takes no list"),
])
def test_a_bad_chain_of_schedulers_is_refused_at_its_field(write_job, scheduler, path, words):
    from traind.jobs.errors import field_name

    with pytest.raises(JobSpecError) as caught:
        load_job(write_job(MLP + "[scheduler]\n" + scheduler + "\n"))
    found = {field_name(p.path): p for p in caught.value.problems}
    assert path in found and words in found[path].message and found[path].fix
    assert found[path].line is not None


def test_one_logit_with_0_1_labels_trains_binary_and_counts_logits_above_0(tmp_path):
    t = trained(tmp_path, BOX, **{"epochs = 12": "epochs = 2", "precision = \"bf16\"": "precision = \"fp32\"",
                                  "ema = 0.9": "ema = 0.0"})
    val = t.job.splits.val
    assert val.y.dtype == torch.float32 and val.y.shape == (len(val), 1)
    with torch.no_grad():
        out = t.job.model.eval()(val.x)
    assert t.validate()["val_acc"] == ((out > 0) == (val.y > 0.5)).float().mean().item()
    assert t.validate()["val_acc"] > 0.9


def test_multi_label_targets_from_npz_and_from_csv_columns(tmp_path):
    multilabel_file(tmp_path)
    t = trained(tmp_path, MULTI)
    assert t.job.splits.train.y.shape[1:] == (3,) and t.validate()["val_acc"] > 0.8
    rows = ["a,b,c,l1,l2"] + [f"{i % 7},{i % 3},{i % 5},{int(i % 7 > 3)},{int(i % 3 == 0)}" for i in range(60)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    text = MULTI.replace("layers = [[\"Linear\", 6, 32], [\"ReLU\"], [\"Linear\", 32, 3]]",
                         "layers = [[\"Linear\", 3, 2]]").replace("source = \"npz\"\npath = \"labels.npz\"",
                                                                  "source = \"csv\"\npath = \"rows.csv\"\n"
                                                                  "target = [\"l1\", \"l2\"]")
    job = build_job(job_at(tmp_path, text).spec, "csv")
    assert job.splits.train.x.shape[1] == 3 and job.splits.train.y.shape[1:] == (2,)
    assert "'l1' (column 3), 'l2' (column 4)" in job.splits.description


@pytest.mark.parametrize("change, words", [
    ({'["Linear", 256, 1]': '["Linear", 256, 2]'}, "needs outputs of shape (16, 1)"),
    ({"classes = 2 ": "classes = 3 "}, "takes labels of 0 and 1; the data holds 2"),
])
def test_binary_targets_that_do_not_fit_are_refused_with_a_fix(tmp_path, change, words):
    text = BOX
    for old, new in change.items():
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(JobSpecError) as caught:
        build_job(job_at(tmp_path, text).spec, "job")
    assert caught.value.problems[0].path == ("train", "loss") and words in caught.value.problems[0].message
    assert caught.value.problems[0].fix


def test_a_non_finite_loss_before_a_pause_rolls_back_and_then_pauses(tmp_path):
    """The losses are looked at before a save: a NaN found there rolls back to the newest
    healthy save, and the decision that asked for the save (a pause here) still happens."""
    from traind.jobs.world import Decision

    jf = job_at(tmp_path, MLP.replace("epochs = 3", "epochs = 3\nlog_every_steps = 100"))
    run = Run(jf, tmp_path / "run")
    poisoned = {"done": False}

    def boundary(trainer):
        p = trainer.progress
        if p.step == 12 and not poisoned["done"]:  # a NaN in the losses not looked at yet, then a pause
            poisoned["done"] = True
            trainer._losses[-1] = torch.tensor(math.nan)
            return run.ckpt.act(trainer, Decision({"manual"}, "after_save"))
        stops = run.ckpt.boundary(trainer)
        if not poisoned["done"]:
            trainer.quiet_until(0, 0.0)  # asked at every step until step 12
        return stops

    run.boundary = boundary
    assert not run.go()
    log = (tmp_path / "run" / "log").read_text()
    assert "non-finite loss nan at step 12" in log and "rolled back to save" in log
    saves = list_saves(tmp_path / "run" / "saves")[0]
    assert saves[-1].step == 9 and "manual" in saves[-1].kinds  # the pause's save, one step after the rollback
    assert run.trainer.progress.skip == [[1, 3]]


def test_a_compiled_model_trains_and_its_saves_keep_the_plain_names(tmp_path):
    """torch.compile on the CPU (inductor, through the machine's C++ compiler), in a `traind
    run` of its own; the same check runs on a GPU in tests/test_gpu.py."""
    from tests.test_gpu import compiled_run

    text = MLP.replace("epochs = 3", "max_steps = 6\ncompile = true").replace("samples = 300", "samples = 200")
    assert compiled_run(tmp_path, text)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_failure_at_the_compiled_models_first_step_is_the_jobs_error_naming_the_key(spec_of, accumulate):
    """What the first step of a compiled model raises (torch.compile compiles there) comes
    back as the job file's error, train.compile, with the fix; by either step path."""
    text = MLP.replace("epochs = 3", f"epochs = 1\naccumulate = {accumulate}\ncompile = true")
    t = Trainer(build_job(spec_of(text), "t"), Recorder())
    assert not t._compiled and t.alone == (accumulate == 1)

    class Unsupported(torch.nn.Module):  # stands where the compiled model would: fails as a backend would
        def forward(self, x):
            raise RuntimeError("inductor: no lowering for aten.weird\nmore detail")

    t.net = Unsupported()
    t.net._traind_compiled = True  # already made: _prepare keeps it
    with pytest.raises(JobSpecError) as error:
        t.fit()
    text = str(error.value)
    assert "train.compile" in text and "RuntimeError: inductor: no lowering for aten.weird" in text
    assert "set train.compile = false" in text and "more detail" not in text
    assert t.progress.step == 0


@pytest.mark.parametrize("accumulate", [1, 2])
def test_failures_of_the_data_or_after_the_first_compiled_step_are_not_blamed_on_compile(spec_of, monkeypatch,
                                                                                        accumulate):
    """Only what the compiled model's first step raises names train.compile: the data
    failing before it, or the model failing at a later step, is raised as it is."""
    text = MLP.replace("epochs = 3", f"epochs = 1\naccumulate = {accumulate}\ncompile = true")

    def broken_loader(*args, **kwargs):
        raise OSError("the data's disk went away")
        yield

    t = Trainer(build_job(spec_of(text), "t"), Recorder())
    t.net._traind_compiled = True  # (the plain model stands for the compiled one)
    monkeypatch.setattr(data, "train_loader", lambda *args, **kwargs: broken_loader())
    with pytest.raises(OSError, match="disk went away"):
        t.fit()
    monkeypatch.undo()

    class FailsLater(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            if self.calls > accumulate:  # the second step's first batch
                raise RuntimeError("a later failure")
            return self.model(x)

    t = Trainer(build_job(spec_of(text), "t"), Recorder())
    t.net = FailsLater(t.job.model)
    t.net._traind_compiled = True
    with pytest.raises(RuntimeError, match="a later failure"):
        t.fit()
    assert t.progress.step == 1 and t._compiled
