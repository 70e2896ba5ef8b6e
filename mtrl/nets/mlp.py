"""``mlp``: the MT-SAC network — an MLP on [x, one_hot(task)] (Yu et al., Meta-World, CoRL 2019).

Published MT-SAC size: 3 hidden layers of 400 units, ReLU. ``width``/``depth`` are settable for a width-matched
baseline (``--set backbone_kwargs.width=...``).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .registry import register


def task_one_hot(task_id: Tensor, num_tasks: int, batch: int, dtype: torch.dtype) -> Tensor:
    """(B, T) one-hot; ``task_id`` is (B,) or a 0-d tensor (one task's slice under vmap), broadcast to B rows."""
    # A comparison, not F.one_hot/indexing: those take a data-dependent path that vmap(grad(...)) cannot batch.
    oh = (task_id.long().unsqueeze(-1) == torch.arange(num_tasks, device=task_id.device)).to(dtype)
    return oh.expand(batch, num_tasks) if oh.dim() == 1 else oh


def mlp(in_dim: int, out_dim: int, width: int, depth: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@register("mlp")
class MLPBackbone(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, width: int = 400, depth: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"mlp backbone needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.num_tasks = num_tasks
        self.net = mlp(in_dim + num_tasks, out_dim, width, depth)

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        return self.net(torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1))
