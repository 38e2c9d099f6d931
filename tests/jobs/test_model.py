import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from traind.jobs.build import build_job
from traind.jobs.errors import JobSpecError
from traind.jobs.model import count_parameters, has_lazy

TIED = """
seed = 0
[model]
layers = [["Linear", 6, 8], ["ReLU"], "@shared", ["ReLU"], "@shared", ["Linear", 8, 3]]
[model.blocks]
shared = ["Linear", 8, 8]
[data]
features = 6
classes = 3
samples = 200
"""


def built(spec_of, text):
    return build_job(spec_of(text), "t")


def test_shared_block_is_one_instance_with_tied_parameters(spec_of):
    job = built(spec_of, TIED)
    net = job.model
    assert net[2] is net[4]
    assert net[2].weight is net[4].weight
    assert count_parameters(net) == (6 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    assert sum(p.numel() for _, p in net.named_parameters(remove_duplicate=False)) > count_parameters(net)


def test_tied_parameters_stay_tied_through_training_steps(spec_of):
    job = built(spec_of, TIED)
    x, y = torch.randn(16, 6), torch.randint(3, (16,))
    before = job.model[2].weight.detach().clone()
    for _ in range(3):
        job.optimizer.zero_grad()
        job.loss_fn(job.model(x), y).backward()
        job.optimizer.step()
    assert job.model[2].weight is job.model[4].weight
    assert not torch.equal(before, job.model[2].weight)
    # the optimizer holds the tied parameter once, not twice
    assert sum(len(g["params"]) for g in job.optimizer.param_groups) == len(list(job.model.parameters()))


def test_blocks_can_nest_and_refer_to_blocks(spec_of):
    text = TIED.replace('shared = ["Linear", 8, 8]', 'shared = [["Linear", 8, 8], "@act"]\nact = ["Tanh"]')
    net = built(spec_of, text).model
    assert isinstance(net[2], nn.Sequential) and isinstance(net[2][1], nn.Tanh)
    assert net[2] is net[4]


def test_nested_lists_become_nested_sequentials(spec_of):
    text = TIED.replace('[["Linear", 6, 8], ["ReLU"], "@shared", ["ReLU"], "@shared", ["Linear", 8, 3]]',
                        '[[["Linear", 6, 8], ["ReLU"]], [["Linear", 8, 3]]]')
    net = built(spec_of, text).model
    assert isinstance(net[0], nn.Sequential) and isinstance(net[0][0], nn.Linear)
    assert net[1][0].out_features == 3


def test_lazy_modules_are_materialized_by_the_dry_forward_pass(spec_of):
    text = TIED.replace('["Linear", 6, 8]', '["LazyLinear", 8]').replace('["Linear", 8, 3]', '["LazyLinear", 3]')
    job = built(spec_of, text)
    assert not has_lazy(job.model)
    assert not any(isinstance(p, UninitializedParameter) for p in job.model.parameters())
    assert job.model[0].weight.shape == (8, 6)
    assert isinstance(job.model[0], nn.Linear)  # LazyLinear turns into Linear once materialized
    assert job.sample_shapes == ((64, 6), (64, 3))


def test_dry_forward_leaves_batchnorm_statistics_alone(spec_of):
    text = TIED.replace('["ReLU"], "@shared"', '["BatchNorm1d", 8], "@shared"', 1)
    job = built(spec_of, text)
    bn = job.model[1]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and int(bn.num_batches_tracked) == 0
    assert job.model.training


def test_init_schemes_apply_to_weights_and_biases(spec_of):
    text = TIED.replace('"@shared", ["Linear", 8, 3]]', '"@shared", ["BatchNorm1d", 8], ["Linear", 8, 3]]') \
        .replace("[model.blocks]", 'init = { weight = { name = "constant", val = 0.5 }, bias = "zeros" }\n[model.blocks]')
    net = built(spec_of, text).model
    for layer in (net[0], net[2], net[6]):
        assert torch.all(layer.weight == 0.5) and torch.all(layer.bias == 0)
    assert torch.all(net[5].weight == 1)  # 1-d weights (norm layers) keep their own init
    assert torch.all(net[5].bias == 0)


def test_xavier_and_normal_init_change_weights_deterministically(spec_of):
    default = built(spec_of, TIED).model[0].weight.detach().clone()
    init = 'init = { weight = "xavier_uniform" }\n[model.blocks]'
    first = built(spec_of, TIED.replace("[model.blocks]", init)).model[0].weight.detach().clone()
    again = built(spec_of, TIED.replace("[model.blocks]", init)).model[0].weight
    assert not torch.equal(default, first)
    assert torch.equal(first, again)
    bound = (6 / (6 + 8)) ** 0.5
    assert first.abs().max() <= bound
    normal = 'init = { weight = { name = "normal", std = 0.001 } }\n[model.blocks]'
    assert built(spec_of, TIED.replace("[model.blocks]", normal)).model[0].weight.abs().max() < 0.01


def test_shape_mismatch_names_the_layer_and_its_input(spec_of):
    text = TIED.replace('["Linear", 8, 3]', '["Linear", 7, 3]')
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, text)
    p = caught.value.problems[0]
    assert p.path == ("model", "layers", 5)
    assert "model.layers[5]" in p.message and "input of shape (64, 8)" in p.message
    assert "LazyLinear" in p.fix


def test_shape_mismatch_inside_a_nested_block(spec_of):
    text = TIED.replace('["Linear", 6, 8], ["ReLU"]', '[["Linear", 6, 8], ["Linear", 9, 8]], ["ReLU"]')
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, text)
    assert caught.value.problems[0].path == ("model", "layers", 0, 1)


def test_constructor_failure_points_at_the_entry(spec_of):
    text = TIED.replace('["ReLU"], "@shared", ["Linear"', '["Dropout", {p = 2.0}], "@shared", ["Linear"')
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, text)
    p = caught.value.problems[0]
    assert p.path == ("model", "layers", 3)
    assert "Dropout(...) failed: ValueError" in p.message


def test_target_with_kwargs(spec_of, tmp_path):
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def mlp(width=4):\n    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))\n"
        "def not_a_module():\n    return 42\n"
        "def picky(width):\n    raise ValueError('width must be even')\n")
    head = 'python_path = ["."]\n[model]\ntarget = "nets:{}"\nkwargs = {}\n[data]\nfeatures = 6\nclasses = 3\nsamples = 64\n'
    job = built(spec_of, head.format("mlp", "{ width = 5 }"))
    assert job.model[0].out_features == 5
    with pytest.raises(JobSpecError, match="returned int, not an nn.Module"):
        built(spec_of, head.format("not_a_module", "{}"))
    with pytest.raises(JobSpecError, match="raised ValueError: width must be even") as caught:
        built(spec_of, head.format("picky", "{ width = 3 }"))
    assert caught.value.problems[0].path == ("model", "kwargs")


def test_same_seed_same_weights_other_seed_other_weights(spec_of):
    a = built(spec_of, TIED).model.state_dict()
    b = built(spec_of, TIED).model.state_dict()
    c = built(spec_of, TIED.replace("seed = 0", "seed = 1")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_regression_outputs_must_match_the_targets(spec_of):
    text = ('[model]\nlayers = [["Linear", 4, 1]]\n[data]\ntask = "regression"\nfeatures = 4\noutputs = 2\n'
            '[train]\nloss = "MSELoss"\n')
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, text)
    p = caught.value.problems[0]
    assert p.path == ("train", "loss") and "(64, 1) with targets of shape (64, 2)" in p.message


def test_class_labels_beyond_the_outputs_are_caught_by_the_dry_run(spec_of):
    text = '[model]\nlayers = [["Linear", 4, 3]]\n[data]\nfeatures = 4\nclasses = 10\n'
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, text)
    p = caught.value.problems[0]
    assert p.path == ("train", "loss") and "needs at least" in p.message and "one per class" in p.fix


def test_a_label_beyond_the_outputs_anywhere_in_the_data_is_caught(spec_of, tmp_path):
    rows = "\n".join(f"{i},{i % 3}" for i in range(200)) + "\n999,7\n"
    (tmp_path / "d.csv").write_text("x,label\n" + rows)
    text = '[model]\nlayers = [["Linear", 1, 3]]\n[data]\nsource = "csv"\npath = "d.csv"\nshuffle = false\n'
    with pytest.raises(JobSpecError, match="class label 7 needs at least 8 outputs"):
        built(spec_of, text)


def test_deterministic_turns_on_deterministic_algorithms_and_off_again(spec_of, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards
    try:
        built(spec_of, "deterministic = true\n" + TIED)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        built(spec_of, TIED)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


REGRESSION = '[model]\nlayers = [["Linear", 4, 1]]\n[data]\ntask = "regression"\nfeatures = 4\nsamples = 100\n'


def test_a_regression_job_without_a_loss_trains_on_mse(spec_of):
    job = built(spec_of, REGRESSION)
    assert job.spec.train.loss == "MSELoss" and isinstance(job.loss_fn, torch.nn.MSELoss)
    assert spec_of(TIED).train.loss == "CrossEntropyLoss"  # classification keeps its default


def test_a_classification_loss_on_regression_targets_is_refused(spec_of):
    with pytest.raises(JobSpecError) as caught:
        built(spec_of, REGRESSION + '[train]\nloss = "CrossEntropyLoss"\n')
    p = caught.value.problems[0]
    assert p.path == ("train", "loss") and "takes class labels" in p.message and "MSELoss" in p.fix


def test_a_loss_that_no_output_can_change_is_refused(spec_of, tmp_path):
    (tmp_path / "d.csv").write_text("x,label\n" + "".join(f"{i},0\n" for i in range(100)))
    text = '[model]\nlayers = [["Linear", 1, 1]]\n[data]\nsource = "csv"\npath = "d.csv"\n'
    with pytest.raises(JobSpecError, match="is 0 whatever the model outputs"):  # softmax over one output is 1
        built(spec_of, text)
