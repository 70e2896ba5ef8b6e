"""``upgrad``: Unconflicting Projection of Gradients — Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv 2406.16232 (2024).

Update rule: d = (1/T) sum_i pi(g_i), pi = projection onto the dual cone {x : g_j . x >= 0 for all j}; with
G = J J^T, pi(g_i) = J^T v_i, v_i = argmin_v v^T G v s.t. v >= e_i, so the weights are (1/T) sum_i v_i (MEAN).
Non-conflicting, linear under scaling, permutation invariant (the paper's Table 1).

Reference followed: torchjd ``UPGradWeighting`` (same rule, same mean scaling). Departure: torchjd normalises G by
its trace and adds 1e-4 I before its quadprog QPs; that regularisation breaks the non-conflicting guarantee when
task-gradient norms differ by 100x+ (RL). We solve the T QPs exactly in float64, in cosine coordinates, with an
active-set NNQP (``solvers.dual_cone_weights``); on torchjd's golden case the results agree to 1e-3 (the effect of
its regularisation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import solvers
from .base import GramianMethod
from .registry import register


@register("upgrad")
class UPGrad(GramianMethod):
    name = "upgrad"
    host_solver = True  # exact float64 solver (numpy, data-dependent active sets): one T x T host copy

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.from_numpy(solvers.upgrad_weights(gramian))
