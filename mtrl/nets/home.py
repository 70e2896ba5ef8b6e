"""``home``: HoME, Hierarchy of Multi-Gate Experts (Wang, Cao, Fu, Gai, Zhou, Kuaishou, KDD 2025, arXiv
2408.05430), for task-conditioned policies and critics. No public code; built from the paper's description.

Tasks are split into ``num_groups`` groups (HoME's task categories; ``groups`` = one group index per task,
default: contiguous blocks of the task order). Two levels of experts, each expert normalised:

    expert(v) = Swish(Norm(ṽ W + b)),  ṽ = v ⊙ 2σ(v A B)        (feature gate: a private, LoRA-like view of the
                                                                   input per expert, rank ``lora_rank``; B = 0 at
                                                                   init so every gate starts at 1)
    level 1 (meta):  ``shared_experts`` global experts + ``group_experts`` per group, all on x
        m_g = Σ softmax_mask(G1_g(x)) · experts        (gate of group g: the global and group-g experts only)
        m_0 = Σ softmax(G1_0(x)) · experts              (the global meta gate: every level-1 expert)
    level 2 (task):  global experts on m_0, group-g experts on m_g, ``task_experts`` per task on m_g(t)
        y_t = Σ softmax_mask(G2_t(x)) · experts + σ(S_t(x)) ⊙ m_g(t)      (gate of task t: global, group-g(t)
                                                                           and its own experts; self-gate residual)
    out = tower_t(y_t) = Linear(width -> out), one per task

The hierarchy mask (``softmax_mask``: −∞ logits before the softmax) gives other groups' and other tasks' experts
exactly zero weight, so a task-specific expert gets exactly zero gradient from every other task's loss (tested).
All gates read the raw input x, as in HoME.

Departures (said here and in README_BACKBONES):

* Expert normalisation is a LayerNorm per expert (with its own scale and shift), not a batch norm: a batch norm
  updates running statistics inside ``forward`` (a buffer write, which vmap and the compiled step forbid) and acts on
  single observations at rollout time. It serves the same purpose, aligning the experts' output distributions.
* The self-gate is read as a sigmoid-gated residual from the task's meta representation (its gradient reaches the
  level-1 experts without passing through the level-2 gate); the paper gives no code to check this against.
* HoME's tasks are click/like/… heads on one input; here every task sees its own states.

Defaults (ours): width 400, 2 groups, 2 global and 1 group expert per level, 1 task expert per task, rank 16.
Task-specific parameters: level-2 task gates, task experts, self-gates and towers.
Diagnostics: ``level1_gate_weights`` (T, n1) the task's group gate, ``level2_gate_weights`` (T, n2),
``level2_usage`` (T, 3) share of weight on global / group / task experts, ``level1_shared_share`` (T,).
"""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Backbone, check_bool, check_int, grouped_by_task, linear_init, parse_options, take, task_one_hot
from .mmoe import masked_softmax, mix, per_task_linear, per_task_rows, task_bank
from .registry import register

PARAMS = ("w", "b", "ln_w", "ln_b", "lora_a", "lora_b")


def expert_params(lead: Tuple[int, ...], d_in: int, width: int, rank: int) -> Dict[str, nn.Parameter]:
    """Parameters of normalised, feature-gated experts with leading shape ``lead`` (e.g. (n,) or (T, K))."""
    w, b = torch.empty(*lead, d_in, width), torch.empty(*lead, 1, width)
    linear_init(w, b, d_in)
    a = torch.empty(*lead, d_in, rank)
    linear_init(a, None, d_in)
    return {"w": nn.Parameter(w), "b": nn.Parameter(b), "ln_w": nn.Parameter(torch.ones(*lead, 1, width)),
            "ln_b": nn.Parameter(torch.zeros(*lead, 1, width)), "lora_a": nn.Parameter(a),
            "lora_b": nn.Parameter(torch.zeros(*lead, rank, d_in))}


def run_experts(v: Tensor, p: Dict[str, Tensor], feature_gate: bool, norm: bool) -> Tensor:
    """Experts with parameters ``p`` (leading axis n) on v (B, d) or per-expert inputs (n, B, d) -> (n, B, width)."""
    v = v.expand(p["w"].shape[0], *v.shape) if v.dim() == 2 else v
    if feature_gate:
        v = v * 2 * torch.sigmoid(torch.matmul(torch.matmul(v, p["lora_a"]), p["lora_b"]))
    h = torch.matmul(v, p["w"]) + p["b"]
    if norm:
        h = F.layer_norm(h, h.shape[-1:]) * p["ln_w"] + p["ln_b"]
    return F.silu(h)


@register("home")
class HoME(Backbone):
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=2, num_groups=2, groups=None, shared_experts=2,
                                    group_experts=1, task_experts=1, lora_rank=16, feature_gate=True,
                                    self_gate=True, expert_norm=True)
    # The structure fixes depth (mtrl.nets.registry.fixed_options): a preset's depth meant for another backbone
    # (pcgrad's 3 x 400 multihead) yields to it with a note at start-up, its width is used (mtrl.config).
    FIXED_OPTIONS = {"depth": (2, "HoME has a meta level and a task level")}

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        n = "home"
        o = parse_options(n, options, self.DEFAULTS)
        width = check_int(n, "width", o["width"])
        depth, (fixed, why) = check_int(n, "depth", o["depth"]), self.FIXED_OPTIONS["depth"]
        if depth != fixed:
            raise ValueError(f"backbone 'home': depth={depth} must be {fixed} ({why})")
        T = num_tasks
        G = check_int(n, "num_groups", o["num_groups"])
        groups = o["groups"]
        if groups is None:
            if G > T:
                raise ValueError(f"backbone 'home': num_groups={G} exceeds the {T} tasks")
            groups = [t * G // T for t in range(T)]
        elif isinstance(groups, str):
            groups = [g.strip() for g in groups.split(",")]
        try:
            groups = [int(g) for g in groups]
        except (TypeError, ValueError):
            raise ValueError(f"backbone 'home': groups={o['groups']!r} must be one group index per task") from None
        if len(groups) != T or not all(0 <= g < G for g in groups):
            raise ValueError(f"backbone 'home': groups={o['groups']!r} must list one index in [0, {G}) for each "
                             f"of the {T} tasks")
        S, Gx, K = (check_int(n, "shared_experts", o["shared_experts"], 0), check_int(n, "group_experts",
                    o["group_experts"], 0), check_int(n, "task_experts", o["task_experts"], 0))
        if S + Gx == 0 or S + Gx + K == 0:
            raise ValueError("backbone 'home': every gate needs an expert (shared_experts + group_experts >= 1)")
        r = check_int(n, "lora_rank", o["lora_rank"])
        self.feature_gate = check_bool(n, "feature_gate", o["feature_gate"])
        self.self_gate = check_bool(n, "self_gate", o["self_gate"])
        self.expert_norm = check_bool(n, "expert_norm", o["expert_norm"])
        self.S, self.Gx, self.K, self.G, self.width = S, Gx, K, G, width
        n1 = S + G * Gx  # level-1 experts and the level-2 global + group experts: [global | group 0 | group 1 | …]
        self.register_buffer("group_of", torch.tensor(groups))
        col_group = torch.tensor([-1] * S + [g for g in range(G) for _ in range(Gx)])
        # allowed1[g]: the gate of group g sees the global experts and its own group's; row G is the global gate.
        allowed1 = (col_group == -1) | (col_group == torch.arange(G).unsqueeze(1))
        self.register_buffer("allowed1", torch.cat([allowed1, torch.ones(1, n1, dtype=torch.bool)]))
        # level-2 gate of task t: [global | all groups | own task experts], other groups masked.
        allowed2 = (col_group == -1) | (col_group == torch.tensor(groups).unsqueeze(1))
        self.register_buffer("allowed2", torch.cat([allowed2, torch.ones(T, K, dtype=torch.bool)], 1))
        self._p1 = self._register("e1", expert_params((n1,), in_dim, width, r))
        self._p2 = self._register("e2", expert_params((n1,), width, width, r))
        self._pt = self._register("et", expert_params((T, K), width, width, r)) if K else []
        self.gate1_w, self.gate1_b = task_bank(G + 1, in_dim, n1)
        self.gate2_w, self.gate2_b = task_bank(T, in_dim, n1 + K)
        if self.self_gate:
            self.self_w, self.self_b = task_bank(T, in_dim, width)
        self.head_w, self.head_b = task_bank(T, width, out_dim)

    def _register(self, prefix: str, params: Dict[str, nn.Parameter]) -> List[str]:
        for k, p in params.items():
            self.register_parameter(f"{prefix}_{k}", p)
        return [f"{prefix}_{k}" for k in params]

    def _params(self, names: List[str]) -> Dict[str, Tensor]:
        # read through getattr so that functional_call's substituted tensors are used
        return {k.split("_", 1)[1]: getattr(self, k) for k in names}

    def task_specific_parameters(self) -> Set[str]:
        names = {"gate2_w", "gate2_b", "head_w", "head_b", *self._pt}
        return names | ({"self_w", "self_b"} if self.self_gate else set())

    # -- forward ---------------------------------------------------------------------------------------------------
    def _experts(self, v: Tensor, names: List[str]) -> Tensor:
        return run_experts(v, self._params(names), self.feature_gate, self.expert_norm)

    def _task_experts(self, m: Tensor, t: Tensor) -> Tensor:
        """(K, B, width): task t's own experts (0-d t), or each row's own task's ((B,) t: every task's experts, each
        row keeping its own: T times the FLOPs of this part, no host read)."""
        p = self._params(self._pt)
        if t.dim() == 0:
            return run_experts(m, {k: take(v, t) for k, v in p.items()}, self.feature_gate, self.expert_norm)
        T, K = self.num_tasks, self.K
        out = run_experts(m, {k: v.flatten(0, 1) for k, v in p.items()}, self.feature_gate, self.expert_norm)
        oh = task_one_hot(t, T, m.shape[0], m.dtype)
        return torch.einsum("bt,tkbw->kbw", oh, out.view(T, K, *out.shape[1:]))

    def _parts(self, x: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(level-2 output y (B, width), level-1 gate weights of the task's group (B, n1), level-2 weights)."""
        g = take(self.group_of, t)
        e1 = self._experts(x, self._p1)                                          # (n1, B, w)
        w1 = masked_softmax(per_task_linear(x, self.gate1_w, self.gate1_b, g), take(self.allowed1, g))
        m_g = mix(w1, e1)                                                        # the task's group representation
        G = torch.full_like(g, self.G)
        m_0 = mix(masked_softmax(per_task_linear(x, self.gate1_w, self.gate1_b, G), take(self.allowed1, G)), e1)
        # level 2: global experts read m_0, group experts m_g (other groups' experts are masked out anyway)
        S = self.S
        inputs = torch.cat([m_0.expand(S, *m_0.shape), m_g.expand(self.G * self.Gx, *m_g.shape)])
        e2 = self._experts(inputs, self._p2)                                     # (n1, B, w)
        if self.K:
            e2 = torch.cat([e2, self._task_experts(m_g, t)])
        w2 = masked_softmax(per_task_linear(x, self.gate2_w, self.gate2_b, t), take(self.allowed2, t))
        y = mix(w2, e2)
        if self.self_gate:
            y = y + torch.sigmoid(per_task_linear(x, self.self_w, self.self_b, t)) * m_g
        return y, w1, w2

    def _forward_tasks(self, x: Tensor, t: Tensor) -> Tensor:
        y, _, _ = self._parts(x, t)
        return per_task_linear(y, self.head_w, self.head_b, t)

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        out = grouped_by_task(x, task_id, self.out_dim, self._forward_tasks, self._forward_tasks)
        return (out, out.new_zeros(())) if return_aux else out

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        _, w1, w2 = self._parts(x, task_id)
        S, n1 = self.S, self.S + self.G * self.Gx
        usage = torch.stack([w2[:, :S].sum(1), w2[:, S:n1].sum(1), w2[:, n1:].sum(1)], 1)
        T = self.num_tasks
        return {"level1_gate_weights": per_task_rows(w1, task_id, T), "level2_gate_weights": per_task_rows(w2,
                task_id, T), "level2_usage": per_task_rows(usage, task_id, T),
                "level1_shared_share": self.per_task_mean(w1[:, :S].sum(1), task_id)}
