"""``config``: ConFIG, Conflict-Free Inverse Gradients — Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025.

Update rule: u_i = g_i / |g_i|; g_u = unit(pinv(U) 1) (the direction with EQUAL cosine to every task gradient);
d = (sum_i g_i . g_u) g_u in the paper (length = the sum of the projections); here divided by T, the MEAN
projection (as our ``pcgrad``: identical rows give that row, like ``mtsac``). Non-conflicting in the sense that
all cosines are equal and positive when the unit gradients are independent; permutation invariant, linear under
scaling (JD paper tests).

Reference followed: official tum-pbs/ConFIG ``ConFIG_update`` (EqualWeight, ProjectionLength) and torchjd's port.
Departure (numerics only): instead of a least-squares / pinv of the T x P matrix U, we use the identity
pinv(U) = U^T pinv(U U^T) and compute everything from the Gramian in float64 on its device (``config_weights``:
the math of ``solvers.config_weights`` with the zero-gradient rows masked out instead of sliced, so no host sync), so
d = J^T w; identical results (tested against torchjd's ``ConFIG`` to 1e-4) without an SVD of a T x P matrix.
Departures: the mean projection length instead of the sum (task-specific parameters get w_k grad L_k with the same
weights); the momentum variant M-ConFIG (one loss back-propagated per step) is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register


def config_weights(gramian: Tensor, zero_tol: float = 1e-15) -> Tensor:
    """ConFIG as weights of the rows of J, on the Gramian's device (see ``solvers.config_weights``):
    a = D^-1 pinv(C) 1 over the nonzero rows (C their cosine matrix), d = J^T a (1^T G a) / (a^T G a); zeros where
    every gradient is zero. Zero rows are masked: pinv of C with their rows/columns zeroed is pinv(C_nz) padded
    with zeros, exactly as slicing them out."""
    n = torch.sqrt(torch.clamp(torch.diagonal(gramian), min=0.0))
    nz = (n > zero_tol * n.max().clamp(min=1e-300)) & (n > 0)
    m = torch.where(nz, n, torch.ones_like(n))
    both = nz[:, None] & nz[None, :]
    c = torch.where(both, gramian / torch.outer(m, m), torch.zeros_like(gramian))
    c = ((c + c.T) / 2).clamp(-1.0, 1.0)
    c = torch.where(torch.eye(len(n), dtype=torch.bool, device=n.device) & both, torch.ones_like(c), c)
    a = torch.linalg.pinv(c, hermitian=True, rtol=1e-15) @ nz.to(gramian.dtype)
    a = torch.where(nz, a / m, torch.zeros_like(a))
    ga = gramian @ a
    q = a @ ga
    ok = q > 0
    return torch.where(ok, a * ga.sum() / torch.where(ok, q, torch.ones_like(q)), torch.zeros_like(a))


@register("config")
class ConFIG(GramianMethod):
    graph_safe = True
    name = "config"

    def weights(self, gramian: Tensor) -> Tensor:
        return config_weights(gramian) / gramian.shape[0]
