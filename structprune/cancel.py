"""Cooperative cancellation: the one place that knows how a run is stopped early.

A caller that can be cancelled (an app job, `run_prune(cancel=...)`, the engine) opens a
`cancel_scope` with its cancel flag (any object with `is_set()`, usually a `threading.Event`);
every long loop of the library calls `check()`: per calibration or evaluation batch
(streaming.py, evaluation.py), per solver iteration (solver/), per refit step (refine.py), between
the steps of a run's set-up (run.py). `check()` raises `RunCancelledError` once a flag of the
calling thread's scopes is set, so a Cancel click ends the run within one batch or one solver
iteration, not at the next layer boundary. The scope is thread-local: a job's flag never stops
another thread's work, and without a scope `check()` costs one attribute lookup.

The scope also carries the app's window counter (`on_window(done, total)`), which evaluation
calls after every window batch so the progress bar moves inside a perplexity pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import RunCancelledError

_local = threading.local()  # .flags: tuple of cancel flags; .on_window: the innermost window callback


@contextmanager
def cancel_scope(cancel=None, on_window: Callable[[int, int], None] | None = None) -> Iterator[None]:
    """Within the block, on this thread, `check()` raises once `cancel` (or a flag of an enclosing
    scope) is set, and `window_done` reports to `on_window` (else to the enclosing scope's)."""
    old_flags, old_window = getattr(_local, "flags", ()), getattr(_local, "on_window", None)
    if cancel is not None and all(f is not cancel for f in old_flags):
        _local.flags = old_flags + (cancel,)
    if on_window is not None:
        _local.on_window = on_window
    try:
        yield
    finally:
        _local.flags, _local.on_window = old_flags, old_window


def cancelled() -> bool:
    """Whether a flag of the calling thread's scopes is set."""
    return any(f.is_set() for f in getattr(_local, "flags", ()))


def check() -> None:
    """Raises RunCancelledError when the calling thread's run was cancelled; call it in long loops."""
    if cancelled():
        raise RunCancelledError("run cancelled")


def current_flag():
    """The innermost cancel flag of this thread (None outside any scope): for code that hands it on."""
    flags = getattr(_local, "flags", ())
    return flags[-1] if flags else None


def window_done(done: int, total: int) -> None:
    """An evaluation window batch finished: checks for cancellation, then tells the scope's counter."""
    check()
    on_window = getattr(_local, "on_window", None)
    if on_window is not None:
        on_window(done, total)


@contextmanager
def window_span(offset: int, total: int) -> Iterator[None]:
    """Inside the block, windows count from `offset` out of `total` for the scope's counter: a run
    that evaluates several corpora in a row reports one count over all of them."""
    outer = getattr(_local, "on_window", None)
    if outer is None:
        yield
        return
    with cancel_scope(on_window=lambda done, _n: outer(offset + done, total)):
        yield


__all__ = ["cancel_scope", "cancelled", "check", "current_flag", "window_done", "window_span"]
