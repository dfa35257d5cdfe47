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


class NonFiniteResultError(StructPruneError):
    """A run whose perplexity, loss or pruned weights are not finite: it ends as failed, never
    "finished". `record` is its complete record with status "failed" and the reason when one was
    assembled (strict JSON: the non-finite numbers are null and listed under "nonfinite")."""

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record


class RunNotFoundError(StructPruneError):
    """No run of that id in the run store, no run store in that folder, or no record file of that name."""


class OutputWriteError(StructPruneError):
    """Writing a run's output failed (a full disk, a folder that went away): what was written
    before stays, marked incomplete, and the run can be resumed once the cause is fixed."""
