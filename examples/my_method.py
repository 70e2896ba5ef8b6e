"""A method from outside the package: ``python scripts/train.py --suite mt10 --method examples/my_method.py:RLW``.

RLW, random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022). Update rule: each step draws λ ~ N(0, I_T), w = softmax(λ), and back-propagates
Σ_t w_t L_t. A loss-weighting method: it receives the (T,) task losses, no Jacobian (README "Extending").
"""

import torch
from torch import Tensor

from mtrl.gradients import LossWeightingMethod


class RLW(LossWeightingMethod):
    name = "rlw"
    OPTIONS = {"temperature": 1.0}  # softmax temperature of the random logits (1 in the paper)

    def _check_options(self) -> None:
        t = self.options["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ValueError(f"method 'rlw': option temperature={t!r} is invalid; expected a number > 0")

    def combine(self, losses: Tensor):
        # Drawn on the losses' device from the method's generator: no host sync, reproducible per run.
        logits = torch.randn(losses.shape, generator=self.generator, dtype=losses.dtype, device=losses.device)
        w = torch.softmax(logits / self.options["temperature"], dim=0)
        return (w.detach() * losses).sum(), {"weights": w.detach()}
