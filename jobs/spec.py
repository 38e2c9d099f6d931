"""The job file as one typed model: every key of CONTRACT §3, its default and its checks.

Structure and types are pydantic's; semantic checks (is 'Linaer' a torch.nn layer?)
run in validators that add Problems to the list in the validation context, so one pass
reports everything wrong with a file. Relative paths resolve against the context's
`base_dir` (the job file's folder), so a validated spec holds absolute paths only.
Here: what is built and from what (model, data, devices, processes) and the whole; how
it trains (optimizer, schedule, [train], [checkpoint]) is jobs/spec_train.py, and the
sections' common ground jobs/sections.py.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from traind.jobs import names
from traind.jobs.jobname import NAME_PATTERN
from traind.jobs.errors import Problem
from traind.jobs.model import check_layers, check_scheme
from traind.jobs.sections import NonNegativeInt, PositiveInt, Section, report, resolve_path
from traind.jobs.spec_train import CheckpointSpec, OptimizerSpec, SchedulerSpec, TrainSpec
from traind.jobs.sweep import SweepSpec
from traind.jobs.sweep import check as sweep_check

__all__ = ["CheckpointSpec", "DataSpec", "DistributedSpec", "InitSpec", "JobSpec", "ModelSpec", "OptimizerSpec",
           "SchedulerSpec", "TrainSpec"]

FILE_SOURCES = ("csv", "npz", "pt")
SOURCES = ("synthetic", *FILE_SOURCES)

Scheme = str | dict[str, Any]


class InitSpec(Section):
    weight: Scheme | None = None
    """torch.nn.init scheme for every weight of 2+ dimensions, as a name ('xavier_uniform') or {name = 'normal', std = 0.01}."""
    bias: Scheme | None = None
    """torch.nn.init scheme for every bias ('zeros', or {name = 'constant', val = 0.1})."""

    @field_validator("weight", "bias")
    @classmethod
    def _known_scheme(cls, value: Scheme | None, info: ValidationInfo) -> Scheme | None:
        if value is not None:
            report(info, check_scheme(value, ("model", "init", info.field_name)))
        return value


class ModelSpec(Section):
    layers: list[Any] | None = None
    """The network as nn.Sequential: entries [nn class name, positional args..., {keyword args}], nested lists for blocks, '@NAME' for a shared block."""
    target: str | None = None
    """Or any nn.Module class or factory by import path, 'package.module:ClassOrFactory'."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for `target`."""
    init: InitSpec | None = None
    """Optional torch.nn.init schemes applied after building."""
    blocks: dict[str, Any] = {}
    """Named blocks that `layers` reuses as '@NAME': one instance, so their parameters are tied."""

    @model_validator(mode="after")
    def _one_way_to_build(self, info: ValidationInfo) -> ModelSpec:
        problems = []
        if (self.layers is None) == (self.target is None):
            problems.append(Problem(("model",), "give exactly one of 'layers' and 'target'",
                                    fix="layers = [['Linear', 20, 10]] or target = 'package.module:Net'"))
        if self.kwargs and self.target is None:
            problems.append(Problem(("model", "kwargs"), "'kwargs' applies only to 'target'",
                                    fix="put arguments of torch.nn layers inside their layer entries"))
        if self.blocks and self.layers is None:
            problems.append(Problem(("model", "blocks"), "'blocks' applies only to 'layers'",
                                    fix="remove [model.blocks] or build the model from 'layers'"))
        if self.layers is not None:
            problems += check_layers(self.layers, self.blocks)
        if self.target is not None and not names.is_import_path(self.target):
            problems.append(Problem(("model", "target"), f"'{self.target}' is not an import path",
                                    fix=names.IMPORT_PATH_HELP))
        report(info, problems)
        return self


# Keys of [data] that only some sources read; giving one to another source is a mistake.
DATA_KEYS_FOR = {
    "samples": ("synthetic",), "features": ("synthetic",), "classes": ("synthetic",),
    "outputs": ("synthetic",), "path": FILE_SOURCES, "target": ("csv",),
    "header": ("csv",), "x": ("npz", "pt"), "y": ("npz", "pt"), "kwargs": ("factory",),
}


class DataSpec(Section):
    source: str = "synthetic"
    """synthetic | csv | npz | pt | 'package.module:factory' (returns a Dataset, or (train, val) Datasets)."""
    task: Literal["classification", "regression"] = "classification"
    """classification: y holds int64 class indices; regression: y is float32 of shape (samples, outputs)."""
    samples: PositiveInt = 2048
    """synthetic: number of samples, fixed by seed."""
    features: PositiveInt = 20
    """synthetic: features per sample."""
    classes: Annotated[int, Field(ge=2)] = 10
    """synthetic classification: number of classes."""
    outputs: PositiveInt = 1
    """synthetic regression: targets per sample."""
    path: str | None = None
    """csv / npz / pt: the data file; relative paths start at the job file's folder."""
    target: str | int | list[str | int] | None = None
    """csv: the target column, by name or index; default the last. A list: several target columns (0/1 labels for multi-label, or regression outputs)."""
    header: bool = True
    """csv: whether the first row names the columns."""
    x: str = "x"
    """npz / pt: key of the inputs."""
    y: str = "y"
    """npz / pt: key of the targets."""
    kwargs: dict[str, Any] = {}
    """factory: keyword arguments."""
    batch_size: PositiveInt = 64
    """Samples per training step."""
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    """Share of the samples held out for validation, chosen by seed."""
    shuffle: bool = True
    """Reshuffle the training set each epoch (the order follows from seed and epoch)."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str, info: ValidationInfo) -> str:
        if value not in SOURCES and not names.is_import_path(value):
            report(info, [Problem(("data", "source"), f"unknown data source '{value}'{names.suggest(value, SOURCES)}",
                                  fix=f"use one of {', '.join(SOURCES)} or 'package.module:factory'")])
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _fits_source(self, info: ValidationInfo) -> DataSpec:
        if self.source not in SOURCES and not names.is_import_path(self.source):
            return self  # an unknown source is reported by itself; its keys cannot be judged
        kind = self.source if self.source in SOURCES else "factory"
        problems = []
        for key in sorted(self.model_fields_set):
            allowed = DATA_KEYS_FOR.get(key)
            # a default written out (as the job folder's spec.json does) is no mistake
            if allowed and kind not in allowed and getattr(self, key) != type(self).model_fields[key].default:
                problems.append(Problem(("data", key), f"'{key}' does not apply to source '{self.source}'",
                                        fix=f"remove it; it is read only for source {' / '.join(allowed)}"))
        if kind in FILE_SOURCES:
            if self.path is None:
                problems.append(Problem(("data", "path"), f"source '{kind}' needs a path",
                                        fix=f"add path = 'data/train.{kind}' (relative to the job file)"))
            elif not os.path.isfile(self.path):
                problems.append(Problem(("data", "path"), f"no such file: {self.path}",
                                        fix="check the path; relative paths start at the job file's folder"))
        report(info, problems)
        return self


class DistributedSpec(Section):
    processes: PositiveInt = 1
    """Training processes (DDP ranks) on each machine: one per GPU on a GPU box, CPU processes with gloo otherwise."""
    nodes: PositiveInt = 1
    """Machines (the Slurm executor, or torchrun multi-node)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl on CUDA, gloo on CPU."""

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


def check_device(value: str) -> str:
    head, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return value
    raise ValueError(f"unknown device '{value}'; use auto, cpu, cuda or cuda:N")


class JobSpec(Section):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    """The job's name; default the file's stem. Letters, digits, '.', '_' and '-', at most 64."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    """Seeds the model's init, the data, its split and order, and every RNG (0 to 2**32 - 1)."""
    priority: int = 0
    """Higher runs first; ties run in submission order."""
    device: str = "auto"
    """auto = try_gpu(); or cpu, cuda, cuda:N."""
    deterministic: bool = False
    """Deterministic algorithms only (torch.use_deterministic_algorithms): exact resume on a GPU, at some speed."""
    threads: PositiveInt | None = None
    """CPU threads to train with; default the machine's cores divided among the daemon's workers. Fixed when the job first starts (for exact resume)."""
    python_path: list[str] = []
    """Folders put first on sys.path for `target` imports; relative ones start at the job file's folder."""
    model: ModelSpec
    """The network."""
    data: DataSpec = DataSpec()
    """Where the samples come from and how they are batched."""
    optimizer: OptimizerSpec = OptimizerSpec()
    """The optimizer and its arguments."""
    scheduler: SchedulerSpec | None = None
    """Optional learning-rate schedule."""
    train: TrainSpec = TrainSpec()
    """Length of training, loss and its guards."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Save cadence and what is kept."""
    distributed: DistributedSpec = DistributedSpec()
    """How many processes train the job (DDP through torch.distributed); data.batch_size stays the global batch."""
    sweep: SweepSpec | None = None
    """A hyperparameter search: the file is a sweep, whose trials are jobs of their own (jobs/sweep.py)."""

    @model_validator(mode="before")
    @classmethod
    def _monitor_train_loss_without_validation(cls, data: Any) -> Any:
        """With no validation set, an unset monitor follows train_loss instead of val_loss."""
        if not isinstance(data, dict):
            return data
        section, checkpoint = data.get("data"), data.get("checkpoint", {})
        if isinstance(section, dict) and section.get("val_fraction") == 0 and isinstance(checkpoint, dict) \
                and "monitor" not in checkpoint:
            data = {**data, "checkpoint": {**checkpoint, "monitor": "train_loss"}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_loss_follows_the_task(cls, data: Any) -> Any:
        """An unset loss is CrossEntropyLoss for classification and MSELoss for regression."""
        if not isinstance(data, dict):
            return data
        section, train = data.get("data"), data.get("train", {})
        if isinstance(section, dict) and section.get("task") == "regression" and isinstance(train, dict) \
                and "loss" not in train:
            data = {**data, "train": {**train, "loss": "MSELoss"}}
        return data

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("python_path")
    @classmethod
    def _absolute(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [resolve_path(p, info) for p in value]

    @model_validator(mode="after")
    def _fits_together(self, info: ValidationInfo) -> JobSpec:
        problems = []
        if self.checkpoint.monitor == "val_acc" and self.data.task != "classification":
            problems.append(Problem(("checkpoint", "monitor"), "val_acc is measured for classification only",
                                    fix="monitor = 'val_loss'"))
        ranks = self.distributed.world_size
        if self.data.batch_size % ranks:
            problems.append(Problem(("data", "batch_size"),
                                    f"data.batch_size {self.data.batch_size} is the global batch of one step and "
                                    f"does not divide among {ranks} processes "
                                    f"(distributed.processes {self.distributed.processes} x nodes {self.distributed.nodes})",
                                    fix=f"make data.batch_size a multiple of {ranks}, such as "
                                        f"{max(ranks, self.data.batch_size // ranks * ranks)}"))
        if self.sweep is not None:
            problems += sweep_check(self)
        # context {"imports": False}: checked elsewhere (the daemon never imports job code)
        for path, text in self._import_paths() if (info.context or {}).get("imports", True) else ():
            try:
                names.import_object(text, self.python_path)
            except LookupError as e:
                problems.append(Problem(path, str(e), fix=names.IMPORT_PATH_HELP))
        report(info, problems)
        return self

    def _import_paths(self) -> list[tuple[tuple, str]]:
        found = [(("model", "target"), self.model.target), (("train", "loss"), self.train.loss),
                 (("data", "source"), self.data.source)]
        return [(p, t) for p, t in found if t and names.is_import_path(t)]
