"""``dualproj``: projection of the mean gradient onto the dual cone — Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", arXiv 2406.16232 (2024), the DualProj baseline (after Lopez-Paz & Ranzato's GEM).

Update rule: d = pi(g_0), g_0 = (1/T) sum_i g_i, pi = projection onto {x : g_j . x >= 0 for all j}; with G = J J^T,
d = J^T v, v = argmin_v v^T G v s.t. v >= 1/T. Non-conflicting (not linear under scaling).

Reference followed: torchjd ``DualProjWeighting`` (same rule and scale). Departure: exact float64 active-set QP in
cosine coordinates (``solvers.dual_cone_weights``) instead of torchjd's trace-normalised, 1e-4-regularised quadprog
QP, so the non-conflicting guarantee holds when task-gradient norms differ by 100x+.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import solvers
from .base import GramianMethod
from .registry import register


@register("dualproj")
class DualProj(GramianMethod):
    name = "dualproj"
    host_solver = True  # exact float64 solver (numpy, data-dependent active sets): one T x T host copy

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.from_numpy(solvers.dualproj_weights(gramian))
