"""A sweep: a job file with a `[sweep]` table, whose trials are jobs of their own, each the
job file with the values a search algorithm (Optuna's) picked for the keys of
`[sweep.space]`, dotted paths into the job file:

    [sweep]
    trials = 12
    parallel = 2
    sampler = "tpe"          # tpe | random | grid | cmaes
    pruner = "median"        # none | median | successive_halving | hyperband
    [sweep.space]
    "optimizer.lr" = { float = [1e-4, 1e-1], log = true }
    "data.batch_size" = { choice = [32, 64, 128] }
    "model.kwargs.hidden" = { int = [16, 256], step = 16 }

Here: the table's model, checked in full against the job it belongs to (each path must
name a key of the job, or a keyword argument of a section that takes them; each end of a
range and each choice must make a valid job), and the job of one trial (`trial_spec`).
Optuna itself is imported only by the daemon's driver (daemon/sweeps.py).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from traind.jobs.errors import Problem, field_name
from traind.jobs.sections import NonNegativeInt, PositiveInt, Section

if TYPE_CHECKING:
    from traind.jobs.spec import JobSpec

GRID_LIMIT = 10_000
"""The most points a grid may have: past that, a grid search is not what was meant."""
TRIAL_SEPARATOR = ".t"
"""A trial's job is named SWEEP.tNNN (its Optuna trial number, three digits or more)."""
KWARGS_SECTIONS = ("optimizer", "scheduler")
"""Sections whose other keys are keyword arguments (of the torch class they name)."""


def trial_name(sweep: str, number: int) -> str:
    return f"{sweep}{TRIAL_SEPARATOR}{number:03d}"


class Dimension(Section):
    """One key's distribution: exactly one of float, int, choice."""

    model_config = ConfigDict(**Section.model_config, serialize_by_alias=True)  # "float", "int" as written

    float_: list[float] | None = Field(None, alias="float", min_length=2, max_length=2)
    """[low, high]: a real number in that range."""
    int_: list[int] | None = Field(None, alias="int", min_length=2, max_length=2)
    """[low, high]: a whole number in that range, both ends included."""
    choice: list[Any] | None = Field(None, min_length=1)
    """The values to pick from (numbers, strings, booleans)."""
    log: bool = False
    """float and int: sample on a log scale (low must be above 0)."""
    step: float | None = Field(None, gt=0)
    """float and int: only low + k * step."""

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k, v in (("float", self.float_), ("int", self.int_), ("choice", self.choice)) if v is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of float = [low, high], int = [low, high] or choice = [...]"
                             f"{'; it has ' + ' and '.join(kinds) if kinds else ''}")
        bounds = self.float_ if self.float_ is not None else self.int_
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"[{low}, {high}]: low is above high; swap them")
            if self.log and low <= 0:
                raise ValueError(f"log = true needs low > 0 (it is {low})")
            if self.log and self.step is not None:
                raise ValueError("log = true and step do not go together (Optuna samples one or the other); drop one")
            if self.int_ is not None and self.step is not None and self.step != int(self.step):
                raise ValueError(f"an int range's step must be whole (it is {self.step})")
        elif self.log or self.step is not None:
            raise ValueError("log and step are for float and int ranges, not choice")
        if self.choice is not None:
            for value in self.choice:
                if not isinstance(value, (bool, int, float, str)) and value is not None:
                    raise ValueError(f"choice {value!r}: each choice must be a number, a string or a boolean "
                                     "(Optuna stores them so)")
        return self

    @property
    def kind(self) -> str:
        return "float" if self.float_ is not None else "int" if self.int_ is not None else "choice"

    def ends(self) -> list[Any]:
        """The values a valid job must take for this dimension to be valid: both ends of a
        range, every choice."""
        return list(self.choice) if self.choice is not None else list(self.float_ or self.int_)

    def grid(self) -> list[Any] | None:
        """Every value of a grid search, or None where there is no finite set (a float range without a step)."""
        if self.choice is not None:
            return list(self.choice)
        if self.int_ is not None:
            low, high = self.int_
            return list(range(low, high + 1, int(self.step or 1)))
        if self.step is None:
            return None
        low, high = self.float_
        count = int(math.floor((high - low) / self.step + 1e-9)) + 1
        return [low + i * self.step for i in range(count)]

    def size(self) -> float:
        if self.choice is not None:
            return len(self.choice)
        low, high = self.int_ or self.float_
        return math.floor((high - low) / (self.step or 1) + 1e-9) + 1 if self.int_ is not None or self.step else math.inf

    def distribution(self):
        """This dimension as an Optuna distribution."""
        import optuna

        if self.choice is not None:
            return optuna.distributions.CategoricalDistribution(self.choice)
        if self.int_ is not None:
            return optuna.distributions.IntDistribution(self.int_[0], self.int_[1], log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.float_[0], self.float_[1], log=self.log, step=self.step)


class SweepSpec(Section):
    trials: PositiveInt = 10
    """Trials in all: the study ends with this many (finished, pruned or failed)."""
    parallel: PositiveInt = 1
    """Trials at once (queued or running), within the daemon's free devices."""
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    """How the next trial's values are picked (Optuna's samplers)."""
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    """What stops a trial early whose epochs go worse than the others' (Optuna's pruners), asked at each epoch's end."""
    objective: str | None = None
    """The epoch metric a trial is judged by (its best value over its epochs); default checkpoint.monitor."""
    direction: Literal["min", "max"] | None = None
    """Whether lower or higher is better; default checkpoint.mode (for checkpoint.monitor; else min, max for accuracies)."""
    seed: NonNegativeInt | None = None
    """The sampler's seed; default the job's seed."""
    storage: str = ""
    """Where the study lives: default an Optuna SQLite storage in the sweep's folder; or an
    RDB URL (postgresql://...) that daemons on several machines share."""
    heartbeat: PositiveInt = 30
    """Shared storage: seconds between a daemon's heartbeats for its trials; a trial silent
    for 3 of them (its daemon died) is failed and tried again, with its values, by a daemon alive."""

    @model_validator(mode="after")
    def _storage_url(self) -> SweepSpec:
        if self.storage and not self.storage.startswith(("postgresql://", "postgresql+", "mysql://", "mysql+",
                                                         "sqlite:///")):
            raise ValueError(f"storage = {self.storage!r}: give an RDB URL such as postgresql://user@host/db "
                             "(or leave it out for a SQLite study in the home)")
        return self
    space: dict[str, Dimension] = Field(min_length=1)
    """Dotted paths into this job file ("optimizer.lr", "data.batch_size", "model.kwargs.hidden")
    and the distribution of each."""

    def grid_space(self) -> dict[str, list[Any]]:
        return {path: dim.grid() for path, dim in self.space.items()}


def resolved_objective(spec: JobSpec) -> tuple[str, str]:
    """The metric a sweep's trials are judged by, and "minimize" or "maximize"."""
    sweep = spec.sweep
    objective = sweep.objective or spec.checkpoint.monitor
    direction = sweep.direction
    if direction is None:  # as checkpoint.mode for the monitor: its own, else max for accuracies, min otherwise
        mode = spec.checkpoint.mode if objective == spec.checkpoint.monitor else None
        direction = mode or ("max" if "acc" in objective else "min")
    return objective, "minimize" if direction == "min" else "maximize"


def base_document(spec: JobSpec) -> dict:
    """The job a sweep's trials are made from: SPEC as JSON data, without its [sweep]."""
    doc = json.loads(spec.model_dump_json(by_alias=True))
    doc.pop("sweep", None)
    return doc


def with_values(doc: dict, values: dict[str, Any]) -> dict:
    """DOC (a job as JSON data) with each dotted path of VALUES set; a copy."""
    doc = json.loads(json.dumps(doc))
    for path, value in values.items():
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = value
    return doc


def trial_spec(spec: JobSpec, name: str, values: dict[str, Any]) -> JobSpec:
    """The job of the sweep SPEC's trial NAME, with VALUES for its space's paths."""
    from traind.jobs.spec import JobSpec

    doc = with_values(base_document(spec), values)
    doc["name"] = name
    return JobSpec.model_validate_json(json.dumps(doc), context={"imports": False})


def path_problem(doc: dict, path: str) -> str | None:
    """Why PATH names no key of the job DOC (its full JSON data, defaults included), or None."""
    keys = path.split(".")
    if not all(keys):
        return f"'{path}' is not a dotted path of keys"
    node: Any = doc
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, dict) and key in node:
            node = node[key]
            continue
        parent = keys[:depth]
        takes_kwargs = (len(parent) == 1 and parent[0] in KWARGS_SECTIONS and isinstance(node, dict)) or \
            (parent[-1:] == ["kwargs"] and isinstance(node, dict))
        if last and takes_kwargs:
            return None  # a keyword argument the section does not set yet; the trial jobs' checks judge it
        where = ".".join(parent) or "the job"
        if isinstance(node, dict):
            from traind.jobs.names import suggest

            known = ", ".join(sorted(node)[:12])
            return f"{where} has no key '{key}'{suggest(key, node)}" + (f" (it has {known})" if known else "")
        return f"{where} is {json.dumps(node)}, not a table with a key '{key}'"
    return None


def check(spec: JobSpec) -> list[Problem]:
    """Every problem of SPEC's [sweep] against the job it belongs to."""
    from traind.jobs.spec import JobSpec

    sweep, problems = spec.sweep, []
    doc = base_document(spec)
    for path, dim in sweep.space.items():
        where = ("sweep", "space", path)
        why = path_problem(doc, path)
        if why is None and path.split(".")[0] in ("name", "sweep"):
            why = f"'{path}' cannot vary: each trial has its own name"
        if why is not None:
            problems.append(Problem(where, why, fix="use a dotted path of the job file, such as \"optimizer.lr\""))
            continue
        for value in dim.ends():
            trial = with_values(doc, {path: value})
            trial["name"] = "trial"
            try:
                JobSpec.model_validate_json(json.dumps(trial), context={"imports": False})
            except ValidationError as e:
                first = e.errors()[0]
                said = f"{field_name(tuple(str(p) for p in first['loc']))}: {first['msg']}" if first["loc"] \
                    else first["msg"]
                problems.append(Problem(where, f"{json.dumps(value)} does not make a valid job ({said})",
                                        fix="give values the key takes"))
                break
    objective, _ = resolved_objective(spec)
    if sweep.sampler == "grid":
        finite = {p: d for p, d in sweep.space.items() if d.grid() is not None}
        for path in sweep.space.keys() - finite.keys():
            problems.append(Problem(("sweep", "space", path), "a grid needs a finite set of values, and this float "
                                    "range has no step", fix="give it a step, or make it a choice"))
        size = math.prod(d.size() for d in finite.values())
        if size > GRID_LIMIT:
            problems.append(Problem(("sweep", "sampler"), f"the grid has {size:,} points, more than {GRID_LIMIT:,}",
                                    fix="use sampler = \"tpe\" or \"random\", or fewer values per key"))
        elif len(finite) == len(sweep.space) and sweep.trials > size:
            problems.append(Problem(("sweep", "trials"), f"trials = {sweep.trials}, and the grid has {size} points",
                                    fix=f"set trials = {size}"))
    if sweep.sampler == "cmaes" and any(d.kind == "choice" for d in sweep.space.values()):
        problems.append(Problem(("sweep", "sampler"), "CMA-ES samples numbers only, and the space has a choice",
                                fix="use sampler = \"tpe\", or make the choice a range"))
    if objective not in METRICS:
        problems.append(Problem(("sweep", "objective"), f"'{objective}' is not an epoch metric",
                                fix=f"one of {', '.join(METRICS)}"))
    elif objective.startswith("val_") and spec.data.val_fraction == 0:
        problems.append(Problem(("sweep", "objective"), f"{objective} needs a validation set, and data.val_fraction "
                                "is 0", fix="objective = \"train_loss\", or data.val_fraction > 0"))
    elif objective == "val_acc" and spec.data.task != "classification":
        problems.append(Problem(("sweep", "objective"), "val_acc is measured for classification only",
                                fix="objective = \"val_loss\""))
    return problems


METRICS = ("val_loss", "val_acc", "train_loss")
"""The epoch metrics a trial records (metrics.jsonl) that can judge it."""
