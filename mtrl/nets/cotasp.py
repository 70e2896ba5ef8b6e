"""``cotasp``: CoTASP-style sparse-prompted neuron masks over a shared meta-policy (Yang et al., ICML 2023,
"Continual Task Allocation in Meta-Policy Network via Sparse Prompting", arXiv 2305.18444; code
stevenyangyj/CoTASP @ f3aa1c2, ``jaxrl/networks/policies.py::MetaPolicy``, ``ste_step_fn``), for joint multi-task
training rather than CoTASP's continual setting. No code copied.

Network (the meta-policy; the task enters only through the masks)::

    h_l = act(φ_l,t ⊙ (W_l h_{l−1} + b_l)),  l = 1..depth    (leaky-ReLU, as CoTASP's default activation)
    out = Linear(width -> out)(h_depth)                       (unmasked head)

* Prompt: e_t, the task's frozen sentence embedding (``mtrl/nets/data/task_embeddings.json``, all-MiniLM-L6-v2,
  384-d, the file ``care`` reads; CoTASP uses all-MiniLM-L12-v2, also 384-d), or with ``embedding=random`` a fixed
  Gaussian unit vector per task (for task sets without descriptions).
* Per layer a dictionary D_l (width × 384), N(0, 1) rows, each row scaled to norm ≤ 1 (CoTASP's constraint c = 1,
  applied here as D / max(1, ‖row‖) inside the loss, so no projection step is needed), and per task a code
  α_l,t (width), initialised as the LASSO code of e_t on D_l: argmin ½‖e_t − D_lᵀα‖² + λ‖α‖₁ with λ =
  ``lasso`` (1e-3, CoTASP's value), solved by ISTA (CoTASP: LARS).
* Mask: φ = hard + (c − stopgrad(c)), c = clip(α, 0, 1) (CoTASP's straight-through estimator: the forward value is
  the hard mask, the gradient that of the clip). hard = Heaviside(α) as in CoTASP when ``density`` is null, or, by
  default, the top round(density·width) entries of α_l,t, so every task's mask has exactly the configured density.
  A masked neuron's row of W_l and b_l and its column of W_{l+1} get exactly zero gradient from that task's loss.
* Sparse-coding objective, through ``return_aux`` (task t's slice):
  ``sc_coef · Σ_l [½‖e_t − D_lᵀα_l,t‖² + λ‖α_l,t‖₁]``: its gradient reaches the codes and the dictionaries, so tasks
  with similar prompts keep similar codes, hence overlapping masks.

Departures from CoTASP (continual → joint multi-task): all tasks train at once, so there is no cumulative mask
freezing earlier tasks' weights, no critic reset and no distillation; codes and dictionaries learn jointly by
gradient (RL loss + the sparse-coding objective above) instead of CoTASP's alternation (990 θ steps, then 10 α
steps) and end-of-task block-coordinate dictionary update; the masked LayerNorm + tanh of CoTASP's first layer
(off in its default) is not built; the critic uses the same masked network (CoTASP's critic is a plain MLP: use
``--critic-backbone mlp`` for that). ``sc_coef`` (1.0) and ``density`` (0.5) are our defaults.
Task-specific parameters: the codes. Diagnostics: ``mask_density`` (T,), ``mask_overlap`` (T, T) Jaccard over all
layers, ``mask_overlap_mean`` (off-diagonal), ``code_sparsity`` (T,) share of zero code entries,
``sparse_coding_loss`` (T,).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Backbone, check_float, check_int, parse_options, take
from .care import EMBEDDINGS, load_task_embeddings, resolve_tasks
from .registry import register


def ista(e: Tensor, d: Tensor, lam: float, iters: int = 500) -> Tensor:
    """LASSO codes argmin_α ½‖e − dᵀα‖² + lam‖α‖₁ for each row of e (T, k), dictionary d (n, k) -> (T, n)."""
    step = 1.0 / torch.linalg.matrix_norm(d, ord=2).pow(2).clamp_min(1e-12)
    a = torch.zeros(e.shape[0], d.shape[0], dtype=e.dtype)
    for _ in range(iters):
        a = a + step * (e - a @ d) @ d.T
        a = torch.sign(a) * (a.abs() - step * lam).clamp_min(0)
    return a


def jaccard(m: Tensor) -> Tensor:
    """(T, T) |M_s ∧ M_t| / |M_s ∨ M_t| for binary rows m (T, N)."""
    inter = m @ m.T
    n = m.sum(1)
    return inter / (n.unsqueeze(1) + n - inter).clamp_min(1)


@register("cotasp")
class CoTASP(Backbone):
    has_aux_loss = True
    needs_task_names = True  # config.validate fills backbone_kwargs.tasks (the prompts are the task descriptions)
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3, density=0.5, lasso=1e-3, sc_coef=1.0, embedding="sentence",
                                    tasks=None, suite=None, embeddings=None, seed=0)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        n = "cotasp"
        o = parse_options(n, options, self.DEFAULTS)
        width, depth = check_int(n, "width", o["width"]), check_int(n, "depth", o["depth"])
        self.density = None if o["density"] is None else check_float(n, "density", o["density"], 0.0, 1.0)
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"backbone 'cotasp': density={self.density} must be in (0, 1], or null for Heaviside")
        self.lasso = check_float(n, "lasso", o["lasso"])
        self.sc_coef = check_float(n, "sc_coef", o["sc_coef"])
        seed = check_int(n, "seed", o["seed"], 0)
        g = torch.Generator().manual_seed(seed)
        if o["embedding"] == "sentence":
            try:
                names = resolve_tasks(num_tasks, o["tasks"], o["suite"])
            except ValueError as e:  # the shared resolver names care; the options are the same here
                raise ValueError(str(e).replace("backbone 'care'", "backbone 'cotasp'") + "; or set "
                                 "backbone_kwargs.embedding=random") from None
            table = load_task_embeddings(str(o["embeddings"] or EMBEDDINGS))
            missing = [t for t in names if t not in table]
            if missing:
                raise ValueError(f"backbone 'cotasp': no description embedding for {missing[0]!r}; use "
                                 f"embedding=random or rerun scripts/make_task_embeddings.py")
            emb = torch.tensor([table[t] for t in names], dtype=torch.float32)
        elif o["embedding"] == "random":
            emb = torch.randn(num_tasks, 384, generator=g)
            emb = emb / emb.norm(dim=1, keepdim=True)
        else:
            raise ValueError(f"backbone 'cotasp': embedding={o['embedding']!r}; valid: sentence, random")
        self.register_buffer("prompt", emb)  # (T, 384) e_t, frozen
        self.k = max(1, int(round(self.density * width))) if self.density is not None else None
        self.layers = nn.ModuleList()
        self.dicts = nn.ParameterList()
        self.codes = nn.ParameterList()
        d = in_dim
        for _ in range(depth):
            self.layers.append(nn.Linear(d, width))
            dic = torch.randn(width, emb.shape[1], generator=g)
            dic = dic / dic.norm(dim=1, keepdim=True).clamp_min(1.0)
            self.dicts.append(nn.Parameter(dic))
            self.codes.append(nn.Parameter(ista(emb, dic, self.lasso)))
            d = width
        self.head = nn.Linear(width, out_dim)

    def task_specific_parameters(self) -> Set[str]:
        return {f"codes.{i}" for i in range(len(self.codes))}

    # -- masks -------------------------------------------------------------------------------------------------------
    def hard_mask(self, a: Tensor) -> Tensor:
        if self.k is None:
            return (a > 0).to(a.dtype)
        return torch.zeros_like(a).scatter(-1, torch.topk(a, self.k, dim=-1).indices, 1.0)

    def masks(self) -> List[Tensor]:
        """Per layer, (T, width) straight-through masks: forward value 0/1, gradient of clip(α, 0, 1)."""
        out = []
        for a in self.codes:
            c = a.clamp(0.0, 1.0)
            out.append(self.hard_mask(a.detach()) + (c - c.detach()))
        return out

    def sparse_coding_loss(self) -> Tensor:
        """(T,) Σ_l ½‖e_t − D_lᵀα_l,t‖² + λ‖α_l,t‖₁ with row-norm-constrained dictionaries."""
        total = self.prompt.new_zeros(self.num_tasks)
        for a, dic in zip(self.codes, self.dicts):
            dn = dic / dic.norm(dim=1, keepdim=True).clamp_min(1.0)
            total = total + 0.5 * (self.prompt - a @ dn).pow(2).sum(1) + self.lasso * a.abs().sum(1)
        return total

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        h = x
        for layer, m in zip(self.layers, self.masks()):
            h = F.leaky_relu(take(m, task_id) * layer(h))
        out = self.head(h)
        if not return_aux:
            return out
        sc = take(self.sparse_coding_loss(), task_id)
        return out, self.sc_coef * sc.mean()

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        hard = torch.cat([self.hard_mask(a) for a in self.codes], 1)  # (T, depth·width)
        ov = jaccard(hard)
        T = self.num_tasks
        off = (ov.sum() - ov.diagonal().sum()) / max(T * (T - 1), 1)
        codes = torch.cat(list(self.codes), 1)
        return {"mask_density": hard.mean(1), "mask_overlap": ov, "mask_overlap_mean": off if T > 1 else ov.mean(),
                "code_sparsity": (codes == 0).float().mean(1), "sparse_coding_loss": self.sparse_coding_loss()}
