"""``samo``: SAMO, sharpness-aware multi-task optimisation with forward-only local perturbations — Ban, Subramani &
Ji, "SAMO: A Lightweight Sharpness-Aware Approach for Multi-Task Optimization with Joint Global-Local Perturbation",
ICCV 2025 (arXiv 2507.07883).

Update rule: g0 = gradient of the mean loss (one backward); per task a zeroth-order local gradient from forward passes
only, g^_i = [(L_i(theta + mu z_i) - L_i(theta - mu z_i)) / (2 mu)] z_i, z_i ~ N(0, I) (mu = ``zo_eps``);
perturbation direction per shared tensor k: (1 - beta) g0_k + beta |g0_k| g^_ik / |g^_ik| (layer-wise: the ZO
estimate is rescaled to the global gradient's layer norm), e_i = rho dir_i / |dir_i| (global norm); then the
per-task gradients at theta + e_i (the task-specific parameters perturbed by rho g0_ts / |g0_ts|) are combined by
the ``base`` aggregator; task-specific parameters get their perturbed gradients combined with the base's loss
weights (a Gramian base; else their mean). Randomised (z).

Reference followed: official OptMN-Lab/SAMO ``experiments/quantum_chemistry/trainer_samo.py`` +
``utils.py::GradEstimator`` (layer-wise rescaling, one z per task, the + and - evaluations with the same noise).
Defaults rho = 0.003, beta = 0.1, zo_eps = 0.01 (its argparse defaults; NYUv2 run.sh uses rho 0.001, beta 0.5).
Implementation: the 2T perturbed forwards are two vmapped forwards (task t at its own point), the T perturbed
gradients one vmapped Jacobian. Departures: (a) the task-specific perturbation is rho g0_ts / |g0_ts| with g0 the
mean-loss gradient (we do not know which slice of a task-specific tensor belongs to which task; the reference
perturbs each head by its own gradient -- and, in the QM9 code, without the rho scaling); (b) ``layerwise=False``
gives the NYUv2 code's global-norm variant; (c) ``base`` defaults to ``mtsac`` (mean of the perturbed gradients);
the paper pairs SAMO with FairGrad/Nash-MTL etc. -- any Jacobian method name works. A random ``loss_fn`` (actor)
gets the same random draws at theta + mu z and theta - mu z.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
from torch import Tensor

from . import engine
from ._compose import build_base
from .base import LossFn, Method, check_bool, check_float, task_losses
from .registry import register


def _same_noise(device: torch.device, fn1, fn2):
    """Run fn1 and fn2 from the same global RNG state (the + / - ZO evaluations see the same random draws)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    a = fn1()
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    return a, fn2()


@register("samo")
class SAMO(Method):
    name = "samo"
    kind = "perturbation"
    OPTIONS = {"rho": 3e-3, "beta": 0.1, "zo_eps": 1e-2, "layerwise": True, "base": "mtsac", "base_kwargs": {}}

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "rho", o["rho"], 0.0)
        check_float(self.name, "beta", o["beta"], 0.0, 1.0)
        check_float(self.name, "zo_eps", o["zo_eps"], 0.0, lo_open=True)
        check_bool(self.name, "layerwise", o["layerwise"])
        self.base = build_base(self.name, o["base"], o["base_kwargs"], self.num_tasks, jacobian_only=True)

    def reset(self) -> None:
        self.base.reset()

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        o = self.options
        shared, ts = engine.split_parameters(params, task_specific)
        t = int(task_ids.shape[0])
        self._check_num_tasks(t)
        # 1. the global gradient g0 of the mean loss
        losses = task_losses(loss_fn, params, batch, task_ids)
        tensors = [params[n] for n in shared + ts]
        g0_list = torch.autograd.grad(losses.mean(), tensors, allow_unused=True)
        g0 = {n: (torch.zeros_like(p) if g is None else g.detach()) for n, p, g in zip(shared + ts, tensors, g0_list)}
        # 2. zeroth-order local gradients, forward passes only (2 vmapped forwards); T x P buffers reused in place
        theta = engine.flatten({n: params[n].detach() for n in shared}, shared)
        z = torch.randn(t, theta.numel(), dtype=theta.dtype, device=theta.device)
        mu = float(o["zo_eps"])
        point = torch.add(theta, z, alpha=mu)
        l_plus, l_minus = _same_noise(
            theta.device,
            lambda: engine.losses_at(loss_fn, params, batch, task_ids, engine.unflatten(point, params, shared)),
            lambda: engine.losses_at(loss_fn, params, batch, task_ids,
                                     engine.unflatten(point.sub_(z, alpha=2 * mu), params, shared)))
        zo = z.mul_(((l_plus - l_minus) / (2 * mu)).to(theta.dtype)[:, None])  # (T, P), in place of z
        # 3. perturbation directions, built in place in zo
        beta, rho = float(o["beta"]), float(o["rho"])
        g0_flat = engine.flatten(g0, shared)
        if o["layerwise"]:
            i = 0
            for n in shared:
                k = params[n].numel()
                zk = zo[:, i:i + k]
                zk.mul_(beta * g0_flat[i:i + k].norm() / (zk.norm(dim=1, keepdim=True) + 1e-12))
                i += k
        else:
            zo.mul_(beta * g0_flat.norm() / (zo.norm(dim=1, keepdim=True) + 1e-12))
        direction = zo.add_(g0_flat, alpha=1 - beta)
        direction.mul_(rho / (direction.norm(dim=1, keepdim=True) + 1e-12))
        per_task = engine.unflatten(direction.add_(theta), params, shared)  # theta + e_i
        at = dict(params)
        if ts:  # one perturbation for every task (not vmapped)
            g_ts = engine.flatten(g0, ts)
            e_ts = rho * g_ts / (g_ts.norm() + 1e-12)
            ts_point = engine.flatten({n: params[n].detach() for n in ts}, ts) + e_ts
            at.update({n: v.requires_grad_(True) for n, v in engine.unflatten(ts_point, params, ts).items()})
        # 4. the perturbed per-task gradients, combined by the base
        sam = engine.compute_jacobian(loss_fn, at, batch, task_ids, task_specific=task_specific,
                                      per_task_params=per_task, **self.base._engine_kwargs())
        vec, info = self.base.aggregate(sam.jacobian, sam.gramian)
        engine.write_back(params, shared, vec)
        engine.write_task_specific(params, sam.task_specific_combined(self.base.combined_loss_weights(info)))
        return {"losses": losses.detach(), "gramian": sam.gramian, "sam_losses": sam.losses, **info}

    def state_dict(self) -> Dict[str, Any]:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.base.load_state_dict(state.get("base", {}))
