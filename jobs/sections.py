"""The building blocks of the job file's typed model: a section (strict, no unknown keys,
a docstring per key), a section whose other keys are a torch class's keyword arguments,
and how a validator hands its problems on (to the list in the validation context, so
that one pass reports everything wrong with a file).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from traind.jobs import names
from traind.jobs.errors import Problem, field_name

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
