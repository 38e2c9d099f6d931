"""The optimizer, scheduler and loss a job names, built for its model."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from traind.jobs import names
from traind.jobs.errors import JobSpecError, Problem
from traind.jobs.spec import OptimizerSpec, SchedulerSpec, TrainSpec


def matches(name: str, pattern: str) -> bool:
    """'bias' matches '0.bias'; '*norm*' matches 'encoder.norm.weight'."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def param_groups(model: nn.Module, spec: OptimizerSpec) -> list[dict]:
    """All trainable parameters (tied ones once); those matching no_decay get weight_decay 0."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not spec.no_decay:
        return [{"params": [p for _, p in named]}]
    unused = [pat for pat in spec.no_decay if not any(matches(n, pat) for n, _ in named)]
    if unused:
        sample = ", ".join(n for n, _ in named[:6])
        raise JobSpecError([Problem(("optimizer", "no_decay"), f"pattern '{unused[0]}' matches no parameter",
                                    fix=f"parameters are named like: {sample}")])
    quiet = [p for n, p in named if any(matches(n, pat) for pat in spec.no_decay)]
    loud = [p for n, p in named if not any(matches(n, pat) for pat in spec.no_decay)]
    return [g for g in ({"params": loud}, {"params": quiet, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    cls = names.optimizers()[spec.name]
    try:
        return cls(param_groups(model, spec), **spec.kwargs)
    except (ValueError, TypeError) as e:
        raise JobSpecError([Problem(("optimizer", "name"), f"{spec.name}: {e}",
                                    fix=f"check the arguments of {names.signature_text(cls)}")]) from e


def build_scheduler(optimizer: torch.optim.Optimizer, spec: SchedulerSpec | None):
    if spec is None:
        return None
    cls = names.schedulers()[spec.name]
    try:
        return cls(optimizer, **spec.kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise JobSpecError([Problem(("scheduler", "name"), f"{spec.name}: {e}",
                                    fix=f"check the arguments of {names.signature_text(cls)}")]) from e


def build_loss(spec: TrainSpec, python_path: list[str]) -> Callable:
    """A torch.nn loss instance, or the user's callable (a Module class is instantiated)."""
    if names.is_import_path(spec.loss):
        try:
            found = names.import_object(spec.loss, python_path)
        except LookupError as e:
            raise JobSpecError([Problem(("train", "loss"), str(e), fix=names.IMPORT_PATH_HELP)]) from e
    else:
        found = names.nn_losses()[spec.loss]
    if isinstance(found, type):
        try:
            return found(**spec.loss_kwargs)
        except (ValueError, TypeError) as e:
            raise JobSpecError([Problem(("train", "loss_kwargs"), f"{spec.loss}: {e}",
                                        fix=f"check the arguments of {names.signature_text(found)}")]) from e
    if spec.loss_kwargs:
        raise JobSpecError([Problem(("train", "loss_kwargs"), f"{spec.loss} is a function, not a class",
                                    fix="remove loss_kwargs; a loss function is called as loss(output, target)")])
    return found


def correct_count(out: torch.Tensor, y: torch.Tensor) -> int:
    """Classification: how many rows of OUT have their largest score at the class in Y."""
    return int((out.argmax(dim=-1) == y).sum())
