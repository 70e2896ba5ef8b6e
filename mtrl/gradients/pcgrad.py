"""``pcgrad``: Projecting Conflicting Gradients — Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

Update rule (Algorithm 1): for every task i, g_i' <- g_i, then for every other task j in a fresh random order:
if g_i' . g_j < 0, g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j (projection against the ORIGINAL g_j);
d = sum_i g_i' in the paper, the official TF code, LibMTL and torchjd; here d = mean_i g_i' (scale, below).

Reference followed: torchjd 0.18 ``PCGradWeighting`` (the rule on the Gramian: g_i' = sum_k C_ik g_k, so
g_i' . g_j = (C G)_ij and d = w^T J with w the column sums of C). Implementation: the same computation vectorised
over i on the Gramian's device (``pcgrad_weights``): T - 1 steps, step k projects every task i against its k-th
task ``orders[i, k]`` at once (each row of C only depends on its own order, so this equals the per-task loops).
The orders -- one uniformly random permutation of the other tasks per task -- are drawn on the device from the
method's generator (``set_generator``; None: torch's global RNG), with no host synchronisation.
Departure: the MEAN of the projected gradients instead of their sum, as the Meta-World+ reference PCGrad
(rainx0r/metaworld-algorithms ``metaworld_algorithms/optim/pcgrad.py``: ``final_grads.mean(axis=0)``), so a
Jacobian with identical rows gives that row, as ``mtsac`` does, and a gradient-norm clip means the same for both.
Task-specific parameters (heads) get w_k grad L_k with the same weights (the reference flattens the heads into the
projected vectors, which gives them this form too, but with projections computed on heads + trunk; ours on the
shared parameters only). Otherwise the rule of the paper. (The official TF code's shuffle is a no-op,
tianheyu927/PCGrad#3/#5; not copied.)
The SAC use in the paper applies PCGrad to the critic and the actor losses separately: build one instance each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._orders import random_orders
from .base import GramianMethod
from .registry import register


def pcgrad_weights(gramian: Tensor, orders: Tensor) -> Tensor:
    """Algorithm 1 on the Gramian, all tasks at once: (T, T) Gramian, (T, T-1) orders -> (T,) weights of the SUM
    of the projected gradients (the paper's d)."""
    t = gramian.shape[0]
    rows = torch.arange(t, device=gramian.device)
    coef = torch.eye(t, dtype=gramian.dtype, device=gramian.device)  # g_i' = sum_k coef[i, k] g_k
    sq = torch.diagonal(gramian)
    safe_sq = torch.where(sq > 0, sq, torch.ones_like(sq))
    for k in range(t - 1):
        j = orders[:, k]
        inner = (coef * gramian.index_select(0, j)).sum(dim=1)  # g_i' . g_j for every i
        step = torch.where(inner < 0, inner / safe_sq.index_select(0, j), torch.zeros_like(inner))
        coef.index_put_((rows, j), -step, accumulate=True)
    return coef.sum(dim=0)


@register("pcgrad")
class PCGrad(GramianMethod):
    name = "pcgrad"
    graph_safe = True
    # scripts/bench_learner.py: one graph 4.2-4.7x eager at width 8, the split form 2.6-3.1x (AMD EPYC, 3 runs);
    # 3.38x and 2.13x on the Intel Xeon of issue 21.
    one_graph = True

    def weights(self, gramian: Tensor) -> Tensor:
        t = gramian.shape[0]
        orders = random_orders(t, self.generator, gramian.device, self.uniform((t, t), gramian.device))
        return pcgrad_weights(gramian, orders) / t

    def random_draws(self):
        return [(self.num_tasks, self.num_tasks)]
