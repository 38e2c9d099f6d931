"""Resolve the names a job file uses: torch classes by name, user code by import path.

Every lookup either returns the object or raises LookupError with a message that
names what was asked for and suggests what was probably meant.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from traind.jobs.errors import Problem

IMPORT_PATH_HELP = "write it as 'package.module:name', importable from python_path or the environment"


def suggest(name: str, choices: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the closest of CHOICES, or ''."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if name.lower() in lowered:
        return f"; did you mean '{lowered[name.lower()]}'?"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _classes_in(module: Any, base: type) -> dict[str, type]:
    return {n: o for n, o in vars(module).items()
            if not n.startswith("_") and isinstance(o, type) and issubclass(o, base)}


def nn_layers() -> dict[str, type[nn.Module]]:
    return _classes_in(nn, nn.Module)


def nn_losses() -> dict[str, type[nn.Module]]:
    return {n: c for n, c in nn_layers().items() if n.endswith("Loss")}


def optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    found = _classes_in(torch.optim, torch.optim.Optimizer)
    found.pop("Optimizer", None)
    return found


def schedulers() -> dict[str, type]:
    sched = torch.optim.lr_scheduler
    found = _classes_in(sched, sched.LRScheduler)
    found.update(_classes_in(sched, sched.ReduceLROnPlateau))
    for base in ("LRScheduler", "_LRScheduler"):
        found.pop(base, None)
    return found


def init_schemes() -> dict[str, Callable]:
    """torch.nn.init's in-place schemes, by name without the trailing underscore."""
    return {n[:-1]: f for n, f in vars(nn.init).items()
            if n.endswith("_") and not n.startswith("_") and callable(f)}


def lookup(name: str, table: dict[str, Any], what: str) -> Any:
    if name in table:
        return table[name]
    raise LookupError(f"unknown {what} '{name}'{suggest(name, table)}")


def is_import_path(text: str) -> bool:
    return ":" in text and all(part.isidentifier() for part in text.replace(":", ".").split("."))


@contextmanager
def search_path(folders: Iterable[str]):
    """Put FOLDERS first on sys.path for the duration (job files name code to import)."""
    folders = [str(f) for f in folders]
    saved = list(sys.path)
    sys.path[:0] = [f for f in folders if f not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_object(path: str, python_path: Iterable[str] = ()) -> Any:
    """'package.module:attr.sub' -> the object, or LookupError saying why not."""
    if not is_import_path(path):
        raise LookupError(f"'{path}' is not an import path; {IMPORT_PATH_HELP}")
    module_name, _, attr_path = path.partition(":")
    with search_path(python_path):
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise LookupError(f"cannot import '{module_name}': {e}; check python_path "
                              f"(now {list(python_path) or 'empty'})") from e
        except Exception as e:  # the user's module raised while importing: report, don't crash
            raise LookupError(f"importing '{module_name}' raised {type(e).__name__}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise LookupError(f"'{module_name}' has no attribute '{attr}'{suggest(attr, public)}")
        obj = getattr(obj, attr)
    return obj


def signature_text(obj: Callable, name: str | None = None) -> str:
    """'AdamW(params, lr=0.001, ...)': names and defaults, without type annotations."""
    label = name or getattr(obj, "__name__", repr(obj))
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return label
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return f"{label}{sig.replace(parameters=bare, return_annotation=inspect.Signature.empty)}"


def parameter_names(obj: Callable) -> list[str]:
    try:
        return [p.name for p in inspect.signature(obj).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _kind(value: Any) -> str | None:
    """The kind of a default value that an argument given for it must share, in words."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (tuple, list)):
        return "a list"
    return None


def _fits(value: Any, kind: str) -> bool:
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "text":
        return isinstance(value, str)
    return isinstance(value, (tuple, list))


def argument_types(obj: Callable, kwargs: dict, where: tuple) -> list:
    """Problems with KWARGS whose values are not of the kind of OBJ's defaults for them
    (lr = "fast" where lr defaults to 0.001): each at its own key, WHERE + (key,)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    problems = []
    for key, value in kwargs.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        kind = None if default is inspect.Parameter.empty or default is None else _kind(default)
        if kind and not _fits(value, kind):
            problems.append(Problem((*where, key), f"expected {kind}, got {value!r}",
                                    fix=f"{key} of {getattr(obj, '__name__', obj)} defaults to {default!r}"))
    return problems


def check_call(obj: Callable, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """Why calling OBJ(*ARGS, **KWARGS) would fail on its signature alone, or None."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*args, **(kwargs or {}))
    except TypeError as e:
        return str(e)
    return None
