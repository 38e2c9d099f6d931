"""What a user sees for each kind of bad job file: file, field, line, and a fix."""

import json

import pytest
import yaml

from traind.jobs.errors import JobSpecError, field_name
from traind.jobs.jobfile import load_job

GOOD = """
name = "ok"
[model]
layers = [["Linear", 4, 2]]
[data]
features = 4
classes = 2
"""


def problems_of(path):
    with pytest.raises(JobSpecError) as caught:
        load_job(path)
    return caught.value


def only(error):
    assert len(error.problems) == 1, error.render()
    return error.problems[0]


def test_message_names_file_field_line_and_fix(write_job):
    path = write_job(GOOD + "\n[optimizer]\nname = 'AdamW'\nlrr = 1e-3\n")
    error = problems_of(path)
    p = only(error)
    assert p.path == ("optimizer", "lrr")
    assert p.line == 11
    assert "unknown key 'lrr' in [optimizer]; did you mean 'lr'?" in p.message
    assert "AdamW(params, lr=0.001" in p.fix
    assert error.render().startswith(f"{path}: invalid job file (1 problem)")
    assert "line 11, optimizer.lrr:" in error.render()


def test_unknown_top_level_key_suggests_the_known_one(write_job):
    p = only(problems_of(write_job("devcie = 'cpu'\n" + GOOD)))
    assert p.path == ("devcie",) and p.line == 1
    assert "did you mean 'device'?" in p.message
    assert "device" in p.fix and "checkpoint" in p.fix


def test_unknown_key_in_fixed_section_suggests(write_job):
    p = only(problems_of(write_job(GOOD + "[train]\nepochz = 3\n")))
    assert p.path == ("train", "epochz")
    assert "unknown key 'epochz' in [train]; did you mean 'epochs'?" in p.message


@pytest.mark.parametrize("line, path, words", [
    ("epochs = 'ten'", ("train", "epochs"), "expected a whole number, got 'ten'"),
    ("epochs = -1", ("train", "epochs"), "should be greater than 0, got -1"),
    ("grad_clip = 'x'", ("train", "grad_clip"), "expected a number, got 'x'"),
    ("on_nonfinite = 'rollbak'", ("train", "on_nonfinite"), "did you mean 'rollback'?"),
    ("loss = 'CrossEntropyLos'", ("train", "loss"), "unknown loss 'CrossEntropyLos'; did you mean 'CrossEntropyLoss'?"),
    ("loss = 'mseloss'", ("train", "loss"), "did you mean 'MSELoss'?"),
    ("loss_kwargs = { smoothing = 0.1 }", ("train", "loss_kwargs"), "unexpected keyword argument 'smoothing'"),
])
def test_bad_values_in_train(write_job, line, path, words):
    p = only(problems_of(write_job(GOOD + f"[train]\n{line}\n")))
    assert p.path == path, p
    assert words in p.message
    assert p.line == 9
    assert p.fix


def test_wrong_type_fix_quotes_the_field_description(write_job):
    p = only(problems_of(write_job(GOOD.replace("features = 4", "features = 'four'"))))
    assert p.path == ("data", "features")
    assert "features per sample" in p.fix


def test_bad_job_name(write_job):
    p = only(problems_of(write_job(GOOD.replace('name = "ok"', 'name = "../escape"'))))
    assert p.path == ("name",) and "not a valid job name" in p.message


@pytest.mark.parametrize("layers, path, words", [
    ('[["Linaer", 4, 2]]', ("model", "layers", 0), "unknown layer 'Linaer'; did you mean 'Linear'?"),
    ('[["Linear", 4]]', ("model", "layers", 0), "missing a required argument: 'out_features'"),
    ('[["Linear", 4, 2, {biass = false}]]', ("model", "layers", 0), "unexpected keyword argument 'biass'"),
    ('[[["Linear", 4, 2], ["Relu"]]]', ("model", "layers", 0, 1), "did you mean 'ReLU'?"),
    ('["@nope"]', ("model", "layers", 0), "no block named 'nope'"),
    ('["Linear"]', ("model", "layers", 0), "neither a layer entry nor a block reference"),
    ('[]', ("model", "layers"), "empty"),
])
def test_bad_layers(write_job, layers, path, words):
    p = only(problems_of(write_job(GOOD.replace('[["Linear", 4, 2]]', layers))))
    assert p.path == path, p
    assert words in p.message
    assert p.line == 4


def test_block_cycle_is_refused(write_job):
    text = GOOD.replace('[["Linear", 4, 2]]', '["@a"]') + '[model.blocks]\na = ["@b"]\nb = [["ReLU"], "@a"]\n'
    error = problems_of(write_job(text))
    assert any("cycle" in p.message and "@a -> @b -> @a" in p.message for p in error.problems), error.render()


def test_model_needs_exactly_one_of_layers_and_target(write_job):
    error = problems_of(write_job(GOOD.replace('layers = [["Linear", 4, 2]]', 'target = "x:Y"\nlayers = [["ReLU"]]')))
    assert any(p.path == ("model",) and "exactly one of 'layers' and 'target'" in p.message for p in error.problems)


@pytest.mark.parametrize("section, words, path", [
    ("[optimizer]\nname = 'Adamw'", "unknown optimizer 'Adamw'; did you mean 'AdamW'?", ("optimizer", "name")),
    ("[optimizer]\nname = 'Adagrad'\nno_decay = ['bias']\nweight_decay = 0.1", None, None),
    ("[optimizer]\nname = 'Rprop'\nno_decay = ['bias']", "Rprop has no weight_decay", ("optimizer", "no_decay")),
    ("[scheduler]\nname = 'StepLr'", "did you mean 'StepLR'?", ("scheduler", "name")),
    ("[scheduler]\nname = 'StepLR'", "missing a required argument: 'step_size'", ("scheduler", "name")),
    ("[scheduler]\nname = 'StepLR'\nstep_size = 2\ngama = 0.1", "did you mean 'gamma'?", ("scheduler", "gama")),
    ("[scheduler]\nname = 'ReduceLROnPlateau'\ninterval = 'step'", "once per epoch", ("scheduler", "interval")),
    ("[scheduler]\nstep_size = 1", "missing required key 'name' in [scheduler]", ("scheduler", "name")),
])
def test_optimizer_and_scheduler_names_and_arguments(write_job, section, words, path):
    path_ = write_job(GOOD + section + "\n")
    if words is None:
        assert load_job(path_).spec.optimizer.kwargs == {"weight_decay": 0.1}
        return
    p = only(problems_of(path_))
    assert p.path == path
    assert words in p.message


@pytest.mark.parametrize("init, words", [
    ('{ weight = "xavier_unifrom" }', "did you mean 'xavier_uniform'?"),
    ('{ bias = { name = "constant" } }', "missing a required argument: 'val'"),
    ('{ bias = { val = 1 } }', "needs a 'name'"),
    ('{ weights = "zeros" }', "unknown key 'weights' in [model.init]; did you mean 'weight'?"),
])
def test_bad_init(write_job, init, words):
    text = GOOD.replace('layers = [["Linear", 4, 2]]', f'layers = [["Linear", 4, 2]]\ninit = {init}')
    p = only(problems_of(write_job(text)))
    assert words in p.message
    assert p.path[:2] == ("model", "init")


def test_data_keys_must_fit_the_source(write_job):
    p = only(problems_of(write_job(GOOD.replace("features = 4\nclasses = 2", "source = 'csv'\npath = 'missing.csv'"))))
    assert p.path == ("data", "path") and "no such file" in p.message
    error = problems_of(write_job(GOOD.replace("features = 4", "source = 'npz'\nfeatures = 4")))
    assert {p.path for p in error.problems} == {("data", "features"), ("data", "classes"), ("data", "path")}
    assert any("'features' does not apply to source 'npz'" in p.message for p in error.problems)


def test_unknown_data_source_suggests(write_job):
    p = only(problems_of(write_job(GOOD.replace("features = 4", "source = 'synthetc'\nfeatures = 4"))))
    assert p.path == ("data", "source") and "did you mean 'synthetic'?" in p.message


def test_failed_import_names_module_and_python_path(write_job, tmp_path):
    p = only(problems_of(write_job(GOOD.replace('layers = [["Linear", 4, 2]]', 'target = "no_such_mod:Net"'))))
    assert p.path == ("model", "target")
    assert "cannot import 'no_such_mod'" in p.message and "python_path" in p.message
    (tmp_path / "mine.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    text = 'python_path = ["."]\n' + GOOD.replace('layers = [["Linear", 4, 2]]', 'target = "mine:Nett"')
    p = only(problems_of(write_job(text)))
    assert "'mine' has no attribute 'Nett'; did you mean 'Net'?" in p.message


def test_module_that_raises_on_import_is_reported_not_crashed(write_job, tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    text = 'python_path = ["."]\n' + GOOD.replace('layers = [["Linear", 4, 2]]', 'target = "broken:Net"')
    p = only(problems_of(write_job(text)))
    assert "raised RuntimeError: boom" in p.message


def test_every_problem_is_reported_at_once(write_job):
    text = """
devcie = "cpu"
[model]
layers = [["Linaer", 4, 2], ["Linear", 4]]
[data]
source = "synthetc"
batch_size = 0
[optimizer]
lrr = 1
[train]
epochs = "x"
loss = "MSELos"
"""
    error = problems_of(write_job(text))
    paths = [p.path for p in error.problems]
    assert paths == [("devcie",), ("model", "layers", 0), ("model", "layers", 1), ("data", "source"),
                     ("data", "batch_size"), ("optimizer", "lrr"), ("train", "epochs"), ("train", "loss")]
    assert [p.line for p in error.problems] == [2, 4, 4, 6, 7, 9, 11, 12]


@pytest.mark.parametrize("suffix, text, line", [
    (".toml", "[model\nlayers = 1\n", 1),
    (".yaml", "seed: 1\n  indented: 2\nmodel: {}\n", 2),
    (".json", '{"model": {"layers": [}\n}', 1),
])
def test_syntax_errors_give_the_line(write_job, suffix, text, line):
    p = only(problems_of(write_job(text, suffix)))
    assert p.message.startswith(f"not valid {suffix[1:].upper()}")
    assert p.line == line


@pytest.mark.parametrize("suffix, text", [(".json", '{"seed": 1, "seed": 2}'), (".yaml", "seed: 1\nseed: 2\n")])
def test_duplicate_keys_are_refused(write_job, suffix, text):
    assert "duplicate key 'seed'" in only(problems_of(write_job(text, suffix))).message


def test_not_a_table_and_unknown_suffix(write_job):
    assert "not a table of keys" in only(problems_of(write_job("[1, 2]", ".json"))).message
    assert "unknown job file type '.ini'" in only(problems_of(write_job("x", ".ini"))).message


def test_yaml_lines_are_exact(write_job):
    text = "model:\n  layers:\n    - [Linear, 4, 2]\n    - [Relu]\ndata:\n  features: 4\n  classes: 2\n"
    p = only(problems_of(write_job(text, ".yaml")))
    assert p.path == ("model", "layers", 1) and p.line == 4


def test_json_lines(write_job):
    text = json.dumps({"model": {"layers": [["Linear", 4, 2]]}, "train": {"epochs": 2, "lss": "x"}}, indent=2)
    p = only(problems_of(write_job(text, ".json")))
    assert p.path == ("train", "lss") and p.line == text.splitlines().index('    "lss": "x"') + 1


def test_three_formats_give_one_spec(write_job):
    raw = {"name": "same", "model": {"layers": [["Linear", 4, 2]], "init": {"bias": "zeros"}},
           "data": {"features": 4, "classes": 2}, "optimizer": {"name": "SGD", "lr": 0.001},
           "scheduler": {"name": "StepLR", "step_size": 2}}
    toml_text = (GOOD.replace('"ok"', '"same"').replace('[["Linear", 4, 2]]', '[["Linear", 4, 2]]\ninit = {bias = "zeros"}')
                 + "[optimizer]\nname = 'SGD'\nlr = 1e-3\n[scheduler]\nname = 'StepLR'\nstep_size = 2\n")
    yaml_text = yaml.safe_dump(raw).replace("0.001", "1e-3")  # YAML 1.1 would read 1e-3 as text
    specs = [load_job(write_job(toml_text, ".toml", "a")).spec, load_job(write_job(yaml_text, ".yaml", "b")).spec,
             load_job(write_job(json.dumps(raw), ".json", "c")).spec]
    assert specs[0] == specs[1] == specs[2]
    assert specs[1].optimizer.kwargs == {"lr": 0.001}


def test_defaults_fill_a_minimal_file(write_job):
    job = load_job(write_job('[model]\nlayers = [["Linear", 20, 10]]\n', name="tiny"))
    assert job.name == "tiny"
    spec = job.spec
    assert (spec.seed, spec.priority, spec.device) == (0, 0, "auto")
    assert spec.data.source == "synthetic" and spec.optimizer.name == "AdamW"
    assert spec.train.epochs == 10 and spec.checkpoint.direction == "min"
    assert spec.scheduler is None


def test_max_steps_alone_unbounds_epochs(spec_of):
    spec = spec_of(GOOD + "[train]\nmax_steps = 7\n")
    assert spec.train.epochs is None and spec.train.max_steps == 7


def test_relative_paths_resolve_against_the_job_files_folder(write_job, tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,0\n2,1\n")
    text = 'python_path = ["lib"]\n' + GOOD.replace("features = 4\nclasses = 2", "source = 'csv'\npath = 'd.csv'")
    spec = load_job(write_job(text)).spec
    assert spec.data.path == str(tmp_path / "d.csv")
    assert spec.python_path == [str(tmp_path / "lib")]


def test_val_acc_needs_classification(write_job):
    text = GOOD.replace("features = 4\nclasses = 2", "task = 'regression'") + "[checkpoint]\nmonitor = 'val_acc'\n"
    p = only(problems_of(write_job(text)))
    assert p.path == ("checkpoint", "monitor") and "classification only" in p.message


def test_mode_follows_the_monitor(spec_of):
    assert spec_of(GOOD + "[checkpoint]\nmonitor = 'val_acc'\n").checkpoint.direction == "max"
    assert spec_of(GOOD + "[checkpoint]\nmonitor = 'val_acc'\nmode = 'min'\n").checkpoint.direction == "min"


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda:1", True), ("gpu", False), ("cuda:x", False)])
def test_device_values(write_job, device, ok):
    path = write_job(f'device = "{device}"\n' + GOOD)
    if ok:
        assert load_job(path).spec.device == device
    else:
        assert "use auto, cpu, cuda or cuda:N" in only(problems_of(path)).message


def test_without_validation_the_monitor_defaults_to_train_loss(spec_of):
    from traind.jobs.build import build_job

    assert spec_of(GOOD + "val_fraction = 0.0\n").checkpoint.monitor == "train_loss"
    with pytest.raises(JobSpecError) as caught:
        build_job(spec_of(GOOD + "val_fraction = 0.0\n[checkpoint]\nmonitor = 'val_loss'\n"), "j")
    p = only(caught.value)
    assert p.path == ("checkpoint", "monitor") and "needs a validation set" in p.message


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_must_fit_every_rng(write_job, seed):
    p = only(problems_of(write_job(f"seed = {seed}\n" + GOOD)))
    assert p.path == ("seed",) and "should be" in p.message


@pytest.mark.parametrize("depth, words", [(5000, "nested too deeply to read"), (100, "nested more than 32 deep")])
def test_deep_nesting_is_refused_not_crashed(write_job, depth, words):
    text = '{"model": {"layers": ' + "[" * depth + '"ReLU"' + "]" * depth + "}}"
    error = problems_of(write_job(text, ".json"))
    assert any(words in p.message for p in error.problems), error.render()


def _laughs(depth):
    """YAML anchors, each a list of 9 aliases of the one before: 9**DEPTH values."""
    lines = ['  a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(depth - 1)]
    return "anchors:\n" + "\n".join(lines) + "\n", chr(96 + depth)


@pytest.mark.parametrize("where", ["model:\n  layers: *{}\n", "data:\n  samples: *{}\n", "train:\n  epochs: *{}\n"])
def test_aliases_that_expand_past_any_job_are_refused_at_once(write_job, where):
    """A "billion laughs" file (387 million values from 9 lines) is refused as it is read;
    walked by validation, one under model.layers took minutes, one under data.samples 49 s."""
    import time

    anchors, last = _laughs(9)
    started = time.monotonic()
    p = only(problems_of(write_job(anchors + where.format(last), ".yaml")))
    assert "more than 100,000 values" in p.message and p.line == 1 and "alias fewer" in p.fix
    assert time.monotonic() - started < 30  # (minutes when walked; a hang is what this guards, not a speed)


def test_an_alias_that_holds_itself_is_refused_and_a_few_aliases_are_fine(write_job):
    p = only(problems_of(write_job("a: &a [1, *a]\nmodel:\n  layers: *a\n", ".yaml")))
    assert "more than 100,000 values" in p.message
    shared = "layer: &relu [ReLU]\nmodel:\n  layers: [[Linear, 4, 8], *relu, [Linear, 8, 8], *relu, [Linear, 8, 2]]\n"
    p = only(problems_of(write_job(shared, ".yaml")))
    assert p.path == ("layer",)  # only the unknown key: the aliases themselves are fine
    anchors, last = _laughs(5)  # 59,049 values: under the bound, read as written
    p = only(problems_of(write_job(anchors + "model:\n  layers: [[Linear, 4, 2]]\n", ".yaml")))
    assert p.path == ("anchors",)


def test_every_wrong_value_type_is_reported_at_once_at_its_own_key_and_line(write_job):
    text = ('[model]\nlayers = [["Linear", 20, 10]]\n[data]\nbatch_size = "32"\n[optimizer]\nlr = "fast"\n'
            'betas = 0.9\n[train]\nepochs = "ten"\nloss_kwargs = { label_smoothing = "lots" }\n')
    with pytest.raises(JobSpecError) as caught:
        load_job(write_job(text))
    found = {field_name(p.path): (p.line, p.message) for p in caught.value.problems}
    assert found == {
        "data.batch_size": (4, "expected a whole number, got '32'"),  # never coerced to 32
        "optimizer.lr": (6, "expected a number, got 'fast'"),
        "optimizer.betas": (7, "expected a list, got 0.9"),
        "train.epochs": (9, "expected a whole number, got 'ten'"),
        "train.loss_kwargs.label_smoothing": (10, "expected a number, got 'lots'"),
    }


def test_the_global_batch_must_divide_among_the_ranks(write_job):
    text = GOOD.replace("[data]", "[data]\nbatch_size = 30") + "[distributed]\nprocesses = 2\nnodes = 2\n"
    p = only(problems_of(write_job(text)))
    assert p.path == ("data", "batch_size") and p.line == 6 and "does not divide among 4 processes" in p.message
    assert "multiple of 4, such as 28" in p.fix
    spec = load_job(write_job(text.replace("batch_size = 30", "batch_size = 32"))).spec
    assert (spec.distributed.world_size, spec.distributed.backend) == (4, "auto")
