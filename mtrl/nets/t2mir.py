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

Task ids hidden (``use_task_id=false``, T2MIR's own setting: the task is implicit in the context): z =
:class:`ContextEncoder` over the K = ``context_len`` (16) most recent transitions (s, a, r, s′) of the env, a
per-transition MLP (``context_hidden`` = 128) averaged over the real entries of the window (``mtrl.nets.context``).
The output then does not depend on ``task_id`` at all; the task label is used only by the contrastive loss at
training time, as in T2MIR. Rollout workers and evaluation keep each env's window; the learner draws, for each
sampled transition, the K transitions stored before it in its task's replay (the window the worker acted with).
The InfoNCE views are two different contexts of each task (the contexts of that task's first two batch rows,
passed to every task's slice as ``contrast`` (T, 2, K, D)): q = online task gate on enc(view 1), k = EMA target
gate on enc(view 2) detached — T2MIR's positive pair of one task under independently drawn contexts, the other
tasks as negatives. With task ids hidden the routing is per sample (each row has its own context). Supported
with ``--algo sac``; PPO's rollouts do not carry contexts (refused by the config check).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

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
    """Task representation from K transitions (s, a, r, s′[, valid]): per-transition MLP, mean over K, Linear ->
    out_dim. Input (…, K, transition_dim) -> (…, out_dim). With ``masked=True`` the last input channel is the
    validity flag of ``mtrl.nets.context`` and the mean runs over valid entries only (an empty window gives
    ``out(0)``)."""

    def __init__(self, transition_dim: int, out_dim: int, hidden: int = 128, masked: bool = False) -> None:
        super().__init__()
        self.masked = masked
        self.phi = nn.Sequential(nn.Linear(transition_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU())
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, transitions: Tensor) -> Tensor:
        h = self.phi(transitions)
        if not self.masked:
            return self.out(h.mean(dim=-2))
        valid = transitions[..., -1:]
        return self.out((h * valid).sum(-2) / valid.sum(-2).clamp_min(1.0))


@register("t2mir")
class T2MIR(Backbone):
    has_aux_loss = True
    takes_transition_dim = True  # the agent fills in transition_dim (mtrl.nets.context.with_transition_dim)
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=1, task_dim=64, token_experts=6, token_top_k=2,
                                    task_experts=8, task_top_k=2, expert_hidden=None, expert_dropout=0.05,
                                    noisy=True, balance_coef=0.1, contrastive_coef=0.01, target_tau=0.005,
                                    use_task_id=True, context_len=16, context_hidden=128, transition_dim=None)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("t2mir", options, self.DEFAULTS)
        name = "t2mir"
        width, depth = check_int(name, "width", o["width"], 2), check_int(name, "depth", o["depth"])
        if width % 2:
            raise ValueError(f"backbone 't2mir': width={width} must be even (two MoEs of width/2 each)")
        self.use_task_id = check_bool(name, "use_task_id", o["use_task_id"])
        K = check_int(name, "context_len", o["context_len"])
        ch = check_int(name, "context_hidden", o["context_hidden"])
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
        # context_len > 0 tells the agent, workers and evaluation to supply `context=` (mtrl.nets.context).
        self.context_len = 0 if self.use_task_id else K
        if self.use_task_id:
            self.task_emb = nn.Parameter(torch.randn(num_tasks, dz) / math.sqrt(dz))
        else:
            if o["transition_dim"] is None:
                raise ValueError("use_task_id=false needs transition_dim (filled in by the agent from the suite)")
            self.encoder = ContextEncoder(check_int(name, "transition_dim", o["transition_dim"]), dz, ch,
                                          masked=True)
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

    def task_rep(self, task_id: Tensor, batch: int, dtype: torch.dtype, context: Optional[Tensor] = None) -> Tensor:
        """(B, task_dim): the task's embedding, or (task ids hidden) the encoding of each row's context."""
        if self.use_task_id:
            return task_one_hot(task_id, self.num_tasks, batch, dtype) @ self.task_emb
        if context is None:
            raise ValueError("backbone 't2mir' with use_task_id=false needs context= (B, K, transition_dim)")
        return self.encoder(context)

    def router_reps(self, contrast: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(query, key) task representations (T, task_dim) of the two InfoNCE views; the key is detached."""
        if self.use_task_id:
            return self.task_emb, self.task_emb.detach()
        if contrast is None:
            raise ValueError("backbone 't2mir' with use_task_id=false needs contrast= (T, 2, K, transition_dim) "
                             "for its auxiliary loss")
        return self.encoder(contrast[:, 0]), self.encoder(contrast[:, 1]).detach()

    def target_logits(self, z: Tensor) -> Tensor:
        return F.linear(torch.tanh(F.linear(z, self.target_w1)), self.target_w2)

    def contrastive(self, task_id: Tensor, contrast: Optional[Tensor] = None) -> Tensor:
        """Task t's share of the symmetric InfoNCE over all tasks' router representations."""
        zq, zk = self.router_reps(contrast)
        q_all = self.task_gate(zq)                            # (T, E) online
        k_all = self.target_logits(zk)                        # (T, E) target, no gradient
        logits = q_all @ self.contrast_w @ k_all.T            # (T, T): [query task, key task]
        logits = logits - logits.max().detach()
        oh = task_one_hot(task_id, self.num_tasks, 1, logits.dtype)  # (1, T) or (B, T)
        row = (oh @ logits)                                   # queries of task t against all keys
        col = (oh @ logits.T)                                 # key of task t against all queries
        ce_row = -(oh * torch.log_softmax(row, -1)).sum(-1)
        ce_col = -(oh * torch.log_softmax(col, -1)).sum(-1)
        return (0.5 * (ce_row + ce_col)).mean()

    # -- forward -----------------------------------------------------------------------------------------------
    def _parts(self, x: Tensor, task_id: Tensor, context: Optional[Tensor] = None):
        z = self.task_rep(task_id, x.shape[0], x.dtype, context)
        h = self.trunk(torch.cat([x, z], dim=-1))
        u = self.norm(h)
        tok_w, load, tok_p = self.token_route(u)
        task_w, _ = topk_softmax(self.task_gate(z), self.kk)
        y = torch.cat([mix(tok_w, self.token_experts(u)), mix(task_w, self.task_experts(u))], dim=-1)
        return h + y, tok_w, load, tok_p, task_w

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False, context: Optional[Tensor] = None,
                contrast: Optional[Tensor] = None):
        h, tok_w, load, _, _ = self._parts(x, task_id, context)
        out = self.head(h)
        if not return_aux:
            return out
        balance = cv_squared(tok_w.sum(0)) + cv_squared(load)
        aux = self.balance_coef * balance + self.contrastive_coef * self.contrastive(task_id, contrast)
        return out, aux

    @torch.no_grad()
    def after_step(self, ctx: Dict[str, Any]) -> bool:
        super().after_step(ctx)
        b = ctx.get("batch") or {}
        if not self.use_task_id and isinstance(b, dict) and b.get("context") is not None and self._last is not None:
            c = b["context"]  # (T, B, K, D): keep the rows _record kept
            keep = self._last[0].shape[0] // c.shape[0]
            self._last_context = c[:, :keep].reshape(-1, *c.shape[2:])
        self.target_w1.lerp_(self.task_gate.w1.weight, self.target_tau)
        self.target_w2.lerp_(self.task_gate.w2.weight, self.target_tau)
        return False

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        T = self.num_tasks
        context = None
        if not self.use_task_id:
            # Only the rows recorded at the last update have known contexts (checked by identity and shapes: no
            # value is read on the host).
            context = getattr(self, "_last_context", None)
            if (context is None or self._last is None or x is not self._last[0] or context.shape[0] != x.shape[0]
                    or x.shape[0] % T):
                return {}
        _, tok_w, _, tok_p, _ = self._parts(x, task_id, context)
        if self.use_task_id:
            z = self.task_emb
            task_w, _ = topk_softmax(self.task_gate(z), self.kk)  # (T, E_task)
            logits = self.task_gate(z) @ self.contrast_w @ self.target_logits(z).T
        else:
            # Recorded rows are in T blocks of n, one per entry of the update's task ids (Backbone._record); each
            # block's first and last halves of rows give its two views (their mean online / target gate logits).
            n = x.shape[0] // T
            zs = self.encoder(context).view(T, n, -1)
            g = self.task_gate(zs)                                             # (T blocks, n, E_task)
            blocks = task_one_hot(task_id.view(T, n)[:, 0], T, T, g.dtype)     # (block, task)
            task_w = blocks.T @ topk_softmax(g, self.kk)[0].mean(1)            # (T, E_task) in task order
            h = max(n // 2, 1)
            logits = g[:, :h].mean(1) @ self.contrast_w @ self.target_logits(zs[:, n - h:]).mean(1).T
        positives = torch.arange(T, device=logits.device)  # a block's own key (the diagonal)
        return {
            "token_expert_load": (tok_w > 0).float().mean(0) / self.kt,        # (E_tok,) share of top-k slots
            "token_gate_entropy": self.per_task_mean(entropy(tok_p), task_id),  # (T,)
            "task_expert_weights": task_w,                                     # (T, E_task)
            "task_expert_load": task_w.mean(0),                             # (E_task,)
            "router_contrastive_acc": (logits.argmax(1) == positives).float().mean(),
        }
