"""``torch.compile`` for the learner's gradient computations (``--set compile=auto|off|default|reduce-overhead|
max-autotune``).

What is compiled. MT-SAC, on every backbone: the whole update after the noise draws as ONE graph
(``MTSAC.full_step``, ``fullgraph=True``): targets, critic losses and the method's combined gradient, the gradient
norm, the finiteness flags (``NonFiniteMonitor``'s device counters), clipping, Adam written in traced tensor ops on
the optimizers' own state (``agents.optim.traced_adam_step``: the fused kernel cannot be traced; a non-finite step
is skipped as with ``found_inf``), the temperature step, the actor's, and the Polyak lerp. It starts at the second
update (the first creates the Adam state eagerly). The backbones' ``after_step`` hooks (diagnostics records, MENTOR
snapshots and perturbations, harmony's mask flips, PaCo resets, T2MIR's target gate) run eagerly after the graph
(``MTSAC._after_update``), on the values it returns. The noise and the methods' declared random draws
(``Method.random_draws``: PCGrad's orders) are drawn eagerly before it, in the eager update's order, because a
``torch.Generator`` cannot enter a graph. Where that graph does not build (a method drawing undeclared random
numbers, an untraceable op), and for MT-PPO, each agent's gradient functions are compiled apart (MT-SAC: critic
gradient; temperature + actor gradient. MT-PPO: each minibatch's actor and critic gradients) and the fused Adam
steps, flags, hooks and Polyak update run eagerly around them. On CPU Inductor fuses a graph into a few C++
kernels. On CUDA the compiled step is captured as one ``torch.cuda.CUDAGraph`` (``agents/graphed.py``; not yet
run on a GPU); without capture (``--set cuda_graph=false``) ``auto`` means ``reduce-overhead``, whose CUDA-graph
trees skip a graph that mutates its inputs (measured on an H200: no graph, 98 mutated inputs).

``auto`` compiles where it is known to work — a method with ``compilable = True`` (every sync-free method whose
gradient is pure tensor code), on any backbone — and stays eager otherwise, with a one-line note naming what does
not compile. A compilation that fails at its first call falls back to eager with a note (the one-graph update: to
the split graphs), after re-zeroing the gradients it may have touched, so a run never dies of it; so does a later
graph variant whose compilation fails (e.g. the update without the Polyak step, compiled when it first occurs),
the compiler's exceptions told apart from the run's own. With ``MTRL_COMPILE_STRICT=1`` (tests,
``scripts/gpu_check.sh``) such a failure raises :class:`CompileFallbackError` instead. Compilation happens at
the first update (one to four minutes for the whole MT-SAC update on a 2-core CPU with an empty Inductor cache,
longest for the MoE backbones; the time is printed) and again after a resume (then mostly from Inductor's on-disk
cache).

On CPUs where it pays (not Intel ones: ``agents.small_matmul.pays_here``) every graph is compiled with
:class:`agents.small_matmul.SmallMatmulPass`: the small matrix products of narrow networks become generated loops
fused with their neighbours instead of BLAS calls (MKL was slow on skinny products on an AMD EPYC, fast on an Intel
Xeon; see that module). ``MTSAC.compile(small_matmul=True|False)`` forces it (``scripts/bench_learner.py
--ablate-small-matmul`` measures what it buys).
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")


def why_not_compiled(methods: Iterable[Any], modules: Iterable[nn.Module]) -> Optional[str]:
    """The first thing that keeps ``auto`` from compiling, or None. Every built-in backbone compiles: their
    ``after_step`` hooks run eagerly after the update (``MTSAC._after_update``), outside the graph."""
    for m in methods:
        if not getattr(m, "compilable", False):
            return f"method {m.name!r}"
    return None


def strict() -> bool:
    """``MTRL_COMPILE_STRICT=1``: a compilation failure raises instead of falling back (the tests and
    ``scripts/gpu_check.sh`` set it, so a silent compile -> eager fallback fails them). A second test knob,
    ``MTRL_COMPILE_BACKEND=aot_eager``, builds the same graphs without Inductor (seconds instead of minutes on 2
    cores): the default test run checks with it that every backbone traces into one graph."""
    return os.environ.get("MTRL_COMPILE_STRICT", "") not in ("", "0")


class CompileFallbackError(RuntimeError):
    """A graph failed to compile while ``MTRL_COMPILE_STRICT`` is set."""


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
        raise_recompile_limit()
        self.fullgraph = fullgraph
        backend = os.environ.get("MTRL_COMPILE_BACKEND", "inductor")
        self.options: Optional[Dict[str, Any]] = None
        if backend == "inductor":
            self.options = inductor_options(mode, small_matmul)
            self.compiled: Optional[Callable] = torch.compile(own_code(fn), options=self.options, dynamic=False,
                                                              fullgraph=fullgraph)
        else:  # a test knob: "aot_eager" builds the same one graph (Dynamo + AOTAutograd) without Inductor's codegen
            self.compiled = torch.compile(own_code(fn), backend=backend, dynamic=False, fullgraph=fullgraph)
        self.first = True
        self.retried = False  # compiled again without Inductor's pattern-matcher passes after a failure
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
            if self.options is not None and not self.retried and self.options.get("pattern_matcher", True):
                # Inductor's pattern-matcher passes are the part of it that differs most between devices (the
                # pcgrad preset's graphs failed on CUDA with a bare AssertionError, and compile on CPU). Once
                # more without them before giving up on the compiler: slower kernels beat eager ones.
                self.retried = True
                print(f"note: torch.compile of {self.name} failed ({describe(e)}); compiling it again without "
                      "Inductor's pattern-matcher passes", file=sys.stderr, flush=True)
                if self.reset is not None:
                    self.reset()
                self.options = {**self.options, "pattern_matcher": False}
                self.options.pop("post_grad_custom_pre_pass", None)
                self.compiled = torch.compile(own_code(self.fn), options=self.options, dynamic=False,
                                              fullgraph=self.fullgraph)
                return self(*args)
            if strict():
                raise CompileFallbackError(f"torch.compile of {self.name} failed with MTRL_COMPILE_STRICT set: "
                                           f"{describe(e)}") from e
            self.compiled = None
            instead = "running it eagerly"
            if self.fallback is not None:
                self.fn, instead = self.fallback[0], f"running {self.fallback[1]} instead"
            print(f"note: torch.compile of {self.name} failed ({describe(e)}); {instead}", file=sys.stderr,
                  flush=True)
            if self.reset is not None:
                self.reset()
            return self.fn(*args)
        if first:
            self.first = False
            self.seconds = time.perf_counter() - t0
            print(f"compiled {self.name} ({self.mode}) in {self.seconds:.1f} s", file=sys.stderr, flush=True)
        return out


def describe(e: BaseException) -> str:
    """``Type: first line of the message`` and where it was raised (the innermost frame): an assertion inside
    Inductor often has no message (the pcgrad preset on CUDA printed only ``AssertionError:``), so the place is
    what a bug report needs."""
    import traceback

    msg = str(e).splitlines()[0][:160] if str(e) else ""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        parts = f.filename.replace("\\", "/").split("/")
        short = "/".join(parts[parts.index("torch"):]) if "torch" in parts else parts[-1]
        where = f" at {short}:{f.lineno} in {f.name}"
    return f"{type(e).__name__}: {msg}{where}"


def own_code(fn: Callable) -> Callable:
    """``fn`` (a function or bound method) with a code object of its own. Dynamo keeps its compiled graphs per
    code object, so every agent compiling ``MTSAC.full_step`` filled one shared cache: its guards were checked
    against every agent's entry, and past the recompile limit a ``fullgraph`` compile failed (a sweep, the tests).
    With its own code object each ``Compiled`` has its own cache, freed with it."""
    f = getattr(fn, "__func__", fn)
    if not isinstance(f, types.FunctionType):
        return fn
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__, g.__doc__ = f.__kwdefaults__, f.__qualname__, f.__doc__
    bound = getattr(fn, "__self__", None)
    return types.MethodType(g, bound) if bound is not None else g


def raise_recompile_limit(limit: int = 64) -> None:
    """The split form's graph breaks compile the frames of shared inner functions (``MTSAC.critic_grads``...) whose
    code objects all agents share (:func:`own_code` covers only the top level): past Dynamo's per-code limit (8
    entries) those would fall back. A sweep, the tests or a notebook build more agents than that in one process,
    so the limit is raised (the name changed in torch 2.6)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


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


def resolve(mode: str, device: torch.device, methods: List[Any], modules: List[nn.Module],
            capture: bool = False) -> str:
    """The mode actually used: ``auto`` -> ``default`` (on CUDA ``reduce-overhead`` unless the update is
    captured by ``agents/graphed.py``, which needs Inductor's plain kernels), or ``off`` (with a note) where a
    method does not compile; ``meta`` never compiles (no kernels to generate)."""
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
        return "reduce-overhead" if device.type == "cuda" and not capture else "default"
    return mode
