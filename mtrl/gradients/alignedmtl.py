"""``alignedmtl``: Aligned-MTL — Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023.

Update rule: eigendecompose G = V L V^T, keep the rank r (eigenvalues > l_max * T * eps); B = sqrt(l_scale) V L^-1/2 V^T
with l_scale = the smallest kept eigenvalue (``scale_mode="min"``; "median", "rmse" = mean also offered); the
aligned gradients J^T B have Gramian l_scale * I (equal norms, orthogonal); d = sum_i (J^T B)_i, i.e. w = B 1 (SUM).

Reference followed: official SamsungLabs/MTL ``ProcrustesSolver`` (sum, as LibMTL), in the form of torchjd 0.18
``AlignedMTLWeighting(scale_mode)`` multiplied by T (torchjd uses B (1/T), the mean; the official code B 1).
Implementation: torchjd's math with device ops (``aligned_weights``): the rank cut is a mask on the eigenvalues
instead of slicing, the rank-0 case a ``torch.where``. ``cutoff`` -- the eps of the rank cut: "float32" (default)
is the official code's ``torch.finfo().eps`` = 1.19e-7 (the default dtype's, whatever G's dtype), so eigenvalues
below l_max * T * 1.19e-7 are dropped as there, although our eigendecomposition runs in float64; "float64" keeps
them down to l_max * T * 2.2e-16 (what torchjd does on a float64 Gramian; tested equal to torchjd x T to 1e-6,
rank-deficient Gramians included). The cut matters on near-collinear task gradients: with ``scale_mode="min"`` a
kept tiny eigenvalue becomes l_scale and shrinks and turns the update. Departures: the official code's removed
``torch.symeig`` is replaced by ``eigh`` (in float64 instead of float32). Not linear under scaling and not
non-conflicting (JD paper Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod, check_choice
from .registry import register


CUTOFF_EPS = {"float32": torch.finfo(torch.float32).eps, "float64": torch.finfo(torch.float64).eps}


def aligned_weights(gramian: Tensor, scale_mode: str = "min", cutoff: str = "float32") -> Tensor:
    """w = B 1 with B = sqrt(l_scale) V_r L_r^-1/2 V_r^T (the r eigenvalues above l_max * T * eps, eps that of
    ``cutoff``); ones where r = 0 (B = I). On the Gramian's device, no data-dependent Python branch."""
    t = gramian.shape[0]
    lam, vec = torch.linalg.eigh(gramian, UPLO="U")  # ascending
    tol = lam.max() * t * CUTOFF_EPS[cutoff]
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
    graph_safe = True
    name = "alignedmtl"
    OPTIONS = {"scale_mode": "min", "cutoff": "float32"}

    def _check_options(self) -> None:
        check_choice(self.name, "scale_mode", self.options["scale_mode"], ["min", "median", "rmse"])
        check_choice(self.name, "cutoff", self.options["cutoff"], sorted(CUTOFF_EPS))

    def weights(self, gramian: Tensor) -> Tensor:
        return aligned_weights(gramian, self.options["scale_mode"], self.options["cutoff"])
