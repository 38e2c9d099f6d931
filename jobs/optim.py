"""The optimizer, scheduler and loss a job names, built for its model."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from traind.jobs import names
from traind.jobs.errors import JobSpecError, Problem
from traind.jobs.spec_train import OptimizerSpec, SchedulerSpec, TrainSpec


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
    """The scheduler [scheduler] names; a chain (SequentialLR, ChainedScheduler) around the
    schedulers of its list, each built on the same optimizer."""
    if spec is None:
        return None
    stages = [_scheduler(optimizer, stage.name, stage.kwargs, ("scheduler", "schedulers", i))
              for i, stage in enumerate(spec.schedulers)]
    if spec.name == "SequentialLR":
        return _scheduler(optimizer, spec.name, {"schedulers": stages, **spec.kwargs}, ("scheduler",))
    if spec.name == "ChainedScheduler":
        return torch.optim.lr_scheduler.ChainedScheduler(stages, optimizer)
    return _scheduler(optimizer, spec.name, spec.kwargs, ("scheduler",))


def _scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict, where: tuple):
    cls = names.schedulers()[name]
    try:
        return cls(optimizer, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise JobSpecError([Problem((*where, "name"), f"{name}: {e}",
                                    fix=f"check the arguments of {names.signature_text(cls)}")]) from e


def build_ema(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of MODEL's weights and buffers (torch's AveragedModel
    around a copy of it): ema = decay * ema + (1 - decay) * weights, after every optimizer
    step; the first update copies the weights."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


BINARY_LOSSES = {"BCEWithLogitsLoss": 0.0, "MultiLabelSoftMarginLoss": 0.0, "BCELoss": 0.5}
"""Losses of 0/1 targets shaped as the output, and the output above which a label is 1
(logits: 0; BCELoss takes probabilities: 0.5)."""


class BinaryTargets(nn.Module):
    """A loss of 0/1 targets whose labels come as class indices (n,) or (n, k): they become
    floats of the output's shape (a no-op for targets made so once, at build)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.shape != out.shape or not y.is_floating_point():
            y = y.to(torch.float32).reshape(out.shape)
        return self.loss(out, y)


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
            made = found(**spec.loss_kwargs)
            return BinaryTargets(made) if spec.loss in BINARY_LOSSES else made
        except (ValueError, TypeError) as e:
            raise JobSpecError([Problem(("train", "loss_kwargs"), f"{spec.loss}: {e}",
                                        fix=f"check the arguments of {names.signature_text(found)}")]) from e
    if spec.loss_kwargs:
        raise JobSpecError([Problem(("train", "loss_kwargs"), f"{spec.loss} is a function, not a class",
                                    fix="remove loss_kwargs; a loss function is called as loss(output, target)")])
    return found


def correct_count(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, int]:
    """Classification: how many predictions in OUT are right (a tensor on OUT's device, so
    that counting costs no wait for the device), and of how many: one per row, the class of
    its largest score; with a loss of 0/1 targets one per label, 1 where the output is
    above the loss's threshold."""
    threshold = BINARY_LOSSES.get(loss)
    if threshold is None:
        return (out.argmax(dim=-1) == y).sum(), y.shape[0]  # (len() of a tensor costs a microsecond)
    return ((out > threshold) == (y.reshape(out.shape) > 0.5)).sum(), out.numel()
