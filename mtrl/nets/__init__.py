"""Backbones: how task identity enters the networks (design.md §5). One file each, registered by name."""

from .registry import available_backbones, build_backbone, register
from . import mlp, multihead  # noqa: F401,E402  (registration)
# Issue-4 backbones (one file each; see mtrl/nets/README_BACKBONES.md).
from . import care, harmony, moe, moore, paco, softmod, t2mir  # noqa: F401,E402  (registration)
# Issue-14 multi-gate and prompt-mask backbones (MMoE/MMoEEx, DSelect-k, HoME, CoTASP).
from . import cotasp, dselect, home, mmoe  # noqa: F401,E402  (registration)

__all__ = ["available_backbones", "build_backbone", "register"]
