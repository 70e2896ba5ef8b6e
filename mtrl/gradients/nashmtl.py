"""``nashmtl``: Nash-MTL — Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.

Update rule (Alg. 1): find alpha > 0 with G alpha = 1 / alpha on the RAW Gramian G = J J^T (the Nash bargaining
solution; then |J^T alpha|^2 = alpha^T G alpha = T); d = J^T alpha (the paper's own scale: |d| = sqrt(T) before
the clip, whatever the gradients' size); then, as the official code's
``clip_grad_norm_(shared, max_norm=1.0)``, scale d down to norm ``max_norm`` (0 disables). With
``update_weights_every = k`` the weights are recomputed every k updates and reused in between; in between no
Jacobian is formed: one backward of sum_i alpha_i L_i, as the official code (this is where Nash-MTL-50/-100 get their
speed: paper Table 5, MT10).

Reference followed: official AvivNavon/nash-mtl ``methods/weight_methods.py::NashMTL`` (warm start from the
previous alpha, clipping, update_weights_every; its cvxpy problem divides G by |G|_F but multiplies the factor back
in the constraint -log(alpha_i |G|_F) - log((G/|G|_F) alpha)_i <= 0, i.e. alpha_i (G alpha)_i >= 1 on the raw G)
and torchjd's port (which rescales alpha so that |J^T alpha| <= max_norm: identical to clipping the shared
gradient). Task-specific parameters get grad sum_i alpha_i L_i with the UNclipped alpha, as the official code
(it back-propagates the weighted loss into everything, then clips the shared parameters only), on computed and
on reuse steps alike. Departure: how the equation is solved. The
reference runs <= 20 convex-concave (CCP) steps, each a cvxpy/ECOS problem (50-100 ms on a CPU); we solve it to
convergence with Newton's method on the strictly convex f(b) = 1/2 b^T C b - sum log b in cosine coordinates
(gradient C b - 1/b = 0 exactly at the solution; ``solvers.nash_weights``), < 1 ms for T = 50, no cvxpy. A 1e-8
ridge keeps it bounded when the gradients are Pareto-stationary (where no solution exists). Non-conflicting.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

import numpy as np
import torch
from torch import Tensor

from . import engine, solvers
from .base import GramianMethod, LossFn, check_float, check_int, task_losses
from .registry import register


@register("nashmtl")
class NashMTL(GramianMethod):
    name = "nashmtl"
    host_solver = True  # exact float64 solver (numpy, data-dependent active sets): one T x T host copy
    OPTIONS = {"update_weights_every": 1, "max_norm": 1.0}

    def _check_options(self) -> None:
        check_int(self.name, "update_weights_every", self.options["update_weights_every"], 1)
        check_float(self.name, "max_norm", self.options["max_norm"], 0.0)
        self.reset()

    def reset(self) -> None:
        self._alpha: Optional[np.ndarray] = None
        self._step = 0

    def _due(self) -> bool:
        return self._alpha is None or self._step % self.options["update_weights_every"] == 0

    def weights(self, gramian: Tensor) -> Tensor:
        if self._due():
            alpha, _ = solvers.nash_weights(gramian, init=self._alpha)
            self._alpha = alpha
        self._step += 1
        w = self._alpha.copy()
        max_norm = float(self.options["max_norm"])
        if max_norm > 0:
            norm = float(np.sqrt(max(float(w @ gramian.numpy() @ w), 0.0)))
            if norm > max_norm:
                w = w * (max_norm / norm)
        return torch.from_numpy(w)

    def task_specific_weights(self, weights: Tensor) -> Tensor:
        return torch.from_numpy(self._alpha.copy()).to(weights.device)

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        if self._due():
            return super().backward(loss_fn, params, batch, task_ids, task_specific=task_specific)
        # Reuse the previous weights: one weighted backward, no Jacobian.
        shared, ts = engine.split_parameters(params, task_specific)
        losses = task_losses(loss_fn, params, batch, task_ids)
        self._check_num_tasks(losses.shape[0])
        alpha = torch.from_numpy(self._alpha).to(losses)
        tensors = [params[n] for n in shared + ts]
        all_grads = torch.autograd.grad((alpha * losses).sum(), tensors, allow_unused=True)
        all_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, all_grads)]
        grads, ts_grads = all_grads[:len(shared)], all_grads[len(shared):]
        max_norm = float(self.options["max_norm"])
        if max_norm > 0:  # clip on the device: scale = min(1, max_norm / |g|), no host read of the norm
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
            scale = (max_norm / norm.clamp(min=max_norm)).to(grads[0].dtype) if grads else None
            grads = [g * scale for g in grads]
        engine.write_task_specific(params, dict(zip(shared + ts, grads + ts_grads)), fresh=True)
        self._step += 1
        return {"losses": losses.detach(), "weights": alpha.detach().to(torch.float32)}

    def state_dict(self) -> Dict[str, Any]:
        return {"alpha": None if self._alpha is None else torch.from_numpy(self._alpha.copy()), "step": self._step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        a = state.get("alpha")
        self._alpha = None if a is None else a.detach().to("cpu", torch.float64).numpy().copy()
        self._step = int(state.get("step", 0))
