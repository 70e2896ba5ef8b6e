"""Shared pieces of the issue-4 backbones (moe, t2mir, harmony, softmod, care, moore, paco).

* :func:`parse_options` — validated keyword options (ValueError with one line, never TypeError);
* :func:`task_one_hot` — vmap-safe one-hot (``task_id`` is (B,) outside vmap, 0-d inside the task-batched vmap);
* :class:`Backbone` — base class: records the inputs of the last update in ``after_step`` so that
  ``diagnostics()`` can run without arguments, and finds the backbone's own parameter names in ``ctx["params"]``;
* :func:`grouped_by_task` — a per-task function on a mixed (B,) batch: each task's rows on the host CPU, a dense
  sync-free form on any other device;
* :func:`mixed_linear` — Σ_j c[b, j] · (h[b] @ W_j) as one matrix product (per-row mixtures of weight banks);
* :func:`topk_renorm` — top-k of a probability vector, renormalised, scattered back to a dense (…, E) weight.

Device rules (``shared/reference/fast_learner.md``, tested on ``meta`` by tests/test_device_backbones.py): every
tensor is created on its inputs' device; ``forward``, ``after_step`` and ``diagnostics`` never read a tensor's value
on the host (no ``.item()``/``.tolist()``/``bool(t)``/numpy); host-side decisions use host-side schedule and
configuration only. ``host_state``/``load_host_state`` (checkpoint time) may read values.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn


def parse_options(name: str, given: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown option(s) {unknown}; valid: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    out.update(given)
    return out


def check_int(name: str, key: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < lo:
        raise ValueError(f"backbone {name!r}: option {key}={value!r} must be an integer >= {lo}")
    return int(value)


def check_float(name: str, key: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= float(value) <= hi):
        raise ValueError(f"backbone {name!r}: option {key}={value!r} must be a number in [{lo}, {hi}]")
    return float(value)


def check_bool(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"backbone {name!r}: option {key}={value!r} must be true or false")
    return value


def task_one_hot(task_id: Tensor, num_tasks: int, batch: int, dtype: torch.dtype) -> Tensor:
    """(B, T) one-hot without F.one_hot (a comparison is vmap-safe for a batched 0-d ``task_id``)."""
    ar = torch.arange(num_tasks, device=task_id.device)
    oh = (ar == task_id.long().unsqueeze(-1)).to(dtype)
    return oh.expand(batch, num_tasks) if oh.dim() == 1 else oh


def take(table: Tensor, task_id: Tensor) -> Tensor:
    """``table[task_id]`` in a vmap-safe form: (…) for a 0-d id, (B, …) for (B,) ids."""
    out = table.index_select(0, task_id.long().reshape(-1))
    return out.squeeze(0) if task_id.dim() == 0 else out


def topk_renorm(probs: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(dense weights (…, E) with k non-zeros summing to 1, top-k indices (…, k))."""
    val, idx = torch.topk(probs, k, dim=-1)
    val = val / val.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.zeros_like(probs).scatter(-1, idx, val), idx


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def cv_squared(x: Tensor) -> Tensor:
    """Var(x) / mean(x)^2 (Shazeer et al. 2017); 0 for a single expert."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean().pow(2) + 1e-10)


def grouped_by_task(x: Tensor, task_id: Tensor, out_dim: int, fn: Callable[[Tensor, Tensor], Tensor],
                    dense: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A per-task network on a batch. Inside the task-batched vmap ``task_id`` is 0-d: ``fn(x, task_id)``. For (B,)
    ids outside vmap (acting, target computation): on the host CPU, ``fn(x_t, t)`` on each task's rows, reassembled
    in batch order (reading the ids costs nothing there, and each task's rows only see their own weights); on any
    other device ``dense(x, task_id)``, which must compute every row's own task's output without reading the ids
    on the host (e.g. with :func:`mixed_linear`; more FLOPs, no synchronisation). Inside ``torch.compile`` the
    dense form too, on any device: the per-task split's sizes are data-dependent, which breaks one graph."""
    if task_id.dim() == 0:
        return fn(x, task_id)
    if task_id.device.type != "cpu" or torch.compiler.is_compiling():
        return dense(x, task_id)
    out = x.new_zeros(x.shape[0], out_dim)
    for t in torch.unique(task_id).tolist():
        idx = (task_id == t).nonzero().squeeze(-1)
        y = fn(x.index_select(0, idx), torch.tensor(t, device=task_id.device))
        out = out.index_copy(0, idx, y.to(out.dtype))
    return out


def mixed_linear(h: Tensor, coef: Tensor, w: Tensor) -> Tensor:
    """Σ_j coef[b, j] · (h[b] @ w[j]) for h (B, in), coef (B, J), w (J, in, out): one (B, J·in) @ (J·in, out)
    product, sync-free for any per-row mixture (a one-hot ``coef`` picks each row's own weight)."""
    B, J = coef.shape
    return (coef.unsqueeze(-1) * h.unsqueeze(1)).reshape(B, J * h.shape[-1]) @ w.reshape(J * w.shape[1], w.shape[2])


def backbone_inputs(ctx: Dict[str, Any], in_dim: int) -> Optional[Tuple[Tensor, Tensor]]:
    """The backbone's (x (T*B, in_dim), task ids (T*B,)) for the batch of an SAC update: the actor sees ``obs``,
    the critics ``[obs, action]``. None when the batch does not have that form."""
    b = ctx.get("batch") or {}
    obs = b.get("obs") if isinstance(b, dict) else None
    if obs is None or obs.dim() != 3:
        return None
    x = obs
    if obs.shape[-1] != in_dim and "action" in b and obs.shape[-1] + b["action"].shape[-1] == in_dim:
        x = torch.cat([obs, b["action"]], dim=-1)
    if x.shape[-1] != in_dim:
        return None
    T, B = x.shape[:2]
    ids = ctx["task_ids"] if "task_ids" in ctx else torch.arange(T, device=x.device)
    return x.reshape(T * B, in_dim).detach(), ids.repeat_interleave(B)


class Backbone(nn.Module):
    """Base class of the issue-4 backbones. Subclasses implement ``forward(x, task_id, return_aux=False)`` and
    ``_diagnostics(x, task_id) -> dict``; ``after_step`` (called by SAC after each optimizer step) records the
    update's inputs (at most ``diag_rows`` rows per task, references only) for :meth:`diagnostics`."""

    has_aux_loss = False
    diag_rows = 64
    # Attributes holding {key: Tensor} state outside parameters and buffers (moe's snapshot bank, harmony's score
    # EMAs): they follow ``.to()``/``.cuda()``/dtype casts like buffers.
    tensor_dicts: Tuple[str, ...] = ()

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_tasks = in_dim, out_dim, num_tasks
        self._last: Optional[Tuple[Tensor, Tensor]] = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for name in self.tensor_dicts:
            setattr(self, name, {k: fn(v) for k, v in getattr(self, name).items()})
        return out

    # -- hooks -------------------------------------------------------------------------------------------------
    def after_step(self, ctx: Dict[str, Any]) -> bool:
        """Returns True when buffers changed (SAC then copies the critic's buffers into its target)."""
        self._record(ctx)
        return False

    def _record(self, ctx: Dict[str, Any]) -> None:
        got = backbone_inputs(ctx, self.in_dim)
        if got is not None:
            x, ids = got
            T = int(ctx["task_ids"].shape[0]) if "task_ids" in ctx else 1
            B = x.shape[0] // max(T, 1)
            keep = min(B, self.diag_rows)
            self._last = (x.view(T, B, -1)[:, :keep].reshape(T * keep, -1), ids.view(T, B)[:, :keep].reshape(-1))

    def own_prefix(self, params: Dict[str, Tensor]) -> str:
        """The prefix (e.g. ``"q1."``) under which this module's parameters appear in ``ctx["params"]``."""
        name0, p0 = next(iter(self.named_parameters()))
        for n, p in params.items():
            if p is p0:
                return n[: len(n) - len(name0)]
        raise KeyError("this backbone's parameters are not in ctx['params']")

    # -- diagnostics -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def diagnostics(self, x: Optional[Tensor] = None, task_id: Optional[Tensor] = None) -> Dict[str, Any]:
        """Diagnostics on (x, task_id) or, when not given, on the inputs recorded at the last ``after_step``.
        Values are detached tensors on the module's device (0-d or n-d; per-task ones have length T on their first
        axis), computed without a host sync, or plain Python numbers for host-side counters. The logger converts
        (``v.detach().cpu().numpy()``) when it writes."""
        if x is None:
            if self._last is None:
                return {}
            x, task_id = self._last
        assert task_id is not None
        was = self.training
        self.eval()
        try:
            out = self._diagnostics(x, task_id.long())
        finally:
            self.train(was)
        return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in out.items()}

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        return {}

    def per_task_mean(self, values: Tensor, task_id: Tensor) -> Tensor:
        """(T,) mean of a per-row value over each task's rows (NaN for absent tasks)."""
        oh = task_one_hot(task_id, self.num_tasks, task_id.shape[0], values.dtype)
        cnt = oh.sum(0)
        return (oh.T @ values) / cnt.clamp_min(1) + torch.where(cnt > 0, 0.0, float("nan"))


def linear_init(w: Tensor, b: Optional[Tensor], fan_in: int) -> None:
    """PyTorch's default nn.Linear init for a (…, out, in) weight bank."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        w.uniform_(-bound, bound)
        if b is not None:
            b.uniform_(-bound, bound)


def dormant_ratio(acts: list, tau: float = 0.025) -> Tensor:
    """DrM/MENTOR dormant ratio: fraction of units whose mean |activation| < tau × the layer's mean (a 0-d float
    tensor on the activations' device; the unit count is known from the shapes)."""
    counts = [(s < tau * s.mean()).sum() for s in (a.abs().reshape(-1, a.shape[-1]).mean(0) for a in acts)]
    total = sum(a.shape[-1] for a in acts)
    return torch.stack(counts).sum().float() / max(total, 1)
