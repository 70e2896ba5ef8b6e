"""Name -> method class. Each method module registers itself on import (see ``mtrl/gradients/__init__.py``)."""

from __future__ import annotations

from typing import List

from mtrl.registry import Registry

def _base() -> type:
    from .base import Method

    return Method


# Plugins (README "Extending"): `module:Class`, `file.py:Class`, or entry points of the group "mtrl.methods".
METHODS = Registry("method", base=_base, group="mtrl.methods")
register = METHODS.register


def available_methods() -> List[str]:
    return METHODS.names()


def get_method(name: str, num_tasks: int, **kwargs):
    """Build method ``name`` for ``num_tasks`` tasks; unknown names or options raise ValueError."""
    return METHODS.build(name, num_tasks, **kwargs)
