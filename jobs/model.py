"""Build the nn.Module a job file describes, and check it fits its data.

The layer-list grammar (CONTRACT §3):
- ["Linear", 20, 256, {bias = false}]: a torch.nn class, positional args, optional kwargs;
- a list whose first item is not a class name: a nested block (an nn.Sequential);
- "@NAME": the block NAME of [model.blocks], one instance however often it is used,
  so its parameters are tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from traind.jobs import names
from traind.jobs.errors import JobSpecError, Problem, field_name

if TYPE_CHECKING:
    from traind.jobs.spec import InitSpec, ModelSpec

MAX_BLOCK_DEPTH = 32


@dataclass(frozen=True)
class Layer:
    name: str
    args: tuple
    kwargs: dict
    path: tuple


@dataclass(frozen=True)
class Ref:
    block: str
    path: tuple


@dataclass(frozen=True)
class Block:
    items: tuple[Item, ...]
    path: tuple


Item = Union[Layer, Ref, Block]


def parse_item(raw: Any, path: tuple) -> Item:
    """One entry of a layer list, or ValueError saying what is wrong with it."""
    if isinstance(raw, str):
        if raw.startswith("@") and len(raw) > 1:
            return Ref(raw[1:], path)
        raise ValueError(f"'{raw}' is neither a layer entry nor a block reference; "
                         f"write ['{raw}'] for a layer or '@NAME' for a block")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"expected a layer entry such as ['Linear', 20, 10] or a nested list, got {raw!r}")
    if len(path) > MAX_BLOCK_DEPTH:
        raise ValueError(f"blocks are nested more than {MAX_BLOCK_DEPTH} deep")
    head = raw[0]
    if isinstance(head, str) and not head.startswith("@"):
        args, kwargs = list(raw[1:]), {}
        if args and isinstance(args[-1], dict):
            kwargs = args.pop()
        return Layer(head, tuple(args), kwargs, path)
    return Block(tuple(parse_item(r, path + (i,)) for i, r in enumerate(raw)), path)


def _parse_all(layers: list, blocks: dict) -> tuple[Block, dict[str, Item], list[Problem]]:
    problems: list[Problem] = []

    def parse(raw: Any, path: tuple) -> Item | None:
        try:
            return parse_item(raw, path)
        except ValueError as e:
            problems.append(Problem(path, str(e)))
            return None

    if not layers:
        problems.append(Problem(("model", "layers"), "the layer list is empty", fix="layers = [['Linear', 20, 10]]"))
    items = [parse(raw, ("model", "layers", i)) for i, raw in enumerate(layers)]
    top = Block(tuple(i for i in items if i is not None), ("model", "layers"))
    parsed = {n: parse(raw, ("model", "blocks", n)) for n, raw in blocks.items()}
    return top, {n: i for n, i in parsed.items() if i is not None}, problems


def _walk(item: Item):
    yield item
    if isinstance(item, Block):
        for child in item.items:
            yield from _walk(child)


def check_layers(layers: list, blocks: dict) -> list[Problem]:
    """Every problem in a layer list and its blocks that can be found without building."""
    top, parsed, problems = _parse_all(layers, blocks)
    table = names.nn_layers()
    for item in [i for root in (top, *parsed.values()) for i in _walk(root)]:
        if isinstance(item, Ref) and item.block not in blocks:
            problems.append(Problem(item.path, f"no block named '{item.block}'{names.suggest(item.block, blocks)}",
                                    fix="define it under [model.blocks]" if not blocks else
                                    f"use one of: {', '.join('@' + b for b in blocks)}"))
        elif isinstance(item, Layer):
            if item.name not in table:
                problems.append(Problem(item.path, f"unknown layer '{item.name}'{names.suggest(item.name, table)}",
                                        fix="layer names resolve in torch.nn; build your own modules "
                                            "with model.target = 'package.module:Net'"))
                continue
            why = names.check_call(table[item.name], item.args, item.kwargs)
            if why:
                problems.append(Problem(item.path, f"{item.name}: {why}",
                                        fix=f"give the arguments of {names.signature_text(table[item.name])}"))
    problems += _block_cycles(parsed)
    return problems


def _block_cycles(parsed: dict[str, Item]) -> list[Problem]:
    def refs(name: str) -> set[str]:
        return {i.block for i in _walk(parsed[name]) if isinstance(i, Ref) and i.block in parsed}

    problems, done = [], set()
    for start in parsed:
        stack, seen = [(start, (start,))], set()
        while stack:
            name, trail = stack.pop()
            for nxt in refs(name):
                if nxt == start and start not in done:
                    problems.append(Problem(("model", "blocks", start), "blocks refer to each other in a cycle: "
                                            + " -> ".join("@" + t for t in trail + (start,)),
                                            fix="a block cannot contain itself; break the cycle"))
                    done.update(trail)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + (nxt,)))
    return problems


class _Builder:
    def __init__(self, blocks: dict[str, Item]):
        self.blocks = blocks
        self.instances: dict[str, nn.Module] = {}
        self.problems: list[Problem] = []

    def build(self, item: Item) -> nn.Module:
        if isinstance(item, Ref):
            if item.block not in self.instances:
                self.instances[item.block] = self.build(self.blocks[item.block])
            return self.instances[item.block]
        if isinstance(item, Block):
            return nn.Sequential(*(self.build(child) for child in item.items))
        cls = names.nn_layers()[item.name]
        try:
            return cls(*item.args, **item.kwargs)
        except Exception as e:  # any constructor failure is the job file's problem
            self.problems.append(Problem(item.path, f"{item.name}(...) failed: {type(e).__name__}: {e}",
                                         fix=f"give the arguments of {names.signature_text(cls)}"))
            return nn.Identity()


def build_model(spec: ModelSpec, python_path: list[str]) -> nn.Module:
    """Construct the module (lazy modules still unmaterialized), or JobSpecError."""
    if spec.target is not None:
        return _build_target(spec, python_path)
    top, parsed, problems = _parse_all(spec.layers or [], spec.blocks)
    if problems:
        raise JobSpecError(problems)
    builder = _Builder(parsed)
    model = builder.build(top)
    if builder.problems:
        raise JobSpecError(builder.problems)
    return model


def _build_target(spec: ModelSpec, python_path: list[str]) -> nn.Module:
    path = ("model", "target")
    try:
        factory = names.import_object(spec.target, python_path)
    except LookupError as e:
        raise JobSpecError([Problem(path, str(e), fix=names.IMPORT_PATH_HELP)]) from e
    try:
        with names.search_path(python_path):
            model = factory(**spec.kwargs)
    except Exception as e:  # user code: whatever it raises is reported against the job file
        raise JobSpecError([Problem(("model", "kwargs"), f"{spec.target}(**kwargs) raised {type(e).__name__}: {e}",
                                    fix=f"give the arguments of {names.signature_text(factory, spec.target)}")]) from e
    if not isinstance(model, nn.Module):
        raise JobSpecError([Problem(path, f"{spec.target} returned {type(model).__name__}, not an nn.Module",
                                    fix="point target at an nn.Module class or a function returning one")])
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each, however often a tied one is used."""
    return sum(p.numel() for p in model.parameters())


def has_lazy(model: nn.Module) -> bool:
    return any(is_lazy(p) for p in model.parameters()) or any(is_lazy(b) for b in model.buffers())


def dry_forward(model: nn.Module, inputs: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """One forward pass in eval mode without gradients: materializes lazy modules and
    proves the layers fit the data, with no effect on BatchNorm statistics or RNG use
    by Dropout. A failure becomes a JobSpecError naming the layer and its input shape."""
    stack: list[tuple[str, tuple]] = []  # modules entered and not yet left: the innermost failed
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def enter(module, args):
        stack.append((module_names.get(id(module), ""), tuple(tuple(a.shape) for a in args if torch.is_tensor(a))))

    def leave(module, args, output):
        stack.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs)
    except Exception as e:  # user or torch code: becomes a located job-file problem
        raise JobSpecError([_forward_problem(stack, e, spec)]) from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    check_output(out, inputs, spec)
    return out


def check_output(out: object, inputs: torch.Tensor, spec: ModelSpec) -> None:
    """The loss takes one tensor with a row per sample: say so when the model returns
    anything else (a scalar such as `X.sum()`, a `(logits, aux)` tuple, a dict)."""
    path = ("model", "target") if spec.target else ("model", "layers")
    if torch.is_tensor(out) and out.dim() >= 1 and out.shape[0] == inputs.shape[0]:
        return
    if torch.is_tensor(out):
        what = f"a tensor of shape {tuple(out.shape)}"
        why = "a scalar" if out.dim() == 0 else f"its first dimension is not the batch's {inputs.shape[0]} samples"
        message = f"the model's forward returns {what} ({why}) for input of shape {tuple(inputs.shape)}"
    else:
        kinds = f" of {', '.join(type(o).__name__ for o in out)}" if isinstance(out, (tuple, list)) else ""
        message = f"the model's forward returns a {type(out).__name__}{kinds}, not a tensor"
    raise JobSpecError([Problem(path, message + "; the loss needs one tensor of shape (batch, outputs...)",
                                fix="make forward return the predictions as one tensor with a row per sample "
                                    "(for (logits, aux) return logits; do not reduce with .sum() or .mean())")])


def _forward_problem(stack: list[tuple[str, tuple]], error: Exception, spec: ModelSpec) -> Problem:
    name, shapes = stack[-1] if stack else ("", ())
    module_desc = f"module '{name}'" if name else "the model"
    if spec.layers is not None and name:
        path = ("model", "layers", *(int(p) if p.isdigit() else p for p in name.split(".")))
        module_desc = field_name(path)
    else:
        path = ("model", "target") if spec.target else ("model", "layers")
    shape_text = ", ".join(str(s) for s in shapes) or "?"
    return Problem(path, f"the dry forward pass failed in {module_desc} on input of shape {shape_text}: "
                         f"{type(error).__name__}: {error}",
                   fix="make this layer's sizes fit that input (a Lazy layer such as LazyLinear infers them), "
                       "or check data.features")


def check_scheme(value: str | dict, path: tuple) -> list[Problem]:
    schemes = names.init_schemes()
    if isinstance(value, str):
        value = {"name": value}
    name, kwargs = value.get("name"), {k: v for k, v in value.items() if k != "name"}
    if not isinstance(name, str):
        return [Problem(path, "an init table needs a 'name'", fix="write {name = 'normal', std = 0.01}")]
    if name not in schemes:
        return [Problem(path, f"unknown init scheme '{name}'{names.suggest(name, schemes)}",
                        fix=f"use one of torch.nn.init's: {', '.join(sorted(schemes))}")]
    why = names.check_call(schemes[name], ("tensor",), kwargs)
    return [Problem(path, f"init '{name}': {why}",
                    fix=f"give the arguments of {names.signature_text(schemes[name])}")] if why else []


def _scheme(value) -> tuple:
    if value is None:
        return None, {}
    if isinstance(value, str):
        return names.init_schemes()[value], {}
    return names.init_schemes()[value["name"]], {k: v for k, v in value.items() if k != "name"}


def apply_init(model: nn.Module, init: InitSpec | None) -> None:
    """torch.nn.init schemes through Module.apply: `weight` for every module's own weight
    of two or more dimensions (norm layers keep their ones), `bias` for every own bias."""
    if init is None:
        return
    weight_fn, weight_kw = _scheme(init.weight)
    bias_fn, bias_kw = _scheme(init.bias)

    def visit(module: nn.Module) -> None:
        weight = module._parameters.get("weight")
        bias = module._parameters.get("bias")
        if weight_fn and weight is not None and weight.dim() >= 2:
            weight_fn(weight, **weight_kw)
        if bias_fn and bias is not None:
            bias_fn(bias, **bias_kw)

    model.apply(visit)
