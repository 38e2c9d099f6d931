"""What a job may be called: one safe folder name (never `.`, `..`, a path or NUL), so
that a name from a job file or the command line cannot reach outside the home."""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def is_job_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None
