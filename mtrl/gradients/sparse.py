"""``sparse``: Sparse Training (ST) — Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task Learning:
A Sparse Training Perspective", arXiv 2411.18615 (2024).

Update rule: a binary mask M selects a ``fraction`` of the shared parameters; only those are updated
(theta <- theta - lr M * g), the rest stay at their values; ST combines with any gradient method (``base``, e.g.
``base: pcgrad``): for a Jacobian/Gramian base the task gradients are masked BEFORE the base combines them (the base
sees the gradients of the trainable sub-network, which is where the paper measures fewer conflicts), and the combined
update is masked; for a loss-weighting base its gradient is masked after its backward. Scale: that of the base.

Selection (``selection``): "magnitude" (default) -- the largest-|theta| entries, per output neuron (per row of a
weight matrix; per tensor for 1-D tensors), following the paper's magnitude-based choice; "random" -- uniform (seeded
by ``seed``). The mask is chosen at the first update (i.e. at initialisation) and kept (``refresh_every`` = k > 0
re-selects every k updates). Task-specific parameters are not masked.

Reference followed: the paper's description (no official code was available to us). Departures / unverified: the
exact selection rule and ratio of the paper were not checked against code; ``fraction`` = 0.5 is our default, not a
published value. Masking saves no compute here (gradients are still computed densely).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Set

import torch
from torch import Tensor

from . import engine
from ._compose import build_base
from .base import JacobianMethod, LossFn, Method, check_choice, check_float, check_int
from .registry import register


@register("sparse")
class Sparse(Method):
    name = "sparse"
    kind = "wrapper"
    OPTIONS = {"fraction": 0.5, "base": "mtsac", "base_kwargs": {}, "selection": "magnitude",
               "refresh_every": 0, "seed": 0}

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "fraction", o["fraction"], 0.0, 1.0, lo_open=True)
        check_choice(self.name, "selection", o["selection"], ["magnitude", "random"])
        check_int(self.name, "refresh_every", o["refresh_every"], 0)
        check_int(self.name, "seed", o["seed"], 0)
        self.base = build_base(self.name, o["base"], o["base_kwargs"], self.num_tasks, jacobian_only=False)
        self.masks: Optional[Dict[str, Tensor]] = None
        self._step = 0

    def reset(self) -> None:
        self.masks = None
        self._step = 0
        self.base.reset()

    def select(self, params: Dict[str, Tensor], names: List[str]) -> Dict[str, Tensor]:
        """Masks (bool, same shape) for the tensors ``names``."""
        frac = float(self.options["fraction"])
        gen = torch.Generator().manual_seed(int(self.options["seed"]) + self._step)
        masks = {}
        for n in names:
            p = params[n].detach()
            if self.options["selection"] == "random":
                score = torch.rand(p.shape, generator=gen).to(p.device)
            else:
                score = p.abs()
            rows = score.reshape(score.shape[0], -1) if p.dim() >= 2 else score.reshape(1, -1)
            k = max(1, math.ceil(frac * rows.shape[1]))
            idx = rows.topk(k, dim=1).indices
            m = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, idx, True)
            masks[n] = m.reshape(p.shape)
        return masks

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        shared, _ = engine.split_parameters(params, task_specific)
        every = self.options["refresh_every"]
        if self.masks is None or set(self.masks) != set(shared) or (every and self._step % every == 0):
            self.masks = self.select(params, shared)
        self._step += 1
        masks = {n: m.to(params[n].device) for n, m in self.masks.items()}
        if isinstance(self.base, JacobianMethod):
            res = engine.compute_jacobian(loss_fn, params, batch, task_ids, task_specific=task_specific,
                                          with_gramian=False, **self.base._engine_kwargs())
            self._check_num_tasks(res.jacobian.shape[0])
            mvec = engine.flatten(masks, shared).to(res.jacobian.dtype)
            jac = res.jacobian * mvec
            gram = engine.gramian(jac)
            vec, info = self.base.aggregate(jac, gram)
            engine.write_back(params, shared, vec * mvec)
            engine.write_task_specific(params, res.task_specific_combined(self.base.combined_loss_weights(info)))
            return {"losses": res.losses, "gramian": gram, **info}
        saved = {n: params[n].grad for n in shared}
        for n in shared:
            params[n].grad = None
        out = self.base.backward(loss_fn, params, batch, task_ids, task_specific=task_specific)
        with torch.no_grad():
            for n in shared:
                g = params[n].grad
                if g is not None:
                    g.mul_(masks[n].to(g.dtype))
                if saved[n] is not None:
                    params[n].grad = saved[n] if g is None else g.add_(saved[n])
        return out

    def post_step(self) -> None:
        self.base.post_step()

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": None if self.masks is None else {n: m.cpu().clone() for n, m in self.masks.items()},
                "step": self._step, "base": self.base.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        m = state.get("masks")
        self.masks = None if m is None else {n: t.to(torch.bool).clone() for n, t in m.items()}
        self._step = int(state.get("step", 0))
        self.base.load_state_dict(state.get("base", {}))
