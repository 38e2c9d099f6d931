"""How a job trains, as the job file says it: the optimizer, the learning-rate schedule
(one scheduler, or a chain of them), the loop and its switches ([train]), and the save
policy ([checkpoint]). Part of the typed job file (jobs/spec.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from traind.jobs import metrics, names
from traind.jobs.errors import Problem
from traind.jobs.sections import KwargsSection, NonNegativeInt, PositiveInt, Section, report

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
