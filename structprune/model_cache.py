"""Loaded models kept for a process's life: the app's one copy of each model it has loaded.

Runs prune a deep copy (run.py), so a cached model is never mutated and every page and job of the
app shares it. A load runs on its own thread, and the caller waits in short steps that check the
calling thread's cancel flag (cancel.py): Cancel ends a job that is still loading within a fraction
of a second. The load itself cannot be interrupted (transformers reads the files), so it finishes
in the background and is cached for the next run instead of being thrown away. Two callers asking
for the same model wait for the same load.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from . import cancel
from .models import LoadedModel, load_model

WAIT_STEP_S = 0.1  # how often a waiting caller looks at its cancel flag


class _Load:
    """One load in flight: its thread fills `model` or `error`, then sets `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.model: LoadedModel | None = None
        self.error: BaseException | None = None


class ModelCache:
    """Up to `max_entries` loaded models by name, the least recently used dropped first (a job that
    still holds a dropped model keeps it alive until it ends)."""

    def __init__(self, max_entries: int = 3, loader: Callable[[str], LoadedModel] = load_model) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loads: dict[str, _Load] = {}
        self._max = max_entries
        self._loader = loader

    def cached(self, name: str) -> bool:
        with self._lock:
            return name.strip() in self._models

    def get(self, name: str) -> LoadedModel:
        """The model called `name`, loaded once. Raises what the loader raises (the library's
        one-line errors), or RunCancelledError when the calling thread's run is cancelled while it
        waits."""
        name = name.strip()
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            load = self._loads.get(name)
            if load is None:
                load = self._loads[name] = _Load()
                threading.Thread(target=self._load, args=(name, load), name=f"structprune-load-{name}",
                                 daemon=True).start()
        while not load.done.wait(WAIT_STEP_S):
            cancel.check()
        if load.error is not None:
            raise load.error
        return load.model

    def _load(self, name: str, load: _Load) -> None:
        try:
            model = self._loader(name)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            load.error = exc
            with self._lock:
                self._loads.pop(name, None)  # a failed load is tried again on the next request
        else:
            load.model = model
            with self._lock:
                self._loads.pop(name, None)
                self._models[name] = model
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
        finally:
            load.done.set()
