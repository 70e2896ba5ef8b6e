"""Small helpers for methods that own learnable task weights (their own Adam, checkpointable state)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor


def new_adam(param: Tensor, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    return torch.optim.Adam([param], lr=lr, weight_decay=weight_decay)


def adam_state(opt: torch.optim.Optimizer) -> Dict[str, Any]:
    return opt.state_dict()


def load_adam_state(opt: torch.optim.Optimizer, param: Tensor, state: Dict[str, Any]) -> None:
    opt.load_state_dict(state)
    for st in opt.state.values():
        for k, v in list(st.items()):
            if isinstance(v, Tensor) and k != "step":
                st[k] = v.to(param.device)
