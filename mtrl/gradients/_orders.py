"""Random visiting orders for the sequential surgery methods (PCGrad, GradVac), drawn on the device."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def random_orders(t: int, generator: Optional[torch.Generator], device: torch.device,
                  keys: Optional[Tensor] = None) -> Tensor:
    """(T, T-1) long: row i is a uniformly random permutation of the tasks other than i (one independent order
    per task), drawn on ``device`` from ``generator`` (None: torch's global RNG) -- no host round trip.
    ``keys``: the (T, T) uniform draw already made (``Method.uniform``: drawn before a compiled update).

    Sorting T uniform keys gives a uniform permutation; task i's own key is pushed past 1 so it sorts last and
    is cut off."""
    if keys is None:
        keys = torch.rand(t, t, generator=generator, device=device)
    keys = keys + 2.0 * torch.eye(t, device=device)
    return keys.argsort(dim=1)[:, : t - 1]
