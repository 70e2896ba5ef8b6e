"""``gradvac``: Gradient Vaccine — Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021.

Update rule: for each task i, g_i' <- g_i; for each j != i in a random order: phi = cos(g_i', g_j); if phi < phi_hat_ij
(an EMA target): g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j;
then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. d = sum_i g_i' (SUM). With zero targets (first call) it is
PCGrad for two tasks.

Reference followed: torchjd 0.18 ``GradVacWeighting(beta, eps)`` used as is on our float64 Gramian (LibMTL's
whole-model variant, ``GradVac_group_type=0``). State: the T x T EMA targets (``state_dict``). ``beta``: 0.5, the
LibMTL/torchjd default. Departures: whole-model grouping only (no per-layer targets).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from .base import GramianMethod, check_float
from .registry import register


@register("gradvac")
class GradVac(GramianMethod):
    name = "gradvac"
    OPTIONS = {"beta": 0.5, "eps": 1e-8}

    def _check_options(self) -> None:
        check_float(self.name, "beta", self.options["beta"], 0.0, 1.0)
        check_float(self.name, "eps", self.options["eps"], 0.0)
        from torchjd.aggregation import GradVacWeighting

        self._weighting = GradVacWeighting(beta=float(self.options["beta"]), eps=float(self.options["eps"]))

    def weights(self, gramian: Tensor) -> Tensor:
        return self._weighting(gramian).to(torch.float64)

    def reset(self) -> None:
        self._weighting.reset()

    def state_dict(self) -> Dict[str, Any]:
        phi = self._weighting._phi_t
        return {"phi": None if phi is None else phi.detach().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        phi = state.get("phi")
        if phi is None:
            self._weighting.reset()
        else:
            phi = phi.detach().to("cpu", torch.float64).clone()
            self._weighting._phi_t = phi
            self._weighting._state_key = (phi.shape[0], torch.float64)
