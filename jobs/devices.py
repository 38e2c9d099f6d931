"""Pick the device a job trains on: try_gpu() and try_all_gpus(), as in d2l."""

from __future__ import annotations

import torch

from traind.jobs.errors import JobSpecError, Problem


def try_gpu(i: int = 0) -> torch.device:
    """The i-th GPU if it exists, else the CPU."""
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")


def try_all_gpus() -> list[torch.device]:
    """Every GPU, or [cpu] when there is none."""
    return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] or [torch.device("cpu")]


def resolve_device(value: str) -> torch.device:
    """The job's `device` key as a torch.device that exists on this machine."""
    if value == "auto":
        return try_gpu()
    if value == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = 0 if value == "cuda" else int(value.partition(":")[2])
    if index < count:
        return torch.device(f"cuda:{index}")
    found = ", ".join(f"cuda:{i}" for i in range(count)) or "no GPU"
    raise JobSpecError([Problem(("device",), f"device '{value}' does not exist here; found {found}",
                                fix="use device = 'auto' (try_gpu()) or one of the devices found")])


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} (try_gpu() found no GPU)" if not torch.cuda.is_available() else str(device)
