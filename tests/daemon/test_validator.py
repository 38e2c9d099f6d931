import json

import pytest

from traind.daemon.validator import Validator

GOOD = '[model]\nlayers = [["Linear", 20, 10]]\n[data]\nsamples = 100\n'


@pytest.fixture
def validator():
    v = Validator(timeout=20)
    yield v
    v.close()


def test_a_good_file_gets_its_resolved_spec(validator, tmp_path):
    (tmp_path / "good.toml").write_text(GOOD)
    verdict = validator.check(tmp_path / "good.toml", tmp_path)
    assert verdict.error is None and verdict.name == "good"
    assert json.loads(verdict.spec_json)["model"]["layers"] == [["Linear", 20, 10]]


def test_an_invalid_file_gets_the_message(validator, tmp_path):
    (tmp_path / "bad.toml").write_text(GOOD.replace("Linear", "Linaer"))
    verdict = validator.check(tmp_path / "bad.toml", tmp_path)
    assert verdict.name is None and "unknown layer 'Linaer'; did you mean 'Linear'?" in verdict.error


def test_code_that_kills_the_process_takes_only_the_validator_down(validator, tmp_path):
    (tmp_path / "poison.py").write_text("import os\ndef net():\n    os._exit(9)\n")
    (tmp_path / "poison.toml").write_text('python_path = ["."]\n[model]\ntarget = "poison:net"\n')
    verdict = validator.check(tmp_path / "poison.toml", tmp_path)
    assert "its code ended the validating process (exit 9" in verdict.error
    (tmp_path / "good.toml").write_text(GOOD)
    assert validator.check(tmp_path / "good.toml", tmp_path).error is None  # a new child took over


def test_a_files_code_that_changes_the_process_changes_nothing_of_the_next_files_validation(validator, tmp_path):
    """Each file is validated in a fork of the warm child: its dtype, cwd, environment,
    imported modules and printed lines stay there."""
    (tmp_path / "meddle.py").write_text(
        "import os, torch\nprint('noise on stdout')\ndef net():\n    torch.set_default_dtype(torch.float64)\n"
        "    os.environ['MEDDLED'] = '1'\n    os.chdir('/')\n    return torch.nn.Linear(20, 10)\n")
    (tmp_path / "meddle.toml").write_text('python_path = ["."]\n[model]\ntarget = "meddle:net"\n[data]\nsamples = 100\n')
    first = validator.check(tmp_path / "meddle.toml", tmp_path)  # its own float64 layer fails its dry forward
    assert "fit that input" in first.error  # an answer: the printed line did not get into the answers
    (tmp_path / "meddle.py").write_text(  # the same module name, new code: imported again, not cached
        "import os, torch\ndef net():\n    assert torch.get_default_dtype() == torch.float32, 'dtype leaked'\n"
        "    assert 'MEDDLED' not in os.environ and os.getcwd() != '/', 'process state leaked'\n"
        "    return torch.nn.Linear(20, 10)\n")
    verdict = validator.check(tmp_path / "meddle.toml", tmp_path)
    assert verdict.error is None, verdict.error


def test_only_a_file_that_names_code_of_its_own_is_validated_in_a_fork(validator, tmp_path):
    """A fork per file costs more than a plain file's validation: files of traind's and
    torch's parts are validated in the warm child itself, which a file naming code (an
    import path anywhere, a python_path) never changes, since that one runs in a fork."""
    from traind.daemon.validator import names_code

    cases = {"plain.toml": (GOOD, False),
             "target.toml": (GOOD.replace('layers = [["Linear", 20, 10]]', 'target = "mymod:net"'), True),
             "loss.yaml": ("model:\n  layers: [[Linear, 20, 10]]\ntrain:\n  loss: pkg.losses:focal\n", True),
             "path.json": (json.dumps({"python_path": ["/x"], "model": {"layers": [["Linear", 20, 10]]}}), True),
             "space.toml": (GOOD + '[sweep]\ntrials = 2\n[sweep.space]\n"train.loss" = { choice = ["m:f"] }\n', True),
             "broken.toml": ("[model\n", False), "note.toml": (GOOD + 'description = "see: notes"\n', False)}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert names_code(str(tmp_path / name)) is expected, name
    (tmp_path / "meddle.py").write_text("import torch\ndef net():\n    torch.set_default_dtype(torch.float64)\n"
                                        "    return torch.nn.Linear(20, 10)\n")
    (tmp_path / "meddle.toml").write_text('python_path = ["."]\n[model]\ntarget = "meddle:net"\n[data]\nsamples = 100\n')
    assert validator.check(tmp_path / "meddle.toml", tmp_path).error is not None
    plain = validator.check(tmp_path / "plain.toml", tmp_path)  # in the child itself: float32 still
    assert plain.error is None and validator.check(tmp_path / "broken.toml", tmp_path).error is not None


def test_code_that_hangs_is_cut_off(tmp_path):
    (tmp_path / "hang.py").write_text("def net():\n    while True:\n        pass\n")
    (tmp_path / "hang.toml").write_text('python_path = ["."]\n[model]\ntarget = "hang:net"\n')
    v = Validator(timeout=8)
    try:
        assert "took longer than 8 s" in v.check(tmp_path / "hang.toml", tmp_path).error
    finally:
        v.close()


def test_an_unexpected_exception_is_an_answer_that_says_whose_code_raised_it(tmp_path):
    from traind.daemon import validator as module

    in_traind = compile("[][1]", module.__file__, "exec")  # an IndexError raised in traind's own file
    answer = module.unexpected(str(tmp_path / "x.toml"), _raised(lambda: exec(in_traind)))
    assert "traind failed validating this file (IndexError" in answer and "traind's bug" in answer
    answer = module.unexpected(str(tmp_path / "x.toml"), _raised(lambda: [][1]))
    assert "validating it raised IndexError" in answer and "traind's bug" not in answer


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e


OUTPUTS = {
    "a scalar": "return x.sum()",
    "a tuple": "return self.net(x), x",
    "a dict": "return {'logits': self.net(x)}",
}


@pytest.mark.parametrize("what", OUTPUTS)
def test_a_model_whose_output_is_not_a_batch_tensor_is_rejected_with_why_not_as_a_crash(validator, tmp_path, what):
    (tmp_path / "nets.py").write_text(
        "import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.net = nn.Linear(20, 10)\n"
        f"    def forward(self, x):\n        {OUTPUTS[what]}\n")
    (tmp_path / "odd.toml").write_text('python_path = ["."]\n[model]\ntarget = "nets:Net"\n[data]\nsamples = 100\n')
    verdict = validator.check(tmp_path / "odd.toml", tmp_path)
    assert "the model's forward returns" in verdict.error and "model.target" in verdict.error
    assert "ended the validating process" not in verdict.error
