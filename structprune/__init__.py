"""structprune: memory-bounded structured pruning of causal LMs (heads and MLP channels).

The public names load lazily, so `import structprune` stays cheap and pulls in the data stack
(`datasets`) only when a run needs corpora (the GPU image has torch and transformers only).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PruneConfig": "config",
    "run_prune": "run",
    "PruneResult": "run",
    "load_model": "models",
    "load_pruned": "checkpoint",
    "save_pruned": "checkpoint",
    "perplexity": "evaluation",
    "estimate_memory": "estimate",
    "ProgressEvent": "pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'structprune' has no attribute {name!r}")
