"""The methods by name: every built-in method, imported here and listed in one dict, plus
`register` for variants defined elsewhere (benchmarks/ablations.py, third-party code).

No method module imports this one (or the package): the dependency runs one way, from the
registry to the methods, so a method module that fails to import fails here, loudly."""

from __future__ import annotations

from ..errors import InvalidConfigError
from .base import Method
from .baselines import FLAP, OWL, Magnitude, WandaSP
from .global_taylor import GlobalTaylor
from .structprune import StructPruneMethod

BUILTIN_METHODS: dict[str, type[Method]] = {
    "structprune": StructPruneMethod,
    "magnitude": Magnitude,
    "wanda-sp": WandaSP,
    "flap": FLAP,
    "owl": OWL,
    "global-taylor": GlobalTaylor,
}

_REGISTRY: dict[str, type[Method]] = dict(BUILTIN_METHODS)


def register(name: str, cls: type[Method]) -> None:
    """Makes `cls` available as `name` to `get_method` (and so to `PruneConfig.method`): the
    extension point for method variants outside this package. A name already taken is replaced."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a method must be a Method subclass, got {cls!r}")
    _REGISTRY[name] = cls


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise InvalidConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return list(_REGISTRY)
