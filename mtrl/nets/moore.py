"""``moore``: Mixture Of ORthogonal Experts (Hendawy, Peters, D'Eramo, ICLR 2024, arXiv 2311.11385; code
AhmedMagdyHendawy/MOORE @ a7550c5, ``networks_sac.py``, ``mixture_layers.py``).

* k = ``n_experts`` experts (default 4 for T ≤ 10 tasks, 6 above: MT10 / MT50), each an MLP on the state only:
  in -> width -> … -> width (``depth`` Linear layers, ReLU between them, **no activation after the last**),
  PyTorch's default Linear init (what the reference effectively gets).
* Gram–Schmidt per sample over the k expert vectors, in a fixed order: u₁ = h₁/‖h₁‖,
  u_i = normalise(h_i − Σ_{j<i} (h_i·u_j) u_j); ‖·‖ gets ``eps`` (1e-8, as the JAX re-implementation) added.
* Task weights w_t = Linear(one_hot(t) -> k, no bias, Xavier): a free, unconstrained per-task vector.
* f = tanh(w_tᵀ U) ∈ R^width; one output head per task, Linear(width -> out) (``head_w``, ``head_b``).
* No auxiliary loss: orthogonality is enforced by construction.
Task-specific parameters: ``task_w`` (row t is task t's weights) and the heads.
MT10 actor (in 39, out 8, width 400, depth 3, k = 4): 1,379,320 parameters, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Backbone, check_float, check_int, parse_options, take, task_one_hot
from .registry import register


def gram_schmidt(h: Tensor, eps: float = 1e-8) -> Tensor:
    """(k, B, D) -> (k, B, D) with orthonormal rows per sample (classical GS in a fixed order)."""
    basis: List[Tensor] = []
    for i in range(h.shape[0]):
        v = h[i]
        for u in basis:
            v = v - (v * u).sum(-1, keepdim=True) * u
        basis.append(v / (v.norm(dim=-1, keepdim=True) + eps))
    return torch.stack(basis)


@register("moore")
class MOORE(Backbone):
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3, n_experts=None, eps=1e-8)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("moore", options, self.DEFAULTS)
        width, depth = check_int("moore", "width", o["width"]), check_int("moore", "depth", o["depth"])
        k = check_int("moore", "n_experts", o["n_experts"] if o["n_experts"] is not None else
                      (4 if num_tasks <= 10 else 6))
        if k > width:
            raise ValueError(f"backbone 'moore': n_experts={k} orthonormal vectors do not fit in width={width}")
        self.eps = check_float("moore", "eps", o["eps"])
        self.k, self.width = k, width
        # Expert bank: layer l holds (k, d_in, width) weights; default nn.Linear init per expert.
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        d = in_dim
        for _ in range(depth):
            bound = 1.0 / math.sqrt(d)
            self.w.append(nn.Parameter(torch.empty(k, d, width).uniform_(-bound, bound)))
            self.b.append(nn.Parameter(torch.empty(k, 1, width).uniform_(-bound, bound)))
            d = width
        self.task_w = nn.Parameter(torch.empty(num_tasks, k))  # = Linear(T -> k, no bias).weight.T
        nn.init.xavier_uniform_(self.task_w)
        bound = math.sqrt(6.0 / (width + out_dim))  # Xavier, as the reference's heads
        self.head_w = nn.Parameter(torch.empty(num_tasks, width, out_dim).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.zeros(num_tasks, out_dim))

    def experts(self, x: Tensor) -> Tensor:
        h = torch.einsum("bi,kio->kbo", x, self.w[0]) + self.b[0]
        for i in range(1, len(self.w)):  # (no ParameterList slicing: it re-wraps functional_call's tensors)
            h = torch.matmul(F.relu(h), self.w[i]) + self.b[i]
        return h  # (k, B, width), no final activation

    def basis(self, x: Tensor) -> Tensor:
        return gram_schmidt(self.experts(x), self.eps)

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        u = self.basis(x)
        wt = task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype) @ self.task_w  # (B, k)
        f = torch.tanh(torch.einsum("bk,kbd->bd", wt, u))
        hw, hb = take(self.head_w, task_id), take(self.head_b, task_id)
        out = f @ hw + hb if hw.dim() == 2 else torch.einsum("bd,bdo->bo", f, hw) + hb
        return (out, out.new_zeros(())) if return_aux else out

    def task_specific_parameters(self) -> Set[str]:
        return {"task_w", "head_w", "head_b"}

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        u = self.basis(x).transpose(0, 1)  # (B, k, D)
        gram = u @ u.transpose(1, 2)
        eye = torch.eye(self.k, dtype=u.dtype, device=u.device)
        return {"gram_max_error": (gram - eye).abs().max(),          # max |U Uᵀ − I| over the batch
                "task_weights": self.task_w.detach(),                 # (T, k)
                "task_weight_norm": self.task_w.detach().norm(dim=1),  # (T,)
                "expert_output_norm": self.experts(x).norm(dim=-1).mean(1)}  # (k,) before orthogonalisation
