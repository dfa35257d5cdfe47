"""Pruning methods by name. Each is a `Method`: how pass 1 scores units, how the budget is split
across modules, and how a module keeps its units (the rule of pass 2). All share the streaming
passes of `pipeline.py`, so a comparison differs only in the method."""

from __future__ import annotations

from .base import Method
from .structprune import StructPruneMethod

_REGISTRY: dict[str, type[Method]] = {"structprune": StructPruneMethod}


def register(name: str, cls: type[Method]) -> None:
    _REGISTRY[name] = cls


def get_method(name: str) -> type[Method]:
    _load_baselines()
    if name not in _REGISTRY:
        from ..errors import InvalidConfigError

        raise InvalidConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    _load_baselines()
    return list(_REGISTRY)


def _load_baselines() -> None:
    try:
        from . import baselines  # noqa: F401  (registers itself)
    except ImportError:
        pass
