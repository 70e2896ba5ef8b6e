"""``pcgrad``: Projecting Conflicting Gradients — Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

Update rule (Algorithm 1): for every task i, g_i' <- g_i, then for every other task j in a fresh random order:
if g_i' . g_j < 0, g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j (projection against the ORIGINAL g_j);
d = sum_i g_i' (SUM over tasks, as the official TF code, LibMTL and torchjd).

Reference followed: torchjd 0.18 ``PCGradWeighting`` used as is on our Gramian (float64): it keeps, for each i,
the coefficients of g_i' on the original gradients, so d = w^T J with w the summed coefficients. The order is
drawn per task with ``torch.randperm`` (the global torch RNG; seed it for reproducibility), skipping i itself.
Departures: none in the rule. (The official TF code's shuffle is a no-op, tianheyu927/PCGrad#3/#5; not copied.)
The SAC use in the paper applies PCGrad to the critic and the actor losses separately: build one instance each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GramianMethod
from .registry import register


@register("pcgrad")
class PCGrad(GramianMethod):
    name = "pcgrad"

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(num_tasks, **kwargs)
        from torchjd.aggregation import PCGradWeighting

        self._weighting = PCGradWeighting()

    def weights(self, gramian: Tensor) -> Tensor:
        return self._weighting(gramian).to(torch.float64)
