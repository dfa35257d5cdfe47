"""Pruning methods by name. Each is a `Method`: how pass 1 scores units, how the budget is split
across modules, and how a module keeps its units (the rule of pass 2). All share the streaming
passes of `pipeline.py`, so a comparison differs only in the method. The names are listed in
`registry.py`; `register` adds a variant defined elsewhere."""

from __future__ import annotations

from .base import Method
from .registry import BUILTIN_METHODS, available_methods, get_method, register

__all__ = ["BUILTIN_METHODS", "Method", "available_methods", "get_method", "register"]
