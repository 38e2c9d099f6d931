"""The job file as one typed model: every key of CONTRACT §3, its default and its checks.

Structure and types are pydantic's; semantic checks (is 'Linaer' a torch.nn layer?)
run in validators that add Problems to the list in the validation context, so one pass
reports everything wrong with a file. Relative paths resolve against the context's
`base_dir` (the job file's folder), so a validated spec holds absolute paths only.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from traind.jobs import metrics, names
from traind.jobs.jobname import NAME_PATTERN
from traind.jobs.errors import Problem, field_name
from traind.jobs.model import check_layers, check_scheme

FILE_SOURCES = ("csv", "npz", "pt")
SOURCES = ("synthetic", *FILE_SOURCES)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def report(info: ValidationInfo, problems: list[Problem]) -> None:
    """Hand PROBLEMS to the context's sink, or fail at once when validating without one."""
    if not problems:
        return
    sink = (info.context or {}).get("problems")
    if sink is None:
        raise ValueError("; ".join(f"{field_name(p.path)}: {p.message}" for p in problems))
    sink.extend(problems)


def resolve_path(path: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get("base_dir")
    path = os.path.expanduser(path)
    return os.path.normpath(os.path.join(base, path)) if base and not os.path.isabs(path) else path


class Section(BaseModel):
    # strict: "32" for a whole number is a mistake to report, never a value to coerce
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, strict=True)


class KwargsSection(Section):
    """A section whose other keys are keyword arguments of the torch class it names."""

    model_config = ConfigDict(extra="allow")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def resolve(self, section: str | tuple, table: dict[str, type], module: str, first_arg: str,
                own: tuple[str, ...]) -> tuple[type | None, list[Problem]]:
        """The class `name` picks from TABLE (or None) and the problems with the section's
        other keys as its constructor's arguments (after FIRST_ARG, the params or optimizer
        they come with). SECTION: the section's name, or its path (an entry of a list)."""
        where = section if isinstance(section, tuple) else (section,)
        title = field_name(where)
        try:
            cls = names.lookup(self.name, table, title)
        except LookupError as e:
            return None, [Problem((*where, "name"), str(e), fix=f"use a {module} class: {', '.join(sorted(table))}")]
        accepted = names.parameter_names(cls)[1:]
        problems = [
            Problem((*where, key), f"unknown key '{key}' in [{title}]{names.suggest(key, accepted + list(own))}",
                    fix=f"[{title}] takes {', '.join(own)} and the arguments of {names.signature_text(cls)}")
            for key in self.kwargs if key not in accepted]
        problems += names.argument_types(cls, self.kwargs, where)
        why = None if problems else names.check_call(cls, (first_arg,), self.kwargs)
        if why:
            problems.append(Problem((*where, "name"), f"{self.name}: {why}",
                                    fix=f"give the arguments of {names.signature_text(cls)}"))
        return cls, problems


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


class OptimizerSpec(KwargsSection):
    name: str = "AdamW"
    """Any torch.optim class; the section's other keys are its keyword arguments."""
    no_decay: list[str] = []
    """Parameter-name patterns (fnmatch, matched against the full name or its last part) put into a weight_decay = 0 group."""

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> OptimizerSpec:
        cls, problems = self.resolve("optimizer", names.optimizers(), "torch.optim", "params", ("name", "no_decay"))
        if cls and self.no_decay and "weight_decay" not in names.parameter_names(cls):
            problems.append(Problem(("optimizer", "no_decay"), f"{self.name} has no weight_decay",
                                    fix="remove no_decay, or pick an optimizer with weight_decay"))
        report(info, problems)
        return self


CHAINS = ("SequentialLR", "ChainedScheduler")
"""Schedulers made of others: [scheduler] schedulers = [{ name = ..., ...}, ...]."""


class StageSpec(KwargsSection):
    """One scheduler of a chain (SequentialLR's stages, ChainedScheduler's parts)."""

    name: str
    """Any torch.optim.lr_scheduler class but a chain or ReduceLROnPlateau; the other keys are its keyword arguments."""


class SchedulerSpec(KwargsSection):
    name: str
    """Any torch.optim.lr_scheduler class; the section's other keys are its keyword arguments."""
    interval: Literal["epoch", "step"] = "epoch"
    """Step the scheduler after every epoch or after every optimizer step."""
    schedulers: list[StageSpec] = []
    """SequentialLR and ChainedScheduler: the schedulers they run, e.g. [{ name = 'LinearLR', start_factor = 0.1, total_iters = 5 }, { name = 'CosineAnnealingLR', T_max = 95 }]."""

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> SchedulerSpec:
        if self.name in CHAINS:
            report(info, self._chain_problems())
            return self
        cls, problems = self.resolve("scheduler", names.schedulers(), "torch.optim.lr_scheduler", "optimizer",
                                     ("name", "interval"))
        if cls and self.name == "ReduceLROnPlateau" and self.interval == "step":
            problems.append(Problem(("scheduler", "interval"), "ReduceLROnPlateau follows a metric measured once per epoch",
                                    fix="set interval = 'epoch'"))
        if self.schedulers:
            problems.append(Problem(("scheduler", "schedulers"), f"{self.name} takes no list of schedulers",
                                    fix=f"remove schedulers, or use name = one of {', '.join(CHAINS)}"))
        report(info, problems)
        return self

    def _chain_problems(self) -> list[Problem]:
        """A chain: its stages, each a scheduler of its own (checked as [scheduler] is), and
        SequentialLR's milestones between them."""
        table = {n: c for n, c in names.schedulers().items() if n not in (*CHAINS, "ReduceLROnPlateau")}
        example = "schedulers = [{ name = 'LinearLR', start_factor = 0.1, total_iters = 5 }, " \
                  "{ name = 'CosineAnnealingLR', T_max = 95 }]"
        problems = []
        if not self.schedulers:
            problems.append(Problem(("scheduler", "schedulers"), f"{self.name} needs the schedulers it runs",
                                    fix=example + (", milestones = [5]" if self.name == "SequentialLR" else "")))
        for i, stage in enumerate(self.schedulers):
            problems += stage.resolve(("scheduler", "schedulers", i), table, "torch.optim.lr_scheduler (no chain, "
                                      "no ReduceLROnPlateau)", "optimizer", ("name",))[1]
        allowed = ("milestones",) if self.name == "SequentialLR" else ()
        for key in self.kwargs:
            if key not in allowed:
                problems.append(Problem(("scheduler", key), f"unknown key '{key}' in [scheduler] for {self.name}",
                                        fix=f"{self.name} takes name, interval, schedulers"
                                            + (" and milestones" if allowed else "")))
        if self.name == "SequentialLR":
            problems += self._milestone_problems()
        return problems

    def _milestone_problems(self) -> list[Problem]:
        milestones, want = self.kwargs.get("milestones"), max(len(self.schedulers) - 1, 0)
        fix = (f"give {want} increasing whole numbers: the {'step' if self.interval == 'step' else 'epoch'} "
               "at which each scheduler after the first takes over")
        if milestones is None:
            return [Problem(("scheduler", "milestones"), "SequentialLR needs milestones", fix=fix)]
        if not isinstance(milestones, list) or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0
                                                       for m in milestones):
            return [Problem(("scheduler", "milestones"), f"expected a list of positive whole numbers, got {milestones!r}",
                            fix=fix)]
        if len(milestones) != want or milestones != sorted(set(milestones)):
            return [Problem(("scheduler", "milestones"), f"{len(self.schedulers)} schedulers need {want} increasing "
                            f"milestones, got {milestones}", fix=fix)]
        return []


class EarlyStopSpec(Section):
    patience: NonNegativeInt = 0
    """End the job after this many epochs in a row in which checkpoint.monitor did not improve; 0 = off."""
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0
    """An improvement smaller than this does not count."""


class TrainSpec(Section):
    epochs: PositiveInt | None = 10
    """Passes over the training set; when only max_steps is given, epochs are unbounded."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps (with epochs: whichever comes first)."""
    loss: str = "CrossEntropyLoss"
    """Any torch.nn loss class by name, or 'package.module:callable' taking (output, target); default CrossEntropyLoss, or MSELoss when data.task = 'regression'."""
    loss_kwargs: dict[str, Any] = {}
    """Keyword arguments of the loss class."""
    grad_clip: Annotated[float, Field(ge=0.0)] = 0.0
    """Clip the gradients' total norm to this; 0 = off."""
    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    """On a NaN or infinite loss: reload the newest healthy save (bounded tries), or stop the job."""
    max_rollbacks: NonNegativeInt = 3
    """Rollbacks in a row before the job stops; the count starts anew once a save is made past the skipped batch."""
    log_every_steps: PositiveInt = 10
    """Write the training loss to the metrics file every this many steps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast the forward pass and the loss to bf16 or fp16 (fp16 on a GPU only, with a GradScaler that every save holds)."""
    accumulate: PositiveInt = 1
    """Batches per optimizer step (gradient accumulation); a step counts optimizer steps, and saves fall between them."""
    compile: bool | Literal["max-autotune"] = False
    """torch.compile the model (true, or 'max-autotune'); saves keep the plain parameter names."""
    ema: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Decay of an exponential moving average of the weights, updated every optimizer step and validated on; 0 = off."""
    early_stop: EarlyStopSpec = EarlyStopSpec()
    """End the job once checkpoint.monitor stops improving: { patience = 5, min_delta = 0.001 }."""

    @model_validator(mode="before")
    @classmethod
    def _steps_alone_unbounds_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_steps") is not None and "epochs" not in data:
            data = {**data, "epochs": None}
        return data

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str, info: ValidationInfo) -> str:
        if not names.is_import_path(value) and value not in names.nn_losses():
            report(info, [Problem(("train", "loss"), f"unknown loss '{value}'{names.suggest(value, names.nn_losses())}",
                                  fix="use a torch.nn loss class such as CrossEntropyLoss or MSELoss, "
                                      "or 'package.module:callable'")])
        return value

    @field_validator("loss_kwargs")
    @classmethod
    def _loss_argument_types(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked as a field, so that it is reported even when another key of [train] is wrong."""
        loss = names.nn_losses().get(info.data.get("loss", ""))
        if loss:
            report(info, names.argument_types(loss, value, ("train", "loss_kwargs")))
        return value

    @model_validator(mode="after")
    def _loss_arguments(self, info: ValidationInfo) -> TrainSpec:
        problems = []
        if self.epochs is None and self.max_steps is None:
            problems.append(Problem(("train", "epochs"), "give epochs or max_steps", fix="epochs = 10"))
        cls = names.nn_losses().get(self.loss)
        typed = cls and not names.argument_types(cls, self.loss_kwargs, ("train", "loss_kwargs"))
        why = typed and names.check_call(cls, (), self.loss_kwargs)
        if why:
            problems.append(Problem(("train", "loss_kwargs"), f"{self.loss}: {why}",
                                    fix=f"give the arguments of {names.signature_text(cls)}"))
        report(info, problems)
        return self


class CheckpointSpec(Section):
    every_steps: NonNegativeInt = 0
    """Autosave every this many steps; 0 = off."""
    every_epochs: NonNegativeInt = 1
    """Autosave every this many epochs; 0 = off."""
    every_minutes: Annotated[float, Field(ge=0.0)] = 10.0
    """Autosave when this many minutes passed since the last save; 0 = off."""
    keep_last: PositiveInt = 3
    """Rotating autosave slots."""
    keep_best: NonNegativeInt = 1
    """Best saves by `monitor` kept."""
    monitor: Literal["val_loss", "val_acc", "train_loss"] = "val_loss"
    """The metric that ranks best saves (and feeds ReduceLROnPlateau); train_loss when data.val_fraction = 0."""
    mode: Literal["min", "max"] | None = None
    """Whether lower or higher `monitor` is better; default max for val_acc, else min."""
    best_after_epoch: NonNegativeInt = 0
    """Ignore best candidates before this epoch."""
    keep_every_epochs: NonNegativeInt = 0
    """Milestone saves every this many epochs, kept for good; 0 = off."""

    @property
    def direction(self) -> Literal["min", "max"]:
        return metrics.direction(self.monitor, self.mode)


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
