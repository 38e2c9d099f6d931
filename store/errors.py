"""traind's one error hierarchy starts here, in the package every other one imports.

Messages say what went wrong, where, and how to fix it.
"""


class TraindError(Exception):
    """Base of every error traind raises on purpose; anything else is a bug."""

    exit_code = 1


class StoreError(TraindError):
    """A save could not be written, read or verified."""


class SaveFailed(StoreError):
    """Writing a save failed; it was never reported, and earlier saves are untouched."""


class DiskFull(SaveFailed):
    """A save did not fit on the disk. Nothing was lost; the job can go on once space is freed."""


class CorruptSave(StoreError):
    """A save does not match its manifest (or has none): it is never loaded."""


class NoSuchSave(StoreError):
    """No save with that id, or none that can be loaded."""

    exit_code = 3
