"""``cagrad``: Conflict-Averse Gradient descent — Liu et al., "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021.

Update rule: g_0 = mean_i g_i; w* = argmin_{w in simplex} w^T G 1/T + c |g_0| sqrt(w^T G w); g_w = J^T w*;
d = g_0 + (c |g_0| / |g_w|) g_w, then rescaled: ``rescale`` 1 -> d / (1 + c^2) (default of the official code and of
its MTRL version), 2 -> d / (1 + c), 0 -> d. Mean-like scale (g_0 is the mean gradient). Converges to a stationary
point of the mean loss for 0 <= c < 1; non-conflicting only for c >= 1 (torchjd tests).

``c``: 0.5 here by default (LibMTL's and the paper's MT50 value). The paper's Meta-World + SAC experiments used
c = 0.9 for MT10 and c = 0.5 for MT50 (Cranial-XIX/CAGrad mtrl scripts); c = 0.4 for NYUv2/Cityscapes.

Reference followed: official Cranial-XIX/CAGrad (``nyuv2/utils.py::cagrad`` rule; ``mtrl/mtrl_files/cagrad.py`` for
the RL scale: mean gradient, /(1 + c^2), no x T). Solver (``solver`` option): "exact" (default) -- our active-set
projected-Newton method on the simplex in float64 (``solvers._cagrad_active_set``), which reaches the optimum
(tested never worse than SLSQP, ~10x faster at T = 50); "slsqp" -- scipy SLSQP as the official supervised code
(needs scipy); "sgd" -- the MTRL reference's ``cagrad`` as it runs (``solvers._cagrad_sgd``): G normalised by
(mean_i sqrt(G_ii + 1e-4))^2, 20 momentum-SGD steps on softmax logits (lr 25, or 50 when T = 50), its 1e-4 terms in
|g0|, |g_w| and lambda; inexact, but what the paper's RL numbers used (tested equal to a transcription of the
reference's arithmetic at a 100x norm spread). No cvxpy (torchjd's CAGrad needs cvxpy + clarabel). The CAGrad-Fast
task-subsampling variant is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import solvers
from .base import GramianMethod, check_choice, check_float
from .registry import register


@register("cagrad")
class CAGrad(GramianMethod):
    name = "cagrad"
    host_solver = True  # exact float64 solver (numpy, data-dependent active sets): one T x T host copy
    OPTIONS = {"c": 0.5, "rescale": 1, "solver": "exact"}

    def _check_options(self) -> None:
        check_float(self.name, "c", self.options["c"], 0.0)
        check_choice(self.name, "rescale", self.options["rescale"], [0, 1, 2])
        check_choice(self.name, "solver", self.options["solver"], ["exact", "slsqp", "sgd"])

    def weights(self, gramian: Tensor) -> Tensor:
        o = self.options
        lr = 50.0 if gramian.shape[0] == 50 else 25.0
        w, _ = solvers.cagrad_weights(gramian, float(o["c"]), rescale=o["rescale"], solver=o["solver"], sgd_lr=lr)
        return torch.from_numpy(w)
