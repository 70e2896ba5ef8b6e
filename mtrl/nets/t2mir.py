"""``t2mir``: T2MIR-style token-wise + task-wise mixture of experts (Wu et al., arXiv 2506.05426; code
NJU-RL/T2MIR @ 5e946c5, ``algorithms/moe.py``, ``transformers_moe.py::contrastive_loss``), for an MLP trunk.

Network::

    z = task representation (task-id embedding, ``task_dim``)
    h = depth x (Linear(width) -> LeakyReLU) of [x, z];  u = LayerNorm(h)        (pre-norm, as T2MIR)
    h = h + concat(TokenMoE(u) (width/2), TaskMoE(u; routed on z) (width/2))     (parallel MoEs, residual)
    out = Linear(out)(h)

* Experts (both MoEs): Linear(width -> expert_hidden) -> LeakyReLU -> Dropout(0.05) -> Linear(-> width/2);
  ``expert_hidden`` defaults to 2·width (T2MIR: 512 at d = 256). Token-wise: 6 experts, top-2; task-wise: 8, top-2.
* Gates: logits = Linear(no bias) -> Tanh -> Linear(E -> E, no bias). The token gate is noisy in training
  (Shazeer: logits += N(0,1)·(softplus(W_noise u) + 0.01), W_noise = 0 at init); the top-k logits get a softmax
  over the k selected only. The task gate routes on z (one decision per task, T2MIR's ``task_hard_router``), no
  noise and no balance loss.
* Token balance loss: ``balance_coef`` (0.1) · [cv²(importance) + cv²(load)], importance = Σ_batch gate weights,
  load = Σ_batch P(expert in top-k) from the Normal CDF of the noisy gate (differentiable; hard counts in eval).
* Router contrastive loss (InfoNCE, ``contrastive_coef`` = 0.01): query q_t = online task-gate logits of task t,
  key k_s = logits of an EMA "target" task gate (τ = ``target_tau`` = 0.005, updated in ``after_step``) on the
  detached representation of task s; bilinear similarity q W kᵀ (W ~ N(0, 1), max-subtracted). Task t's loss
  holds its own row and column of the symmetric CURL loss: ½ CE(q_t W K_allᵀ, t) + ½ CE(k_t Wᵀ Q_allᵀ, t), so the
  mean over tasks is T2MIR's symmetric InfoNCE. With task-id representations every task's views are identical,
  so the loss only separates the tasks' routers; it computes inside one task's vmapped slice because all keys
  come from parameters, not from other tasks' batches.
* Both aux terms are returned with ``return_aux=True`` (added to every task's loss).
* Execution is dense (all experts run, then weighted): vmap cannot sort tokens by expert. No FLOP saving.

``use_task_id=false`` (the spec's in-context version: z from a :class:`ContextEncoder` over K recent transitions
of the task) needs per-sample contexts from the replay, which are not plumbed into the SAC batch yet: it raises
ValueError. :class:`ContextEncoder` and :func:`info_nce` are complete and tested on their own.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (Backbone, check_bool, check_float, check_int, cv_squared, entropy, parse_options,
                      task_one_hot)
from .moe import ExpertBank, mix
from .registry import register


class TanhGate(nn.Module):
    """T2MIR's "mlp" gate: Linear(d -> E, no bias) -> Tanh -> Linear(E -> E, no bias)."""

    def __init__(self, d: int, E: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, E, bias=False)
        self.w2 = nn.Linear(E, E, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(torch.tanh(self.w1(x)))


def topk_softmax(logits: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Softmax over the k largest logits only, scattered to a dense (…, E) weight; and the top-k indices."""
    val, idx = torch.topk(logits, k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(val, dim=-1)), idx


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def info_nce(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """Symmetric CURL-style InfoNCE: rows i of ``q`` and ``k`` are positives, other rows negatives."""
    logits = q @ w @ k.T
    logits = logits - logits.max().detach()  # one shift for both directions (CE is invariant to it)
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits.T, labels)


class ContextEncoder(nn.Module):
    """Task representation from K transitions (s, a, r, s′): per-transition MLP, mean over K, Linear -> out_dim.
    Input (…, K, transition_dim) -> (…, out_dim)."""

    def __init__(self, transition_dim: int, out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(transition_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU())
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, transitions: Tensor) -> Tensor:
        return self.out(self.phi(transitions).mean(dim=-2))


@register("t2mir")
class T2MIR(Backbone):
    has_aux_loss = True
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=1, task_dim=64, token_experts=6, token_top_k=2,
                                    task_experts=8, task_top_k=2, expert_hidden=None, expert_dropout=0.05,
                                    noisy=True, balance_coef=0.1, contrastive_coef=0.01, target_tau=0.005,
                                    use_task_id=True)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("t2mir", options, self.DEFAULTS)
        name = "t2mir"
        width, depth = check_int(name, "width", o["width"], 2), check_int(name, "depth", o["depth"])
        if width % 2:
            raise ValueError(f"backbone 't2mir': width={width} must be even (two MoEs of width/2 each)")
        if not check_bool(name, "use_task_id", o["use_task_id"]):
            raise ValueError("backbone 't2mir': use_task_id=false (context-encoder task representation) is not "
                             "wired yet: the replay does not supply per-sample transition contexts")
        dz = check_int(name, "task_dim", o["task_dim"])
        Et, kt = check_int(name, "token_experts", o["token_experts"]), check_int(name, "token_top_k", o["token_top_k"])
        Ek, kk = check_int(name, "task_experts", o["task_experts"]), check_int(name, "task_top_k", o["task_top_k"])
        if kt > Et or kk > Ek:
            raise ValueError(f"backbone 't2mir': top-k must not exceed the number of experts "
                             f"(token {kt}/{Et}, task {kk}/{Ek})")
        eh = check_int(name, "expert_hidden", o["expert_hidden"] or 2 * width)
        drop = check_float(name, "expert_dropout", o["expert_dropout"], 0.0, 0.999)
        self.noisy = check_bool(name, "noisy", o["noisy"])
        self.balance_coef = check_float(name, "balance_coef", o["balance_coef"])
        self.contrastive_coef = check_float(name, "contrastive_coef", o["contrastive_coef"])
        self.target_tau = check_float(name, "target_tau", o["target_tau"], 0.0, 1.0)
        self.Et, self.kt, self.Ek, self.kk = Et, kt, Ek, kk
        self.task_emb = nn.Parameter(torch.randn(num_tasks, dz) / math.sqrt(dz))
        layers = []
        d = in_dim + dz
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LeakyReLU()]
            d = width
        self.trunk = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)
        self.token_gate = TanhGate(width, Et)
        self.token_noise = nn.Linear(width, Et, bias=False)
        nn.init.zeros_(self.token_noise.weight)
        self.token_experts = ExpertBank(Et, width, eh, width // 2, act="leaky", init="default", dropout=drop)
        self.task_gate = TanhGate(dz, Ek)
        self.task_experts = ExpertBank(Ek, width, eh, width // 2, act="leaky", init="default", dropout=drop)
        self.contrast_w = nn.Parameter(torch.randn(Ek, Ek))
        self.register_buffer("target_w1", self.task_gate.w1.weight.detach().clone())
        self.register_buffer("target_w2", self.task_gate.w2.weight.detach().clone())
        self.head = nn.Linear(width, out_dim)

    # -- routing -----------------------------------------------------------------------------------------------
    def token_route(self, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(dense weights (B, E), load (E,), clean probabilities (B, E))."""
        clean = self.token_gate(u)
        E, k = self.Et, self.kt
        if self.training and self.noisy:
            std = F.softplus(self.token_noise(u)) + 0.01
            noisy = clean + torch.randn_like(clean) * std
            weights, _ = topk_softmax(noisy, k)
            if k < E:
                top = torch.topk(noisy, k + 1, dim=-1).values
                thr_in, thr_out = top[..., k:k + 1], top[..., k - 1:k]
                p_in = normal_cdf((clean - thr_in) / std)
                p_out = normal_cdf((clean - thr_out) / std)
                load = torch.where(noisy > thr_in, p_in, p_out).sum(0)
            else:
                load = torch.ones_like(clean).sum(0)
        else:
            weights, _ = topk_softmax(clean, k)
            load = (weights > 0).to(clean.dtype).sum(0)
        return weights, load, torch.softmax(clean, dim=-1)

    def task_rep(self, task_id: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        return task_one_hot(task_id, self.num_tasks, batch, dtype) @ self.task_emb

    def target_logits(self, z: Tensor) -> Tensor:
        return F.linear(torch.tanh(F.linear(z, self.target_w1)), self.target_w2)

    def contrastive(self, task_id: Tensor) -> Tensor:
        """Task t's share of the symmetric InfoNCE over all tasks' router representations."""
        q_all = self.task_gate(self.task_emb)                 # (T, E) online
        k_all = self.target_logits(self.task_emb.detach())    # (T, E) target, no gradient
        logits = q_all @ self.contrast_w @ k_all.T            # (T, T): [query task, key task]
        logits = logits - logits.max().detach()
        oh = task_one_hot(task_id, self.num_tasks, 1, logits.dtype)  # (1, T) or (B, T)
        row = (oh @ logits)                                   # queries of task t against all keys
        col = (oh @ logits.T)                                 # key of task t against all queries
        ce_row = -(oh * torch.log_softmax(row, -1)).sum(-1)
        ce_col = -(oh * torch.log_softmax(col, -1)).sum(-1)
        return (0.5 * (ce_row + ce_col)).mean()

    # -- forward -----------------------------------------------------------------------------------------------
    def _parts(self, x: Tensor, task_id: Tensor):
        z = self.task_rep(task_id, x.shape[0], x.dtype)
        h = self.trunk(torch.cat([x, z], dim=-1))
        u = self.norm(h)
        tok_w, load, tok_p = self.token_route(u)
        task_w, _ = topk_softmax(self.task_gate(z), self.kk)
        y = torch.cat([mix(tok_w, self.token_experts(u)), mix(task_w, self.task_experts(u))], dim=-1)
        return h + y, tok_w, load, tok_p, task_w

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        h, tok_w, load, _, _ = self._parts(x, task_id)
        out = self.head(h)
        if not return_aux:
            return out
        balance = cv_squared(tok_w.sum(0)) + cv_squared(load)
        aux = self.balance_coef * balance + self.contrastive_coef * self.contrastive(task_id)
        return out, aux

    @torch.no_grad()
    def after_step(self, ctx: Dict[str, Any]) -> bool:
        super().after_step(ctx)
        self.target_w1.lerp_(self.task_gate.w1.weight, self.target_tau)
        self.target_w2.lerp_(self.task_gate.w2.weight, self.target_tau)
        return False

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        _, tok_w, _, tok_p, _ = self._parts(x, task_id)
        ids = torch.arange(self.num_tasks)
        task_w, _ = topk_softmax(self.task_gate(self.task_emb), self.kk)  # (T, E_task)
        logits = self.task_gate(self.task_emb) @ self.contrast_w @ self.target_logits(self.task_emb).T
        return {
            "token_expert_load": (tok_w > 0).float().mean(0) / self.kt,        # (E_tok,) share of top-k slots
            "token_gate_entropy": self.per_task_mean(entropy(tok_p), task_id),  # (T,)
            "task_expert_weights": task_w,                                     # (T, E_task)
            "task_expert_load": task_w.mean(0),                                # (E_task,)
            "router_contrastive_acc": (logits.argmax(1) == ids).float().mean(),
        }
