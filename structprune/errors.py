"""Typed exceptions. Every message says what went wrong and what to do about it.

The CLI prints ``str(exc)`` on one line and exits non-zero; the app shows it in the page.
"""


class StructPruneError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidConfigError(StructPruneError, ValueError):
    """A setting is out of range or settings contradict each other."""


class UnknownModelError(StructPruneError):
    """A model name that is neither built in, a local folder, nor loadable from the hub."""


class ModelLoadError(StructPruneError):
    """A folder or hub id exists but no model could be loaded from it (or not offline)."""


class UnsupportedArchitectureError(StructPruneError):
    """The model's architecture has no adapter."""


class CorpusUnavailableError(StructPruneError):
    """A corpus is not installed or cannot be reached offline."""


class SequenceLengthError(StructPruneError, ValueError):
    """seqlen exceeds the model's context, or the text is shorter than the request."""


class RunCancelledError(StructPruneError):
    """A run was cancelled by its caller (raised at the next check of cancel.py: within one batch or
    solver step)."""


class DeviceOutOfMemoryError(StructPruneError):
    """The compute device ran out of memory; the message suggests smaller settings."""
