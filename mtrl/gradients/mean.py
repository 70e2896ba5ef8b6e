"""``mtsac`` (alias ``mean``): the plain average of the task losses — the MT-SAC baseline.

Update rule: g = ∇θ (1/T) Σ_t L_t(θ). One vmapped forward over the task axis, one backward (``torch.func.grad``
of the mean, accumulated into ``.grad`` in place: a pure function that ``torch.compile`` traces whole, where
``Tensor.backward()`` would break the graph); no Jacobian.
Reference: Yu et al., "Meta-World" (CoRL 2019), multi-task SAC with a task one-hot and per-task temperature.
Task-specific parameters (``task_specific``) get the same gradient of the mean loss, so the option changes nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Set

from torch import Tensor
from torch.func import grad

from . import engine
from .base import LossFn, Method, task_losses
from .registry import register


@register("mtsac", "mean")
class MeanMethod(Method):
    name = "mtsac"
    kind = "mean"
    compilable = True
    one_graph = True
    graph_safe = True

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        del task_specific
        names = [n for n, p in params.items() if p.requires_grad]
        const = {n: p.detach() for n, p in params.items() if not p.requires_grad}

        def mean_loss(diff: Dict[str, Tensor]):
            losses = task_losses(loss_fn, {**const, **diff}, batch, task_ids)
            return losses.mean(), losses

        grads, losses = grad(mean_loss, has_aux=True)({n: params[n].detach() for n in names})
        engine.accumulate([params[n] for n in names], [grads[n] for n in names], fresh=True)
        return {"losses": losses.detach()}
