"""The CLI as users of squeue, ts and docker expect it: queue order, filters, a daemon's
pulse, rejected files, short logs, quiet and JSON outputs, completion, examples."""

import io
import json

from click.testing import CliRunner

from tests.conftest import MLP
from tests.conftest import TINY as GOOD  # noqa: N811
from traind.daemon.cli import cli
from traind.daemon.foreground import ProgressLine
from traind.daemon.intake import Intake
from traind.daemon.jobstate import JobState, transition



def traind(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home.root), *map(str, args)])


def accept(home, name, priority=0):
    (home.inbox / f"{name}.toml").write_text(f"priority = {priority}\n" + GOOD)
    assert Intake(home).scan(delivered={f"{name}.toml"})[0].error is None
    return home.job_dir(name)


def test_ls_lists_in_queue_order_and_filters_by_state(home):
    accept(home, "zeta-finished")
    accept(home, "low")
    accept(home, "urgent", priority=5)
    accept(home, "later")
    accept(home, "on-hold")
    transition(home.job_dir("zeta-finished"), JobState.RUNNING)
    transition(home.job_dir("zeta-finished"), JobState.DONE)
    transition(home.job_dir("on-hold"), JobState.PAUSED)
    order = [r["name"] for r in json.loads(traind(home, "ls", "--json").output)]
    assert order == ["urgent", "low", "later", "on-hold", "zeta-finished"]  # what runs next first
    listing = traind(home, "ls", "--state", "queued").output.splitlines()
    assert listing[0].startswith("no daemon serves") and listing[1].split()[:2] == ["name", "state"]
    assert [line.split()[0] for line in listing[2:]] == ["urgent", "low", "later"]
    both = json.loads(traind(home, "ls", "--json", "--state", "paused", "--state", "done").output)
    assert [r["name"] for r in both] == ["on-hold", "zeta-finished"]


def test_ls_columns_fit_long_names(home):
    long = "a-job-name-that-is-far-longer-than-twenty-four"
    accept(home, long)
    header, row = traind(home, "ls").output.splitlines()[1:3]
    assert row.startswith(long + "  queued") and header.index("state") == row.index("queued")


def test_rejected_lists_files_with_their_reasons_and_status_points_there(home):
    (home.inbox / "typo.toml").write_text(GOOD.replace("Linear", "Linaer"))
    Intake(home).scan(delivered={"typo.toml"})
    out = traind(home, "rejected").output
    assert "typo.toml: typo.toml: invalid job file" in out and "unknown layer 'Linaer'" in out
    assert json.loads(traind(home, "rejected", "--json").output)[0]["file"] == "typo.toml"
    status = traind(home, "status", "typo")
    assert status.exit_code == 3 and "its file was rejected" in status.output and "typo.toml.error" in status.output


def test_logs_n_shows_the_last_lines(home):
    folder = accept(home, "chatty")
    (folder / "log").write_text("".join(f"line {i}\n" for i in range(10)))
    assert traind(home, "logs", "chatty", "-n", "2").output == "line 8\nline 9\n"
    assert traind(home, "logs", "chatty", "-n", "0").output == ""


def test_verify_quiet_and_json(tmp_path, write_job):
    path = write_job(MLP + "[checkpoint]\nevery_steps = 5\n")
    assert CliRunner().invoke(cli, ["run", str(path), "--dir", str(tmp_path / "run")]).exit_code == 0
    quiet = CliRunner().invoke(cli, ["verify", "--dir", str(tmp_path / "run"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""
    rows = json.loads(CliRunner().invoke(cli, ["verify", "--dir", str(tmp_path / "run"), "--json"]).output)
    assert rows and all(r["ok"] and r["problems"] == [] and r["job"] == "run" for r in rows)
    victim = tmp_path / "run" / "saves" / rows[0]["save"] / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    quiet = CliRunner().invoke(cli, ["verify", "--dir", str(tmp_path / "run"), "-q"])
    assert quiet.exit_code == 1 and quiet.output.count("CORRUPT") == 1 and ": ok" not in quiet.output


def test_validate_json_says_what_a_person_reads_or_every_problem(write_job):
    good = json.loads(CliRunner().invoke(cli, ["validate", "--json", str(write_job(MLP))]).output)
    assert good["valid"] and good["parameters"] == 20 * 32 + 32 + 32 * 10 + 10
    assert [g["names"] for g in good["param_groups"]] == [["0.weight", "0.bias", "3.weight", "3.bias"]]
    result = CliRunner().invoke(cli, ["validate", "--json", str(write_job(MLP.replace("epochs = 3", "epochs = 'x'")))])
    bad = json.loads(result.output)
    assert result.exit_code == 2 and not bad["valid"] and bad["problems"][0]["path"] == "train.epochs"


def test_validate_warns_of_plain_tensor_attributes_and_shows_optimizer_groups(write_job, tmp_path):
    (tmp_path / "fixed.py").write_text(
        "import torch\nfrom torch import nn\nclass FixedHiddenMLP(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.rand_weight = torch.rand((20, 20))\n"
        "        self.linear = nn.Linear(20, 20)\n    def forward(self, X):\n"
        "        return self.linear(torch.relu(self.linear(X) @ self.rand_weight + 1))\n")
    path = write_job('python_path = ["."]\n[model]\ntarget = "fixed:FixedHiddenMLP"\n[data]\nclasses = 20\n'
                     'samples = 100\n[optimizer]\nno_decay = ["bias"]\n')
    out = CliRunner().invoke(cli, ["validate", str(path)]).output
    assert "warning: rand_weight is a plain tensor attribute of shape (20, 20)" in out
    assert "optimizer group 0: 1 tensors, 400 parameters, lr 0.001, weight_decay 0.01 (linear.weight)" in out
    assert "optimizer group 1: 1 tensors, 20 parameters, lr 0.001, weight_decay 0.0 (linear.bias)" in out


def test_submit_json(home, write_job):
    result = traind(home, "submit", "--json", write_job(MLP))
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [{"file": str(write_job(MLP)), "name": "job",
                                          "delivered": str(home.inbox / "job.json")}]


def test_shell_completion_offers_job_names_and_save_ids(home, tmp_path, monkeypatch):
    accept(home, "alpha")
    accept(home, "beta")
    save = home.job_dir("beta") / "saves" / "000001-s5"
    save.mkdir(parents=True)
    (save / "manifest.json").write_text(json.dumps({"format": "traind-save/1", "id": save.name, "seq": 1, "step": 5,
                                                   "epoch": 0, "kinds": ["auto"], "files": {}}))

    def complete(words):
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - (0 if words.endswith(" ") else 1)))
        result = CliRunner().invoke(cli, [], env={"_TRAIND_COMPLETE": "bash_complete"}, prog_name="traind")
        return [line.split(",", 1)[1] for line in result.output.splitlines()]

    assert complete(f"traind --home {home.root} status a") == ["alpha"]
    assert complete(f"traind --home {home.root} load beta 0") == ["000001-s5"]
    assert complete(f"traind --home {home.root} rm ") == ["alpha", "beta"]


def test_every_command_shows_an_example_in_its_help():
    for name, command in cli.commands.items():
        assert "Example" in CliRunner().invoke(cli, [name, "--help"]).output, name


def test_the_progress_line_shows_the_epoch_the_batch_and_steps_per_second(monkeypatch):
    times = iter([100.0, 101.0])
    monkeypatch.setattr("traind.daemon.foreground.time.monotonic", lambda: next(times))
    job = type("J", (), {"batches_per_epoch": 10, "total_steps": 30,
                         "spec": type("S", (), {"train": type("T", (), {"epochs": 3})()})()})()
    trainer = type("Tr", (), {"job": job, "progress": type("P", (), {"epoch": 1, "batch": 5, "step": 15})()})()
    out = io.StringIO()
    line = ProgressLine(out)
    line(trainer)
    trainer.progress.step = 25
    line(trainer)
    assert out.getvalue().endswith("epoch 2/3 [##########..........] batch 5/10, step 25/30, 10.0 steps/s")
    line.clear()
    assert out.getvalue().endswith("\r\x1b[K") and not line.shown


def test_submit_of_two_files_with_one_name_delivers_neither(home, write_job, tmp_path):
    a, b = write_job(MLP, name="a"), write_job('name = "a"\n' + MLP, name="b")
    result = traind(home, "submit", a, b)
    assert result.exit_code == 2 and "job name 'a' given twice" in result.output
    assert "nothing delivered: 2 of 2 files" in result.output and list(home.inbox.glob("*.json")) == []


def test_ls_watch_redraws_the_table_until_interrupted(home, monkeypatch):
    accept(home, "watched")
    draws = []

    def sleep(seconds):
        draws.append(seconds)
        if len(draws) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("traind.daemon.jobs_cli.time.sleep", sleep)
    result = traind(home, "ls", "--watch")
    assert result.output.count("watched") == 2 and draws == [1.0, 1.0]


def test_status_tells_a_job_that_stopped_early_and_why(tmp_path):
    job = tmp_path / "early.toml"
    job.write_text(MLP.replace("epochs = 3", "epochs = 30\nearly_stop = { patience = 1, min_delta = 1.0 }"))
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(job), "--dir", str(tmp_path / "run")]).exit_code == 0
    status = json.loads(runner.invoke(cli, ["status", "--dir", str(tmp_path / "run"), "--json"]).output)
    assert status["state"] == "done" and status["stopped"] == "early stop at epoch 2" and status["epoch"] == 2
    text = runner.invoke(cli, ["status", "--dir", str(tmp_path / "run")]).output
    assert "stopped: early stop at epoch 2" in text
