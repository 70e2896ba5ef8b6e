"""``gcond``: Gradient Conductor — Limarenko et al., "GCond: Gradient Conflict Resolution via Accumulation-based
Stabilization for Large-Scale Multi-Task Learning", arXiv 2509.07252 (2025).

Update rule (per update): (1) the per-task gradients are ACCUMULATED over the whole batch before any conflict
is resolved (the paper's stabilisation: conflicts are judged on low-noise, accumulated gradients); (2) up to
``projection_max_iters`` (default 2T) rounds: take the pair (i, j) with the lowest cosine; stop if it is >= the weak
threshold (0); an arbitrator picks winner/loser -- a task that won the last ``dominance_window`` rounds loses, else
the larger score 0.8 max(0, cos(g, g_prev)) + 0.2 (|g| / EMA|g|, normalised over the pair) wins; the cosine is mapped
to an angle a in [0, pi] through the thresholds (-0.8, -0.5, 0) with ``remap_power`` 2; then simultaneously
g_w -= sin(a) (g_w.g_l / |g_l|^2) g_l and g_l -= sin(min(a, pi/2)) (g_w.g_l / |g_w|^2) g_w (a critical conflict
fully projects the loser, leaves the winner); (3) d_raw = sum_i g_i in the reference, here mean_i g_i (as our
``pcgrad``: identical rows give that row, like ``mtsac``); GCond's own momentum
m <- beta m + (1 - beta) d_raw, bias-corrected, is written to ``.grad`` (``momentum_beta`` 0 writes d_raw).

Reference followed: official AlevLab-dev/GCond ``grad_conductor.py::GradientConductor`` (smooth logic, the code's
defaults: thresholds (-0.8, -0.5, 0), momentum 0.85, norm EMA 0.95, tie-breaking (0.8, 0.2), dominance window 3).
Implemented on the Gramian: every g_i' is kept as coefficients on the original rows of J (as torchjd's GradVac),
dot products come from G, and the stability term needs the cross products with the previous step's projected
gradients P_prev = C_prev J_prev (state: J_prev, T x P floats, with C_prev and its Gramian). Departures:
(a) accumulation is the engine's full-batch per-task gradient (equal to the reference's "classic" accumulation of
micro-batch gradients of that batch); the "stochastic accumulation" mode (each loss sees acc/T micro-batches) and
bf16 accumulators are not reproduced;
(b) the mean of the resolved gradients instead of their sum (task-specific parameters: the mean-loss gradient);
(c) the reference's absolute eps = 1e-8 in norms and denominators is made relative to the mean squared gradient norm
(an absolute 1e-8 switches the surgery off for RL gradients with norms below 1e-4); (d) no Lion/LARS option, no DDP
sync; (e) the official README advises optimizer beta1 = 0 since GCond has its own momentum -- the optimiser is the
runner's choice.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import engine
from .base import JacobianMethod, bad_option, check_float, check_int
from .registry import register


@register("gcond")
class GCond(JacobianMethod):
    name = "gcond"
    OPTIONS = {
        "momentum_beta": 0.85,
        "conflict_thresholds": [-0.8, -0.5, 0.0],
        "remap_power": 2.0,
        "norm_ema_beta": 0.95,
        "tie_breaking_weights": [0.8, 0.2],
        "dominance_window": 3,
        "projection_max_iters": None,
        "norm_cap": None,
        "eps": 1e-8,
    }

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "momentum_beta", o["momentum_beta"], 0.0, 1.0, hi_open=True)
        th = o["conflict_thresholds"]
        if (not isinstance(th, (list, tuple)) or len(th) != 3
                or not all(isinstance(v, (int, float)) and -1.0 <= v <= 1.0 for v in th)
                or not th[0] <= th[1] <= th[2]):
            raise bad_option(self.name, "conflict_thresholds", th, "3 cosines in [-1, 1], critical <= main <= weak")
        check_float(self.name, "remap_power", o["remap_power"], 0.0, lo_open=True)
        check_float(self.name, "norm_ema_beta", o["norm_ema_beta"], 0.0, 1.0, hi_open=True)
        tb = o["tie_breaking_weights"]
        if (not isinstance(tb, (list, tuple)) or len(tb) != 2 or not all(isinstance(v, (int, float)) and v >= 0
                                                                        for v in tb) or sum(tb) <= 0):
            raise bad_option(self.name, "tie_breaking_weights", tb, "2 non-negative numbers with a positive sum")
        check_int(self.name, "dominance_window", o["dominance_window"], 0)
        if o["projection_max_iters"] is not None:
            check_int(self.name, "projection_max_iters", o["projection_max_iters"], 1)
        if o["norm_cap"] is not None:
            check_float(self.name, "norm_cap", o["norm_cap"], 0.0, lo_open=True)
        check_float(self.name, "eps", o["eps"], 0.0)
        self.reset()

    def reset(self) -> None:
        self._norm_ema = [1.0] * self.num_tasks
        self._prev: Optional[Tensor] = None  # the previous Jacobian
        self._prev_coef: Optional[Tensor] = None  # its projection coefficients
        self._prev_gram: Optional[Tensor] = None  # its Gramian
        self._history: Deque[int] = deque(maxlen=self.options["dominance_window"])
        self._momentum: Optional[Tensor] = None
        self._step = 0

    # ---- the smooth remapping of a cosine to an "effective conflict angle"
    def _angle(self, cos: float) -> float:
        crit, main, weak = self.options["conflict_thresholds"]
        eps = 1e-8
        c = min(1.0, max(-1.0, cos))
        if c >= main:
            t = min(1.0, max(0.0, (c - main) / (weak - main + eps)))
            return math.pi / 2 * (1.0 - t)
        if c > crit:
            t = (c - main) / (crit - main + eps)
            return math.pi / 2 + math.pi / 2 * t ** float(self.options["remap_power"])
        return math.pi

    def aggregate(self, jacobian: Tensor, gramian: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        o = self.options
        t = jacobian.shape[0]
        g = gramian.detach().to("cpu", torch.float64).numpy()
        raw_sq = np.clip(np.diag(g), 0.0, None)
        eps = float(o["eps"]) * max(float(raw_sq.mean()), 1e-300)  # relative eps (departure (b))
        raw = np.sqrt(raw_sq)
        b_n = float(o["norm_ema_beta"])
        self._norm_ema = [max(b_n * e + (1 - b_n) * float(r), float(o["eps"])) for e, r in zip(self._norm_ema, raw)]
        coef = np.eye(t)
        if o["norm_cap"] is not None:
            cap = float(o["norm_cap"])
            for i in range(t):
                if raw[i] > cap:
                    coef[i] *= cap / (raw[i] + eps)
        # cross[k, i] = g_k . prev_i (stability), prev_sq[i] = |prev_i|^2
        # (the previous projected gradients are P_prev = C_prev J_prev: keep J_prev and C_prev, not their product)
        if self._prev is not None and self._prev.shape == jacobian.shape:
            prev_j = self._prev.to(jacobian.device, jacobian.dtype)
            prev_c = self._prev_coef.to("cpu", torch.float64).numpy()
            with engine.full_precision():
                raw_cross = (jacobian @ prev_j.T).detach().to("cpu", torch.float64).numpy()
            cross = raw_cross @ prev_c.T
            prev_sq = np.clip(np.diag(prev_c @ self._prev_gram.to(torch.float64).numpy() @ prev_c.T), 0.0, None)
        else:
            cross, prev_sq = np.zeros((t, t)), np.zeros(t)
        weak = float(o["conflict_thresholds"][2])
        w_stab, w_str = (float(v) for v in o["tie_breaking_weights"])
        window = int(o["dominance_window"])
        iters, min_cos0 = 0, 1.0
        for it in range(o["projection_max_iters"] or 2 * t):
            m = coef @ g @ coef.T
            nsq = np.clip(np.diag(m), 0.0, None)
            # the pair i < j with the lowest cosine (first in row-major order on ties, as the reference's loops)
            cos_m = m / (np.sqrt(np.outer(nsq, nsq)) + eps)
            ok = np.triu(np.ones((t, t), dtype=bool), k=1) & (nsq >= eps)[:, None] & (nsq >= eps)[None, :]
            cos_m = np.where(ok, cos_m, np.inf)
            flat = int(np.argmin(cos_m))
            best = float(cos_m.flat[flat])
            if not best < weak:
                break
            pair = divmod(flat, t)
            if it == 0:
                min_cos0 = best
            iters = it + 1
            i, j = pair
            winner, loser = self._arbitrate(i, j, coef, nsq, cross, prev_sq, eps, w_stab, w_str, window)
            if window > 0:
                self._history.append(winner)
            a = self._angle(best)
            s_w, s_l = math.sin(a), math.sin(min(a, math.pi / 2))
            dot = m[i, j]
            a_w = -s_w * dot / (nsq[loser] + eps)
            a_l = -s_l * dot / (nsq[winner] + eps)
            cw, cl = coef[winner].copy(), coef[loser].copy()
            coef[winner] = cw + a_w * cl
            coef[loser] = cl + a_l * cw
        w = coef.sum(axis=0) / t
        d_raw = engine.combine(torch.from_numpy(w), jacobian)
        self._prev = jacobian.detach().clone()
        self._prev_coef = torch.from_numpy(coef.copy())
        self._prev_gram = torch.from_numpy(g.copy())
        beta = float(o["momentum_beta"])
        self._step += 1
        if beta > 0:
            if self._momentum is None or self._momentum.shape != d_raw.shape:
                self._momentum = torch.zeros_like(d_raw)
            self._momentum = self._momentum.to(d_raw)
            self._momentum.mul_(beta).add_(d_raw, alpha=1 - beta)
            out = self._momentum / (1 - beta ** self._step)
        else:
            out = d_raw
        info = {"weights": torch.from_numpy(w).to(torch.float32), "projection_iters": torch.tensor(iters),
                "min_cosine": torch.tensor(float(min(min_cos0, 1.0)))}
        return out, info

    def _arbitrate(self, i: int, j: int, coef: np.ndarray, nsq: np.ndarray, cross: np.ndarray,
                   prev_sq: np.ndarray, eps: float, w_stab: float, w_str: float, window: int) -> Tuple[int, int]:
        h = self._history
        if window > 0 and len(h) == window:
            i_dom, j_dom = h.count(i) == window, h.count(j) == window
            if i_dom and not j_dom:
                return j, i
            if j_dom and not i_dom:
                return i, j
        n_i, n_j = math.sqrt(nsq[i]), math.sqrt(nsq[j])
        stab_i = float(coef[i] @ cross[:, i]) / (n_i * math.sqrt(prev_sq[i]) + eps)
        stab_j = float(coef[j] @ cross[:, j]) / (n_j * math.sqrt(prev_sq[j]) + eps)
        sc_i, sc_j = n_i / (self._norm_ema[i] + 1e-8), n_j / (self._norm_ema[j] + 1e-8)
        tot = sc_i + sc_j + 1e-8
        score_i = w_stab * max(stab_i, 0.0) + w_str * sc_i / tot
        score_j = w_stab * max(stab_j, 0.0) + w_str * sc_j / tot
        return (j, i) if score_j > score_i else (i, j)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "norm_ema": list(self._norm_ema),
            "prev": None if self._prev is None else self._prev.detach().clone(),
            "prev_coef": None if self._prev_coef is None else self._prev_coef.clone(),
            "prev_gram": None if self._prev_gram is None else self._prev_gram.clone(),
            "history": list(self._history),
            "momentum": None if self._momentum is None else self._momentum.detach().clone(),
            "step": self._step,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reset()
        self._norm_ema = [float(v) for v in state.get("norm_ema", self._norm_ema)]
        self._prev = state.get("prev")
        self._prev_coef = state.get("prev_coef")
        self._prev_gram = state.get("prev_gram")
        self._history.extend(int(v) for v in state.get("history", []))
        self._momentum = state.get("momentum")
        self._step = int(state.get("step", 0))
