"""An Inductor graph pass for the compiled learner on CPU: small matrix products as generated loops, not BLAS calls.

Why: at small widths the learner's matrix products are skinny — (1280, 53) @ (53, 8) for a width-8 critic's first
layer on an MT10 batch, (1280, 8) @ (8, 8) for its next ones — and the BLAS that the PyTorch CPU wheel calls (MKL)
is slow on them: on our 2-core AMD EPYC machine, one thread, the first takes 110–150 µs (under 10 GFLOP/s) where
OpenBLAS (numpy) takes 26 µs; ``scripts/bench_learner.py --profile`` showed ~2 ms of each compiled width-8 MT-SAC
update in 65 BLAS calls. Written as a broadcast multiply and a sum (the rule torch's own
``decompose_mm_pass`` uses on CUDA, where its CPU thresholds only admit one-row products), Inductor generates each
as one vectorised C++ loop, fused with the bias, activation or reduction around it.

Which products: 2-d ``mm``/``addmm`` on CPU whose multiply-adds M·K·N are at most ``max_macs``, whose reduced size
K is at most ``max_dim`` and whose smaller output size is at most ``max_dim`` — on MT10 batches (1280 rows) the
forward and input-gradient products of first layers up to width 15 and hidden layers up to width 28. Weight gradients (K = the batch) and a 3 x 400 network's
products (M·K·N ≥ 20M) stay with BLAS, which is fast there; of the rules tried (all small products, or only those
with a short reduction) this one measured best (``--ablate-small-matmul`` in ``scripts/bench_learner.py`` measures
the pass against none; README *Speed*).

Where: only on CPUs where it pays (:func:`pays_here`). On the AMD EPYC machine of issue 11 it bought +19% to +54%
at width 8; on an Intel Xeon (issue 21, same 2 cores, one thread; ``bench_learner.py --widths 8 --ablate-small-matmul``,
two runs) MKL is fast on these products and the pass cost 13-15% (mtsac 2.80/2.92x eager with it, 3.30/3.35x
without; pcgrad 2.95/3.12x, 3.19/3.53x). So ``MTSAC.compile(small_matmul=None)`` (the default) applies it where the
CPU is not an Intel one; ``True``/``False`` force it.

Use: ``torch.compile(fn, options={"post_grad_custom_pre_pass": SmallMatmulPass()})`` (``agents/compiled.py`` does
this on CPU). ``uuid`` keys Inductor's cache on this file and the thresholds, so a changed rule never reuses an old
graph.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten

MAX_MACS = 1 << 20  # 1M multiply-adds: a (1280, 53) @ (53, 8) product is 0.54M, a 3 x 400 layer's 205M
MAX_DIM = 64  # the reduced size K and the smaller of the output's (M, N)

_PATTERNS = PatternMatcherPass(pass_name="mtrl_small_matmul")
_limits = {"max_macs": MAX_MACS, "max_dim": MAX_DIM}
REWRITES: Counter = Counter()  # products rewritten since import, by op ("mm", "addmm"): for tests and diagnostics


def pays_here() -> bool:
    """Whether the pass is on by default on this machine: not on an Intel CPU (``vendor_id`` GenuineIntel in
    /proc/cpuinfo), where MKL's skinny products are fast and the pass measured slower; on elsewhere (AMD, where it
    was measured faster, and CPUs this cannot identify)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" not in line
    except OSError:
        pass
    return True


def is_small(a: torch.fx.Node, b: torch.fx.Node, max_macs: int = MAX_MACS, max_dim: int = MAX_DIM) -> bool:
    """Whether ``a @ b`` (FX nodes of a post-grad graph) is a small CPU product that this pass rewrites."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if va.dim() != 2 or vb.dim() != 2 or va.device.type != "cpu" or vb.device.type != "cpu":
        return False
    if not va.dtype.is_floating_point:
        return False
    try:
        m, k, n = int(va.shape[0]), int(va.shape[1]), int(vb.shape[1])
    except (TypeError, ValueError):  # symbolic sizes (dynamic shapes): leave to BLAS
        return False
    # A long reduction (a weight gradient: k = the batch) would be a strided dot product per output in the
    # generated loop; BLAS does those well (29 us for (8, 1280) @ (1280, 53)), so they stay with it.
    return m * k * n <= max_macs and k <= max_dim and min(m, n) <= max_dim


def _product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y as a broadcast multiply and a sum over the reduced size (what Inductor turns into one loop)."""
    return (x[:, :, None] * y[None, :, :]).sum(dim=1).to(x.dtype)


def _realize(*nodes: torch.fx.Node) -> None:
    # The operands are read N (or M) times by the generated loop: compute them once into memory rather than
    # fusing (and recomputing) their producers into it (torch's decompose_mem_bound_mm does the same).
    for node in nodes:
        node.meta["inductor_realize_to_strides"] = True


@register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=_PATTERNS)
def _mm(match: Match, a: torch.fx.Node, b: torch.fx.Node) -> None:
    if is_small(a, b, **_limits):
        match.replace_by_example(_product, [a, b])
        _realize(a, b)
        REWRITES["mm"] += 1


@register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=_PATTERNS)
def _addmm(match: Match, bias: torch.fx.Node, a: torch.fx.Node, b: torch.fx.Node) -> None:
    # Only the default beta = alpha = 1 reaches here: the pattern has exactly three arguments and no keywords.
    if is_small(a, b, **_limits):
        match.replace_by_example(lambda c, x, y: _product(x, y) + c, [bias, a, b])
        _realize(a, b)
        REWRITES["addmm"] += 1


class SmallMatmulPass(CustomGraphPass):
    """The pass (see the module docstring). ``max_macs``/``max_dim``: the size rule (module defaults)."""

    def __init__(self, max_macs: int = MAX_MACS, max_dim: int = MAX_DIM) -> None:
        self.max_macs, self.max_dim = int(max_macs), int(max_dim)

    def __call__(self, graph: torch.fx.Graph) -> None:
        _limits.update(max_macs=self.max_macs, max_dim=self.max_dim)
        try:
            _PATTERNS.apply(graph)
        finally:
            _limits.update(max_macs=MAX_MACS, max_dim=MAX_DIM)
        graph.lint()

    def uuid(self) -> Optional[Any]:
        return hashlib.sha256(f"{get_hash_for_files((__file__,))!r}{self.max_macs}:{self.max_dim}".encode()
                              ).hexdigest()
