"""``gss``: Gradient Similarity Surgery (SAM-GS) — Borsani et al., "Gradient Similarity Surgery in Multi-Task
Deep Learning", arXiv 2506.06130 (ECML-PKDD 2025).

Update rule: magnitude similarity of a pair s_ij = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2) (1 = equal norms); per-task
gradient momentum m_i <- b1 m_i + (1 - b1) g_i (elementwise), one scalar v <- b2 v + (1 - b2)(1 - mean s)^2 + 1e-8,
bias-corrected m_hat, v_hat. If the gradients are dissimilar in magnitude (``condition="any"``: some pair has
s_ij < gamma; ``"mean"``: the mean of s over pairs < gamma), equalise magnitudes:
d = mean_i |g_i| sum_i g_i / |g_i|; else d = sum_i g_i * |m_hat_i| / sqrt(v_hat) (elementwise). SUM over tasks.

Reference followed: the authors' Meta-World code ThomBors/samgs ``experiments/mtrl_methods/samgs.py`` (its
settings: b1 = b2 = gamma = 0.9 hard-coded, "any" condition, sum, no clipping). Its yaml lists beta2 = 0.99 (unused
by the code); the supervised version (``methods/weight_methods.py::SAMGS``) uses the "mean" condition, multiplies d
by T and clips the shared gradient norm to 1.0 -- available as ``condition="mean"``, ``scale=T``, ``max_norm=1.0``.
State: the T x P momentum, v, the step count -- one set per optimised loss (one instance each).

Departures from that code as it runs (ours is the paper's rule; the reference's behaviour looks unintended):
(a) its momentum m starts as a 1 x 1 zero that the first call pads with ONES to 1 x P, so m_i starts at (0, 1, 1,
..., 1) for every task (ours: zero), and the first momentum-branch updates weight each coordinate by about
|b1 + (1 - b1) g| instead of |g|; (b) the MTRL agent keeps ONE m, v and step count for every loss it routes through
``_compute_gradient`` -- critic, actor and alpha -- truncating m or padding it with ones whenever the parameter count
changes, so the actor's momentum starts from the critic's first columns, v mixes the similarities of all three losses,
and the bias corrections count all their calls (ours: per loss, ``t`` = this loss's updates); (c) a zero task
gradient makes the reference's similarities (two zeros) and equalised d NaN; ours: similarity 0 with a non-zero
partner, 1 with a zero one, and weight 0 in the equalised d.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .base import JacobianMethod, check_choice, check_float
from .registry import register


@register("gss", "samgs")
class GSS(JacobianMethod):
    name = "gss"
    OPTIONS = {"gamma": 0.9, "beta1": 0.9, "beta2": 0.9, "condition": "any", "scale": 1.0, "max_norm": 0.0}

    def _check_options(self) -> None:
        o = self.options
        check_float(self.name, "gamma", o["gamma"], 0.0, 1.0)
        check_float(self.name, "beta1", o["beta1"], 0.0, 1.0, hi_open=True)
        check_float(self.name, "beta2", o["beta2"], 0.0, 1.0, hi_open=True)
        check_choice(self.name, "condition", o["condition"], ["any", "mean"])
        check_float(self.name, "scale", o["scale"], 0.0, lo_open=True)
        check_float(self.name, "max_norm", o["max_norm"], 0.0)
        self.reset()

    def reset(self) -> None:
        self._m: Optional[Tensor] = None
        self._v = 0.0
        self._t = 0

    def aggregate(self, jacobian: Tensor, gramian: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        o = self.options
        t = jacobian.shape[0]
        self._t += 1
        norms = torch.sqrt(torch.clamp(torch.diagonal(gramian.detach()).to("cpu", torch.float64), min=0.0))
        if t >= 2:
            ni, nj = norms[:, None], norms[None, :]
            den = ni**2 + nj**2
            sim = torch.where(den > 0, 2 * ni * nj / torch.where(den > 0, den, torch.ones_like(den)),
                              torch.ones_like(den))
            iu = torch.triu_indices(t, t, offset=1)
            pairs = sim[iu[0], iu[1]]
            mean_sim = float(pairs.mean())
            dissimilar = bool((pairs < o["gamma"]).any()) if o["condition"] == "any" else mean_sim < o["gamma"]
        else:
            mean_sim, dissimilar = 1.0, False
        b1, b2 = float(o["beta1"]), float(o["beta2"])
        if self._m is None or self._m.shape != jacobian.shape:
            self._m = torch.zeros_like(jacobian)
        self._m = self._m.to(jacobian)
        self._m.mul_(b1).add_(jacobian.detach(), alpha=1 - b1)
        self._v = b2 * self._v + (1 - b2) * (1 - mean_sim) ** 2 + 1e-8
        v_hat = self._v / (1 - b2**self._t)
        info: Dict[str, Any] = {"magnitude_similarity": torch.tensor(mean_sim), "equalised": torch.tensor(dissimilar)}
        if dissimilar:
            w = torch.where(norms > 0, norms.mean() / torch.where(norms > 0, norms, torch.ones_like(norms)),
                            torch.zeros_like(norms))
            from . import engine

            d = engine.combine(w, jacobian)
            info["weights"] = w.to(torch.float32)
        else:
            m_hat = self._m / (1 - b1**self._t)
            d = (jacobian * m_hat.abs()).sum(dim=0) / (v_hat ** 0.5)
        d = d * float(o["scale"])
        if o["max_norm"] > 0:
            n = d.norm()
            if n > o["max_norm"]:
                d = d * (o["max_norm"] / n)
        return d, info

    def state_dict(self) -> Dict[str, Any]:
        return {"m": None if self._m is None else self._m.detach().clone(), "v": float(self._v), "t": self._t}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._m = state.get("m")
        self._v = float(state.get("v", 0.0))
        self._t = int(state.get("t", 0))
