"""Requests to a running job act exactly once: a quicksave makes one save, even when the
run looks again before it is committed, or after a crash between commit and removal."""

import subprocess
import sys
import threading
from dataclasses import dataclass, field

from tests.conftest import MLP
from tests.daemon.live import wait_for
from traind.daemon import requests
from traind.daemon.requests import JobRequests
from traind.jobs.world import Decision
from traind.store.saves import list_saves


@dataclass
class FakeSave:
    request: str | None


@dataclass
class FakeStore:
    found: list = field(default_factory=list)

    def saves(self):
        return list(self.found)


def look(taker, store=None):
    taker._next_look = 0.0  # requests are looked at most every LOOK_EVERY seconds; a test looks now
    return taker.decide(store or FakeStore())


def test_a_quicksave_request_makes_one_save_however_often_the_run_looks(tmp_path):
    requests.send(tmp_path, "save", "once")
    taker = JobRequests(tmp_path)
    first = look(taker)
    assert (first.kinds, first.note, first.stop) == ({"manual"}, "once", None)
    for _ in range(5):  # the save is still being written: the request is still there
        assert look(taker).kinds == set()
    assert len(requests.pending(tmp_path)) == 1
    first.after()  # its save is committed
    assert requests.pending(tmp_path) == []


def test_two_quicksaves_are_two_saves_at_two_boundaries(tmp_path):
    requests.send(tmp_path, "save", "one")
    requests.send(tmp_path, "save", "two")
    taker = JobRequests(tmp_path)
    assert look(taker).note == "one"
    second = taker.decide(FakeStore())  # looked again at once: the other was still waiting
    assert (second.kinds, second.note) == ({"manual"}, "two")


def test_a_quicksave_whose_save_a_crash_left_committed_is_not_made_again(tmp_path):
    path = requests.send(tmp_path, "save", "before the crash")
    decision = look(JobRequests(tmp_path), FakeStore([FakeSave(None), FakeSave(path.name)]))
    assert decision.kinds == set() and requests.pending(tmp_path) == []


def test_pause_stops_after_a_save_and_its_request_goes_once_the_run_ended(tmp_path):
    requests.send(tmp_path, "pause")
    taker = JobRequests(tmp_path)
    decision = look(taker)
    assert decision.stop == "after_save" and taker.ending == "paused"
    assert len(requests.pending(tmp_path)) == 1  # a crash before the run ends pauses it again
    assert taker.ended() == []
    assert requests.pending(tmp_path) == []


def test_a_cancel_stops_at_once_and_a_quicksave_beside_it_is_dropped_not_kept(tmp_path):
    requests.send(tmp_path, "save", "too late")
    requests.send(tmp_path, "cancel")
    taker = JobRequests(tmp_path)
    decision = look(taker)
    assert (decision.stop, decision.kinds, decision.after) == ("now", set(), None) and taker.ending == "cancelled"
    assert [r.kind for r in taker.ended()] == ["save"]  # said as dropped; it does not fire on the next run
    assert requests.pending(tmp_path) == []


def test_a_quicksave_at_an_autosave_boundary_is_one_save_of_both_kinds(write_job, tmp_path):
    """The requests and the policy decide once per boundary: a quicksave that falls on an
    autosave's step is one save, manual and auto, not two saves of the same state."""
    from traind.jobs.build import build_job
    from traind.jobs.checkpoint import Checkpointer
    from traind.jobs.jobfile import load_job
    from traind.jobs.metrics import Recorder
    from traind.jobs.train import Trainer

    jf = load_job(write_job(MLP.replace("epochs = 3", "epochs = 1")))
    folder = tmp_path / "run"
    trainer = Trainer(build_job(jf.spec, jf.name), Recorder(folder))
    checkpoints = Checkpointer(trainer, folder, trainer.recorder)
    taker = JobRequests(folder)
    requests.send(folder, "save", "at the epoch's end")

    def boundary(t):
        decision = taker.decide(checkpoints.store) if t.progress.batch == 0 else Decision()
        return checkpoints.act(t, checkpoints.due(t, decision))

    assert trainer.fit(boundary)
    checkpoints.close()
    trainer.recorder.close()
    saves = list_saves(folder / "saves")[0]
    assert [(s.kinds, s.note) for s in saves] == [(("auto", "best", "manual", "final"), "at the epoch's end")]
    assert requests.pending(folder) == []


def test_one_quicksave_of_a_real_run_is_one_manual_save(write_job, tmp_path):
    path = write_job(MLP.replace("samples = 300", "samples = 4000").replace("epochs = 3", "epochs = 12"))
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "training 'job'" in ((folder / "log").read_text() if (folder / "log").exists() else ""),
                 "training to start")
        requests.send(folder, "save", "once")
        assert proc.wait(300) == 0
    finally:
        proc.kill()
    manual = [s for s in list_saves(folder / "saves")[0] if "manual" in s.kinds]
    assert [s.note for s in manual] == ["once"]
    assert requests.pending(folder) == []


def test_every_job_command_takes_dir_for_a_folder_of_traind_run(write_job, tmp_path):
    import json

    from click.testing import CliRunner

    from traind.daemon.cli import cli

    def traind(*args):
        return CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), *map(str, args)])

    path = write_job(MLP.replace("samples = 300", "samples = 4000").replace("epochs = 3", "epochs = 40"))
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "traind.daemon.cli", "run", str(path), "--dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "training 'job'" in ((folder / "log").read_text() if (folder / "log").exists() else ""),
                 "training to start")
        assert json.loads(traind("status", "--dir", folder, "--json").output)["state"] == "running"
        assert "training 'job'" in traind("logs", "--dir", folder).output
        assert traind("rm", "--dir", folder).exit_code == 1  # running
        assert "save requested" in traind("save", "--dir", folder, "--note", "dir").output
        assert "pause requested" in traind("pause", "--dir", folder).output
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "paused at step" in out
    finally:
        proc.kill()
    assert [s.note for s in list_saves(folder / "saves")[0] if "manual" in s.kinds] == ["dir"]
    assert json.loads(traind("status", "--dir", folder, "--json").output)["state"] == "paused"
    resumed = traind("resume", "--dir", folder)
    assert resumed.exit_code == 1 and "run it again" in resumed.output
    assert traind("pause", "--dir", folder).exit_code == 1  # nothing trains it
    removed = traind("rm", "--dir", folder, "--keep-saves")
    assert removed.exit_code == 0 and not folder.exists()
    assert (tmp_path / "home" / "kept" / "run").is_dir()


def test_a_request_too_late_for_a_run_does_not_act_on_the_next(write_job, tmp_path, monkeypatch):
    """A cancel that arrives after the run's last look at its requests (here: the hook looks
    only at the first boundary) is dropped when the run ends; the job's next run, with more
    epochs, trains to the end instead of cancelling at once."""
    from traind.daemon.foreground import run_job
    from traind.jobs.jobfile import load_job

    monkeypatch.setattr(requests, "LOOK_EVERY", 1e9)
    folder = tmp_path / "run"
    bigger = MLP.replace("samples = 300", "samples = 4000")
    first = load_job(write_job(bigger.replace("epochs = 3", "epochs = 2")))
    said = []
    sent = threading.Event()

    def send_once_started():  # as `traind cancel` from another terminal, while the run trains
        wait_for(lambda: '"kind": "step"' in ((folder / "metrics.jsonl").read_text()
                                               if (folder / "metrics.jsonl").exists() else ""), "10 steps")
        requests.send(folder, "cancel")
        sent.set()

    sender = threading.Thread(target=send_once_started)
    sender.start()
    assert run_job(first, folder, said.append)  # done: the cancel came too late for it
    sender.join()
    assert sent.is_set() and requests.pending(folder) == []
    assert "request 'cancel' came as the run ended; dropped" in said
    more = load_job(write_job(bigger.replace("epochs = 3", "epochs = 4")))
    assert run_job(more, folder, said.append)  # trains epochs 3 and 4, not cancelled
    assert max(s.epoch for s in list_saves(folder / "saves")[0]) == 4
