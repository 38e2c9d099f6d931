"""Read a job file (TOML, YAML or JSON) into a JobSpec, or a JobSpecError that names
the file, each field, its line and a fix."""

from __future__ import annotations

import json
import re
import sys
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from traind.jobs import names
from traind.jobs.errors import JobSpecError, Problem, field_name
from traind.jobs.jobname import is_job_name
from traind.jobs.spec import JobSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}


@dataclass(frozen=True)
class JobFile:
    """A validated job file: where it came from, its text, and its spec."""

    path: Path
    fmt: str
    text: str
    spec: JobSpec

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    def locate(self, error: JobSpecError) -> JobSpecError:
        """ERROR (say, from building the model) attributed to this file, with lines."""
        return locate(error.problems, self.path, self.text, self.fmt)


def load_job(path: str | Path, base_dir: str | Path | None = None) -> JobFile:
    """PATH as a validated job file; its relative paths start at BASE_DIR (default its folder)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise JobSpecError([Problem((), f"unknown job file type '{path.suffix}'",
                                    fix="name it .toml, .yaml, .yml or .json")], path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise JobSpecError([Problem((), f"cannot read the file: {e.strerror}", fix="check the path and its permissions")],
                           path) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobSpecError([Problem((), f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}",
                                    line=raw[:e.start].count(b"\n") + 1, fix="save the file as UTF-8")], path) from e
    job_file = JobFile(path, fmt, text, parse_spec(text, fmt, path, base_dir))
    if not is_job_name(job_file.name):  # no name key: the file's stem is the name, and must be one
        raise JobSpecError([Problem(("name",), f"the job takes its name from the file, and '{job_file.name}' is not "
                                    "a job name (letters, digits, '.', '_' and '-', starting with a letter or digit, "
                                    "at most 64)", fix="rename the file, or give it a name = \"...\" key")], path)
    return job_file


def parse_spec(text: str, fmt: str, path: Path, base_dir: str | Path | None = None) -> JobSpec:
    raw = parse_text(text, fmt, path)
    problems: list[Problem] = []
    spec = None
    base = Path(base_dir) if base_dir is not None else path.parent
    try:
        spec = JobSpec.model_validate(raw, context={"problems": problems, "base_dir": str(base.resolve())})
    except ValidationError as e:
        problems[:0] = pydantic_problems(e, raw)
    if problems:
        raise locate(problems, path, text, fmt)
    return spec


def locate(problems: list[Problem], path: Path, text: str, fmt: str) -> JobSpecError:
    lines = [p if p.line else replace(p, line=line_of(text, fmt, p.path)) for p in problems]
    return JobSpecError(sorted(lines, key=lambda p: (p.line is None, p.line or 0)), path)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3) and finds duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.\d*|\.\d+)$"),
    list("-+0123456789."))


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key '{key}'")
        found[key] = value
    return found


def parse_text(text: str, fmt: str, path: Path) -> dict:
    """The file's data as a dict, or a JobSpecError with the syntax error's line."""
    try:
        if fmt == "toml":
            raw = tomllib.loads(text)
        elif fmt == "yaml":
            raw = yaml.load(text, Loader=_YamlLoader)
            if _expanded_size(raw) > MOST_VALUES:  # (inside the try: a deep file's count recurses too)
                raise JobSpecError([Problem((), f"its aliases (*name) make the file more than {MOST_VALUES:,} "
                                                "values, more than any job needs (a \"billion laughs\" file)",
                                            line=1, fix="write the values out, or alias fewer of them")], path)
        else:
            raw = json.loads(text, object_pairs_hook=_json_pairs)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, ValueError) as e:
        line, message = _syntax_error(e, text)
        raise JobSpecError([Problem((), f"not valid {fmt.upper()}: {message}", line=line,
                                    fix=f"fix the {fmt.upper()} syntax at that line")], path) from e
    except RecursionError as e:
        raise JobSpecError([Problem((), "lists or tables are nested too deeply to read", line=1,
                                    fix="nest at most a few dozen levels")], path) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobSpecError([Problem((), f"the file holds a {type(raw).__name__}, not a table of keys", line=1,
                                    fix="start from an example in examples/")], path)
    return raw


MOST_VALUES = 100_000
"""Values (each list, table and scalar) a YAML file may reach through its aliases. A file
without aliases has as many as its text shows; one of 9 aliases, each of 9 of the one
before, reaches 387 million, and every walk over it (validation, the check for code of its
own) would take minutes, holding up the daemon's intake."""


def _expanded_size(value: Any) -> int:
    """The values in VALUE with each alias counted as a copy of what it names; each list
    and table is counted once (by its id: an alias is the same object) so the count costs
    the file's own size, not the expansion's."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) not in sizes:
            sizes[id(v)] = MOST_VALUES + 1  # until counted: one that holds itself never ends
            sizes[id(v)] = 1 + sum(size(x) for x in (v.values() if isinstance(v, dict) else v))
        return sizes[id(v)]
    return size(value)


def _syntax_error(e: Exception, text: str) -> tuple[int | None, str]:
    """The line (1-based) and message of a parser's error, each parser telling it its own way."""
    if isinstance(e, json.JSONDecodeError):
        return e.lineno, e.msg
    if isinstance(e, yaml.reader.ReaderError):
        return text[:e.position].count("\n") + 1, str(e.reason)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return mark.line + 1, str(getattr(e, "problem", None) or e).strip()
    message = str(e)
    if "(at end of document)" in message:
        return text.count("\n") + 1, message.replace(" (at end of document)", " at the end of the file")
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    return (int(found.group(1)) if found else None), re.sub(r"\s*\(at line \d+, column \d+\)", "", message)


# pydantic's type errors, said for people who write job files.
_EXPECTED = {
    "int_type": "a whole number", "int_parsing": "a whole number", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "text", "list_type": "a list", "dict_type": "a table",
    "model_type": "a table", "model_attributes_type": "a table",
}


def pydantic_problems(error: ValidationError, raw: dict) -> list[Problem]:
    problems, seen = [], set()
    for e in error.errors(include_url=False):
        path = _data_path(e["loc"], raw)
        if path in seen:  # a union reports once per member; one message per field is enough
            continue
        seen.add(path)
        problems.append(_problem_for(e, path))
    return problems


def _data_path(loc: tuple, raw: Any) -> tuple:
    """LOC without pydantic's union-member tags: only the parts that index the data."""
    path, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict):
            node = None  # a key missing from the data, such as a required one
        else:
            continue  # a union member's tag, not a place in the data
        path.append(part)
    return tuple(path)


def _problem_for(e: dict, path: tuple) -> Problem:
    kind, where = e["type"], field_name(path)
    section = path[:-1]
    model = _model_at(section)
    key = path[-1] if path else ""
    header = f"[{field_name(section)}]" if section else "the top level"
    if kind == "extra_forbidden" and model is not None:
        known = list(model.model_fields)
        return Problem(path, f"unknown key '{key}' in {header}{names.suggest(str(key), known)}",
                       fix=f"{header} takes: {', '.join(known)}")
    field = model.model_fields.get(key) if model is not None and isinstance(key, str) else None
    about = f"{where}: {field.description}" if field is not None and field.description else "see `traind schema`"
    if kind == "missing":
        return Problem(path, f"missing required key '{key}' in {header}", fix=about)
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", ""))
        got = e.get("input")
        return Problem(path, f"{got!r} is not one of {', '.join(options)}{names.suggest(str(got), options)}",
                       fix=about)
    if kind == "string_pattern_mismatch" and key == "name":
        return Problem(path, f"{e.get('input')!r} is not a valid job name",
                       fix="use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if kind == "value_error":
        return Problem(path, e["msg"].removeprefix("Value error, "), fix=about)
    if kind in _EXPECTED:
        return Problem(path, f"expected {_EXPECTED[kind]}, got {e.get('input')!r}", fix=about)
    return Problem(path, f"{e['msg'].replace('Input should', 'should')}, got {e.get('input')!r}", fix=about)


def _model_at(section: tuple) -> type[BaseModel] | None:
    model: Any = JobSpec
    for part in section:
        if not (isinstance(part, str) and isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def line_of(text: str, fmt: str, path: tuple) -> int | None:
    """The line where PATH is written, as near as can be told (1-based), or None."""
    if not path:
        return None
    if fmt == "yaml":
        return _yaml_line(text, path)
    keys = [p for p in path if isinstance(p, str)]
    return _toml_line(text, keys) if fmt == "toml" else _json_line(text, keys)


def _yaml_line(text: str, path: tuple) -> int | None:
    try:
        node = yaml.compose(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _toml_line(text: str, keys: list[str]) -> int | None:
    lines = text.splitlines()
    headers = {i: m.group(1).replace('"', "").replace(" ", "") for i, l in enumerate(lines)
               if (m := _HEADER.match(l))}
    start, rest, line = 0, keys, None
    for depth in range(len(keys), 0, -1):
        wanted = ".".join(keys[:depth])
        hit = next((i for i, h in headers.items() if h == wanted), None)
        if hit is not None:
            start, rest, line = hit, keys[depth:], hit + 1
            break
    end = next((i for i in sorted(headers) if i > start), len(lines)) if rest else len(lines)
    for key in rest:
        pattern = re.compile(rf"(^|[\s{{,.]){re.escape(key)}\s*=|\"{re.escape(key)}\"\s*=")
        hit = next((i for i in range(start, end) if pattern.search(lines[i].split("#")[0])), None)
        if hit is None:
            break
        start, line = hit, hit + 1
    return line


def _json_line(text: str, keys: list[str]) -> int | None:
    offset, line = 0, None
    for key in keys:
        found = re.compile(rf"\"{re.escape(key)}\"\s*:").search(text, offset)
        if found is None:
            break
        offset, line = found.end(), text.count("\n", 0, found.start()) + 1
    return line
