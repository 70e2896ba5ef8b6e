"""``softmod``: Soft Modularization (Yang, Xu, Wu, Wang, NeurIPS 2020, arXiv 2003.13661), following the
reference code RchalYang/Soft-Module @ e6d7c8a ``ModularGatedCascadeCondNet`` (not the facebookresearch/mtrl
simplification).

1. out = base(x): MLP in -> width -> … -> width (``depth`` layers, default 2 × 400), no final activation;
   emb = em_base(one_hot(t)): Linear(T -> width) -> ReLU -> Linear(width -> width).
2. emb = emb ⊙ out (state-dependent routing); out ← ReLU(out).
3. e = Linear(gating_hidden)(ReLU(ReLU(emb) -> Linear(width -> gating_hidden))): ReLU(emb) -> Linear -> ReLU -> Linear.
4. p¹ = row-softmax(reshape(W₀ ReLU(e), n × n)); later routing matrices (cascade):
   cond = concat(previous flattened p) -> Linear(-> gating_hidden) ⊙ e -> ReLU -> Linear(-> n²) -> row-softmax.
5. Last-layer module weights: cond over all (L−1) routing matrices -> Linear ⊙ e -> ReLU -> Linear(-> n) -> softmax.
6. Modules: layer 0 module i = Linear(width -> module_width) on out; layer l+1 module j gets
   ReLU(Σ_i p^l[j, i] · out_i^l) -> Linear(module_width -> module_width); output = Linear(module_width -> out)
   of ReLU(Σ_j w_j · out_j^{L−1}).
Defaults: the MT10 "shallow" config ``modular_2_2_2_256`` (L = num_layers = 2, n = num_modules = 2,
module_width = 256, gating_hidden = 256); MT50 "deep" is L = 4, n = 4, module_width = 128
(``configs/backbones/softmod_deep.yaml``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Backbone, check_int, entropy, parse_options, task_one_hot
from .mlp import mlp
from .registry import register


class ModuleBank(nn.Module):
    """n parallel Linear(d_in -> d_out) modules as batched weights."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.w = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:  # x: (B, d_in) shared, or (n, B, d_in) per module
        eq = "bi,nio->nbo" if x.dim() == 2 else "nbi,nio->nbo"
        return torch.einsum(eq, x, self.w) + self.b


@register("softmod")
class SoftModularization(Backbone):
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=2, num_layers=2, num_modules=2, module_width=256,
                                    gating_hidden=256)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("softmod", options, self.DEFAULTS)
        width, depth = check_int("softmod", "width", o["width"]), check_int("softmod", "depth", o["depth"])
        L = check_int("softmod", "num_layers", o["num_layers"], 2)
        n = check_int("softmod", "num_modules", o["num_modules"])
        d = check_int("softmod", "module_width", o["module_width"])
        G = check_int("softmod", "gating_hidden", o["gating_hidden"])
        self.L, self.n = L, n
        self.base = mlp(in_dim, width, width, depth - 1) if depth > 1 else nn.Linear(in_dim, width)
        self.em_base = nn.Sequential(nn.Linear(num_tasks, width), nn.ReLU(), nn.Linear(width, width))
        self.gating = nn.Sequential(nn.Linear(width, G), nn.ReLU(), nn.Linear(G, G))
        self.route0 = nn.Linear(G, n * n)
        self.route_cond = nn.ModuleList([nn.Linear((l + 1) * n * n, G) for l in range(L - 2)])
        self.route_out = nn.ModuleList([nn.Linear(G, n * n) for _ in range(L - 2)])
        self.last_cond = nn.Linear((L - 1) * n * n, G)
        self.last_out = nn.Linear(G, n)
        self.modules_ = nn.ModuleList([ModuleBank(n, width, d)] + [ModuleBank(n, d, d) for _ in range(L - 1)])
        self.head = nn.Linear(d, out_dim)

    def routing(self, x: Tensor, task_id: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
        """(ReLU(base(x)), [L−1 routing matrices (B, n, n), rows = target module], last weights (B, n))."""
        out = self.base(x)
        emb = self.em_base(task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)) * out
        out = F.relu(out)
        e = self.gating(F.relu(emb))
        B, n = x.shape[0], self.n
        probs = [torch.softmax(self.route0(F.relu(e)).view(B, n, n), dim=-1)]
        for cond_l, out_l in zip(self.route_cond, self.route_out):
            cond = torch.cat([p.reshape(B, n * n) for p in probs], dim=-1)
            probs.append(torch.softmax(out_l(F.relu(cond_l(cond) * e)).view(B, n, n), dim=-1))
        cond = torch.cat([p.reshape(B, n * n) for p in probs], dim=-1)
        last = torch.softmax(self.last_out(F.relu(self.last_cond(cond) * e)), dim=-1)
        return out, probs, last

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        out, probs, last = self.routing(x, task_id)
        h = self.modules_[0](out)  # (n, B, d)
        for l in range(1, self.L):
            mixed = torch.einsum("bji,ibd->jbd", probs[l - 1], h)
            h = self.modules_[l](F.relu(mixed))
        y = self.head(F.relu(torch.einsum("bj,jbd->bd", last, h)))
        return (y, y.new_zeros(())) if return_aux else y

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        _, probs, last = self.routing(x, task_id)
        ent = sum(entropy(p).mean(-1) for p in probs) / len(probs)  # (B,) mean row entropy of routing matrices
        return {"routing_entropy": self.per_task_mean(ent, task_id),          # (T,)
                "module_weights": torch.stack([self.per_task_mean(last[:, j], task_id)
                                               for j in range(self.n)], 1),  # (T, n) last-layer weights
                "module_weight_entropy": self.per_task_mean(entropy(last), task_id)}  # (T,)
