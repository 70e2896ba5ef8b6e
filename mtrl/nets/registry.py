"""Name -> backbone class. A backbone maps (x: (B, in_dim), task_id: (B,) long or a 0-d long under vmap) to
(B, out_dim). It must be ``torch.func.vmap``-friendly: no in-place updates of buffers in ``forward``, no
data-dependent Python control flow on tensor values."""

from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

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


def backbone_options(name: str) -> Optional[FrozenSet[str]]:
    """The option names backbone ``name`` accepts: its ``DEFAULTS`` (the issue-4 backbones, mlp, multihead), else
    the keyword parameters of its constructor after ``(in_dim, out_dim, num_tasks)``. None when that cannot be
    told (a constructor taking ``**kwargs`` without ``DEFAULTS``, or a name that does not resolve: validation
    reports that)."""
    try:
        cls = BACKBONES.get(name)
    except Exception:  # a name or plugin that does not resolve: validate() names it
        return None
    defaults = getattr(cls, "DEFAULTS", None)
    if isinstance(defaults, dict):
        return frozenset(defaults)
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[4:]  # self, in_dim, out_dim, num_tasks
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def fixed_options(name: str) -> Dict[str, Tuple[Any, str]]:
    """Options whose value the backbone's structure fixes: ``{option: (value, why)}`` from the class attribute
    ``FIXED_OPTIONS`` (HoME: ``depth`` 2, a meta level and a task level). A preset's value for another backbone
    yields to it (mtrl.config.fit_preset_options); a value the user sets must equal it."""
    try:
        return dict(getattr(BACKBONES.get(name), "FIXED_OPTIONS", {}))
    except Exception:  # as in backbone_options
        return {}
