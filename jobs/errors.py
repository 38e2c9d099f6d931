"""Errors about job files and training, each pointing at a field and a fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from traind.store.errors import TraindError

PathPart = str | int


def field_name(path: tuple[PathPart, ...]) -> str:
    """('model', 'layers', 2, 0) -> 'model.layers[2][0]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file."""

    path: tuple[PathPart, ...]
    message: str
    fix: str = ""
    line: int | None = None

    def render(self) -> str:
        where = f"line {self.line}, " if self.line else ""
        text = f"{where}{field_name(self.path)}: {self.message}"
        return text + (f"\n    fix: {self.fix}" if self.fix else "")


class JobSpecError(TraindError):
    """A job file is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem], file: str | Path | None = None):
        self.problems = list(problems)
        self.file = str(file) if file is not None else None
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.file}: " if self.file else ""
        n = len(self.problems)
        lines = [f"{head}invalid job file ({n} problem{'s' if n != 1 else ''})"]
        lines += ["  " + p.render().replace("\n", "\n  ") for p in self.problems]
        return "\n".join(lines)


class TrainingError(TraindError):
    """Training could not go on (not a problem of the job file)."""


class NonFiniteLoss(TrainingError):
    """The loss of STEP (counted from 1), on batch BATCH of EPOCH (both from 0), was NaN or infinite."""

    def __init__(self, step: int, epoch: int, batch: int, loss: float, detail: str = ""):
        self.step, self.epoch, self.batch, self.loss = step, epoch, batch, loss
        msg = (f"non-finite loss {loss} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
               "lower the learning rate, set train.grad_clip, or check the data for NaN")
        super().__init__(msg + (f"; {detail}" if detail else ""))


class OutOfMemory(TrainingError):
    """The job asked for more memory (host or device) than there was."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether E is an allocation failure: Python's MemoryError, torch's OutOfMemoryError
    (CUDA), or the RuntimeError of torch's CPU and MPS allocators."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e) if isinstance(e, RuntimeError) else ""
    return any(s in text for s in ("can't allocate memory", "out of memory", "not enough memory"))
