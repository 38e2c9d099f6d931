"""Snapshot, then persist: training waits only for a copy of its state.

`Snapshot.capture` copies tensors into host buffers that live from save to save (pinned
when they come from a GPU, so the copy runs at full speed), and `Writer` persists the
copy on one background thread. At most one save is in flight: the next capture first
waits for the previous write, since it reuses the same buffers. Memory stays at the
state plus one snapshot; nothing is serialized in memory. A save that training would wait
for at once (the final one, one before a stop) is written on the calling thread instead:
a thread started only to be joined costs its start and the GIL passed back and forth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class Snapshot:
    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def capture(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of TENSORS, valid until the next capture."""
        out, on_gpu = {}, False
        for name, t in tensors.items():
            t = t.detach()
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._buffers[name] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            on_gpu |= t.is_cuda
            out[name] = buf
        if on_gpu:
            torch.cuda.synchronize()
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class Writer:
    """Runs one persist job at a time, on a background thread (or, asked to, on the
    caller's); its failure surfaces at the next `wait` (or `submit`), on the training thread."""

    def __init__(self, name: str = "traind-writer"):
        self._name = name
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], Any], here: bool = False) -> None:
        """Run JOB in the background, after the job in flight; HERE: on this thread, now
        (its result or error is then `wait`'s all the same)."""
        self.wait()
        self._result, self._error = None, None

        def run() -> None:
            try:
                self._result = job()
            except BaseException as e:  # handed to the training thread by wait(), not lost here
                self._error = e

        if here:
            run()
            return
        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()

    def wait(self) -> Any:
        """Block until the job in flight is done; return its result or raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result
