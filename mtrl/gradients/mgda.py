"""``mgda``: Multiple-Gradient Descent — Désidéri 2012; for deep MTL: Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018.

Update rule: d = J^T w with w = argmin_{w in simplex} |J^T w|^2, the min-norm point of the convex hull of the task
gradients. Non-conflicting: g_i . d >= |d|^2 for every i. Weights sum to 1 (a convex combination: mean-like scale).

Reference followed: the rule of the paper (Algorithm 2 solves it by Frank-Wolfe, as LibMTL and torchjd
``MGDAWeighting``). Departure: we solve the small QP EXACTLY in float64 (``solvers.mgda_weights``: a primal
active-set method for the QP on the simplex, in cosine coordinates) instead of Frank-Wolfe with a 1e-3 stopping
step, because Frank-Wolfe's tolerance breaks the non-conflicting guarantee when task-gradient norms differ by
100x or more (RL). No MGDA-UB (representation-gradient) variant: the engine forms parameter gradients. No
gradient normalisation (LibMTL's ``mgda_gn='none'`` default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import solvers
from .base import GramianMethod
from .registry import register


@register("mgda")
class MGDA(GramianMethod):
    name = "mgda"
    host_solver = True  # exact float64 solver (numpy, data-dependent active sets): one T x T host copy

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.from_numpy(solvers.mgda_weights(gramian))
