"""``famo``: Fast Adaptive Multitask Optimization — Liu et al., "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023.

Update rule: logits xi, z = softmax(xi); D_i = L_i - L_i^min + eps; c = (sum_i z_i / D_i)^-1; back-propagate
c sum_i z_i log D_i, i.e. d = sum_i (c z_i / D_i) grad L_i -- effective weights that sum to 1 (mean-like scale;
reported as "weights"). One backward, no Jacobian. After the optimiser step the losses of the SAME batch are
recomputed without grad, delta_i = log D_i(before) - log D_i(after), xi.grad = (dz/dxi)^T delta, Adam step on xi
(lr ``w_lr``, weight decay ``gamma``): tasks whose loss fell fast lose weight.

Reference followed: official Cranial-XIX/FAMO ``famo.py`` (divides by c; the repo's ``mtrl_files/famo.py``
multiplies by c, a different scale) with the MT10 run.sh values w_lr = 0.025, gamma = 0.01 (famo.py default 0.01;
NYUv2/QM9 use 0.001; FAMO issue #12 reports MT10 critic-loss blow-ups with these values). The reference applies FAMO
to the critic only. Needs L_i > ``min_losses`` (0 by default: fine for the SAC critic's MSE, not for the actor loss).
That check would be a host read on every update, so it is deferred: a violation sets a device flag (``health()``,
a 0-d bool tensor) and the gap is floored at ``eps`` for that update (finite weights, the offending task gets most
of them); ``check()`` -- to be called at the trainer's periodic checks -- reads the flag (a host sync) and raises the
ValueError (naming the offending losses) once it is set. The logits and their Adam state live on the losses' device.
The post-step update: call ``method.post_step()`` right after ``optimizer.step()``; if it is not called, the update
runs at the start of the next ``backward`` (same parameters, so the same result unless something else -- e.g. a
target network inside ``loss_fn`` -- moved in between). The batch of the pending update is copied (replay buffers may
reuse their sample tensors) and is not checkpointed (one logit update is lost at a resume).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import engine
from ._optim import load_adam_state, new_adam
from .base import LossFn, Method, bad_option, check_float, task_losses
from .registry import register


@register("famo")
class FAMO(Method):
    name = "famo"
    kind = "loss"
    OPTIONS = {"w_lr": 0.025, "gamma": 0.01, "min_losses": 0.0, "eps": 1e-8}

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "w_lr", o["w_lr"], 0.0, lo_open=True)
        check_float(self.name, "gamma", o["gamma"], 0.0)
        check_float(self.name, "eps", o["eps"], 0.0)
        ml = o["min_losses"]
        vals = ml if isinstance(ml, (list, tuple)) else [ml]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) or (
                isinstance(ml, (list, tuple)) and len(ml) != self.num_tasks):
            raise bad_option(self.name, "min_losses", ml, f"a number or a list of {self.num_tasks} numbers")
        self._min = torch.tensor([float(v) for v in vals] * (1 if isinstance(ml, (list, tuple)) else self.num_tasks),
                                 dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        self.logits = torch.zeros(self.num_tasks, requires_grad=True)
        self._opt = new_adam(self.logits, float(self.options["w_lr"]), float(self.options["gamma"]))
        self._pending: Optional[tuple] = None
        self._bad: Optional[Tensor] = None        # device flag: some gap was <= 0 since the last check()
        self._bad_losses: Optional[Tensor] = None  # the losses of the latest violation (for the message)

    def _gap(self, losses: Tensor) -> Tensor:
        """L - L_min + eps, floored at eps where it is <= 0 (recorded in the device flag; no host read)."""
        if self._min.device != losses.device:  # moved once, not copied from the host every update
            self._min = self._min.to(losses.device)
        d = losses - self._min.to(losses.dtype) + float(self.options["eps"])
        bad = (d.detach() <= 0).any()
        self._bad = bad if self._bad is None else self._bad | bad.to(self._bad.device)
        self._bad_losses = torch.where(bad, losses.detach(), self._bad_losses.to(losses)) \
            if self._bad_losses is not None and self._bad_losses.shape == losses.shape else losses.detach()
        floor = max(float(self.options["eps"]), 1e-12)
        return torch.where(d > 0, d, torch.full_like(d, floor))

    def health(self) -> Optional[Tensor]:
        return self._bad

    def check(self) -> None:
        bad, losses = self._bad, self._bad_losses
        self._bad, self._bad_losses = None, None
        if bad is not None and bool(bad):
            raise ValueError(f"method 'famo' needs losses > min_losses, got losses {losses.tolist()}; "
                             "set min_losses (a lower bound per task) or apply FAMO to a positive loss (the critic)")

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        del task_specific
        self.post_step()  # a pending logit update whose post_step() was not called
        losses = task_losses(loss_fn, params, batch, task_ids)
        self._check_num_tasks(losses.shape[0])
        if self.logits.device != losses.device:
            self._move(losses.device)
        d = self._gap(losses)
        z = torch.softmax(self.logits.detach(), dim=0).to(losses)
        c = (z / d.detach()).sum()
        (z * torch.log(d) / c).sum().backward()
        keep = pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, batch)
        self._pending = (loss_fn, params, keep, task_ids.detach().clone(), losses.detach())
        w = z / (c * d.detach())
        return {"losses": losses.detach(), "weights": w.to(torch.float32)}

    def post_step(self) -> None:
        if self._pending is None:
            return
        loss_fn, params, batch, task_ids, before = self._pending
        self._pending = None
        after = engine.losses_at(loss_fn, params, batch, task_ids, {})
        self.update(before, after)

    def update(self, before: Tensor, after: Tensor) -> None:
        """One logit step from the losses of the same batch before and after the optimiser step."""
        if self.logits.device != before.device:
            self._move(before.device)
        delta = (torch.log(self._gap(before.detach().double())) -
                 torch.log(self._gap(after.detach().double()))).to(torch.float32)
        logits = self.logits
        with torch.enable_grad():
            g, = torch.autograd.grad(torch.softmax(logits, dim=0), logits, grad_outputs=delta.to(logits))
        self._opt.zero_grad(set_to_none=True)
        logits.grad = g
        self._opt.step()

    def _move(self, device: torch.device) -> None:
        state = self._opt.state_dict()
        self.logits = self.logits.detach().to(device).requires_grad_(True)
        self._opt = new_adam(self.logits, float(self.options["w_lr"]), float(self.options["gamma"]))
        load_adam_state(self._opt, self.logits, state)

    @property
    def task_weights(self) -> Tensor:
        return torch.softmax(self.logits.detach(), dim=0)

    def state_dict(self) -> Dict[str, Any]:
        return {"logits": self.logits.detach().cpu().clone(), "optimizer": self._opt.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.logits = state["logits"].detach().clone().to(torch.float32).requires_grad_(True)
        self._opt = new_adam(self.logits, float(self.options["w_lr"]), float(self.options["gamma"]))
        load_adam_state(self._opt, self.logits, state["optimizer"])
        self._pending = None
