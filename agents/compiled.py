"""``torch.compile`` for the learner's gradient computations (``--set compile=auto|off|default|reduce-overhead|
max-autotune``).

What is compiled. MT-SAC without ``after_step`` hooks: the whole update after the noise draws as ONE graph
(``MTSAC.full_step``, ``fullgraph=True``): targets, critic losses and the method's combined gradient, the gradient
norm, the finiteness flags (``NonFiniteMonitor``'s device counters), clipping, Adam written in traced tensor ops on
the optimizers' own state (``agents.optim.traced_adam_step``: the fused kernel cannot be traced; a non-finite step
is skipped as with ``found_inf``), the temperature step, the actor's, and the Polyak lerp. It starts at the second
update (the first creates the Adam state eagerly). The noise and the methods' declared random draws
(``Method.random_draws``: PCGrad's orders) are drawn eagerly before it, in the eager update's order, because a
``torch.Generator`` cannot enter a graph. Where that graph does not build (a method drawing undeclared random
numbers, an untraceable op), and for MT-SAC with hooks or MT-PPO, each agent's gradient functions are compiled
apart (MT-SAC: critic gradient; temperature + actor gradient. MT-PPO: each minibatch's actor and critic
gradients) and the fused Adam steps, flags, hooks and Polyak update run eagerly around them. On CPU Inductor fuses
a graph into a few C++ kernels, on CUDA ``reduce-overhead`` replays it as a CUDA graph (not yet run on a GPU; a
graph that mutates the optimizer state may be run without the CUDA graph by PyTorch).

``auto`` compiles where it is known to work — a method with ``compilable = True`` (every sync-free method whose
gradient is pure tensor code) on backbones without ``after_step`` hooks — and stays eager otherwise, with a
one-line note naming what does not compile. A compilation that fails at its first call falls back to eager with
a note (the one-graph update: to the split graphs), after re-zeroing the gradients it may have touched, so a run
never dies of it; so does a later graph variant whose compilation fails (e.g. the update without the Polyak step,
compiled when it first occurs), the compiler's exceptions told apart from the run's own. Compilation happens at
the first update (about a minute for the whole MT-SAC update on a 2-core CPU with an empty Inductor cache; the
time is printed) and again after a resume (then mostly from Inductor's on-disk cache).

Every graph is compiled with :class:`agents.small_matmul.SmallMatmulPass`: on CPU, the small matrix products of
narrow networks become generated loops fused with their neighbours instead of BLAS calls (MKL is slow on skinny
products; see that module). ``MTSAC.compile(small_matmul=False)`` turns it off (``scripts/bench_learner.py
--ablate-small-matmul`` measures what it buys).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")


def why_not_compiled(methods: Iterable[Any], modules: Iterable[nn.Module]) -> Optional[str]:
    """The first thing that keeps ``auto`` from compiling, or None."""
    for m in methods:
        if not getattr(m, "compilable", False):
            return f"method {m.name!r}"
    for mod in modules:
        for sub in mod.modules():
            if callable(getattr(sub, "after_step", None)):
                return f"backbone module {type(sub).__name__!r} (after_step hook)"
    return None


class Compiled:
    """``fn`` compiled with ``mode`` at its first call; on failure then, ``fn`` itself from then on (one note).

    ``reset`` runs before the eager retry (e.g. re-zeroing gradient buffers the failed attempt may have written).
    """

    def __init__(self, fn: Callable, mode: str, name: str, reset: Optional[Callable[[], None]] = None,
                 fullgraph: bool = False, fallback: Optional[Tuple[Callable, str]] = None,
                 small_matmul: bool = True) -> None:
        """``fullgraph``: one graph or a failure (then nothing of it has run, so ``fallback`` can redo the call);
        ``fallback``: (what to run instead of ``fn`` after a failure, its name for the note); ``small_matmul``:
        with :class:`agents.small_matmul.SmallMatmulPass` (small CPU matrix products as generated loops)."""
        self.fn, self.name, self.reset = fn, name, reset
        self.fallback = fallback
        self.mode = mode
        # Dynamo's guards re-check the modules at every call (~0.25 ms a call here). Skipping them
        # (torch.compiler.skip_guard_on_all_nn_modules_unsafe) was tried and is wrong: two agents in one process
        # share the method's code object, so the second one ran the first one's graph (a 3 x 8 graph on 3 x 400
        # weights).
        self.compiled: Optional[Callable] = torch.compile(fn, options=inductor_options(mode, small_matmul),
                                                          dynamic=False, fullgraph=fullgraph)
        self.first = True
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        first, t0 = self.first, time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager is always correct
            # At the first call any failure is the compiler's (the eager function has not run yet). Later, a new
            # graph variant (another argument value, a guard that no longer holds) may be compiled and fail the
            # same way; an error raised by the compiled code itself is the run's and propagates.
            if not first and not is_compiler_error(e):
                raise
            self.compiled = None
            instead = "running it eagerly"
            if self.fallback is not None:
                self.fn, instead = self.fallback[0], f"running {self.fallback[1]} instead"
            print(f"note: torch.compile of {self.name} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]});"
                  f" {instead}", file=sys.stderr, flush=True)
            if self.reset is not None:
                self.reset()
            return self.fn(*args)
        if first:
            self.first = False
            self.seconds = time.perf_counter() - t0
            print(f"compiled {self.name} ({self.mode}) in {self.seconds:.1f} s", file=sys.stderr, flush=True)
        return out


def inductor_options(mode: str, small_matmul: bool = True) -> Dict[str, Any]:
    """``torch.compile``'s options for ``mode`` (it takes a mode or options, not both), plus the small-matmul
    pass, which rewrites only CPU products and so is a no-op on CUDA."""
    opts: Dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode != "default" else {}
    if small_matmul:
        from agents.small_matmul import SmallMatmulPass

        opts["post_grad_custom_pre_pass"] = SmallMatmulPass()
    return opts


def is_compiler_error(e: BaseException) -> bool:
    """True for an exception raised by Dynamo, AOTAutograd or Inductor while building a graph."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def resolve(mode: str, device: torch.device, methods: List[Any], modules: List[nn.Module]) -> str:
    """The mode actually used: ``auto`` -> ``reduce-overhead`` on CUDA, ``default`` elsewhere, or ``off`` (with a
    note) where a method or backbone does not compile; ``meta`` never compiles (no kernels to generate)."""
    if mode not in MODES:
        raise ValueError(f"compile={mode!r} is invalid; valid: {', '.join(MODES)}")
    if mode == "off" or device.type == "meta":
        return "off"
    if mode == "auto":
        why = why_not_compiled(methods, modules)
        if why is not None:
            print(f"note: compile=auto: {why} does not compile; the learner runs eagerly", file=sys.stderr,
                  flush=True)
            return "off"
        return "reduce-overhead" if device.type == "cuda" else "default"
    return mode
