"""``uw``: Uncertainty Weighting — Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
for Scene Geometry and Semantics", CVPR 2018.

Update rule: learnable log-variances s_i = log sigma_i^2; loss = sum_i [L_i / (2 exp(s_i)) + s_i / 2] (SUM, as the
references); the network and the s_i are trained on it (for fixed L_i the optimum is s_i = log L_i, so the weight
1 / (2 sigma_i^2) ~ 1 / (2 L_i)). Reported "weights" = 1 / (2 exp(s_i)).

Reference followed: the Nash-MTL / IGB4MTL ``Uncertainty`` class (adapted from the authors' yaringal notebook:
s init 0) and LibMTL ``UW`` (init -0.5; ``init`` option). Departure: the s_i live in this method and are stepped by
its own Adam (``lr``, default 3e-4 = the MT-SAC learning rate) right after the backward; in the references they sit
in the model's optimiser with the model's learning rate. Requires losses that can be weighed as likelihoods (the SAC
critic's MSE); with an actor loss that can be negative the objective is unbounded in s.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from ._optim import load_adam_state, new_adam
from .base import LossWeightingMethod, check_float
from .registry import register


@register("uw")
class UncertaintyWeighting(LossWeightingMethod):
    name = "uw"
    OPTIONS = {"lr": 3e-4, "init": 0.0}

    def _check_options(self) -> None:
        check_float(self.name, "lr", self.options["lr"], 0.0, lo_open=True)
        check_float(self.name, "init", self.options["init"])
        self.reset()

    def reset(self) -> None:
        self.log_vars = torch.full((self.num_tasks,), float(self.options["init"]), requires_grad=True)
        self._opt = new_adam(self.log_vars, float(self.options["lr"]))

    def combine(self, losses: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        if self.log_vars.device != losses.device:
            self._move(losses.device)
        s = self.log_vars
        total = (losses / (2 * torch.exp(s.to(losses.dtype))) + s.to(losses.dtype) / 2).sum()
        self._opt.zero_grad(set_to_none=True)
        return total, {"weights": (0.5 * torch.exp(-s.detach())).to(torch.float32)}

    def after_backward(self, losses: Tensor) -> None:
        self._opt.step()

    def _move(self, device: torch.device) -> None:
        state = self._opt.state_dict()
        self.log_vars = self.log_vars.detach().to(device).requires_grad_(True)
        self._opt = new_adam(self.log_vars, float(self.options["lr"]))
        load_adam_state(self._opt, self.log_vars, state)

    def state_dict(self) -> Dict[str, Any]:
        return {"log_vars": self.log_vars.detach().cpu().clone(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.log_vars = state["log_vars"].detach().clone().to(torch.float32).requires_grad_(True)
        self._opt = new_adam(self.log_vars, float(self.options["lr"]))
        load_adam_state(self._opt, self.log_vars, state["optimizer"])
