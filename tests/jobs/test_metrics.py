import json

import pytest

from traind.jobs.folder import METRICS_FILE, TENSORBOARD_DIR
from traind.jobs.metrics import Recorder, read_metrics, tensorboard_available

needs_tensorboard = pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def write_steps(recorder, steps, offset=0.0):
    for step in steps:
        recorder.metric({"kind": "step", "step": step, "epoch": 0, "loss": step + offset, "lr": 0.1})


def test_a_resume_forgets_the_records_after_its_save(tmp_path):
    recorder = Recorder(tmp_path)
    write_steps(recorder, range(1, 11))
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"kind": "step", "st')  # torn by a crash
    recorder.keep_until(5, 0)
    write_steps(recorder, [6, 7], offset=0.5)
    recorder.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(s, s) for s in range(1, 6)] + [(6, 6.5),
                                                                                                          (7, 7.5)]


@needs_tensorboard
def test_tensorboard_gets_every_number_under_its_kind(tmp_path):
    recorder = Recorder(tmp_path, tensorboard=True)
    recorder.keep_until(0, 0)
    write_steps(recorder, [1, 2])
    recorder.metric({"kind": "epoch", "epoch": 1, "step": 2, "val_loss": 0.25, "val_acc": 0.5, "lr": 0.1})
    recorder.metric({"kind": "save", "id": "000001-s2", "step": 2, "kinds": ["auto"], "stall_s": 0.001})
    recorder.close()
    assert scalars(tmp_path, "step/loss") == [(1, 1.0), (2, 2.0)]
    assert scalars(tmp_path, "epoch/val_loss") == [(2, 0.25)]
    assert scalars(tmp_path, "save/stall_s")[0][0] == 2
    assert not scalars(tmp_path, "epoch/epoch") and not scalars(tmp_path, "step/step")


@needs_tensorboard
def test_after_a_resume_tensorboard_shows_each_step_once(tmp_path):
    """A run killed after step 10 resumes from its save at step 5: TensorBoard must show
    steps 6 and 7 of the resumed run, not the lost run's 6 to 10."""
    first = Recorder(tmp_path, tensorboard=True)
    first.keep_until(0, 0)
    write_steps(first, range(1, 11))
    first.close()
    second = Recorder(tmp_path, tensorboard=True)
    second.keep_until(5, 0)
    write_steps(second, [6, 7], offset=0.5)
    second.close()
    assert scalars(tmp_path, "step/loss") == [(s, float(s)) for s in range(1, 6)] + [(6, 6.5), (7, 7.5)]


def test_no_event_files_without_tensorboard_or_when_turned_off(tmp_path, monkeypatch):
    recorder = Recorder(tmp_path, tensorboard=False)
    recorder.keep_until(0, 0)
    write_steps(recorder, [1])
    recorder.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    monkeypatch.setenv("TRAIND_TENSORBOARD", "0")
    assert tensorboard_available() is False
    assert json.loads((tmp_path / METRICS_FILE).read_text())["loss"] == 1
