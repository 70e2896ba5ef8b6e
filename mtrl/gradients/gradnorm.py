"""``gradnorm``: GradNorm — Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018.

Update rule: loss = sum_i w_i L_i (SUM; weights init 1, renormalised to sum T). With W the last shared layer,
G_i = |grad_W (w_i L_i)| = w_i |grad_W L_i|, mean G_bar, relative inverse training rate r_i = (L_i / L_i(0)) /
mean_j (L_j / L_j(0)); the weights descend L_grad = sum_i |G_i - G_bar r_i^alpha| (target detached); then
w <- T w / sum(w). No full Jacobian: the per-task gradients of W alone come from one batched backward over the T
losses restricted to W (``torch.autograd.grad(..., is_grads_batched=True)``), then one backward of the weighted loss.

Reference followed: the paper's Algorithm 1 (L(0) = the losses of the first update; renormalisation) with LibMTL's
alpha = 1.5 default. ``layer``: the parameter name(s) of W. Default: the last shared parameter with >= 2 dims
together with its namesakes in the sibling top-level modules -- for the SAC twin critic ``q2.<path>`` AND
``q1.<path>`` (the two Q networks share no layer, so the last shared weight alone would be Q2's and GradNorm would
ignore Q1's gradients), for the actor its one output layer; G_i is then the norm over all of them. Departures: the weights have their own Adam (``lr`` default 3e-4, the
MT-SAC learning rate; the paper/LibMTL train them with the model's optimiser), and are clamped at 1e-6 before the
renormalisation so none becomes negative.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

import torch
from torch import Tensor

from . import engine
from ._optim import load_adam_state, new_adam
from .base import LossFn, Method, bad_option, check_float, task_losses
from .registry import register


@register("gradnorm")
class GradNorm(Method):
    name = "gradnorm"
    kind = "loss"
    OPTIONS = {"alpha": 1.5, "lr": 3e-4, "layer": None}

    def _check_options(self) -> None:
        check_float(self.name, "alpha", self.options["alpha"], 0.0)
        check_float(self.name, "lr", self.options["lr"], 0.0, lo_open=True)
        layer = self.options["layer"]
        if layer is not None and not (isinstance(layer, str) or (
                isinstance(layer, (list, tuple)) and layer and all(isinstance(x, str) for x in layer))):
            raise bad_option(self.name, "layer", layer, "a parameter name, a list of names, or null")
        self.reset()

    def reset(self) -> None:
        self.task_weights = torch.ones(self.num_tasks, requires_grad=True)
        self._opt = new_adam(self.task_weights, float(self.options["lr"]))
        self._initial: Optional[Tensor] = None

    def _layer(self, params: Dict[str, Tensor], shared: List[str]) -> List[str]:
        layer = self.options["layer"]
        if layer is None:
            cands = [n for n in shared if params[n].dim() >= 2]
            if not cands:
                raise ValueError("method 'gradnorm': no shared parameter with >= 2 dims; set option layer=<name>")
            last = cands[-1]
            if "." not in last:
                return [last]
            path = last.split(".", 1)[1]
            return [n for n in cands if "." in n and n.split(".", 1)[1] == path]
        names = [layer] if isinstance(layer, str) else list(layer)
        bad = [n for n in names if n not in shared]
        if bad:
            raise ValueError(f"method 'gradnorm': layer {bad} is not a shared trainable parameter; valid: "
                             f"{', '.join(shared[:12])}")
        return names

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        shared, _ = engine.split_parameters(params, task_specific)
        layer = [params[n] for n in self._layer(params, shared)]
        losses = task_losses(loss_fn, params, batch, task_ids)
        t = losses.shape[0]
        self._check_num_tasks(t)
        eye = torch.eye(t, dtype=losses.dtype, device=losses.device)
        per_task = torch.autograd.grad(losses, layer, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                       allow_unused=True)
        sq = torch.zeros(t, dtype=torch.float64, device=losses.device)
        for g in per_task:
            if g is not None:
                sq = sq + g.reshape(t, -1).double().pow(2).sum(dim=1)
        gnorm = sq.sqrt().cpu()
        w = self.task_weights.detach().double()
        det = losses.detach().double().cpu()
        if self._initial is None:
            self._initial = torch.where(det.abs() > 1e-12, det, torch.full_like(det, 1e-12))
        ratio = det / self._initial
        r = ratio / ratio.mean()
        g_w = w * gnorm
        target = g_w.mean() * r ** float(self.options["alpha"])
        grad_w = torch.sign(g_w - target) * gnorm  # d/dw_i sum_j |w_j n_j - target_j|
        (w.to(losses) * losses).sum().backward()
        self._opt.zero_grad(set_to_none=True)
        self.task_weights.grad = grad_w.to(self.task_weights)
        self._opt.step()
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-6)
            self.task_weights.mul_(t / self.task_weights.sum())
        return {"losses": losses.detach(), "weights": w.to(torch.float32), "grad_norms": gnorm.to(torch.float32)}

    def state_dict(self) -> Dict[str, Any]:
        return {"weights": self.task_weights.detach().clone(), "optimizer": self._opt.state_dict(),
                "initial": None if self._initial is None else self._initial.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.task_weights = state["weights"].detach().clone().to(torch.float32).requires_grad_(True)
        self._opt = new_adam(self.task_weights, float(self.options["lr"]))
        load_adam_state(self._opt, self.task_weights, state["optimizer"])
        i = state.get("initial")
        self._initial = None if i is None else i.to(torch.float64).clone()
