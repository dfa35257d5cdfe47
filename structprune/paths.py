"""Where the project keeps converted models, prepared corpora and the run store.

One place decides every folder, so the CLI, the app and the tests agree. Each can be moved with an
environment variable (or passed explicitly where a function takes a folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Converted models and prepared corpora. ``STRUCTPRUNE_CACHE`` overrides the default
    ``$XDG_CACHE_HOME/structprune`` (``~/.cache/structprune``)."""
    env = os.environ.get("STRUCTPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "structprune"


def data_dir() -> Path:
    """The run store (SQLite) and saved pruned models. ``STRUCTPRUNE_DATA`` overrides the
    default ``<cache_dir>/runs``."""
    env = os.environ.get("STRUCTPRUNE_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "runs"


def models_dir() -> Path:
    return cache_dir() / "models"


def corpora_dir() -> Path:
    return cache_dir() / "corpora"
