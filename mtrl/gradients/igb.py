"""``igb``: Improvable Gap Balancing, the heuristic IGBv1 — Dai, Fei & Lu, "Improvable Gap Balancing for Multi-Task
Learning", UAI 2023.

Update rule: the improvable gap of task i is estimated by its loss relative to a base loss, L_i / L_i^base; weights
w = T softmax(L / L^base) (detached; a task far from done gets more weight); loss = sum_i w_i log L_i (SUM of
log-losses: the "scale-invariant" form the paper pairs IGB with). Before the base losses exist, w = 1.

Reference followed: official YanqiDai/IGB4MTL ``methods/loss_weight_methods.py::ImprovableGapBalancing_v1`` (base
losses = the mean training loss of the first epoch, ``base_epoch`` 0). Departures: RL has no epochs -- the base
losses are the mean losses of the first ``base_steps`` updates (default 1000, our choice: about one Meta-World
episode-batch worth of updates at the start); ``log_losses=False`` weighs the raw losses instead of their logs, for
losses that can be <= 0 (the SAC actor loss): with ``log_losses=True`` a non-positive loss raises. IGBv2 (weights
from an RL agent) is not implemented.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .base import LossWeightingMethod, check_bool, check_int
from .registry import register


@register("igb")
class IGB(LossWeightingMethod):
    name = "igb"
    OPTIONS = {"base_steps": 1000, "log_losses": True}

    def _check_options(self) -> None:
        check_int(self.name, "base_steps", self.options["base_steps"], 1)
        check_bool(self.name, "log_losses", self.options["log_losses"])
        self.reset()

    def reset(self) -> None:
        self._sum = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._count = 0
        self._base = None

    def combine(self, losses: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        det = losses.detach().to("cpu", torch.float64)
        if self._base is not None:
            w = self.num_tasks * torch.softmax(det / self._base, dim=0)
        else:
            w = torch.ones(self.num_tasks, dtype=torch.float64)
            self._sum += det
            self._count += 1
            if self._count >= self.options["base_steps"]:
                base = self._sum / self._count
                self._base = torch.where(base.abs() > 1e-12, base, torch.full_like(base, 1e-12))
        if self.options["log_losses"]:
            if bool((det <= 0).any()):
                raise ValueError(
                    f"method 'igb' with log_losses=true needs positive losses, got {det.tolist()}; "
                    "set log_losses=false for losses that can be <= 0 (e.g. the SAC actor loss)")
            total = (w.to(losses) * torch.log(losses)).sum()
        else:
            total = (w.to(losses) * losses).sum()
        return total, {"weights": w.to(torch.float32)}

    def state_dict(self) -> Dict[str, Any]:
        return {"sum": self._sum.clone(), "count": self._count,
                "base": None if self._base is None else self._base.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._sum = state["sum"].to(torch.float64).clone()
        self._count = int(state["count"])
        b = state.get("base")
        self._base = None if b is None else b.to(torch.float64).clone()
