"""``mmoe``: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning
with Multi-gate Mixture-of-Experts"), with the expert exclusivity of MMoEEx (Aoki et al., 2021, "Heterogeneous
Multi-task Learning with Expert Diversity", arXiv 2106.10595). Settings compared with LibMTL's ``MMoE``
(median-research-group/LibMTL, ``LibMTL/architecture/MMoE.py``: shared experts, one softmax gate per task on the
input); no code copied.

Network, for task t::

    E_i(x) = ReLU MLP, ``depth`` Linear layers in -> h_i -> … -> width  (``num_experts`` experts, shared)
    g_t(x) = softmax(x W_t + b_t)  over the experts allowed for t        (one gate per task, task-specific)
    out    = tower_t(Σ_i g_t,i(x) E_i(x)),  tower_t = Linear(width -> out) (one per task, task-specific)

The task enters only through which gate and which tower are used (as in MMoE; no one-hot on the input). Defaults
(ours, MMoE has no RL setting): 6 experts of 2 × 400, ~1.1M parameters for the MT10 actor (see bench_backbones).

MMoEEx options:

* ``exclusivity`` (α ∈ [0, 1], default 0 = plain MMoE): round(α·E) experts are *exclusive*, each reserved for one
  task, assigned at random (``seed``) in a balanced way; every other task's gate gives it exactly zero weight (its
  logit is replaced by −∞ before the softmax, so neither the weight nor its gradient exists for those tasks, and the
  expert's parameters get exactly zero gradient from their losses). A task must keep at least one expert.
* Heterogeneous experts: ``expert_hidden`` may be a list with one hidden width per expert (experts of one width
  run as one batched stack). MMoEEx mixes expert *types* (e.g. recurrent and dense); for state-vector policies the
  experts here differ in width only.
* Not done: MMoEEx's MAML-style two-step optimisation (that is an optimiser, not a network; the suite's methods
  play that role), and its "exclusion" variant (an expert removed from one task only).

No auxiliary loss; ``return_aux=True`` gives ``(out, 0)``. Task-specific parameters: the gates and the towers.
Diagnostics: ``gate_weights`` (T, E) mean gate weight per task, ``expert_load`` (E,) mean weight over the batch,
``gate_entropy`` (T,), ``excluded`` (T, E) the exclusivity mask (1 = excluded).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (Backbone, check_float, check_int, entropy, linear_init, mixed_linear, parse_options, take,
                      task_one_hot)
from .moe import mix
from .registry import register


# -- pieces shared by the multi-gate backbones (mmoe, dselect, home) --------------------------------------------
def per_task_linear(x: Tensor, w: Tensor, b: Tensor, task_id: Tensor) -> Tensor:
    """x @ w[t] + b[t] for banks w (T, in, out), b (T, out): task t's weights for a 0-d id; for (B,) ids each row
    its own task's, as one dense product (no gather of a (B, in, out) weight, no host read)."""
    if task_id.dim() == 0:
        return x @ take(w, task_id) + take(b, task_id)
    oh = task_one_hot(task_id, w.shape[0], x.shape[0], x.dtype)
    return mixed_linear(x, oh, w) + oh @ b


def masked_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the allowed entries only: the others get weight exactly 0 and no gradient."""
    return torch.softmax(torch.where(allowed, logits, -math.inf), dim=-1)


def per_task_rows(values: Tensor, task_id: Tensor, num_tasks: int) -> Tensor:
    """(T, n) mean of the rows of ``values`` (B, n) that belong to each task (NaN for a task without rows)."""
    oh = task_one_hot(task_id, num_tasks, task_id.shape[0], values.dtype)
    cnt = oh.sum(0).unsqueeze(-1)
    return (oh.T @ values) / cnt.clamp_min(1) + torch.where(cnt > 0, 0.0, math.nan)


def task_bank(num_tasks: int, d_in: int, d_out: int) -> Tuple[nn.Parameter, nn.Parameter]:
    """(T, in, out) weights and (T, out) biases with PyTorch's default Linear init per task."""
    w, b = nn.Parameter(torch.empty(num_tasks, d_in, d_out)), nn.Parameter(torch.empty(num_tasks, d_out))
    linear_init(w, b, d_in)
    return w, b


class ExpertStack(nn.Module):
    """E equally shaped ReLU MLP experts as batched weights: (B, in) -> (E, B, out), ReLU after every layer."""

    def __init__(self, num_experts: int, dims: Sequence[int]) -> None:
        super().__init__()
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w, b = nn.Parameter(torch.empty(num_experts, d_in, d_out)), nn.Parameter(torch.empty(num_experts, 1,
                                                                                                   d_out))
            linear_init(w, b, d_in)
            self.w.append(w)
            self.b.append(b)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(torch.einsum("bi,eio->ebo", x, self.w[0]) + self.b[0])
        for i in range(1, len(self.w)):  # (no ParameterList slicing: it re-wraps functional_call's tensors)
            h = F.relu(torch.matmul(h, self.w[i]) + self.b[i])
        return h


class Experts(nn.Module):
    """Experts with possibly different hidden widths (MMoEEx's heterogeneous experts): one :class:`ExpertStack` per
    distinct width, outputs (E, B, out) in expert order."""

    def __init__(self, in_dim: int, hidden: List[int], out_dim: int, depth: int) -> None:
        super().__init__()
        widths = sorted(set(hidden))
        self.stacks = nn.ModuleList()
        order: List[int] = []
        for h in widths:
            idx = [i for i, v in enumerate(hidden) if v == h]
            order += idx
            self.stacks.append(ExpertStack(len(idx), [in_dim] + [h] * (depth - 1) + [out_dim]))
        # position in the concatenated stacks of each expert
        self.register_buffer("_perm", torch.tensor([order.index(i) for i in range(len(hidden))]), persistent=False)
        self.single = len(widths) == 1

    def forward(self, x: Tensor) -> Tensor:
        if self.single:
            return self.stacks[0](x)
        return torch.cat([s(x) for s in self.stacks], 0).index_select(0, self._perm)


@register("mmoe")
class MMoE(Backbone):
    NAME = "mmoe"
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=2, num_experts=6, expert_hidden=None, exclusivity=0.0, seed=0)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        name = self.NAME
        o = parse_options(name, options, self.DEFAULTS)
        width, depth = check_int(name, "width", o["width"]), check_int(name, "depth", o["depth"])
        E = check_int(name, "num_experts", o["num_experts"])
        hidden = o["expert_hidden"] if o["expert_hidden"] is not None else width
        if isinstance(hidden, (list, tuple)):
            if len(hidden) != E:
                raise ValueError(f"backbone {name!r}: expert_hidden lists {len(hidden)} widths for num_experts={E}")
            hidden = [check_int(name, "expert_hidden", h) for h in hidden]
        else:
            hidden = [check_int(name, "expert_hidden", hidden)] * E
        self.opt = o
        self.num_experts, self.width = E, width
        self.experts = Experts(in_dim, hidden, width, depth)
        self.head_w, self.head_b = task_bank(num_tasks, width, out_dim)
        self._build_gate(o)

    # -- gate (dselect overrides these) ----------------------------------------------------------------------------
    def _build_gate(self, o: Dict[str, Any]) -> None:
        E, T = self.num_experts, self.num_tasks
        self.gate_w, self.gate_b = task_bank(T, self.in_dim, E)
        alpha = check_float(self.NAME, "exclusivity", o["exclusivity"], 0.0, 1.0)
        seed = check_int(self.NAME, "seed", o["seed"], 0)
        n_excl = int(round(alpha * E))
        allowed = torch.ones(T, E, dtype=torch.bool)
        if n_excl:
            g = torch.Generator().manual_seed(seed)
            experts = torch.randperm(E, generator=g)[:n_excl]
            owners = torch.randperm(T, generator=g).repeat(math.ceil(n_excl / T))[:n_excl]  # balanced over tasks
            allowed[:, experts] = False
            allowed[owners, experts] = True
            if not allowed.any(1).all():
                raise ValueError(f"backbone {self.NAME!r}: exclusivity={alpha} leaves a task without experts "
                                 f"({n_excl} of {E} experts exclusive, {T} tasks); lower it or add experts")
        self.register_buffer("allowed", allowed)  # (T, E): False = excluded for that task (MMoEEx)

    def gate(self, x: Tensor, task_id: Tensor) -> Tuple[Tensor, Tensor]:
        """(gate weights (B, E), auxiliary loss)."""
        logits = per_task_linear(x, self.gate_w, self.gate_b, task_id)
        return masked_softmax(logits, take(self.allowed, task_id)), x.new_zeros(())

    def task_specific_parameters(self) -> Set[str]:
        return {"gate_w", "gate_b", "head_w", "head_b"}

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        w, aux = self.gate(x, task_id)
        out = per_task_linear(mix(w, self.experts(x)), self.head_w, self.head_b, task_id)
        return (out, aux) if return_aux else out

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        w, _ = self.gate(x, task_id)
        return {"gate_weights": per_task_rows(w, task_id, self.num_tasks),  # (T, E)
                "expert_load": w.mean(0),                                     # (E,)
                "gate_entropy": self.per_task_mean(entropy(w), task_id),      # (T,)
                "excluded": (~self.allowed).float()}                          # (T, E)
