"""``paco``: Parameter-Compositional multi-task networks (Sun, Zhang, Xu, Tomizuka, Zhan, NeurIPS 2022; code
TToTMooN/paco-mtrl @ b63387f and ALF ``layers.py::CompositionalFC``).

* Every FC layer holds K = ``num_param_sets`` parameter sets W ∈ R^{K×in×out}, b ∈ R^{K×out} (default 5 for T ≤ 10,
  20 above: MT10 / MT50), **initialised identically** (``kernel_identical_init``).
* Task vector w_t ∈ R^K from a linear task encoder on one_hot(t) (no bias, no activation): row t of ``task_w``.
  Initialised as a random convex combination (uniform, normalised to sum 1), so θ_t = Φ w_t starts at the
  common initial layer for every task (the reference's raw linear init can make Σ_k w_t,k ≈ 0 and scale the
  network's output down; documented deviation).
* Layer output y = Σ_k w_t,k (W_k x + b_k), i.e. θ_t = Φ w_t; ReLU between the hidden layers (width × depth,
  default 400 × 3) and a compositional output layer (the mean / log-std or Q head).
* Stability trick (``reset_extreme``, on by default): in ``after_step``, a task whose loss exceeds
  ``extreme_loss`` (3e3) gets its w_t reset to a random convex combination of the other tasks' vectors
  ("interpolate"). Zeroing that task's loss for the step is the method's job and is not done here. The reset is
  computed on the device without reading the losses on the host: a (T, T) uniform draw at every update (so the
  global RNG advances each update), applied with ``where`` to the extreme rows; the source rows are read before
  any reset (the same as a sequential loop unless every task is extreme at once). ``resets`` is a device counter.
* Mixed (B,) task ids off the host CPU (targets on CUDA): every row mixes the K sets' outputs with its own w_t
  (one product over K·in, :func:`mixed_linear`: K times the FLOPs, no synchronisation).
* Deviation: the reference shares one task encoder between actor and critic; here each backbone has its own.
Task-specific parameters: ``task_w``. MT10 actor (39 -> 8, 400 × 3, K = 5): 1,700,090 parameters.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (Backbone, check_bool, check_float, check_int, grouped_by_task, mixed_linear, parse_options,
                      take)
from .registry import register


@register("paco")
class PaCo(Backbone):
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3, num_param_sets=None, reset_extreme=True,
                                    extreme_loss=3e3, seed=0)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("paco", options, self.DEFAULTS)
        width, depth = check_int("paco", "width", o["width"]), check_int("paco", "depth", o["depth"])
        K = check_int("paco", "num_param_sets", o["num_param_sets"] if o["num_param_sets"] is not None else
                      (5 if num_tasks <= 10 else 20))
        self.reset_extreme = check_bool("paco", "reset_extreme", o["reset_extreme"])
        self.extreme_loss = check_float("paco", "extreme_loss", o["extreme_loss"])
        self.K = K
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        dims = [in_dim] + [width] * depth + [out_dim]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)
            w0 = torch.empty(1, d_in, d_out).uniform_(-bound, bound)
            b0 = torch.empty(1, d_out).uniform_(-bound, bound)
            self.w.append(nn.Parameter(w0.repeat(K, 1, 1)))  # identical init of the K sets
            self.b.append(nn.Parameter(b0.repeat(K, 1)))
        g = torch.Generator().manual_seed(int(o["seed"]))
        tw = torch.rand(num_tasks, K, generator=g)
        self.task_w = nn.Parameter(tw / tw.sum(1, keepdim=True))
        self.register_buffer("resets", torch.zeros((), dtype=torch.long), persistent=False)  # device counter

    def _forward_tasks(self, x: Tensor, t: Tensor) -> Tensor:
        """One task's network (0-d ``t``: θ_t = Φ w_t composed first), or each row's own task's ((B,) ``t``)."""
        wt = take(self.task_w, t)  # (K,) or (B, K)
        h = x
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            h = (h @ torch.einsum("k,kio->io", wt, w) if wt.dim() == 1 else mixed_linear(h, wt, w)) + wt @ b
            if i < len(self.w) - 1:
                h = F.relu(h)
        return h

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        out = grouped_by_task(x, task_id, self.out_dim, self._forward_tasks, self._forward_tasks)
        return (out, out.new_zeros(())) if return_aux else out

    def task_specific_parameters(self) -> Set[str]:
        return {"task_w"}

    def output_parameters(self) -> Set[str]:
        """The compositional output layer (mtrl/nets/init.py gives it the small output init)."""
        return {f"w.{len(self.w) - 1}", f"b.{len(self.b) - 1}"}

    @torch.no_grad()
    def after_step(self, ctx: Dict[str, Any]) -> bool:
        super().after_step(ctx)
        losses = (ctx.get("info") or {}).get("losses")
        if not self.reset_extreme or losses is None or self.num_tasks < 2:
            return False
        tw = self.task_w
        T = self.num_tasks
        losses = torch.as_tensor(losses).detach().float().to(tw.device)
        bad = (losses > self.extreme_loss) | ~torch.isfinite(losses)  # (T,)
        good = ~bad
        # Sources of task t: the tasks that are not extreme or, when all are, every other task.
        others = ~torch.eye(T, dtype=torch.bool, device=tw.device)
        src = torch.where(good.any(), good.unsqueeze(0).expand(T, T), others)
        c = torch.rand(T, T, device=tw.device) * src
        c = (c / c.sum(1, keepdim=True)).to(tw)
        tw.copy_(torch.where(bad.unsqueeze(1), c @ tw, tw))
        self.resets += bad.sum()
        return False

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        tw = self.task_w.detach()
        n = tw / tw.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return {"task_vectors": tw,                  # (T, K) compositional weights
                "task_vector_cosine": n @ n.T,      # (T, T)
                "task_vector_resets": self.resets}
