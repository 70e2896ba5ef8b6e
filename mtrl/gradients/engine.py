"""Task-batched Jacobian engine: per-task gradients in ONE vmapped pass, the Gramian, and write-back into ``.grad``.

Each task's loss depends only on its own slice of the (T, B, ...) batch, so

    torch.func.vmap(torch.func.grad_and_value(loss_fn), in_dims=(None, 0, 0))(params, batch, task_ids)

returns all T gradients (and losses) at about the cost of one ordinary backward (design.md §4). The shared
parameters' gradients are flattened into the rows of J (T x P); task-specific parameters (``task_specific``: a set
of names) keep their per-task gradients apart; they get the gradient of the loss the method combines: ``sum_i w_i
L_i`` for a weighting (Gramian) method (``task_specific_combined``), else of the MEAN task loss (sum of per-task
grads / T), which is what autograd of ``losses.mean()`` gives.

Memory: the per-task gradients are T*P floats (plus activations); past ``memory_budget`` bytes (default 1 GiB) the
task axis is processed in chunks, each copied into per-parameter (T, ...) buffers. Gramian methods never form the
concatenated T x P matrix: G = sum_p B_p B_p^T over the per-parameter blocks B_p, and the combined gradient
w^T B_p is written straight into each ``.grad`` (``write_combined``); ``JacobianResult.jacobian`` concatenates the
blocks only when a Jacobian method asks for J.

Numerics: the Gramian and the combination ``w^T J`` are computed at full float32 precision (TF32 matmuls are
switched off for them): the Gramian's entries are then accurate relative to ``|g_i| |g_j|``, so cosines between
task gradients are right even when their norms differ by 1e6.

Host synchronisation: none. Nothing here reads a tensor's value on the host; existing ``.grad`` tensors are added
to in place (no clone).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils import _pytree as pytree

from .base import LossFn

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-task gradients held by one vmapped call


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Float32 matmuls at full precision (no TF32 / bf16 shortcuts) inside the block. Inside a compiled graph the
    setting cannot be switched (Dynamo cannot trace it): the graph keeps the one in force when it was compiled
    (PyTorch's default is "highest")."""
    if torch.compiler.is_compiling():
        yield
        return
    prev = torch.get_float32_matmul_precision()
    if prev != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if prev != "highest":
            torch.set_float32_matmul_precision(prev)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch CPU thread inside the block: for the tiny T x T problems, where the thread pool's start-up and
    contention cost 100x the work (a 50 x 50 pinv: 0.5 ms on one thread, ~100 ms on two busy cores)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def split_parameters(params: Dict[str, Tensor], task_specific: Optional[Set[str]] = None
                     ) -> Tuple[List[str], List[str]]:
    """(shared names, task-specific names) among the trainable tensors of ``params``, in ``params`` order."""
    ts = set(task_specific or ())
    unknown = sorted(ts - set(params))
    if unknown:
        names = list(params)
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"task_specific names {unknown} are not in params; valid: {shown}")
    trainable = [n for n, p in params.items() if p.requires_grad]
    return [n for n in trainable if n not in ts], [n for n in trainable if n in ts]


@dataclass
class JacobianResult:
    """Per-task gradients of one vmapped pass. The shared parameters' gradients are kept as one (T, numel) block
    per parameter (``blocks``, views of the vmap's own outputs: no copy); ``jacobian`` concatenates them into
    the T x P matrix J on first access (Jacobian methods and wrappers need it, Gramian methods do not)."""

    blocks: List[Tensor]             # per shared parameter, (T, numel): row t = task t
    losses: Tensor                   # (T,) detached
    gramian: Optional[Tensor]        # (T, T) = J J^T, or None when not asked for
    shared_names: List[str]          # order of the shared parameters (the columns of J)
    task_specific_names: List[str]
    task_specific_jacobian: Dict[str, Tensor] = field(default_factory=dict)  # name -> (T, *shape)
    num_tasks: int = 0
    _jacobian: Optional[Tensor] = field(default=None, repr=False)

    @property
    def jacobian(self) -> Tensor:
        """(T, P) gradients of the shared parameters, row t = task t (concatenated once, then cached)."""
        if self._jacobian is None:
            if self.blocks:
                self._jacobian = torch.cat(self.blocks, dim=1)
            else:
                ref = self.losses
                self._jacobian = torch.empty(self.num_tasks, 0, dtype=ref.dtype, device=ref.device)
        return self._jacobian

    def task_specific_mean(self) -> Dict[str, Tensor]:
        """Gradient of the mean task loss for every task-specific parameter."""
        return {n: g.mean(dim=0) for n, g in self.task_specific_jacobian.items()}

    def task_specific_combined(self, weights: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Gradient of ``sum_i w_i L_i`` for every task-specific parameter: the loss whose shared-parameter
        gradient a weighting method writes, so heads and trunk see one objective (None: the mean loss)."""
        if weights is None:
            return self.task_specific_mean()
        out = {}
        with full_precision():
            for n, g in self.task_specific_jacobian.items():
                w = weights.detach().to(device=g.device, dtype=g.dtype)
                out[n] = (w @ g.reshape(g.shape[0], -1)).reshape(g.shape[1:])
        return out


def _slice_tree(tree: Any, start: int, stop: int) -> Any:
    return pytree.tree_map(lambda x: x[start:stop] if isinstance(x, Tensor) else x, tree)


def compute_jacobian(loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                     task_specific: Optional[Set[str]] = None, chunk_size: Optional[int] = None,
                     memory_budget: Optional[int] = None, per_task_params: Optional[Dict[str, Tensor]] = None,
                     with_gramian: bool = True, randomness: str = "different") -> JacobianResult:
    """Per-task gradients of ``loss_fn`` in one ``vmap(grad_and_value(loss_fn), in_dims=(None, 0, 0))``.

    ``per_task_params``: name -> (T, *shape) values used instead of ``params[name]`` for task t (each task at its
    own point, e.g. sharpness-aware perturbations); those entries are vmapped with ``in_dims=0``.
    ``randomness="different"``: random ops in ``loss_fn`` draw independent numbers per task.
    No host synchronisation: shapes and the chunking plan come from sizes only.
    """
    shared, ts = split_parameters(params, task_specific)
    diff_names = shared + ts
    diff_set = set(diff_names)
    const = {n: p.detach() for n, p in params.items() if n not in diff_set}
    point = {n: params[n].detach() for n in diff_names}
    per_task = dict(per_task_params or {})
    bad = sorted(set(per_task) - diff_set)
    if bad:
        raise ValueError(f"per_task_params names {bad} are not trainable entries of params")

    t = int(task_ids.shape[0])
    ref = point[shared[0]] if shared else (point[ts[0]] if ts else None)
    if ref is None:
        raise ValueError("params holds no trainable tensor (requires_grad=True)")
    dtype, device = ref.dtype, ref.device

    def one_task(diff: Dict[str, Tensor], batch_t: Any, task_id: Tensor) -> Tensor:
        return loss_fn({**const, **diff}, batch_t, task_id)

    in_dims_params = {n: (0 if n in per_task else None) for n in diff_names}
    batched = vmap(grad_and_value(one_task), in_dims=(in_dims_params, 0, 0), randomness=randomness)

    if chunk_size is None:
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        per_task_bytes = max(1, sum(point[n].numel() for n in diff_names) * ref.element_size())
        chunk_size = max(1, min(t, budget // per_task_bytes))
    chunk_size = max(1, min(int(chunk_size), t))

    if chunk_size >= t:  # one call: keep the vmap's outputs as they are (no copy)
        grads, vals = _run(batched, {n: per_task.get(n, point[n]) for n in diff_names}, batch, task_ids)
        blocks = [grads[n].reshape(t, -1) for n in shared]
        ts_jac = {n: grads[n] for n in ts}
        losses = vals.detach()
    else:  # chunks of the task axis, each written into per-parameter buffers
        full = {n: torch.empty((t, *point[n].shape), dtype=point[n].dtype, device=device) for n in diff_names}
        losses = torch.empty(t, dtype=dtype, device=device)
        for start in range(0, t, chunk_size):
            stop = min(t, start + chunk_size)
            inputs = {n: per_task[n][start:stop] if n in per_task else point[n] for n in diff_names}
            grads, vals = _run(batched, inputs, _slice_tree(batch, start, stop), task_ids[start:stop])
            torch._foreach_copy_([full[n][start:stop] for n in diff_names], [grads[n] for n in diff_names])
            losses[start:stop] = vals.detach()
            del grads, vals
        blocks = [full[n].reshape(t, -1) for n in shared]
        ts_jac = {n: full[n] for n in ts}
    g = gramian_of_blocks(blocks, t, dtype, device) if with_gramian else None
    return JacobianResult(blocks, losses, g, shared, ts, ts_jac, num_tasks=t)


def _run(batched: Any, inputs: Dict[str, Tensor], batch: Any, ids: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
    try:
        return batched(inputs, batch, ids)
    except RuntimeError as err:
        if "vmap: It looks like you" not in str(err):
            raise
        raise RuntimeError(
            "loss_fn cannot run under vmap(grad(...)) over the task axis: it has data-dependent ops on the "
            "task id or batch (e.g. F.one_hot(task_id) or tensor[task_id]); use vmap-safe forms such as "
            "(torch.arange(T) == task_id).float() and torch.index_select. Original error: "
            + str(err).splitlines()[0][:200]) from err


def losses_at(loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor,
              per_task_params: Dict[str, Tensor], randomness: str = "different") -> Tensor:
    """(T,) losses (no graph) with task t evaluated at ``per_task_params[name][t]`` where given."""
    point = {n: p.detach() for n, p in params.items()}
    in_dims_params = {n: (0 if n in per_task_params else None) for n in point}
    inputs = {n: per_task_params.get(n, p) for n, p in point.items()}
    with torch.no_grad():
        return vmap(loss_fn, in_dims=(in_dims_params, 0, 0), randomness=randomness)(inputs, batch, task_ids)


def gramian(jacobian: Tensor) -> Tensor:
    """G = J J^T (T x T), symmetrised, at full float32 precision."""
    with full_precision():
        g = jacobian @ jacobian.T
    return (g + g.T) / 2


def gramian_of_blocks(blocks: Sequence[Tensor], t: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """G = sum_p B_p B_p^T over the (T, n_p) per-parameter blocks of J (no concatenated J), symmetrised, at
    full float32 precision (one ``addmm_`` per block into a T x T accumulator)."""
    g = torch.zeros(t, t, dtype=dtype, device=device)
    with full_precision():
        for b in blocks:
            g.addmm_(b, b.T)
    return (g + g.T) / 2


def combine(weights: Tensor, jacobian: Tensor) -> Tensor:
    """``w^T J`` (P,) at full precision; ``weights`` may be float64 (cast to J's dtype, on J's device)."""
    w = weights.to(device=jacobian.device, dtype=jacobian.dtype)
    with full_precision():
        return w @ jacobian


def write_combined(params: Dict[str, Tensor], names: Sequence[str], blocks: Sequence[Tensor], weights: Tensor
                   ) -> None:
    """``.grad += w^T B_p`` for every shared parameter ``p`` (block ``B_p`` of J): the combined gradient goes
    straight into each existing ``.grad`` (``addmv_`` in place, also into views of one flat buffer), without
    forming J or the P-vector ``w^T J``. A missing ``.grad`` is set to the freshly computed product."""
    if not names:
        return
    w = weights.detach().to(device=blocks[0].device, dtype=blocks[0].dtype)
    with torch.no_grad(), full_precision():
        for n, b in zip(names, blocks):
            p = params[n]
            if p.grad is None:
                p.grad = (w @ b).reshape(p.shape).to(p.dtype)
            elif p.grad.is_contiguous() and p.grad.dtype == b.dtype:
                p.grad.view(-1).addmv_(b.T, w)
            else:
                p.grad.add_((w @ b).reshape(p.shape))


def flatten(tensors: Dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate ``tensors[n].reshape(-1)`` for ``n`` in ``names`` (the column order of J)."""
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(vec: Tensor, params: Dict[str, Tensor], names: Sequence[str]) -> Dict[str, Tensor]:
    """Inverse of :func:`flatten`; a leading batch axis of ``vec`` (shape (..., P)) is kept."""
    out, i = {}, 0
    lead = vec.shape[:-1]
    for n in names:
        k = params[n].numel()
        out[n] = vec[..., i:i + k].reshape(*lead, *params[n].shape)
        i += k
    if i != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries but the parameters {list(names)[:4]}... hold {i}")
    return out


def accumulate(tensors: Sequence[Tensor], grads: Sequence[Tensor], fresh: bool = False) -> None:
    """``p.grad += g`` in place for every tensor that has a ``.grad`` (one ``torch._foreach_add_``: the agent
    keeps persistent ``.grad`` tensors, zeroed in place, possibly views of one flat buffer); ``p.grad = g``
    where there is none (a copy unless ``fresh``: ``g`` may be a view of something the caller keeps)."""
    have_p, have_g = [], []
    for p, g in zip(tensors, grads):
        g = g.detach().reshape(p.shape)
        if g.dtype != p.dtype or g.device != p.device:
            g, copied = g.to(dtype=p.dtype, device=p.device), True
        else:
            copied = fresh
        if p.grad is None:
            p.grad = g if copied else g.clone()
        else:
            have_p.append(p.grad)
            have_g.append(g)
    if have_p:
        torch._foreach_add_(have_p, have_g)


def write_back(params: Dict[str, Tensor], names: Sequence[str], vec: Tensor) -> None:
    """Write a combined P-vector into ``.grad`` of the shared parameters ``names`` (added to an existing
    ``.grad``, as autograd accumulates)."""
    n_total = sum(params[n].numel() for n in names)
    if vec.dim() != 1 or vec.numel() != n_total:
        raise ValueError(f"combined gradient has shape {tuple(vec.shape)}, expected ({n_total},)")
    with torch.no_grad():
        parts = unflatten(vec, params, names)
        accumulate([params[n] for n in names], [parts[n] for n in names])


def write_task_specific(params: Dict[str, Tensor], grads: Dict[str, Tensor], fresh: bool = False) -> None:
    """Write (accumulate) ordinary gradients, e.g. ``JacobianResult.task_specific_mean()`` (``fresh``: the
    tensors are new and owned by nobody else, so they may become ``.grad`` without a copy)."""
    with torch.no_grad():
        accumulate([params[n] for n in grads], list(grads.values()), fresh=fresh)


def numel(params: Dict[str, Tensor], names: Sequence[str]) -> int:
    return int(sum(params[n].numel() for n in names))
