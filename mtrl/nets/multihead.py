"""``multihead``: a shared trunk on [x, one_hot(task)] with one linear output head per task (MT-MH-SAC,
Yu et al., Meta-World, CoRL 2019; the Meta-World+ baseline). The heads are task-specific parameters: each task's
loss only reaches its own head (``task_specific_parameters``)."""

from __future__ import annotations

from typing import Set

import torch
from torch import Tensor, nn

from .mlp import mlp, task_one_hot
from .registry import register


@register("multihead")
class MultiHeadBackbone(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, width: int = 400, depth: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"multihead backbone needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.num_tasks = num_tasks
        self.trunk = nn.Sequential(*list(mlp(in_dim + num_tasks, width, width, depth).children())[:-1])
        bound = 1.0 / width ** 0.5
        self.head_w = nn.Parameter(torch.empty(num_tasks, width, out_dim).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.empty(num_tasks, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        h = self.trunk(torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1))
        w = self.head_w[task_id]  # (D, O) for a 0-d id, (B, D, O) per sample otherwise
        b = self.head_b[task_id]
        if w.dim() == 2:
            return h @ w + b
        return torch.einsum("bd,bdo->bo", h, w) + b

    def task_specific_parameters(self) -> Set[str]:
        return {"head_w", "head_b"}
