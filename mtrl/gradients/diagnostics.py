"""What to log about task gradients (design.md §4): pairwise cosines, fraction of conflicting pairs, norms."""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


def grad_diagnostics(gramian: Tensor) -> Dict[str, Tensor]:
    """From a (T, T) Gramian ``J J^T``:

    * ``"cosine"``: (T, T) cosine similarities between task gradients (0 where a gradient is zero; 1 on the
      diagonal of nonzero rows);
    * ``"conflict_fraction"``: 0-d, fraction of pairs i < j with cosine < 0 (0 when T < 2);
    * ``"norms"``: (T,) gradient norms.

    Computed in float64 on the Gramian's device; returned as float32 CPU tensors (ready for TensorBoard).
    """
    g = gramian.detach().to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"grad_diagnostics expects a square (T, T) Gramian, got shape {tuple(g.shape)}")
    t = g.shape[0]
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    cos = cos.clamp(-1.0, 1.0)
    if t >= 2:
        iu = torch.triu_indices(t, t, offset=1, device=g.device)
        pairs = cos[iu[0], iu[1]]
        conflict = (pairs < 0).to(torch.float64).mean()
    else:
        conflict = torch.zeros((), dtype=torch.float64, device=g.device)
    return {
        "cosine": cos.to("cpu", torch.float32),
        "conflict_fraction": conflict.to("cpu", torch.float32),
        "norms": norms.to("cpu", torch.float32),
    }
