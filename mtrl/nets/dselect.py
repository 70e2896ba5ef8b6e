"""``dselect``: DSelect-k gates (Hazimeh et al., NeurIPS 2021, "DSelect-k: Differentiable Selection in the Mixture
of Experts with Applications to Multi-Task Learning", arXiv 2106.03760), in the paper's multi-task form: one static
gate per task over shared experts. Settings checked against LibMTL's port of the authors' TensorFlow layer
(median-research-group/LibMTL, ``LibMTL/architecture/DSelect_k.py``); no code copied.

Network: :class:`mtrl.nets.mmoe.MMoE` (shared ReLU experts, one tower per task) with the softmax gate replaced.
Gate of task t, with m = ⌈log2 E⌉ and k = ``top_k`` single-expert selectors::

    S(u) = 0 for u ≤ −γ/2,  1 for u ≥ γ/2,  −2/γ³ u³ + 3/(2γ) u + 1/2 in between      (smooth-step, γ = ``gamma``)
    r_i(z)_j = Π_l [S(z_il) if bit l of j is 1 else 1 − S(z_il)]      (selector i over experts j, z_i ∈ R^m)
    w_t = Σ_i softmax(α_t)_i · r_i(z_t)                                (α_t ∈ R^k)

Once every |z_il| ≥ γ/2 each selector is one-hot, so w_t has at most k non-zeros (exactly k when the selectors
pick distinct experts), and gradients through S vanish there: the selection is final, only α keeps learning.
Init as the reference: z ~ U(−γ/100, γ/100), α ~ U(−0.05, 0.05).

Auxiliary loss (``return_aux=True``, task t's slice holds task t's gate only):
``entropy_coef · Σ_i H(r_i(z_t))`` (minimised: pushes each selector to one expert) plus, when E is not a power of
two, ``Σ_i 1 / Σ_j r_i(z_t)_j`` (the reference's penalty on the probability mass of the 2^m − E codes that name no
expert; unweighted, as there). ``entropy_coef`` defaults to 0.1 (our choice: the authors' layer leaves the entropy
term off unless set, LibMTL hard-codes 1e-6).

Departures: the gates are static per task (the paper's multi-task form); the per-example variant (z, α computed
from the input) is not built. Task-specific parameters: ``z``, ``alpha`` and the towers.
Diagnostics: ``gate_weights`` (T, E), ``selected_experts`` (T, E) 1 where the weight is non-zero,
``num_selected`` (T,), ``converged_fraction`` (share of all z entries with |z| ≥ γ/2), ``selector_entropy`` (T,),
``expert_load`` (E,).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Set, Tuple

import torch
from torch import Tensor, nn

from ._common import check_float, check_int, entropy, take
from .mmoe import MMoE
from .registry import register


def smooth_step(u: Tensor, gamma: float) -> Tensor:
    poly = -2.0 / gamma ** 3 * u.pow(3) + 1.5 / gamma * u + 0.5
    return torch.where(u <= -gamma / 2, torch.zeros_like(u), torch.where(u >= gamma / 2, torch.ones_like(u), poly))


@register("dselect")
class DSelectK(MMoE):
    NAME = "dselect"
    has_aux_loss = True
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=2, num_experts=8, expert_hidden=None, top_k=2, gamma=1.0,
                                    entropy_coef=0.1)

    def _build_gate(self, o: Dict[str, Any]) -> None:
        E, T = self.num_experts, self.num_tasks
        k = check_int(self.NAME, "top_k", o["top_k"])
        if k > E:
            raise ValueError(f"backbone 'dselect': top_k={k} must be <= num_experts={E}")
        self.gamma = check_float(self.NAME, "gamma", o["gamma"], 1e-6)
        self.entropy_coef = check_float(self.NAME, "entropy_coef", o["entropy_coef"])
        self.top_k = k
        m = max(1, math.ceil(math.log2(E)))
        self.power_of_2 = E == 2 ** m
        self.z = nn.Parameter(torch.empty(T, k, m).uniform_(-self.gamma / 100, self.gamma / 100))
        self.alpha = nn.Parameter(torch.empty(T, k).uniform_(-0.05, 0.05))
        bits = torch.tensor([[(j >> (m - 1 - l)) & 1 for l in range(m)] for j in range(E)], dtype=torch.bool)
        self.register_buffer("codes", bits)  # (E, m): expert j's binary code, most significant bit first

    def selectors(self) -> Tensor:
        """(T, k, E) selector outputs r_i(z_t)."""
        s = smooth_step(self.z, self.gamma).unsqueeze(2)                 # (T, k, 1, m)
        return torch.where(self.codes, s, 1 - s).prod(-1)                # (T, k, E)

    def task_weights(self) -> Tuple[Tensor, Tensor]:
        """((T, E) expert weights of every task, (T, k, E) selector outputs)."""
        r = self.selectors()
        return torch.einsum("tk,tke->te", torch.softmax(self.alpha, -1), r), r

    def gate(self, x: Tensor, task_id: Tensor) -> Tuple[Tensor, Tensor]:
        w_all, r_all = self.task_weights()
        w = take(w_all, task_id).expand(x.shape[0], -1)
        r = take(r_all, task_id)                                          # (k, E) or (B, k, E)
        aux = self.entropy_coef * entropy(r).sum(-1)
        if not self.power_of_2:
            aux = aux + (1.0 / r.sum(-1).clamp_min(1e-12)).sum(-1)
        return w, aux.mean()

    def task_specific_parameters(self) -> Set[str]:
        return {"z", "alpha", "head_w", "head_b"}

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        w, r = self.task_weights()
        sel = (w > 0).float()
        return {"gate_weights": w, "selected_experts": sel, "num_selected": sel.sum(1),
                "converged_fraction": (self.z.abs() >= self.gamma / 2).float().mean(),
                "selector_entropy": entropy(r).sum(-1), "expert_load": w.mean(0)}
