"""``moe``: MENTOR-style mixture of experts with task-oriented perturbation (Huang et al., ICML 2025,
arXiv 2410.14972; code suninghuang19/mentor @ f4fa81f, ``moe.py``, ``utils.py::perturb``).

Network (the MENTOR actor's MLP part, with the task one-hot on the input as in MT-SAC)::

    [x, one_hot(t)] -> depth x (Linear(width) -> ReLU) -> MoE(width -> width) -> ReLU -> Linear(out)

MoE layer: ``num_experts`` (16) experts, each Linear(width -> expert_hidden) -> ReLU -> Linear(-> width) with
Xavier-uniform weights and zero biases; gate Linear(width -> gate_hidden) -> ReLU -> Dropout(gate_dropout)
-> Linear(-> E). p = softmax(gate(h)); the top ``top_k`` (4) are kept and renormalised to sum to 1;
y = Σ_{i∈top-k} p̂_i E_i(h). All experts run densely (as in the reference): no FLOP saving.
MENTOR sizes at width 1024 are expert_hidden = gate_hidden = 256; the defaults keep that ratio (width // 4).

Auxiliary loss (returned with ``return_aux=True``, added to every task's loss)::

    aux = aux_scale * (balance_coef * E Σ_e f_e P̄_e  +  entropy_coef * mean_b H(p_b))

* The entropy of the gate distribution is *minimised* (confident routing), as in MENTOR.
* **Fix of the reference:** MENTOR's load term ``Var(load)`` builds the load from ``one_hot(top_k_indices)``, so
  it has no gradient and never balances anything. Here the load term is the Switch-Transformer form: f_e, the
  fraction of top-k slots given to expert e (no gradient), times P̄_e, the mean gate probability (differentiable),
  so its gradient reaches the gate. It is 1 at perfect balance and E at total collapse.
* ``aux_scale`` defaults to 0.002, MENTOR's ``aux_loss_scale`` config value (their code computes it but adds the
  aux unscaled, i.e. scale 1 with λ_balance = λ_entropy = 1; pass ``aux_scale=1.0`` for that).

Task-oriented perturbation (``after_step``, MENTOR §1.2 adapted to online multi-task SAC):

* Performance signal: MENTOR ranks whole-agent snapshots by episode return; a backbone has no returns, so a
  snapshot's score is −EMA(mean over tasks of a per-task loss). ``rank="relative"`` (default, issue 12): the SAC
  critic's TD loss relative to the variance of its TD targets (``ctx["rank_losses"]`` from agents/sac.py, the same
  signal for the actor and the critic backbone, as MENTOR ranks whole agents): the raw TD loss grows with the Q
  scale, which grows as the agent learns, so ranking by it kept the early critics. ``rank="loss"``: the raw loss
  of this backbone's own role (``ctx["info"]["losses"]``; also the fallback where no ``rank_losses`` is given,
  e.g. PPO). Every ``snapshot_interval`` of this
  module's updates a snapshot of the backbone's parameters is added to a top-``tp_set_size`` set (while not full
  always; then replacing the worst if better).
* Every ``perturb_interval`` updates: β = dormant ratio (DrM: units with mean |act| < 0.025 × layer mean) of this
  backbone's hidden layers on the current batch; α = clip(1 − perturb_rate·β, min_perturb_factor,
  max_perturb_factor); φ ~ N(μ, σ) element-wise from the snapshots' mean/std (σ ≥ 1e-7); θ ← α θ + (1 − α) φ.
* Optimizer reset (``reset_optimizer``, default true): after a perturbation MENTOR clears the perturbed network's
  optimizer state (``optimizer.state = defaultdict(dict)`` in ``utils.py::perturb``): Adam's moments were built up
  for the parameters before the jump. ``ctx["optimizer"]`` may also hold other modules' parameters (e.g. the twin
  critic's other Q net, whose own hook resets its own), so only this backbone's entries are dropped
  (``opt.state.pop(p)``); Adam restarts them from zero moments and step 0 at the next step.
* Checkpoints: the snapshot set, the loss EMA and the counters are host state (``host_state()`` /
  ``load_host_state()``, plain tensors and numbers for a ``weights_only`` load), which the agents save in their
  checkpoints, so a resumed run takes the same snapshots and perturbs from the same set.
* Device: ``after_step`` is sync-free. The loss EMA, the snapshot scores and the set itself (one (S, …) bank per
  parameter) live on the parameters' device; the slot a snapshot takes (the first empty one, else the worst, if
  the new score is better) is chosen with ``argmin``/``where`` there, and the dormant ratio and α are device
  tensors. What happens on the host follows the schedule only: a snapshot is offered every ``snapshot_interval``
  updates once losses have been seen, and a perturbation runs every ``perturb_interval`` updates once a snapshot
  has been offered. An offer with a non-finite score (the loss EMA is still NaN: every loss mean so far was
  non-finite; SAC's skipped steps, ``ctx["ok"]`` false, reach the hooks) is not kept; a perturbation that finds
  the set empty on the device keeps θ (α = 1), though the optimizer reset still happens.
* Not done: MENTOR's shrink-perturb of its convolutional image encoder (θ ← α θ + (1 − α) θ_init, fresh random
  init, no snapshots): it exists for pixel observations; with state observations there is no encoder (the trunk
  here is MENTOR's MLP part and gets the snapshot perturbation).
* Target critic: a critic-role perturbation returns True from ``after_step`` and SAC applies the same α and φ to
  the target critic's copy (:meth:`apply_last_perturbation`), so the target moves with the critic (MENTOR perturbs
  its target critic too, from target-critic snapshots; here from the critic's snapshot distribution).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (Backbone, check_bool, check_float, check_int, dormant_ratio, entropy, parse_options,
                      task_one_hot, topk_renorm)
from .registry import register


class ExpertBank(nn.Module):
    """E two-layer MLP experts as batched weights: (B, in) -> (E, B, out), all experts computed densely."""

    def __init__(self, num_experts: int, in_dim: int, hidden: int, out_dim: int, act: str = "relu",
                 init: str = "xavier", dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, out_dim))
        self.act = act
        self.dropout = dropout
        with torch.no_grad():
            for w in (self.w1, self.w2):
                if init == "xavier":
                    bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
                    w.uniform_(-bound, bound)
                else:  # PyTorch Linear default
                    bound = 1.0 / math.sqrt(w.shape[1])
                    w.uniform_(-bound, bound)
            if init != "xavier":
                self.b1.uniform_(-1.0 / math.sqrt(in_dim), 1.0 / math.sqrt(in_dim))
                self.b2.uniform_(-1.0 / math.sqrt(hidden), 1.0 / math.sqrt(hidden))

    def hidden(self, x: Tensor) -> Tensor:
        h = torch.einsum("bi,eih->ebh", x, self.w1) + self.b1
        return F.relu(h) if self.act == "relu" else F.leaky_relu(h)

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden(x)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return torch.einsum("ebh,eho->ebo", h, self.w2) + self.b2


def mix(weights: Tensor, expert_out: Tensor) -> Tensor:
    """Σ_e weights[b, e] · expert_out[e, b, :]."""
    return torch.einsum("be,ebo->bo", weights, expert_out)


@register("moe")
class MentorMoE(Backbone):
    has_aux_loss = True
    tensor_dicts = ("_bank",)
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=1, num_experts=16, top_k=4, expert_hidden=None,
                                    gate_hidden=None, gate_dropout=0.1, aux_scale=0.002, balance_coef=1.0,
                                    entropy_coef=1.0, perturb=True, perturb_interval=50_000,
                                    snapshot_interval=500, tp_set_size=10, perturb_rate=2.0,
                                    min_perturb_factor=0.2, max_perturb_factor=0.95, loss_ema=0.99,
                                    reset_optimizer=True, rank="relative")

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("moe", options, self.DEFAULTS)
        width, depth = check_int("moe", "width", o["width"]), check_int("moe", "depth", o["depth"])
        E = check_int("moe", "num_experts", o["num_experts"])
        k = check_int("moe", "top_k", o["top_k"])
        if k > E:
            raise ValueError(f"backbone 'moe': top_k={k} must be <= num_experts={E}")
        eh = check_int("moe", "expert_hidden", o["expert_hidden"] or max(1, width // 4))
        gh = check_int("moe", "gate_hidden", o["gate_hidden"] or max(1, width // 4))
        self.gate_dropout = check_float("moe", "gate_dropout", o["gate_dropout"], 0.0, 0.999)
        for key in ("aux_scale", "balance_coef", "entropy_coef", "perturb_rate"):
            o[key] = check_float("moe", key, o[key])
        for key in ("perturb_interval", "snapshot_interval", "tp_set_size"):
            o[key] = check_int("moe", key, o[key])
        o["min_perturb_factor"] = check_float("moe", "min_perturb_factor", o["min_perturb_factor"], 0.0, 1.0)
        o["max_perturb_factor"] = check_float("moe", "max_perturb_factor", o["max_perturb_factor"], 0.0, 1.0)
        o["loss_ema"] = check_float("moe", "loss_ema", o["loss_ema"], 0.0, 0.999999)
        check_bool("moe", "perturb", o["perturb"])
        check_bool("moe", "reset_optimizer", o["reset_optimizer"])
        if o["rank"] not in ("relative", "loss"):
            raise ValueError(f"backbone 'moe': option rank={o['rank']!r}; valid: relative, loss")
        self.opt = o
        self.num_experts, self.top_k = E, k
        layers: List[nn.Module] = []
        d = in_dim + num_tasks
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.trunk = nn.Sequential(*layers)
        self.experts = ExpertBank(E, width, eh, width, init="xavier")
        self.gate = nn.Sequential(nn.Linear(width, gh), nn.ReLU(), nn.Dropout(self.gate_dropout), nn.Linear(gh, E))
        self.head = nn.Linear(width, out_dim)
        # Perturbation state, outside state_dict (checkpointed through host_state()). Device tensors: non-persistent
        # buffers (they follow .to()); the snapshot bank {name: (S, *shape)} is allocated at the first snapshot.
        S = o["tp_set_size"]
        self.register_buffer("_loss_ema", torch.tensor(math.nan, dtype=torch.float64), persistent=False)
        self.register_buffer("_snap_scores", torch.full((S,), -math.inf, dtype=torch.float64), persistent=False)
        self.register_buffer("_snap_filled", torch.zeros(S, dtype=torch.bool), persistent=False)
        self.register_buffer("last_alpha", torch.tensor(math.nan), persistent=False)
        self.register_buffer("last_dormant", torch.tensor(math.nan), persistent=False)
        self._bank: Dict[str, Tensor] = {}
        self._last_phi: Dict[str, Tensor] = {}  # the critic's last perturbation target φ, for its target network
        # Host side, from the schedule: losses seen, snapshots offered (capped at S), updates, perturbations.
        self._seen_losses = False
        self._n_offered = 0
        self._steps = 0
        self.n_perturbations = 0

    # -- forward -----------------------------------------------------------------------------------------------
    def _route(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        probs = torch.softmax(self.gate(h), dim=-1)
        weights, idx = topk_renorm(probs, self.top_k)
        return probs, weights, idx

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        h = self.trunk(torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1))
        probs, weights, idx = self._route(h)
        out = self.head(F.relu(mix(weights, self.experts(h))))
        if not return_aux:
            return out
        return out, self.aux_loss(probs, idx)

    def aux_loss(self, probs: Tensor, idx: Tensor) -> Tensor:
        E = self.num_experts
        with torch.no_grad():
            f = torch.zeros_like(probs).scatter(-1, idx, 1.0).mean(0) / self.top_k  # share of top-k slots
        balance = E * (f * probs.mean(0)).sum()
        ent = entropy(probs).mean()
        return self.opt["aux_scale"] * (self.opt["balance_coef"] * balance + self.opt["entropy_coef"] * ent)

    def hidden_activations(self, x: Tensor, task_id: Tensor) -> List[Tensor]:
        acts: List[Tensor] = []
        h = torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1)
        for m in self.trunk:
            h = m(h)
            if isinstance(m, nn.ReLU):
                acts.append(h)
        _, weights, _ = self._route(h)
        eh = self.experts.hidden(h)  # (E, B, H)
        acts += [eh[e] for e in range(eh.shape[0])]
        acts.append(F.relu(mix(weights, self.experts(h))))
        return acts

    # -- MENTOR task-oriented perturbation ---------------------------------------------------------------------
    def after_step(self, ctx: Dict[str, Any]) -> bool:
        super().after_step(ctx)
        if not self.opt["perturb"]:
            return False
        self._steps += 1
        losses = (ctx.get("info") or {}).get("losses")
        if self.opt["rank"] == "relative" and ctx.get("rank_losses") is not None:
            losses = ctx["rank_losses"]  # scale-free: TD loss / Var(TD target) per task (agents/sac.py)
        if losses is not None:
            self._update_loss_ema(losses)
        if self._steps % self.opt["snapshot_interval"] == 0 and self._seen_losses:
            self.add_snapshot(-self._loss_ema)
        if self._steps % self.opt["perturb_interval"] == 0 and self._n_offered:
            self.perturb(keep_phi=ctx.get("role") == "critic")
            if self.opt["reset_optimizer"] and ctx.get("optimizer") is not None:
                self.reset_optimizer_state(ctx["optimizer"])
            return ctx.get("role") == "critic"  # the agent then moves the target critic (apply_last_perturbation)
        return False

    @torch.no_grad()
    def apply_last_perturbation(self, target: nn.Module) -> None:
        """θ̄ ← α θ̄ + (1 − α) φ on ``target`` (the same architecture, e.g. the target critic's copy of this
        backbone) with the α and φ of the last :meth:`perturb` (kept with ``keep_phi``), then forget φ."""
        if not self._last_phi:
            return
        a = self.last_alpha
        for n, p in target.named_parameters():
            p.mul_(a.to(p.dtype)).add_(self._last_phi[n] * (1.0 - a.to(p.dtype)))
        self._last_phi = {}

    @torch.no_grad()
    def _update_loss_ema(self, losses: Tensor) -> None:
        """EMA of the mean per-task loss (float64, as the host float it was); a non-finite mean leaves it as is."""
        cur = torch.as_tensor(losses).detach().float().mean().to(self._loss_ema)
        ema, b = self._loss_ema, self.opt["loss_ema"]
        new = torch.where(torch.isnan(ema), cur, b * ema + (1 - b) * cur)
        ema.copy_(torch.where(torch.isfinite(cur), new, ema))
        self._seen_losses = True

    def reset_optimizer_state(self, opt: torch.optim.Optimizer) -> int:
        """Drop ``opt``'s state (Adam moments, step) of this backbone's parameters only; other parameters in the
        same optimizer keep theirs. Returns the number of entries dropped."""
        return sum(opt.state.pop(p, None) is not None for p in self.parameters())

    @torch.no_grad()
    def add_snapshot(self, score: Tensor) -> None:
        """Keep the top-``tp_set_size`` snapshots by score (higher is better), on the device: the snapshot takes the
        first empty slot or, when the set is full, replaces the worst (first of ties) if it scores higher; a
        non-finite score is not kept. The bank is rebuilt out of place, so a ``host_state()`` taken earlier keeps
        the snapshots it saw."""
        S = self.opt["tp_set_size"]
        scores, filled = self._snap_scores, self._snap_filled
        score = torch.as_tensor(score).to(scores)
        key = torch.where(filled, scores, -math.inf)  # empty slots first
        slot = torch.arange(S, device=scores.device) == key.argmin()
        take = slot & torch.isfinite(score) & (score > key.min())
        scores.copy_(torch.where(take, score, scores))
        filled.logical_or_(take)
        for n, p in self.named_parameters():
            bank = self._bank.get(n)
            if bank is None:
                bank = torch.zeros((S, *p.shape), dtype=p.dtype, device=p.device)
            self._bank[n] = torch.where(take.view(S, *[1] * p.dim()), p.detach().unsqueeze(0), bank)
        self._n_offered = min(self._n_offered + 1, S)

    def snapshots(self) -> List[Tuple[float, Dict[str, Tensor]]]:
        """The kept snapshots as (score, {name: tensor}) in slot order (reads the scores: checkpoints and tests,
        not the update step). The tensors are views of the bank, which is never written in place."""
        filled, scores = self._snap_filled.tolist(), self._snap_scores.tolist()
        return [(scores[i], {n: b[i] for n, b in self._bank.items()}) for i in range(len(filled)) if filled[i]]

    @torch.no_grad()
    def perturb(self, keep_phi: bool = False) -> Tensor:
        """θ ← α θ + (1 − α) φ, φ ~ N(mean, std of the snapshot set). Returns α (a device tensor; 1 when the set is
        empty on the device). ``keep_phi``: keep φ for :meth:`apply_last_perturbation` (the target critic)."""
        o = self.opt
        if self._last is not None:
            beta = dormant_ratio(self.hidden_activations(*self._last))
        else:
            beta = torch.zeros((), device=self.last_dormant.device)
        alpha = (1.0 - o["perturb_rate"] * beta).clamp(min=o["min_perturb_factor"]).clamp(max=o["max_perturb_factor"])
        S = o["tp_set_size"]
        w = self._snap_filled.float()
        n = w.sum()
        alpha = torch.where(n > 0, alpha, torch.ones_like(alpha))
        for name, p in self.named_parameters():
            stack = self._bank[name]
            wv = w.view(S, *[1] * p.dim()).to(p.dtype)
            mu = (stack * wv).sum(0) / n.clamp_min(1)
            sd = (((stack - mu) ** 2) * wv).sum(0).div(n.clamp_min(1)).sqrt().clamp_min(1e-7)
            phi = mu + sd * torch.randn_like(mu)
            a = alpha.to(p.dtype)
            p.mul_(a).add_(phi * (1.0 - a))
            if keep_phi:
                self._last_phi[name] = phi
        self.n_perturbations += 1
        self.last_alpha.copy_(alpha)
        self.last_dormant.copy_(beta)
        return alpha

    # -- checkpointing of the host-side state --------------------------------------------------------------------
    def host_state(self) -> Dict[str, Any]:
        """The perturbation state, as tensors and plain numbers (a ``torch.load(weights_only=True)`` reads it back).
        Snapshot tensors are shared, not copied: views of the bank, which :meth:`add_snapshot` replaces rather than
        writes in place, so the live parameters never alias them and a later snapshot does not change a state
        already taken. Reads device values (checkpoint time, outside the update)."""
        return {"snapshots": [{"score": float(score), "params": dict(snap)} for score, snap in self.snapshots()],
                "loss_ema": float(self._loss_ema), "steps": int(self._steps),
                "n_perturbations": int(self.n_perturbations), "last_alpha": float(self.last_alpha),
                "last_dormant": float(self.last_dormant)}

    def load_host_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`host_state` exactly (snapshots moved to the parameters' device and dtype). A snapshot whose
        parameter names or shapes differ from this module's raises ValueError: it comes from another network."""
        params = dict(self.named_parameters())
        snaps: List[Tuple[float, Dict[str, Tensor]]] = []
        for i, entry in enumerate(state.get("snapshots", [])):
            got = entry["params"]
            if set(got) != set(params) or any(tuple(got[n].shape) != tuple(p.shape) for n, p in params.items()):
                raise ValueError(f"backbone 'moe': checkpointed snapshot {i} does not match this network's "
                                 f"parameters (names or shapes differ)")
            snaps.append((float(entry["score"]), got))
        S = self.opt["tp_set_size"]
        if len(snaps) > S:  # a smaller set than the run that saved it: keep the best
            keep = sorted(range(len(snaps)), key=lambda i: snaps[i][0], reverse=True)[:S]
            snaps = [snaps[i] for i in sorted(keep)]
        self._bank = {}
        for n, p in params.items():
            bank = torch.zeros((S, *p.shape), dtype=p.dtype, device=p.device)
            for j, (_, got) in enumerate(snaps):
                bank[j].copy_(got[n].detach())
            self._bank[n] = bank
        self._snap_scores.fill_(-math.inf)
        self._snap_filled.zero_()
        for j, (score, _) in enumerate(snaps):
            self._snap_scores[j] = score
            self._snap_filled[j] = True
        self._n_offered = len(snaps)
        self._loss_ema.fill_(float(state["loss_ema"]))
        self._seen_losses = math.isfinite(float(state["loss_ema"]))
        self._steps = int(state["steps"])
        self.n_perturbations = int(state["n_perturbations"])
        self.last_alpha.fill_(float(state["last_alpha"]))
        self.last_dormant.fill_(float(state["last_dormant"]))

    # -- diagnostics -------------------------------------------------------------------------------------------
    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        h = self.trunk(torch.cat([x, task_one_hot(task_id, self.num_tasks, x.shape[0], x.dtype)], dim=-1))
        probs, weights, idx = self._route(h)
        slots = torch.zeros_like(probs).scatter(-1, idx, 1.0)
        load = slots.mean(0) / self.top_k
        return {
            "expert_load": load,                                         # (E,) share of top-k slots
            "expert_load_cv": cv(load),
            "gate_entropy": self.per_task_mean(entropy(probs), task_id),  # (T,) mean H(softmax gate)
            "expert_load_per_task": torch.stack([self.per_task_mean(slots[:, e], task_id)
                                                 for e in range(self.num_experts)], 1) / self.top_k,  # (T, E)
            "dormant_ratio": dormant_ratio(self.hidden_activations(x, task_id)),
            "snapshots": self._snap_filled.sum(),   # kept snapshots (device count)
            "perturbations": self.n_perturbations,  # host-side counter (int)
            "last_perturb_alpha": self.last_alpha,
        }


def cv(x: Tensor) -> Tensor:
    return x.std(unbiased=False) / x.mean().clamp_min(1e-12)
