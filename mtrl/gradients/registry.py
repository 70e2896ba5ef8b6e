"""Name -> method class. Each method module registers itself on import (see ``mtrl/gradients/__init__.py``)."""

from __future__ import annotations

from typing import Callable, Dict, List, Type

_METHODS: Dict[str, type] = {}


def register(*names: str) -> Callable[[Type], Type]:
    def deco(cls: Type) -> Type:
        for n in names:
            if n in _METHODS:
                raise KeyError(f"method name {n!r} registered twice")
            _METHODS[n] = cls
        return cls

    return deco


def available_methods() -> List[str]:
    return sorted(_METHODS)


def get_method(name: str, num_tasks: int, **kwargs):
    """Build method ``name`` for ``num_tasks`` tasks; unknown names or options raise ValueError."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _METHODS[name](num_tasks, **kwargs)
