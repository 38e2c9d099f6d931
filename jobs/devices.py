"""Pick the device a job trains on: try_gpu() and try_all_gpus(), as in d2l."""

from __future__ import annotations

import os

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


PLACED = "TRAIND_PLACED_GPUS"
"""Set by the daemon for a worker it placed on some GPUs (their numbers on the machine,
which CUDA_VISIBLE_DEVICES shows it as cuda:0, cuda:1...): `device = "cuda:N"` names the
machine's GPU N."""


def resolve_device(value: str) -> torch.device:
    """The job's `device` key as a torch.device that exists on this machine."""
    if value == "auto":
        return try_gpu()
    if value == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = 0 if value == "cuda" else int(value.partition(":")[2])
    placed = [g for g in os.environ.get(PLACED, "").split(",") if g]
    if value != "cuda" and placed:
        if str(index) not in placed:
            raise JobSpecError([Problem(("device",), f"device '{value}': the daemon placed this job on GPU "
                                        f"{', '.join(placed)}", fix="submit it again; please report this")])
        index = placed.index(str(index))
    if index < count:
        return torch.device(f"cuda:{index}")
    found = ", ".join(f"cuda:{i}" for i in range(count)) or "no GPU"
    raise JobSpecError([Problem(("device",), f"device '{value}' does not exist here; found {found}",
                                fix="use device = 'auto' (try_gpu()) or one of the devices found")])


def check_ranks(value: str, processes: int) -> None:
    """At validation: a job of PROCESSES ranks on GPUs needs that many on this machine."""
    count = torch.cuda.device_count()
    if processes > 1 and count and value in ("auto", "cuda") and processes > count:
        found = ", ".join(f"cuda:{i}" for i in range(count))
        raise JobSpecError([Problem(("distributed", "processes"), f"distributed.processes = {processes} needs "
                                    f"{processes} GPUs (one per process), and this machine has {count}: {found}",
                                    fix=f"set distributed.processes to at most {count}, or device = 'cpu'")])
    if processes > 1 and value.startswith("cuda:"):
        rank_device(value, 0)


def rank_device(value: str, local_rank: int) -> torch.device:
    """The device of LOCAL_RANK, one rank of several on this machine: GPU LOCAL_RANK (of
    those CUDA_VISIBLE_DEVICES shows) where the job trains on GPUs, else the CPU."""
    count = torch.cuda.device_count()
    if value == "cpu" or (value == "auto" and count == 0):
        return torch.device("cpu")
    if value not in ("auto", "cuda"):
        raise JobSpecError([Problem(("device",), f"device '{value}' names one GPU, and this job trains in several "
                                    "processes, one GPU each", fix="use device = 'auto' or 'cuda'")])
    if local_rank >= count:
        raise JobSpecError([Problem(("distributed", "processes"), f"process {local_rank} of this machine has no GPU of "
                                    f"its own: {count} found", fix=f"set distributed.processes to at most {count}")])
    return torch.device(f"cuda:{local_rank}")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} (try_gpu() found no GPU)" if not torch.cuda.is_available() else str(device)
