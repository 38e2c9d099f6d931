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


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    ema: nn.Module | None = None
    """train.ema: the moving average of the weights (torch's AveragedModel around a copy)."""
    scaler: torch.amp.GradScaler | None = None
    """train.precision = 'fp16': the loss scale."""

    @property
    def batches_per_epoch(self) -> int:
        return data.batches_per_epoch(self.splits.train, self.spec.data.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of a whole epoch: its batches, train.accumulate to a step."""
        return -(-self.batches_per_epoch // self.spec.train.accumulate)

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the forward pass runs in (train.precision), None for fp32."""
        return AUTOCAST[self.spec.train.precision]

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
            "accumulate": job.spec.train.accumulate, "precision": job.spec.train.precision,
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
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl's collectives, the object ones too, use the current device
    splits = data.load_splits(spec.data, spec.seed, spec.python_path)
    if len(splits.train) == 0:
        raise JobSpecError([Problem(("data",), "the training set is empty",
                                    fix="give more samples, or lower data.val_fraction")])
    monitor = spec.checkpoint.monitor
    if monitor.startswith("val_") and (splits.val is None or len(splits.val) == 0):
        raise JobSpecError([Problem(("checkpoint", "monitor"), f"{monitor} needs a validation set, and there is none",
                                    fix="set data.val_fraction > 0 (or return (train, val) from a factory), "
                                        "or monitor = 'train_loss'")])
    if spec.train.precision == "fp16" and device.type != "cuda":
        raise JobSpecError([Problem(("train", "precision"), f"fp16 trains on a GPU only (with a GradScaler); this job "
                                    f"runs on {device.type}", fix="use precision = 'bf16' on a CPU, or 'fp32'")])
    net = model_mod.build_model(spec.model, spec.python_path).to(device)
    x, y = data.first_batch(splits.train, spec.data)
    x, y = x.to(device), y.to(device)
    out = model_mod.dry_forward(net, x, spec.model)
    model_mod.apply_init(net, spec.model.init)
    loss_fn = optim.build_loss(spec.train, spec.python_path)
    _check_loss(loss_fn, out, y, spec, data.labels_of(splits))
    if spec.train.loss in optim.BINARY_LOSSES:  # float targets of the output's shape, made once
        splits = data.float_targets(splits, out.shape[1:])
    optimizer = optim.build_optimizer(net, spec.optimizer)
    scheduler = optim.build_scheduler(optimizer, spec.scheduler)
    ema = optim.build_ema(net, spec.train.ema) if spec.train.ema else None
    scaler = torch.amp.GradScaler(device.type) if spec.train.precision == "fp16" else None
    return Job(name, spec, device, net, optimizer, scheduler, loss_fn, splits,
               (tuple(x.shape), tuple(out.shape)), ema, scaler)


CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss", "MultiMarginLoss", "MultiLabelMarginLoss", "MultiLabelSoftMarginLoss")


def _check_loss(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor, spec: JobSpec,
                labels: torch.Tensor | None) -> None:
    """The loss and the metrics of validation, tried on the dry run's batch; class labels
    against the outputs over all of the data where it is in memory (LABELS)."""
    def problem(message: str, fix: str) -> JobSpecError:
        return JobSpecError([Problem(("train", "loss"), message, fix=fix)])

    shapes = f"the model's output of shape {tuple(out.shape)} with targets of shape {tuple(y.shape)} ({y.dtype})"
    binary = spec.train.loss in optim.BINARY_LOSSES
    if binary and spec.data.task == "classification":
        _check_binary(spec, out, y, labels)
    if spec.data.task == "regression" and spec.train.loss in CLASS_LOSSES:
        raise problem(f"{spec.train.loss} takes class labels, but data.task = 'regression' gives real-valued "
                      "targets", "use a regression loss such as MSELoss, L1Loss or HuberLoss (or remove "
                      "train.loss: regression defaults to MSELoss), or set data.task = 'classification'")
    if spec.data.task == "regression" and out.shape != y.shape:  # MSELoss would broadcast, silently wrong
        raise problem(f"regression compares {shapes}: they must be equal", _loss_fix(spec, out))
    largest = int(labels.max()) if labels is not None and labels.numel() else None
    if largest is None and spec.data.task == "classification" and not y.is_floating_point() and len(y):
        largest = int(y.max())
    if spec.data.task == "classification" and not binary and largest is not None and largest >= out.shape[-1]:
        # checked here, not left to the loss: on a GPU that is a device-side assert, fatal to the process
        raise problem(f"class label {largest} needs at least {largest + 1} outputs; {shapes}", _loss_fix(spec, out))
    try:
        with torch.no_grad():
            loss = loss_fn(out, y)
            if spec.data.task == "classification":
                optim.correct_count(out, y, spec.train.loss)
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


def _check_binary(spec: JobSpec, out: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None) -> None:
    """A loss of 0/1 targets (BCEWithLogitsLoss...): one output per label, and labels of 0 and 1."""
    loss = spec.train.loss
    wanted = (len(y), 1) if y.dim() == 1 else tuple(y.shape)
    if tuple(out.shape) != wanted:
        what = "one 0/1 label per sample" if y.dim() == 1 else f"{y.shape[-1]} 0/1 labels per sample"
        raise JobSpecError([Problem(("train", "loss"), f"{loss} with {what} needs outputs of shape {wanted}; the "
                                    f"model gives {tuple(out.shape)}",
                                    fix=f"make the last layer give {wanted[-1]} output{'s' * (wanted[-1] > 1)} (one "
                                        "logit per label), or use CrossEntropyLoss with one output per class")])
    seen = labels if labels is not None else y
    odd = seen[(seen != 0) & (seen != 1)] if seen.numel() else seen
    if odd.numel():
        raise JobSpecError([Problem(("train", "loss"), f"{loss} takes labels of 0 and 1; the data holds "
                                    f"{odd.flatten()[0].item():g}",
                                    fix="use CrossEntropyLoss (one output per class) for more than two classes, "
                                        "or give 0/1 targets")])


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
