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
        if len(self.params) == 1 and self.params[0].shape == self.buffer.shape:
            # One 1-d tensor (log alpha): the buffer itself, not a view, so a compiled graph that reads both the
            # buffer and the .grad sees one input rather than two aliasing ones (see :meth:`separate`).
            self.params[0].grad = self.buffer
            return
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad = self.buffer[i:i + n].view_as(p)
            i += n

    def separate(self) -> None:
        """Give each parameter a ``.grad`` of its own (zeros), for the whole update compiled as one graph:
        AOTAutograd cannot build guards for mutated graph inputs that are views of one buffer (torch 2.13: "sources
        must not be empty for symbol ..."). Inside that graph the traced variants (``traced=True``) work on the
        ``.grad`` list, where Inductor fuses them anyway; the eager path's :meth:`zero` attaches the views again."""
        if len(self.params) == 1 and self.params[0].shape == self.buffer.shape:
            if self.params[0].grad is not self.buffer:
                self.attach()
            return
        if self.intact() or any(p.grad is None for p in self.params):
            for p in self.params:
                p.grad = torch.zeros_like(p)

    def tensors(self) -> List[Tensor]:
        return [p.grad for p in self.params]

    def intact(self) -> bool:
        """Every ``.grad`` is still a view of the buffer (host-side check of storage pointers; no device read)."""
        lo = self.buffer.data_ptr()
        hi = lo + self.buffer.numel() * self.buffer.element_size()
        return all(p.grad is not None and lo <= p.grad.data_ptr() < hi for p in self.params)

    def zero(self, traced: bool = False) -> None:
        """``traced``: inside the one-graph update, on the separate ``.grad`` tensors (:meth:`separate`)."""
        if traced:
            # Per tensor, not torch._foreach_zero_: Inductor has no lowering for that one and calls it as an
            # opaque kernel (plus a copy of each result); zero_ fuses into the graph's kernels.
            for g in self.tensors():
                g.zero_()
            return
        if not self.intact():
            self.attach()
        self.buffer.zero_()

    def norm(self, traced: bool = False) -> Tensor:
        if traced:
            # sqrt of the summed squares rather than torch._foreach_norm, which Inductor leaves to an opaque
            # per-tensor kernel; this fuses into the graph (same value up to float rounding).
            return torch.stack([g.square().sum() for g in self.tensors()]).sum().sqrt()
        return torch.linalg.vector_norm(self.buffer)

    def clip_(self, norm: Tensor, max_norm: float, traced: bool = False) -> None:
        """Scale to at most ``max_norm`` (``nn.utils.clip_grad_norm_``'s rule, coefficient clamped at 1)."""
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if traced:
            torch._foreach_mul_(self.tensors(), coef)
        else:
            self.buffer.mul_(coef)


def guarded_step(opt: torch.optim.Optimizer, ok: Tensor, grads: Optional[FlatGrads] = None,
                 traced: bool = False) -> None:
    """``opt.step()`` that leaves parameters and optimizer state untouched where ``ok`` (0-d bool) is False.

    Fused Adam skips on ``found_inf`` (:func:`fused_adam_step`). Where there is no fused kernel (the ``meta``
    device of the tests) the gradient is zeroed instead, which keeps the parameters finite but still moves
    Adam's moments. ``traced``: :func:`traced_adam_step` (inside one compiled update; the state must exist)."""
    if traced:
        traced_adam_step(opt, ok)
        return
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
    if not plain_adam_ready(opt, params):
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


def plain_adam_ready(opt: torch.optim.Optimizer, params: Optional[List[Tensor]] = None) -> bool:
    """One parameter group of plain Adam (no amsgrad, maximize or decoupled decay) whose parameters (default: those
    with a ``.grad``) all have state already and share one device and dtype: what :func:`fused_adam_step` and
    :func:`traced_adam_step` handle without ``opt.step()``."""
    g = opt.param_groups[0]
    if params is None:
        params = [p for p in g["params"] if p.grad is not None]
    return (len(opt.param_groups) == 1 and not (g["amsgrad"] or g["maximize"] or g.get("decoupled_weight_decay"))
            and all(opt.state.get(p) for p in params) and len({(p.device, p.dtype) for p in params}) == 1)


def traced_adam_step(opt: torch.optim.Optimizer, ok: Tensor) -> None:
    """Adam's step (Kingma & Ba 2015, Algorithm 1, with PyTorch's placement of eps) in plain tensor ops, so that
    ``torch.compile`` traces it into the same graph as the gradients (the fused kernel cannot be traced). It works
    on the optimizer's own state tensors (``exp_avg``, ``exp_avg_sq``, ``step``), so checkpoints and the eager
    fused path see the same state; where ``ok`` (0-d bool) is False, parameters, moments and the step counter stay
    exactly as they were, as with fused Adam's ``found_inf``. Needs :func:`plain_adam_ready` (the state exists).

    Per tensor: m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2; s <- s + 1;
    p <- p - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)   (g += wd * p first with weight decay)."""
    g = opt.param_groups[0]
    beta1, beta2 = (float(b) for b in g["betas"])
    lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
    with torch.no_grad():
        for p in g["params"]:
            if p.grad is None:
                continue
            st = opt.state[p]
            # A skipped step must leave everything bit-identical: select old values rather than scale by ok, since
            # a non-finite gradient times 0 is still NaN.
            grad = torch.where(ok, p.grad, torch.zeros_like(p.grad))
            if wd:
                grad = grad.add(p, alpha=wd)
            step = st["step"] + 1
            avg = st["exp_avg"].lerp(grad, 1 - beta1)
            sq = st["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (sq.sqrt() / (1 - torch.pow(beta2, step)).sqrt()).add_(eps)
            new = p - (lr / (1 - torch.pow(beta1, step))) * avg / denom
            p.copy_(torch.where(ok, new, p))
            st["exp_avg"].copy_(torch.where(ok, avg, st["exp_avg"]))
            st["exp_avg_sq"].copy_(torch.where(ok, sq, st["exp_avg_sq"]))
            st["step"].add_(ok.to(st["step"].dtype))


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

