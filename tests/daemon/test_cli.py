import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tests.conftest import EXAMPLES, MLP
from traind.daemon.cli import cli
from traind.jobs.metrics import read_metrics

EXAMPLE_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".toml", ".yaml", ".json"))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_examples_exist_in_all_three_formats():
    assert {p.suffix for p in EXAMPLE_FILES} == {".toml", ".yaml", ".json"}
    assert len(EXAMPLE_FILES) >= 7


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_validate_every_example(path):
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"valid job '{path.stem}'" in out
    assert "parameters: " in out and "device: cpu" in out
    assert "forward: input (" in out and ") -> output (" in out


def test_validate_prints_tree_count_and_shapes():
    out = invoke("validate", EXAMPLES / "mlp.toml").output
    assert "(0): Linear(in_features=20, out_features=256, bias=True)" in out
    assert "parameters: 7,946\n" in out
    assert "forward: input (64, 20) -> output (64, 10)" in out
    tied = invoke("validate", EXAMPLES / "tied.yaml").output
    assert "parameters: 276 (tied: 72 reused, counted once)" in tied


def test_invalid_file_exits_2_with_the_message_and_no_traceback(write_job):
    path = write_job('[model]\nlayers = [["Linear", 20, 10]]\n[optimizer]\nlrr = 1\n')
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}: invalid job file (1 problem)" in result.output
    assert "line 4, optimizer.lrr: unknown key 'lrr' in [optimizer]; did you mean 'lr'?" in result.output
    assert "Traceback" not in result.output


def test_shape_error_from_the_dry_run_gets_file_and_line(write_job):
    path = write_job('[model]\nlayers = [["Linear", 20, 10], ["Linear", 5, 2]]\n')
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}: invalid job file" in result.output
    assert "line 2, model.layers[1]: the dry forward pass failed in model.layers[1] on input of shape (64, 10)" \
        in result.output


def test_run_trains_in_the_foreground_into_its_folder(write_job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_job(MLP, name="small")
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "small"
    lines = result.output.splitlines()
    assert [l.split()[1] for l in lines if l.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert lines[-1] == f"done: step 24/24; folder {folder.name}"
    assert (folder / "job.toml").read_text() == MLP
    assert json.loads((folder / "spec.json").read_text())["train"]["epochs"] == 3
    assert "epoch 3/3" in (folder / "log").read_text()
    assert [r["epoch"] for r in read_metrics(folder) if r["kind"] == "epoch"] == [1, 2, 3]


def test_run_with_dir(write_job, tmp_path):
    result = invoke("run", write_job(MLP), "--dir", tmp_path / "elsewhere")
    assert result.exit_code == 0
    assert (tmp_path / "elsewhere" / "metrics.jsonl").exists()


def test_schema_is_json_schema_with_descriptions():
    schema = json.loads(invoke("schema").output)
    assert schema["title"] == "JobSpec" and "model" in schema["required"]
    assert "try_gpu" in schema["properties"]["device"]["description"]
    assert "OptimizerSpec" in schema["$defs"]


@pytest.mark.parametrize("args", [["--home", "H", "schema"], ["schema", "--home", "H"]])
def test_home_is_accepted_before_and_after_the_command(args):
    assert invoke(*args).exit_code == 0


def test_bad_usage_exits_2():
    assert CliRunner().invoke(cli, ["validate", "/no/such/file.toml"]).exit_code == 2
    assert CliRunner().invoke(cli, ["frobnicate"]).exit_code == 2


LONG = MLP.replace("epochs = 3", "epochs = 100000")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_real_run_at_a_step_boundary(write_job, tmp_path, sig):
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(write_job(LONG)),
                             "--dir", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(r["kind"] == "epoch" for r in read_metrics(folder)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no epoch finished within 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "stopped by signal at step" in out and "saved; run again to continue" in out
    assert "Traceback" not in out
    stopped_at = int(out.split("stopped by signal at step ")[1].split("/")[0])
    from traind.store.saves import list_saves

    newest = list_saves(folder / "saves")[0][-1]
    assert newest.step == stopped_at  # the stop saved exactly where it stopped
    again = CliRunner().invoke(cli, ["run", str(write_job(LONG.replace("epochs = 100000", "epochs = 1"))),
                                     "--dir", str(folder)])
    assert f"resumed from save {newest.id} at step {stopped_at}" in again.output


def test_a_failing_module_is_one_line_on_screen_and_a_traceback_in_the_log(write_job, tmp_path):
    (tmp_path / "flaky.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(20, 10)\n        self.calls = 0\n"
        "    def forward(self, x):\n        self.calls += 1\n"
        "        if self.training and self.calls > 5:\n            raise RuntimeError('the GPU caught fire')\n"
        "        return self.lin(x)\n")
    path = write_job('python_path = ["."]\n[model]\ntarget = "flaky:Net"\n')
    result = CliRunner().invoke(cli, ["run", str(path), "--dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error: training failed at step 5: RuntimeError: the GPU caught fire" in result.output
    assert "Traceback" not in result.output
    log = (tmp_path / "out" / "log").read_text()
    assert "Traceback" in log and "the GPU caught fire" in log


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_the_resolved_spec_of_every_example_reads_back_equal(path):
    from traind.jobs.jobfile import load_job
    from traind.jobs.spec import JobSpec

    spec = load_job(path).spec
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_one_process_at_a_time_trains_a_job_folder(write_job, tmp_path):
    folder = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(write_job(LONG)),
                              "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while " saved " not in ((folder / "log").read_text() if (folder / "log").exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline  # a save acknowledged
            time.sleep(0.05)
        second = CliRunner().invoke(cli, ["run", str(write_job(LONG)), "--dir", str(folder)])
        assert second.exit_code == 1
        assert f"is being trained by pid {first.pid}" in second.output
    finally:
        first.kill()
        first.wait()
    after = CliRunner().invoke(cli, ["run", str(write_job(MLP)), "--dir", str(folder)])  # the lock died with it
    assert after.exit_code == 0 and "resumed from save" in after.output
