"""traind's one error hierarchy starts here, in the package every other one imports.

Messages say what went wrong, where, and how to fix it.
"""


class TraindError(Exception):
    """Base of every error traind raises on purpose; anything else is a bug."""

    exit_code = 1


class StoreError(TraindError):
    """A save could not be written, read or verified."""
