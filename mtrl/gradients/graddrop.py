"""``graddrop``: Gradient Sign Dropout — Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020.

Update rule (Algorithm 1, lines 10-15), per coordinate k: purity P_k = 1/2 (1 + sum_i g_ik / sum_i |g_ik|); draw
U_k ~ U(0, 1); keep task i's coordinate if (P_k > U_k and g_ik > 0) or (P_k < U_k and g_ik < 0), with a ``leak``
l_i letting a fraction through: d_k = sum_i (l_i + (1 - l_i) M_ik) g_ik in the paper and torchjd; here divided by
T (the MEAN of the kept gradients, as our ``pcgrad``: identical rows give that row, like ``mtsac``). Randomised.

Reference followed: torchjd 0.18 ``GradDrop`` (f = identity; LibMTL default leak 0), vectorised over the task axis
here (torchjd loops over the rows with full-length temporaries: 8x the MT-SAC update at T = 50); same random draw
(one ``torch.rand(P)``), same result (tested against torchjd). Departure from the paper: the paper applies
GradDrop to the gradients at a shared activation layer (summed over the batch); like torchjd, we apply it to the
parameter gradients of the shared network (the engine's Jacobian), since MTRL critics have no separate encoder;
and the mean instead of the sum. Task-specific parameters get the mean-loss gradient: a coordinate only one task
touches is always kept (purity 0 or 1), so that is what the rule applied to them would give.
Not linear, not non-conflicting (JD paper Table 1). The thresholds U come from the method's generator
(``set_generator``; None: the global RNG), drawn on J's device; no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from . import engine
from .base import JacobianMethod, bad_option
from .registry import register


@register("graddrop")
class GradDrop(JacobianMethod):
    name = "graddrop"
    OPTIONS = {"leak": 0.0}

    def _check_options(self) -> None:
        leak = self.options["leak"]
        vals = leak if isinstance(leak, (list, tuple)) else [leak]
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in vals)
        if not ok or (isinstance(leak, (list, tuple)) and len(leak) != self.num_tasks):
            raise bad_option(self.name, "leak", leak, f"a number in [0, 1] or a list of {self.num_tasks} of them")
        self._leak = [float(v) for v in vals] * (1 if isinstance(leak, (list, tuple)) else self.num_tasks)

    def _leak_on(self, j: Tensor) -> Tensor:
        """The leak vector on J's device (built once per device/dtype: no host-to-device copy per update)."""
        cached = getattr(self, "_leak_t", None)
        if cached is None or cached.device != j.device or cached.dtype != j.dtype:
            cached = self._leak_t = torch.tensor(self._leak, dtype=j.dtype).to(j.device)
        return cached

    def aggregate(self, jacobian: Tensor, gramian: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        j = jacobian
        if j.shape[1] == 0:
            return torch.zeros(0, dtype=j.dtype, device=j.device), {}
        # sum_i (l_i + (1 - l_i) M_ik) g_ik with M_ik = [P_k > U_k][g_ik > 0] + [P_k < U_k][g_ik < 0]
        # = l^T J + where(P > U, (1 - l)^T J+, where(P < U, (1 - l)^T J-, 0)): two passes over J.
        leak = self._leak_on(j)
        pos = j.clamp(min=0)
        neg = j - pos
        ones = torch.ones_like(leak)
        with engine.full_precision():
            p_sum, n_sum = ones @ pos, ones @ neg
            kept_pos, kept_neg = (1 - leak) @ pos, (1 - leak) @ neg
            leaked = leak @ j
        purity = 0.5 * (1.0 + (p_sum + n_sum) / (p_sum - n_sum))  # nan where every task's coordinate is 0
        u = torch.rand(purity.shape, dtype=j.dtype, device=j.device, generator=self.generator)
        zero = torch.zeros((), dtype=j.dtype, device=j.device)
        kept = torch.where(purity > u, kept_pos, torch.where(purity < u, kept_neg, zero))
        return (leaked + kept) / j.shape[0], {}
