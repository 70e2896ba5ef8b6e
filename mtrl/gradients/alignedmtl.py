"""``alignedmtl``: Aligned-MTL — Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023.

Update rule: eigendecompose G = V L V^T, keep the rank r (tolerance l_max * T * eps); B = sqrt(l_scale) V L^-1/2 V^T
with l_scale = the smallest kept eigenvalue (``scale_mode="min"``; "median", "rmse" = mean also offered); the
aligned gradients J^T B have Gramian l_scale * I (equal norms, orthogonal); d = sum_i (J^T B)_i, i.e. w = B 1 (SUM).

Reference followed: official SamsungLabs/MTL ``ProcrustesSolver`` (sum, as LibMTL). Implementation: torchjd 0.18
``AlignedMTLWeighting(scale_mode)`` on our float64 Gramian, multiplied by T because torchjd uses B (1/T) (mean) where
the official code uses B 1. Departures: none in the rule (the official code's removed ``torch.symeig`` is replaced by
``eigh``). Not linear under scaling and not non-conflicting (JD paper Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod, check_choice
from .registry import register


@register("alignedmtl")
class AlignedMTL(GramianMethod):
    name = "alignedmtl"
    OPTIONS = {"scale_mode": "min"}

    def _check_options(self) -> None:
        check_choice(self.name, "scale_mode", self.options["scale_mode"], ["min", "median", "rmse"])
        from torchjd.aggregation import AlignedMTLWeighting

        self._weighting = AlignedMTLWeighting(scale_mode=self.options["scale_mode"])

    def weights(self, gramian: Tensor) -> Tensor:
        return self._weighting(gramian).to(torch.float64) * gramian.shape[0]
