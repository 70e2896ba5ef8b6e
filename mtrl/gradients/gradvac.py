"""``gradvac``: Gradient Vaccine — Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021.

Update rule: for each task i, g_i' <- g_i; for each j != i in a random order: phi = cos(g_i', g_j); if phi < phi_hat_ij
(an EMA target): g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j;
then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. The paper, LibMTL and torchjd sum: d = sum_i g_i'; here
d = mean_i g_i' (as our ``pcgrad``: identical rows give that row, like ``mtsac``). With zero targets (first call) it
is PCGrad for two tasks.

Reference followed: torchjd 0.18 ``GradVacWeighting(beta, eps)`` (LibMTL's whole-model variant,
``GradVac_group_type=0``), its Gramian formulation reimplemented with device ops and vectorised over i
(``gradvac_weights``: T - 1 steps, each visiting one task j per task i, as PCGrad; every (i, j) pair and its EMA
target is touched once per call, so this equals the per-task loops given the same orders). The orders come from the
method's generator (``set_generator``; None: torch's global RNG). State: the T x T EMA targets, kept on the
Gramian's device (``state_dict`` copies them to the CPU). ``beta``: 0.5, the LibMTL/torchjd default. Departures:
the mean instead of the sum (above; task-specific parameters get w_k grad L_k with the same weights); whole-model
grouping only (no per-layer targets).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._orders import random_orders
from .base import GramianMethod, check_float
from .registry import register


def gradvac_weights(gramian: Tensor, phi_hat: Tensor, orders: Tensor, beta: float, eps: float
                    ) -> Tuple[Tensor, Tensor]:
    """(weights (T,), updated EMA targets (T, T)) from the Gramian, the targets and the (T, T-1) orders."""
    t = gramian.shape[0]
    rows = torch.arange(t, device=gramian.device)
    coef = torch.eye(t, dtype=gramian.dtype, device=gramian.device)  # g_i' = sum_k coef[i, k] g_k
    cg = gramian.clone()  # cg[i] = coef[i] @ G: the dot products of g_i' with every original g_j
    phi_hat = phi_hat.clone()
    norms = torch.sqrt(torch.diagonal(gramian).clamp(min=0.0))
    zero = torch.zeros(t, dtype=gramian.dtype, device=gramian.device)
    for k in range(t - 1):
        j = orders[:, k]
        dot = cg[rows, j]
        norm_i = (cg * coef).sum(dim=1).clamp(min=0.0).sqrt()
        norm_j = norms.index_select(0, j)
        phi = dot / (norm_i * norm_j + eps)
        target = phi_hat[rows, j]
        s_phi = (1.0 - phi * phi).clamp(min=0.0).sqrt()
        s_hat = (1.0 - target * target).clamp(min=0.0).sqrt()
        w = torch.where(phi < target, norm_i * (target * s_phi - phi * s_hat) / (norm_j * s_hat + eps), zero)
        coef.index_put_((rows, j), w, accumulate=True)
        cg = cg + w[:, None] * gramian.index_select(0, j)
        phi_hat.index_put_((rows, j), (1.0 - beta) * target + beta * phi)
    return coef.sum(dim=0), phi_hat


@register("gradvac")
class GradVac(GramianMethod):
    name = "gradvac"
    OPTIONS = {"beta": 0.5, "eps": 1e-8}

    def _check_options(self) -> None:
        check_float(self.name, "beta", self.options["beta"], 0.0, 1.0)
        check_float(self.name, "eps", self.options["eps"], 0.0)
        self.reset()

    def weights(self, gramian: Tensor) -> Tensor:
        t = gramian.shape[0]
        phi = self._phi
        if phi is None or phi.shape != (t, t):
            phi = torch.zeros(t, t, dtype=gramian.dtype, device=gramian.device)
        phi = phi.to(device=gramian.device, dtype=gramian.dtype)
        orders = random_orders(t, self.generator, gramian.device, self.uniform((t, t), gramian.device))
        w, self._phi = gradvac_weights(gramian, phi, orders, float(self.options["beta"]), float(self.options["eps"]))
        return w / t

    def random_draws(self):
        return [(self.num_tasks, self.num_tasks)]

    def reset(self) -> None:
        self._phi: Optional[Tensor] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"phi": None if self._phi is None else self._phi.detach().to("cpu", torch.float64).clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        phi = state.get("phi")
        self._phi = None if phi is None else phi.detach().to("cpu", torch.float64).clone()
