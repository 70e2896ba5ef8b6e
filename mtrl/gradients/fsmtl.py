"""``fsmtl``: task-based flat regions — Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat
Regions", arXiv 2211.13723 (v5: "Beyond Losses Reweighting: Empowering Multi-Task Learning via the Generalization
Perspective", ICCV 2025).

Update rule (sharpness-aware per task): g_i = per-task gradient at theta; eps_i = rho g_i / |g_i| (the shared part
and the task-specific part normalised separately; ``adaptive`` = ASAM: eps_i = rho theta^2 g_i / |theta g_i|);
g_i^SAM = per-task gradient at theta + eps_i; h_i = g_i^SAM - g_i; shared update d = A({g_i}) + A({h_i}) with A the
``base`` aggregator (two separate instances, so a stateful base keeps one state per stream); task-specific
parameters get their SAM gradients combined with the g-stream base's loss weights (a Gramian base; else their
mean over tasks). Scale: that of the base.

Reference followed: official VietHoang1512/FS-MTL ``city2scape/train.py`` (stage 1 / stage 2, ``--method pcgrad``
etc.: A applied to g and to h separately and summed). Implementation: both passes are vmapped -- one Jacobian at
theta, one Jacobian with task t at its own point theta + eps_t (``engine.compute_jacobian(per_task_params=...)``):
T x P extra memory for the perturbed copies, and the second pass runs the network with T different weight sets
(batched matmuls over T weight copies instead of one): measured 3.2x the ``mtsac`` update at T = 10 and 13x at
T = 50 on CPU (``scripts/bench_update.py``, README *Speed*). ``base`` defaults to ``pcgrad`` (our
choice; the paper reports FS-MTL on top of MGDA, PCGrad, CAGrad, IMTL...). ``rho`` = 0.001 (our default from the
reference's Cityscapes runs, 0.001-0.0025; its argparse default 2 is not a working value). The "a-" variants
(A applied to g^SAM directly) are ``base`` applied to g^SAM: not offered separately.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
from torch import Tensor

from . import engine
from ._compose import build_base
from .base import LossFn, Method, check_bool, check_float
from .registry import register


@register("fsmtl")
class FSMTL(Method):
    name = "fsmtl"
    kind = "perturbation"
    OPTIONS = {"rho": 1e-3, "base": "pcgrad", "base_kwargs": {}, "adaptive": False}

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "rho", o["rho"], 0.0)
        check_bool(self.name, "adaptive", o["adaptive"])
        self.base_g = build_base(self.name, o["base"], o["base_kwargs"], self.num_tasks, jacobian_only=True)
        self.base_h = build_base(self.name, o["base"], o["base_kwargs"], self.num_tasks, jacobian_only=True)

    def reset(self) -> None:
        self.base_g.reset()
        self.base_h.reset()

    def _perturbation(self, grads: Tensor, theta: Tensor) -> Tensor:
        """rho * grads / |grads| row-wise (ASAM: rho theta^2 g / |theta g|); grads (T, n), theta (n,)."""
        rho = float(self.options["rho"])
        if self.options["adaptive"]:
            num, den = theta**2 * grads, (theta.abs() * grads).norm(dim=1, keepdim=True)
        else:
            num, den = grads, grads.norm(dim=1, keepdim=True)
        return rho * num / (den + 1e-12)

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        kw = self.base_g._engine_kwargs()
        res = engine.compute_jacobian(loss_fn, params, batch, task_ids, task_specific=task_specific, **kw)
        self._check_num_tasks(res.jacobian.shape[0])
        shared, ts = res.shared_names, res.task_specific_names
        t = res.jacobian.shape[0]
        per_task: Dict[str, Tensor] = {}
        theta = engine.flatten({n: params[n].detach() for n in shared}, shared)
        eps = self._perturbation(res.jacobian, theta)
        per_task.update(engine.unflatten(theta + eps, params, shared))
        if ts:
            ts_jac = torch.cat([res.task_specific_jacobian[n].reshape(t, -1) for n in ts], dim=1)
            ts_theta = engine.flatten({n: params[n].detach() for n in ts}, ts)
            per_task.update(engine.unflatten(ts_theta + self._perturbation(ts_jac, ts_theta), params, ts))
        sam = engine.compute_jacobian(loss_fn, params, batch, task_ids, task_specific=task_specific,
                                      per_task_params=per_task, with_gramian=False, **kw)
        h = sam.jacobian - res.jacobian
        d_g, info = self.base_g.aggregate(res.jacobian, res.gramian)
        d_h, _ = self.base_h.aggregate(h, engine.gramian(h))
        engine.write_back(params, shared, d_g + d_h)
        engine.write_task_specific(params, sam.task_specific_combined(self.base_g.combined_loss_weights(info)))
        return {"losses": res.losses, "gramian": res.gramian, "sam_losses": sam.losses, **info}

    def state_dict(self) -> Dict[str, Any]:
        return {"base_g": self.base_g.state_dict(), "base_h": self.base_h.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.base_g.load_state_dict(state.get("base_g", {}))
        self.base_h.load_state_dict(state.get("base_h", {}))
