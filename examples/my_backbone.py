"""A backbone from outside the package: ``python scripts/train.py --suite mt10 --backbone examples/my_backbone.py:FiLM``.

FiLM conditioning (Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018): every
hidden layer's features are scaled and shifted per task, h <- (1 + γ_t) ⊙ h + β_t, with γ, β learned per task.
Contract (README "Extending"): ``__init__(in_dim, out_dim, num_tasks, **options)``, ``forward(x, task_id)`` with x
(B, in_dim) and task_id (B,) or 0-d under vmap; optional ``task_specific_parameters`` and ``diagnostics``.
"""

import torch
from torch import Tensor, nn


class FiLM(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, width: int = 400, depth: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"backbone FiLM: width={width}, depth={depth}; valid: integers >= 1")
        self.num_tasks = num_tasks
        self.layers = nn.ModuleList(nn.Linear(in_dim if i == 0 else width, width) for i in range(depth))
        self.film = nn.Parameter(torch.zeros(num_tasks, depth, 2, width))  # (γ, β) per task and layer
        self.out = nn.Linear(width, out_dim)

    def task_specific_parameters(self):  # each task's loss touches only its own row of `film`
        return {"film"}

    def diagnostics(self):  # logged as backbone/<role>.net/film_norm/<task>
        return {"film_norm": self.film.detach().flatten(1).norm(dim=1)}

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        # A one-hot product, not film[task_id]: indexing by a batched 0-d id is not vmap-safe in grad.
        one_hot = (task_id.long().unsqueeze(-1) == torch.arange(self.num_tasks, device=x.device)).to(x.dtype)
        film = torch.tensordot(one_hot, self.film, dims=1)  # (B, depth, 2, width) or (depth, 2, width)
        h = x
        for i, layer in enumerate(self.layers):
            h = torch.relu(layer(h) * (1 + film[..., i, 0, :]) + film[..., i, 1, :])
        return self.out(h)
