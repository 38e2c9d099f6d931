"""From a validated spec to everything training needs, checked on a real batch.

`traind validate` and `traind run` both come through here, so a job that validates
is one that builds: same seed, same order of RNG use, same device.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from traind.jobs import data, devices, model as model_mod, optim
from traind.jobs.errors import JobSpecError, Problem
from traind.jobs.spec import JobSpec


def use_deterministic_algorithms(on: bool) -> None:
    """Deterministic kernels (cuBLAS needs its workspace fixed before its first use), or torch's defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:  # the call imports torch._inductor: 1.6 s here
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = on


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device too) from the job's seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Job:
    """A job ready to train: its spec and the live objects built from it."""

    name: str
    spec: JobSpec
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    loss_fn: Callable
    splits: data.Splits
    sample_shapes: tuple[tuple, tuple]

    @property
    def steps_per_epoch(self) -> int:
        return data.batches_per_epoch(self.splits.train, self.spec.data.batch_size)

    @property
    def total_steps(self) -> int:
        epochs, limit = self.spec.train.epochs, self.spec.train.max_steps
        by_epochs = self.steps_per_epoch * epochs if epochs else None
        return min(s for s in (by_epochs, limit) if s is not None)

    @property
    def classification(self) -> bool:
        return self.spec.data.task == "classification"


def summary(job: Job) -> dict:
    """What `traind validate` tells of a built job: the model, its parameters and how the
    optimizer groups them, the device, the data, the length, and warnings."""
    model = job.model
    unique = model_mod.count_parameters(model)
    uses = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    names_of = {id(p): n for n, p in model.named_parameters()}
    groups = [{"tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"]),
               "lr": g.get("lr"), "weight_decay": g.get("weight_decay"),
               "names": [names_of.get(id(p), "?") for p in g["params"]][:6]} for g in job.optimizer.param_groups]
    (x_shape, out_shape), d = job.sample_shapes, job.spec.data
    return {"name": job.name, "model": str(model), "parameters": unique, "tied": uses - unique,
            "device": devices.describe(job.device), "data": job.splits.description, "batch_size": d.batch_size,
            "steps_per_epoch": job.steps_per_epoch, "input_shape": list(x_shape), "output_shape": list(out_shape),
            "total_steps": job.total_steps, "epochs": job.spec.train.epochs, "param_groups": groups,
            "warnings": [f"{where} is a plain tensor attribute of shape {tuple(t.shape)}: no save or export carries "
                         "it and .to(device) does not move it (a resume rebuilds it from the seed, but exported "
                         "weights loaded elsewhere meet another one); register_buffer keeps it"
                         for where, t in plain_tensors(model)]}


def plain_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors kept as plain attributes of the model's modules (d2l's FixedHiddenMLP keeps its
    `rand_weight` so): not parameters, not buffers, so no state_dict holds them."""
    return [(f"{name}.{key}" if name else key, value) for name, module in model.named_modules()
            for key, value in vars(module).items() if torch.is_tensor(value) and not isinstance(value, nn.Parameter)]


def build_job(spec: JobSpec, name: str, local_rank: int | None = None) -> Job:
    """Seed, load the data, build and check the model, then its optimizer, scheduler and
    loss (LOCAL_RANK: this process is that rank of several on its machine, and takes its GPU)."""
    use_deterministic_algorithms(spec.deterministic)
    seed_everything(spec.seed)
    if local_rank is None:  # one process, or the dry build of a job of several (validate, submit, intake)
        devices.check_ranks(spec.device, spec.distributed.processes)
        device = devices.resolve_device(spec.device)
    else:
        device = devices.rank_device(spec.device, local_rank)
    splits = data.load_splits(spec.data, spec.seed, spec.python_path)
    if len(splits.train) == 0:
        raise JobSpecError([Problem(("data",), "the training set is empty",
                                    fix="give more samples, or lower data.val_fraction")])
    monitor = spec.checkpoint.monitor
    if monitor.startswith("val_") and (splits.val is None or len(splits.val) == 0):
        raise JobSpecError([Problem(("checkpoint", "monitor"), f"{monitor} needs a validation set, and there is none",
                                    fix="set data.val_fraction > 0 (or return (train, val) from a factory), "
                                        "or monitor = 'train_loss'")])
    net = model_mod.build_model(spec.model, spec.python_path).to(device)
    x, y = data.first_batch(splits.train, spec.data)
    x, y = x.to(device), y.to(device)
    out = model_mod.dry_forward(net, x, spec.model)
    model_mod.apply_init(net, spec.model.init)
    loss_fn = optim.build_loss(spec.train, spec.python_path)
    _check_loss(loss_fn, out, y, spec, data.largest_label(splits))
    optimizer = optim.build_optimizer(net, spec.optimizer)
    scheduler = optim.build_scheduler(optimizer, spec.scheduler)
    return Job(name, spec, device, net, optimizer, scheduler, loss_fn, splits,
               (tuple(x.shape), tuple(out.shape)))


CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss", "MultiMarginLoss", "MultiLabelMarginLoss", "MultiLabelSoftMarginLoss")


def _check_loss(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor, spec: JobSpec, largest: int | None) -> None:
    """The loss and the metrics of validation, tried on the dry run's batch; class labels
    against the outputs over all of the data where it is in memory (LARGEST)."""
    def problem(message: str, fix: str) -> JobSpecError:
        return JobSpecError([Problem(("train", "loss"), message, fix=fix)])

    shapes = f"the model's output of shape {tuple(out.shape)} with targets of shape {tuple(y.shape)} ({y.dtype})"
    if spec.data.task == "regression" and spec.train.loss in CLASS_LOSSES:
        raise problem(f"{spec.train.loss} takes class labels, but data.task = 'regression' gives real-valued "
                      "targets", "use a regression loss such as MSELoss, L1Loss or HuberLoss (or remove "
                      "train.loss: regression defaults to MSELoss), or set data.task = 'classification'")
    if spec.data.task == "regression" and out.shape != y.shape:  # MSELoss would broadcast, silently wrong
        raise problem(f"regression compares {shapes}: they must be equal", _loss_fix(spec, out))
    if largest is None and spec.data.task == "classification" and not y.is_floating_point() and len(y):
        largest = int(y.max())
    if spec.data.task == "classification" and largest is not None and largest >= out.shape[-1]:
        # checked here, not left to the loss: on a GPU that is a device-side assert, fatal to the process
        raise problem(f"class label {largest} needs at least {largest + 1} outputs; {shapes}", _loss_fix(spec, out))
    try:
        with torch.no_grad():
            loss = loss_fn(out, y)
            if spec.data.task == "classification":
                optim.correct_count(out, y)
    except Exception as e:  # torch or user code; the pairing of model, data and loss is the job's problem
        raise problem(f"{spec.train.loss} cannot compare {shapes}: {type(e).__name__}: {e}",
                      _loss_fix(spec, out)) from e
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise problem(f"{spec.train.loss} returned {type(loss).__name__} of shape "
                      f"{tuple(getattr(loss, 'shape', ()))}, not a single number",
                      "use a loss with reduction 'mean' or 'sum'")
    if _blind(loss_fn, out, y):
        raise problem(f"{spec.train.loss} is {float(loss):g} whatever the model outputs ({shapes}): "
                      "training would learn nothing", _loss_fix(spec, out))


def _blind(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the loss ignores the output: no gradient at all reaches it (CrossEntropyLoss
    over a single output, say, is 0 for every input)."""
    if not out.is_floating_point():
        return False
    probe = out.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = loss_fn(probe, y)
            if not loss.requires_grad:
                return True
            (grad,) = torch.autograd.grad(loss, probe, allow_unused=True)
    except Exception:  # noqa: BLE001 - a loss that cannot be differentiated here fails in training, with its traceback
        return False
    return grad is None or not bool(grad.abs().sum() > 0)


def _loss_fix(spec: JobSpec, out: torch.Tensor) -> str:
    if spec.data.task == "classification":
        return (f"the last layer gives {out.shape[-1]} outputs: it needs one per class, with class labels "
                f"0..{out.shape[-1] - 1} and a classification loss such as CrossEntropyLoss")
    return "for regression, make the last layer's outputs match the targets and use a loss such as MSELoss"
