"""Name -> backbone class. A backbone maps (x: (B, in_dim), task_id: (B,) long or a 0-d long under vmap) to
(B, out_dim). It must be ``torch.func.vmap``-friendly: no in-place updates of buffers in ``forward``, no
data-dependent Python control flow on tensor values."""

from __future__ import annotations

from typing import Any, List

from torch import nn

from mtrl.registry import Registry

# Plugins (README "Extending"): `module:Class`, `file.py:Class`, or entry points of the group "mtrl.backbones";
# any nn.Module with this constructor and forward.
BACKBONES = Registry("backbone", base=lambda: nn.Module, group="mtrl.backbones")


def register(name: str):
    return BACKBONES.register(name)


def available_backbones() -> List[str]:
    return BACKBONES.names()


def build_backbone(name: str, in_dim: int, out_dim: int, num_tasks: int, **kwargs: Any) -> nn.Module:
    return BACKBONES.build(name, in_dim, out_dim, num_tasks, **kwargs)
