"""``imtl``: IMTL-G, the gradient half of Impartial Multi-Task Learning — Liu et al., "Towards Impartial
Multi-task Learning", ICLR 2021.

Update rule: d = J^T w with sum(w) = 1 such that d has the same projection on every unit task gradient:
d . u_i equal for all i (u_i = g_i / |g_i|). Closed form w proportional to G^+ |g| (|g| = the vector of norms),
normalised to sum 1 (a convex-like combination: mean-like scale).

Reference followed: torchjd 0.18 ``IMTLGWeighting`` used as is on our float64 Gramian (the JD paper's
generalisation of the paper's closed form to linearly dependent gradients; equal to LibMTL's/Nash-MTL repo's
closed form when the gradients are independent). Departures: only IMTL-G; the loss-scale half (IMTL-L, learnable
log-scales) is not included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register


@register("imtl")
class IMTLG(GramianMethod):
    name = "imtl"

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(num_tasks, **kwargs)
        from torchjd.aggregation import IMTLGWeighting

        self._weighting = IMTLGWeighting()

    def weights(self, gramian: Tensor) -> Tensor:
        return self._weighting(gramian).to(torch.float64)
