"""``imtl``: IMTL-G, the gradient half of Impartial Multi-Task Learning — Liu et al., "Towards Impartial
Multi-task Learning", ICLR 2021.

Update rule: d = J^T w with sum(w) = 1 such that d has the same projection on every unit task gradient:
d . u_i equal for all i (u_i = g_i / |g_i|). Closed form w proportional to G^+ |g| (|g| = the vector of norms),
normalised to sum 1 (a convex-like combination: mean-like scale).

Reference followed: torchjd 0.18 ``IMTLGWeighting`` (the JD paper's generalisation of the paper's closed form to
linearly dependent gradients; equal to LibMTL's/Nash-MTL repo's closed form when the gradients are independent),
reimplemented with device ops on the float64 Gramian (``imtl_weights``: same pinv, the "sum ~ 0 -> zero weights"
branch as a ``torch.where``; equal to torchjd's to 1e-6, tested, also on rank-deficient Gramians). Departures:
only IMTL-G; the loss-scale half (IMTL-L, learnable log-scales) is not included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register


def imtl_weights(gramian: Tensor) -> Tensor:
    """w = G^+ |g| / sum(G^+ |g|), or 0 where that sum is ~0 (|sum| < 1e-12), on the Gramian's device."""
    v = torch.linalg.pinv(gramian) @ torch.sqrt(torch.diagonal(gramian))
    s = v.sum()
    ok = s.abs() >= 1e-12
    return torch.where(ok, v / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(v))


@register("imtl")
class IMTLG(GramianMethod):
    graph_safe = True
    name = "imtl"

    def weights(self, gramian: Tensor) -> Tensor:
        return imtl_weights(gramian)
