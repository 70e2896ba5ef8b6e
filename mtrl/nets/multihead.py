"""``multihead``: a shared trunk on [x, one_hot(task)] with one linear output head per task (MT-MH-SAC,
Yu et al., Meta-World, CoRL 2019; the Meta-World+ baseline). The heads are task-specific parameters: each task's
loss only reaches its own head (``task_specific_parameters``)."""

from __future__ import annotations

from typing import Any, Dict, Set

import torch
from torch import Tensor, nn

from .mlp import mlp, task_one_hot, width_depth
from .registry import register


@register("multihead")
class MultiHeadBackbone(nn.Module):
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__()
        width, depth = width_depth("multihead", options, self.DEFAULTS)
        self.num_tasks = num_tasks
        self.trunk = nn.Sequential(*list(mlp(in_dim + num_tasks, width, width, depth).children())[:-1])
        bound = 1.0 / width ** 0.5
        self.head_w = nn.Parameter(torch.empty(num_tasks, width, out_dim).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.empty(num_tasks, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        oh = task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)
        h = self.trunk(torch.cat([x, oh], dim=-1))
        if task_id.dim() == 0:  # one task's slice (under vmap): select its head by a one-hot product, not indexing
            sel = oh[0]
            w = torch.einsum("t,tdo->do", sel, self.head_w)
            return h @ w + sel @ self.head_b
        return torch.einsum("bd,tdo,bt->bo", h, self.head_w, oh) + oh @ self.head_b

    def task_specific_parameters(self) -> Set[str]:
        return {"head_w", "head_b"}
