"""TensorBoard event files, written by the thread that records, with no thread of their own.

torch's `SummaryWriter` cost 127 us of CPU per step record (two scalars) on the 2-core VM,
against 8 us for the record's JSON line (bench/loop.py's TensorBoard row read 0.84 to 0.92
of the loop's speed without it, on the seed MLP): each `add_scalar` goes through a bounded
queue to a writer thread, which takes the GIL from the training thread to frame the record
with a CRC-32C computed in pure Python, byte by byte. This file's way: 13 us a record.
Here a record's scalars become one Event (tensorboard's own protos), framed as TensorFlow's
record format says (the CRC from google-crc32c, C, where installed), and kept in memory
until `flush`: at each `Recorder.sync` (every save's commit), at each epoch's record, and
at least every FLUSH_SECONDS. Like SummaryWriter's, the file is not fsynced: `metrics.jsonl`
is the durable record, and a resume writes the steps it redoes again (`purge_step`).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary

try:
    from google_crc32c import value as _crc32c
except ImportError:  # tensorboard's own, pure Python (a few microseconds a record more)
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c

FLUSH_SECONDS = 5.0
"""Longest time a written record waits in memory (SummaryWriter's default: 120 s)."""

_files = itertools.count()


def masked_crc32c(data: bytes) -> int:
    """The record format's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    crc = _crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """DATA framed as a TFRecord: length, its masked CRC, the bytes, their masked CRC."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data, struct.pack("<I", masked_crc32c(data))))


class EventFile:
    """One event file in FOLDER (named as TensorBoard's own writers name theirs). With
    PURGE_STEP, TensorBoard hides the events of earlier files from that step on."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_files)}"
        self.path = folder / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pending = bytearray()
        self._flush_by = time.monotonic() + FLUSH_SECONDS
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._add(Event(wall_time=time.time(), step=purge_step,
                            session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def scalars(self, step: int | None, values: dict[str, float]) -> None:
        """VALUES ({tag: number}) as one event at STEP."""
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._add(Event(wall_time=time.time(), step=step or 0, summary=summary))
        if time.monotonic() >= self._flush_by:
            self.flush()

    def _add(self, event: Event) -> None:
        self._pending += record(event.SerializeToString())

    def flush(self) -> None:
        """Hand the records written so far to the OS."""
        self._flush_by = time.monotonic() + FLUSH_SECONDS
        pending, self._pending = self._pending, bytearray()
        view = memoryview(pending)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)
