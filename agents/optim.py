"""What an optimizer step needs to stay on the device: one flat gradient buffer per network, Adam that skips a
non-finite step on the device, and a monitor that the training loop reads every ``log_every`` updates.

Why: the learner is bound by framework overhead and host synchronisations, not arithmetic (issue 11). A check
like ``bool(torch.isfinite(loss).all())`` before each step stalls a GPU until the step's kernels have run; the
same check kept as a device flag costs nothing, and PyTorch's fused Adam reads it (``found_inf``: the step, its
moments and its step counter are left exactly as they were) — the mechanism ``torch.amp.GradScaler`` uses.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

FUSED_DEVICES = ("cpu", "cuda")  # fused Adam kernels exist there; elsewhere (meta in the tests) foreach Adam


def adam(params: Iterable[Tensor], lr: float, device: torch.device, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused where the device has the kernel (one kernel for all tensors; reads ``found_inf``)."""
    params = list(params)
    if device.type in FUSED_DEVICES:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


class FlatGrads:
    """One zeroed buffer holding every ``.grad`` of ``module`` (each a view of it, in parameter order).

    Zeroing, the norm, clipping and the finiteness test are then one op each instead of one per tensor; autograd
    and the gradient engine accumulate into the views in place (they never replace an existing ``.grad``). Call
    :meth:`attach` again if something set a ``.grad`` to None (``optimizer.zero_grad(set_to_none=True)``)."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params: List[Tensor] = [p for p in params if p.requires_grad]
        ref = self.params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=ref.dtype, device=ref.device)
        self.attach()

    def attach(self) -> None:
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad = self.buffer[i:i + n].view_as(p)
            i += n

    def intact(self) -> bool:
        """Every ``.grad`` is still a view of the buffer (host-side check of storage pointers; no device read)."""
        lo = self.buffer.data_ptr()
        hi = lo + self.buffer.numel() * self.buffer.element_size()
        return all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in self.params)

    def zero(self) -> None:
        if not self.intact():
            self.attach()
        self.buffer.zero_()

    def norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.buffer)

    def clip_(self, norm: Tensor, max_norm: float) -> None:
        """Scale to at most ``max_norm`` (``nn.utils.clip_grad_norm_``'s rule, coefficient clamped at 1)."""
        self.buffer.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def guarded_step(opt: torch.optim.Optimizer, ok: Tensor, grads: Optional[FlatGrads] = None) -> None:
    """``opt.step()`` that leaves parameters and optimizer state untouched where ``ok`` (0-d bool) is False.

    Fused Adam skips on ``found_inf`` (:func:`fused_adam_step`). Where there is no fused kernel (the ``meta``
    device of the tests) the gradient is zeroed instead, which keeps the parameters finite but still moves
    Adam's moments."""
    if opt.defaults.get("fused"):
        fused_adam_step(opt, (~ok).to(torch.float32))
        return
    if grads is not None:
        grads.buffer.copy_(torch.where(ok, grads.buffer, torch.zeros_like(grads.buffer)))
    opt.step()


def fused_adam_step(opt: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """What ``torch.optim.Adam(fused=True).step()`` does for one device and dtype — step counts + 1, the fused
    kernel (skipping where ``found_inf``), step counts − found_inf — without its Python (hooks, profiler ranges,
    per-call grouping of the tensors: ~0.4 ms a call, more than the kernel at MT-SAC sizes). The first step, and
    any step whose parameters lack state (a fresh or reset optimizer), go through ``opt.step()`` itself."""
    g = opt.param_groups[0]
    params = [p for p in g["params"] if p.grad is not None]
    simple = (len(opt.param_groups) == 1 and not (g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay"))
              and all(opt.state.get(p) for p in params) and len({(p.device, p.dtype) for p in params}) == 1)
    if not simple:
        opt.found_inf = found_inf
        opt.step()
        return
    states = [opt.state[p] for p in params]
    grads = [p.grad for p in params]
    avgs, sqs, steps = ([st[k] for st in states] for k in ("exp_avg", "exp_avg_sq", "step"))
    beta1, beta2 = g["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=g["lr"], beta1=float(beta1),
                       beta2=float(beta2), weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                       grad_scale=None, found_inf=found_inf)
    torch._foreach_sub_(steps, [found_inf] * len(steps))


class NonFiniteMonitor:
    """Device-side record of non-finite losses and gradients, read on the host only by :meth:`collect`.

    For each optimised loss (critic, actor, alpha): how many steps were skipped and which tasks had a non-finite
    loss at any of them (none: the combined gradient was non-finite with finite losses)."""

    def __init__(self) -> None:
        self._state: Dict[str, Tuple[Tensor, Tensor]] = {}

    def record(self, name: str, losses: Tensor, grad_ok: Optional[Tensor] = None) -> Tensor:
        """Note one step's per-task ``losses`` (T,) and gradient finiteness; return ``ok`` (0-d bool)."""
        finite = torch.isfinite(losses.detach())
        ok = finite.all() if grad_ok is None else finite.all() & grad_ok
        if name not in self._state:
            self._state[name] = (torch.zeros((), dtype=torch.int64, device=losses.device),
                                 torch.zeros(losses.shape, dtype=torch.bool, device=losses.device))
        count, tasks = self._state[name]
        count.add_((~ok).to(torch.int64))
        tasks.logical_or_(~finite)
        return ok

    def collect(self) -> List[Tuple[str, Optional[int], int]]:
        """[(loss name, first bad task index or None for the combined gradient, skipped steps)] since the last
        call, then reset. One host read per loss: call it every ``log_every`` updates, not per step."""
        out = []
        for name, (count, tasks) in self._state.items():
            n = int(count)
            if n:
                bad = torch.nonzero(tasks.cpu()).flatten().tolist()
                out.append((name, bad[0] if bad else None, n))
                count.zero_()
                tasks.zero_()
        return out

