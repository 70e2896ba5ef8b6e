"""``harmony``: HarmoDT-style per-task binary weight masks over a shared trunk (Hu et al., ICML 2024,
arXiv 2405.18080; code charleshsc/HarmoDT @ 1c4244f), carried over to online SAC as in architectures.md §3.5.

Network: [x, one_hot(t)] -> Linear(width) -> ReLU -> (depth−1) x (masked Linear(width) -> ReLU) -> Linear(out).
The hidden-to-hidden weights are masked per task: task t uses W ⊙ M_t. As in HarmoDT, the input "embedding" layer,
the output "prediction" head and all biases are never masked (``mask_input_layer=true`` masks the first layer too).

* Masks are bool buffers ``mask{i}`` of shape (T, out, in), initialised independently per task at ``density``
  (0.8) with an exact count per task and tensor (ERK gives the same density to equal-shaped tensors).
* The mask is applied inside forward, so task t's loss has zero gradient on the weights it masks out: a
  masked-out weight is untouched by its task's update (other tasks still update the shared weight, and Adam's
  momentum from earlier steps still moves it: plain SAC semantics, not HarmoDT's restore trick).
* Harmony scores (``after_step``): every ``score_interval`` of this module's updates, per-task gradients g_t of the
  *unmasked* weights are computed — gradients w.r.t. the effective weights W ⊙ M_t at task t's own network, so
  masked-out entries get a real gradient (this is the paper's intent; the official code scores masked gradients,
  which makes revival a tie-break among zeros) — and smoothed: ĝ_t = EMA(g_t), F_t = EMA(g_t²)
  (``ema`` = 0.9). ḡ = mean_t ĝ_t (a fresh tensor: the reference's aliasing bug is not reproduced).
* Every ``mask_interval`` updates, per task and per masked tensor: prune the k active entries with the smallest
  γ·ḡ⊙ĝ_t + F_t (γ = ``gamma`` = 10) and revive the k inactive ones with the largest ḡ⊙ĝ_t; density stays fixed.
  k = int(η_max + ½(η_min − η_max)(1 + cos(2π u / total_updates))) with η_min = 0, η_max = ``eta_max`` (one full
  cosine period: 0 → η_max → 0 over ``total_updates``, default 2M = the suite's default run of 2M vector steps
  at one update each; set it to the run's number of updates), split over the
  masked tensors in proportion to their size (a per-layer budget, §3.5.4).
* ``after_step`` returns True after a flip: SAC then copies the critic's masks into the target critic, which
  shares them (a small edit in agents/sac.py).
* Device: ``after_step`` is sync-free. The score EMAs are device tensors; the number of active entries per task
  and tensor comes from the configuration (the exact count set at init, which every flip preserves); a score
  gradient counts only when finite and the step ran (SAC's device flag ``ctx["ok"]``), and the
  return value (a flip happened) from the schedule and that count. Mixed (B,) task ids off the host CPU (targets
  on CUDA) run each masked layer for every task and keep each row's own (:func:`mixed_linear`: T times the FLOPs
  of those layers, no synchronisation).
* Checkpoints: the masks are buffers (in ``state_dict``); the score EMAs ĝ_t, F_t and the counters are host state
  (``host_state()`` / ``load_host_state()``, tensors under string layer keys for a ``weights_only`` load), saved
  in the agents' checkpoints, so a resumed run scores and flips as an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from ._common import (Backbone, check_bool, check_float, check_int, grouped_by_task, mixed_linear, parse_options,
                      take, task_one_hot)
from .registry import register


@register("harmony")
class HarmonyMasks(Backbone):
    tensor_dicts = ("_ema_g", "_ema_g2")
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3, density=0.8, mask_input_layer=False, mask_interval=1000,
                                    score_interval=100, ema=0.9, gamma=10.0, eta_min=0, eta_max=100,
                                    total_updates=2_000_000, seed=0)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("harmony", options, self.DEFAULTS)
        width, depth = check_int("harmony", "width", o["width"]), check_int("harmony", "depth", o["depth"])
        density = check_float("harmony", "density", o["density"], 0.0, 1.0)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"backbone 'harmony': option density={density} must be in (0, 1]")
        mask_in = check_bool("harmony", "mask_input_layer", o["mask_input_layer"])
        for key in ("mask_interval", "score_interval", "total_updates"):
            o[key] = check_int("harmony", key, o[key])
        for key in ("eta_min", "eta_max", "seed"):
            o[key] = check_int("harmony", key, o[key], 0)
        o["ema"] = check_float("harmony", "ema", o["ema"], 0.0, 0.999999)
        o["gamma"] = check_float("harmony", "gamma", o["gamma"])
        if depth < 2 and not mask_in:
            raise ValueError("backbone 'harmony': nothing to mask with depth=1; use depth >= 2 or "
                             "mask_input_layer=true")
        self.opt = o
        self.layers = nn.ModuleList()
        d = in_dim + num_tasks
        for _ in range(depth):
            self.layers.append(nn.Linear(d, width))
            d = width
        self.head = nn.Linear(width, out_dim)
        self.masked = [i for i in range(depth) if i > 0 or mask_in]
        g = torch.Generator().manual_seed(o["seed"])
        self._n_active: Dict[int, int] = {}  # active entries per task of each masked tensor (flips preserve it)
        for i in self.masked:
            w = self.layers[i].weight
            n = w.numel()
            keep = int(round(density * n))
            self._n_active[i] = keep
            m = torch.zeros(num_tasks, n, dtype=torch.bool)
            for t in range(num_tasks):
                m[t, torch.randperm(n, generator=g)[:keep]] = True
            self.register_buffer(f"mask{i}", m.view(num_tasks, *w.shape))
        self._ema_g: Dict[int, Tensor] = {}
        self._ema_g2: Dict[int, Tensor] = {}
        self._steps = 0
        self.flips = 0
        self.last_k = 0

    def mask(self, i: int) -> Tensor:
        return getattr(self, f"mask{i}")

    # -- forward -----------------------------------------------------------------------------------------------
    def _forward_tasks(self, x: Tensor, t: Tensor) -> Tensor:
        """One task's network (0-d ``t``), or each row's own task's ((B,) ``t``: every task's masked weights, each
        row keeping its own task's output)."""
        oh = task_one_hot(t, self.num_tasks, x.shape[0], x.dtype)
        h = torch.cat([x, oh], dim=-1)
        for i, layer in enumerate(self.layers):
            w = layer.weight
            if i not in self.masked:
                h = F.linear(h, w, layer.bias)
            elif t.dim() == 0:
                h = F.linear(h, w * take(self.mask(i), t).to(w.dtype), layer.bias)
            else:
                h = mixed_linear(h, oh, (w * self.mask(i).to(w.dtype)).transpose(1, 2)) + layer.bias
            h = F.relu(h)
        return self.head(h)

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        out = grouped_by_task(x, task_id, self.out_dim, self._forward_tasks, self._forward_tasks)
        return (out, out.new_zeros(())) if return_aux else out

    # -- harmony mask updates ----------------------------------------------------------------------------------
    def eta(self, u: int) -> int:
        o = self.opt
        u = min(u, o["total_updates"])
        return int(o["eta_max"] + 0.5 * (o["eta_min"] - o["eta_max"]) *
                   (1 + math.cos(2 * math.pi * u / o["total_updates"])))

    def unmasked_task_grads(self, ctx: Dict[str, Any]) -> Dict[int, Tensor]:
        """(T, out, in) gradient of each task's loss w.r.t. the effective weights W ⊙ M_t of each masked layer."""
        prefix = self.own_prefix(ctx["params"])
        base = {n: p.detach() for n, p in ctx["params"].items()}
        weff = {}
        for i in self.masked:
            base[f"{prefix}mask{i}"] = torch.ones_like(self.mask(i))
            weff[f"{prefix}layers.{i}.weight"] = self.layers[i].weight.detach() * self.mask(i).to(
                self.layers[i].weight.dtype)
        loss_fn = ctx["loss_fn"]

        def one(w: Dict[str, Tensor], b: Any, t: Tensor) -> Tensor:
            return loss_fn({**base, **w}, b, t)

        g = vmap(grad(one), in_dims=(0, 0, 0), randomness="different")(weff, ctx["batch"], ctx["task_ids"])
        return {i: g[f"{prefix}layers.{i}.weight"].detach() for i in self.masked}

    @torch.no_grad()
    def update_scores(self, grads: Dict[int, Tensor], ok: Optional[Tensor] = None) -> None:
        """EMA of the gradients and their squares. On the device, a layer's gradient counts only when it is finite
        and the step ran (``ok``, SAC's 0-d flag; a skipped step leaves the EMAs as they were, and one at the very
        start leaves them at 0)."""
        b = self.opt["ema"]
        for i, g in grads.items():
            keep = torch.isfinite(g).all() if ok is None else torch.isfinite(g).all() & ok.to(g.device)
            if i not in self._ema_g:
                self._ema_g[i] = torch.where(keep, g, torch.zeros_like(g))
                self._ema_g2[i] = torch.where(keep, g.pow(2), torch.zeros_like(g))
            else:
                for ema, x in ((self._ema_g[i], g), (self._ema_g2[i], g.pow(2))):
                    ema.copy_(torch.where(keep, (ema * b).add_(x, alpha=1 - b), ema))

    @torch.no_grad()
    def flip(self, k_total: int) -> int:
        """Prune/revive k entries per task (split over tensors by size). Returns the number of flips per task."""
        if k_total <= 0 or not self._ema_g:
            return 0
        sizes = {i: self.mask(i)[0].numel() for i in self.masked}
        n_all = sum(sizes.values())
        done = 0
        for i in self.masked:
            m = self.mask(i)
            T = m.shape[0]
            flat = m.view(T, -1)
            g = self._ema_g[i].view(T, -1)
            fisher = self._ema_g2[i].view(T, -1)
            gbar = g.mean(0, keepdim=True)  # new tensor: no aliasing with any task's row
            harmony = gbar * g
            n_act = self._n_active[i]
            k = min(int(round(k_total * sizes[i] / n_all)), n_act, flat.shape[1] - n_act)
            if k <= 0:
                continue
            prune_score = torch.where(flat, self.opt["gamma"] * harmony + fisher, torch.full_like(g, math.inf))
            revive_score = torch.where(flat, torch.full_like(g, -math.inf), harmony)
            prune = torch.topk(prune_score, k, dim=1, largest=False).indices
            revive = torch.topk(revive_score, k, dim=1, largest=True).indices
            new = flat.scatter(1, prune, False).scatter(1, revive, True)
            m.copy_(new.view_as(m))
            done += k
        self.flips += done
        self.last_k = done
        return done

    def after_step(self, ctx: Dict[str, Any]) -> bool:
        super().after_step(ctx)
        self._steps += 1
        if self._steps % self.opt["score_interval"] == 0 and "loss_fn" in ctx:
            self.update_scores(self.unmasked_task_grads(ctx), ctx.get("ok"))
        if self._steps % self.opt["mask_interval"] == 0:
            return self.flip(self.eta(self._steps)) > 0
        return False

    # -- checkpointing of the host-side state --------------------------------------------------------------------
    def host_state(self) -> Dict[str, Any]:
        """Score EMAs (copies: :meth:`update_scores` updates them in place) under ``str(layer)`` keys, and the
        counters; readable by ``torch.load(weights_only=True)``."""
        return {"ema_g": {str(i): g.detach().clone() for i, g in self._ema_g.items()},
                "ema_g2": {str(i): g.detach().clone() for i, g in self._ema_g2.items()},
                "steps": int(self._steps), "flips": int(self.flips), "last_k": int(self.last_k)}

    def load_host_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`host_state` exactly (copied onto the weights' device: the EMAs are then updated in place).
        A layer that is not masked here, or a shape that differs from its mask, raises ValueError."""
        loaded = []
        for key in ("ema_g", "ema_g2"):
            out: Dict[int, Tensor] = {}
            for k, g in state[key].items():
                i = int(k)
                if i not in self.masked or tuple(g.shape) != tuple(self.mask(i).shape):
                    raise ValueError(f"backbone 'harmony': checkpointed {key}[{k}] does not match this network's "
                                     f"masked layers")
                w = self.layers[i].weight
                out[i] = g.detach().to(device=w.device, dtype=w.dtype, copy=True)
            loaded.append(out)
        if set(loaded[0]) != set(loaded[1]):
            raise ValueError("backbone 'harmony': checkpointed ema_g and ema_g2 cover different layers")
        self._ema_g, self._ema_g2 = loaded
        self._steps = int(state["steps"])
        self.flips = int(state["flips"])
        self.last_k = int(state["last_k"])

    # -- diagnostics -------------------------------------------------------------------------------------------
    def mask_overlap(self) -> Tensor:
        """(T, T) Jaccard overlap |M_s ∧ M_t| / |M_s ∨ M_t| over all masked entries."""
        inter, union = 0.0, 0.0
        for i in self.masked:
            m = self.mask(i).view(self.num_tasks, -1).float()
            inter = inter + m @ m.T
            union = union + (m.sum(1, keepdim=True) + m.sum(1) - m @ m.T)
        return inter / union.clamp_min(1)

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        dens = sum(self.mask(i).view(self.num_tasks, -1).float().sum(1) for i in self.masked) / sum(
            self.mask(i)[0].numel() for i in self.masked)
        ov = self.mask_overlap()
        T = self.num_tasks
        off = (ov.sum() - ov.diagonal().sum()) / max(T * (T - 1), 1)
        return {"mask_density": dens, "mask_overlap": ov, "mask_overlap_mean": off if T > 1 else ov.mean(),
                "mask_flips_total": self.flips, "mask_last_k": self.last_k}
