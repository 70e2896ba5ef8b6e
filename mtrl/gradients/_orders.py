"""Random visiting orders for the sequential surgery methods (PCGrad, GradVac), drawn on the device."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def random_orders(t: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(T, T-1) long: row i is a uniformly random permutation of the tasks other than i (one independent order
    per task), drawn on ``device`` from ``generator`` (None: torch's global RNG) -- no host round trip.

    Sorting T uniform keys gives a uniform permutation; task i's own key is pushed past 1 so it sorts last and
    is cut off."""
    keys = torch.rand(t, t, generator=generator, device=device)
    keys = keys + 2.0 * torch.eye(t, device=device)
    return keys.argsort(dim=1)[:, : t - 1]
