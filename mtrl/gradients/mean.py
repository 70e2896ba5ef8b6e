"""``mtsac`` (alias ``mean``): the plain average of the task losses — the MT-SAC baseline.

Update rule: g = ∇θ (1/T) Σ_t L_t(θ). One vmapped forward over the task axis, one ordinary backward; no Jacobian.
Reference: Yu et al., "Meta-World" (CoRL 2019), multi-task SAC with a task one-hot and per-task temperature.
Task-specific parameters (``task_specific``) get the same gradient of the mean loss, so the option changes nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

from torch import Tensor

from .base import LossFn, Method, task_losses
from .registry import register


@register("mtsac", "mean")
class MeanMethod(Method):
    name = "mtsac"
    kind = "mean"

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        del task_specific
        losses = task_losses(loss_fn, params, batch, task_ids)
        losses.mean().backward()
        return {"losses": losses.detach()}
