"""Name -> backbone class. A backbone maps (x: (B, in_dim), task_id: (B,) long or a 0-d long under vmap) to
(B, out_dim). It must be ``torch.func.vmap``-friendly: no in-place updates of buffers in ``forward``, no
data-dependent Python control flow on tensor values."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Type

from torch import nn

_BACKBONES: Dict[str, type] = {}


def register(name: str) -> Callable[[Type], Type]:
    def deco(cls: Type) -> Type:
        if name in _BACKBONES:
            raise KeyError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = cls
        return cls

    return deco


def available_backbones() -> List[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, in_dim: int, out_dim: int, num_tasks: int, **kwargs: Any) -> nn.Module:
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(available_backbones())}")
    return _BACKBONES[name](in_dim, out_dim, num_tasks, **kwargs)
