"""``config``: ConFIG, Conflict-Free Inverse Gradients — Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025.

Update rule: u_i = g_i / |g_i|; g_u = unit(pinv(U) 1) (the direction with EQUAL cosine to every task gradient);
d = (sum_i g_i . g_u) g_u (length = the sum of the projections: sum-like scale). Non-conflicting in the sense that
all cosines are equal and positive when the unit gradients are independent; permutation invariant, linear under
scaling (JD paper tests).

Reference followed: official tum-pbs/ConFIG ``ConFIG_update`` (EqualWeight, ProjectionLength) and torchjd's port.
Departure (numerics only): instead of a least-squares / pinv of the T x P matrix U, we use the identity
pinv(U) = U^T pinv(U U^T) and compute everything from the Gramian in float64 (``solvers.config_weights``), so
d = J^T w; identical results (tested against torchjd's ``ConFIG`` to 1e-4) without an SVD of a T x P matrix. The
momentum variant M-ConFIG (one loss back-propagated per step) is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import solvers
from .base import GramianMethod
from .registry import register


@register("config")
class ConFIG(GramianMethod):
    name = "config"

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.from_numpy(solvers.config_weights(gramian))
