"""``mlp``: the MT-SAC network — an MLP on [x, one_hot(task)] (Yu et al., Meta-World, CoRL 2019).

Published MT-SAC size: 3 hidden layers of 400 units, ReLU. ``width``/``depth`` are settable for a width-matched
baseline (``--set backbone_kwargs.width=...``); an unknown option or a bad value is a one-line ValueError.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ._common import check_int, parse_options
from .registry import register


def width_depth(name: str, options: Dict[str, Any], defaults: Dict[str, Any]) -> Tuple[int, int]:
    """Validated ``(width, depth)`` of an MLP-shaped backbone (mlp, multihead)."""
    o = parse_options(name, options, defaults)
    return check_int(name, "width", o["width"]), check_int(name, "depth", o["depth"])


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
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__()
        width, depth = width_depth("mlp", options, self.DEFAULTS)
        self.num_tasks = num_tasks
        self.net = mlp(in_dim + num_tasks, out_dim, width, depth)

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        return self.net(torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1))
