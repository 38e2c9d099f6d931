import io
import random
import time

import pytest

pytest.importorskip("tensorboard")

from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards_crc  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402

from tests.jobs.test_metrics import scalars  # noqa: E402  (a job folder's: its TENSORBOARD_DIR read)
from traind.jobs import events  # noqa: E402
from traind.jobs.folder import TENSORBOARD_DIR  # noqa: E402


def test_records_are_framed_byte_for_byte_as_tensorboards_record_writer_frames_them():
    rng = random.Random(0)
    for size in [0, 1, 7, 8, 31, 32, 33, 1000, 65536]:
        data = bytes(rng.getrandbits(8) for _ in range(size))
        assert events.masked_crc32c(data) == tensorboards_crc(data)
        theirs = io.BytesIO()
        RecordWriter(theirs).write(data)
        assert events.record(data) == theirs.getvalue()


def test_scalars_wait_in_memory_until_a_flush_then_tensorboard_reads_them(tmp_path):
    file = events.EventFile(tmp_path / TENSORBOARD_DIR)
    file.scalars(1, {"step/loss": 0.5, "step/lr": 0.1})
    file.scalars(2, {"step/loss": 0.25})
    assert scalars(tmp_path, "step/loss") == []  # not written yet: no write per record
    file.flush()
    assert scalars(tmp_path, "step/loss") == [(1, 0.5), (2, 0.25)]
    assert scalars(tmp_path, "step/lr") == [(1, pytest.approx(0.1))]
    file.close()


def test_a_record_waits_at_most_flush_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "FLUSH_SECONDS", 0.2)
    file = events.EventFile(tmp_path / TENSORBOARD_DIR)
    file.scalars(1, {"step/loss": 1.0})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not scalars(tmp_path, "step/loss"):
        time.sleep(0.05)
        file.scalars(2, {"step/other": 2.0})  # a later record finds the deadline passed
    assert scalars(tmp_path, "step/loss") == [(1, 1.0)]
    file.close()


def test_a_purge_step_hides_the_earlier_files_events_from_that_step_on(tmp_path):
    first = events.EventFile(tmp_path / TENSORBOARD_DIR)
    first.scalars(None, {})  # an empty record is a valid event
    for step in range(1, 11):
        first.scalars(step, {"step/loss": float(step)})
    first.close()
    time.sleep(1.1)  # TensorBoard orders files by their name's timestamp, in seconds
    second = events.EventFile(tmp_path / TENSORBOARD_DIR, purge_step=6)
    second.scalars(6, {"step/loss": 6.5})
    second.close()
    assert scalars(tmp_path, "step/loss") == [(s, float(s)) for s in range(1, 6)] + [(6, 6.5)]
