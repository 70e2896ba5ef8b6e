"""``dwa``: Dynamic Weight Average — Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019.

Update rule: w_i = T softmax_i(r_i / temp) with r_i = (recent loss of task i) / (older loss of task i); loss =
sum_i w_i L_i (SUM; the weights average 1, so this is T x the mean loss until the ratios differ). The paper uses the
last two EPOCH averages; RL has no epochs, so the loss ratio is taken over two windows of ``iteration_window``
updates: r = mean(last window) / mean(the window before).

Reference followed: the iteration-window variant of the Nash-MTL / IGB4MTL repositories
(``DynamicWeightAverage(iteration_window=25, temp=2.0)``: a FIFO of 2 windows initialised with ones; weights stay 1
for the first ``iteration_window`` updates). ``temp`` = 2 is the paper's value. Departures: none beyond the window.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .base import LossWeightingMethod, check_float, check_int
from .registry import register


@register("dwa")
class DWA(LossWeightingMethod):
    name = "dwa"
    OPTIONS = {"iteration_window": 25, "temp": 2.0}

    def _check_options(self) -> None:
        check_int(self.name, "iteration_window", self.options["iteration_window"], 1)
        check_float(self.name, "temp", self.options["temp"], 0.0, lo_open=True)
        self.reset()

    def reset(self) -> None:
        win = self.options["iteration_window"]
        self._costs = torch.ones(2 * win, self.num_tasks, dtype=torch.float64)
        self._weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self._iters = 0

    def combine(self, losses: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        win = self.options["iteration_window"]
        # the history lives on the losses' device: no host sync per update
        self._costs = torch.roll(self._costs.to(losses.device), -1, dims=0)
        self._weights = self._weights.to(losses.device)
        self._costs[-1] = losses.detach().to(torch.float64)
        if self._iters > win:
            ratio = self._costs[win:].mean(0) / self._costs[:win].mean(0)
            self._weights = self.num_tasks * torch.softmax(ratio / float(self.options["temp"]), dim=0)
        self._iters += 1
        w = self._weights.to(losses)
        return (w * losses).sum(), {"weights": self._weights.detach().to(torch.float32)}

    def state_dict(self) -> Dict[str, Any]:
        return {"costs": self._costs.cpu().clone(), "weights": self._weights.cpu().clone(), "iters": self._iters}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._costs = state["costs"].to(torch.float64).clone()
        self._weights = state["weights"].to(torch.float64).clone()
        self._iters = int(state["iters"])
