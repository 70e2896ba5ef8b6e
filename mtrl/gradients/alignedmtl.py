"""``alignedmtl``: Aligned-MTL — Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023.

Update rule: eigendecompose G = V L V^T, keep the rank r (tolerance l_max * T * eps); B = sqrt(l_scale) V L^-1/2 V^T
with l_scale = the smallest kept eigenvalue (``scale_mode="min"``; "median", "rmse" = mean also offered); the
aligned gradients J^T B have Gramian l_scale * I (equal norms, orthogonal); d = sum_i (J^T B)_i, i.e. w = B 1 (SUM).

Reference followed: official SamsungLabs/MTL ``ProcrustesSolver`` (sum, as LibMTL), in the form of torchjd 0.18
``AlignedMTLWeighting(scale_mode)`` multiplied by T (torchjd uses B (1/T), the mean; the official code B 1).
Implementation: torchjd's math with device ops (``aligned_weights``): the rank cut is a mask on the eigenvalues
instead of slicing, the rank-0 case a ``torch.where``; equal to torchjd x T to 1e-6 (tested, rank-deficient
Gramians included). Departures: none in the rule (the official code's removed ``torch.symeig`` is replaced by
``eigh``). Not linear under scaling and not non-conflicting (JD paper Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod, check_choice
from .registry import register


def aligned_weights(gramian: Tensor, scale_mode: str = "min") -> Tensor:
    """w = B 1 with B = sqrt(l_scale) V_r L_r^-1/2 V_r^T (the r eigenvalues above l_max * T * eps); ones where
    r = 0 (B = I). On the Gramian's device, no data-dependent Python branch."""
    t = gramian.shape[0]
    lam, vec = torch.linalg.eigh(gramian, UPLO="U")  # ascending
    tol = lam.max() * t * torch.finfo(gramian.dtype).eps
    kept = lam > tol  # the top r eigenvalues (a suffix of the ascending list)
    rank = kept.sum()
    one = torch.ones_like(lam)
    inv_sqrt = torch.where(kept, torch.rsqrt(torch.where(kept, lam, one)), torch.zeros_like(lam))
    if scale_mode == "min":
        scale = torch.where(kept, lam, torch.full_like(lam, float("inf"))).min()
    elif scale_mode == "median":  # torch.median: the lower middle of the r kept values
        idx = (t - rank + torch.div(rank - 1, 2, rounding_mode="floor")).clamp(0, t - 1)
        scale = lam.gather(0, idx.reshape(1))[0]
    else:  # "rmse": the mean kept eigenvalue (as the original implementation)
        scale = (lam * kept).sum() / rank.clamp(min=1)
    # B 1 = sqrt(scale) V diag(inv_sqrt) V^T 1
    w = torch.sqrt(scale.clamp(min=0)) * (vec @ (inv_sqrt * (vec.T @ one)))
    return torch.where(rank > 0, w, one)


@register("alignedmtl")
class AlignedMTL(GramianMethod):
    name = "alignedmtl"
    OPTIONS = {"scale_mode": "min"}

    def _check_options(self) -> None:
        check_choice(self.name, "scale_mode", self.options["scale_mode"], ["min", "median", "rmse"])

    def weights(self, gramian: Tensor) -> Tensor:
        return aligned_weights(gramian, self.options["scale_mode"])
