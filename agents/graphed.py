"""The MT-SAC update as one captured graph (issue 21): static input buffers, the noise drawn into them, one replay.

Why: on a GPU the compiled update is launch-bound (measured on an H200 with ``reduce-overhead``: ~7 ms of host
launches for ~1 ms of kernels, because Inductor's CUDA-graph trees skip a graph that mutates its inputs, and this
update mutates parameters, Adam moments and steps, gradients and the non-finite counters). A manual
``torch.cuda.CUDAGraph`` capture does not care which tensors are mutated, only that their addresses stay put; they
do here: parameters, the separate ``.grad`` tensors (``FlatGrads.separate``), the optimizers' state and the
monitor's counters are all updated in place by the compiled step (``MTSAC.run_step``).

One update through :class:`GraphedUpdate`:

1. the batch (sampled by the replay on the learner's device) is copied into the slot's static buffers;
2. the update's noise and the methods' declared draws (``Method.random_draws``) are drawn from the agent's
   generator straight into static buffers (``torch.randn(..., out=...)``: the same stream, in the same order, as the
   uncaptured update; a ``torch.Generator`` of our own cannot be read inside a graph on every torch >= 2.4, so the
   two or three draws stay outside it);
3. on CUDA, ``graph.replay()``; elsewhere the same compiled step called directly on the static buffers, so the CPU
   tests drive everything but the capture itself.

The backbones' ``after_step`` hooks run after it, eagerly (``MTSAC._after_update``), on the outputs. Outputs are
the graph's static tensors: each replay overwrites them, so a caller that keeps a value past the next update must
clone it (the training loop reads them right after the update).

A slot per (actor step?, target step?, batch shapes): with ``actor_update_every`` or ``target_update_every`` > 1
two to four graphs. On CUDA a slot runs ``WARMUP`` eager calls on a side stream first (compilation, Triton
autotuning, lazily created state), then captures at the next call and replays from then on. :meth:`reset` (the
agent calls it when optimizer state is created anew: a resume, a hook that drops Adam state) drops every graph.

Not captured (a one-line note says so; the update runs compiled without the graph): methods whose state lives in
Python between updates (``Method.graph_safe`` False: a replay runs no Python), and a capture that fails.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

WARMUP = 3  # eager calls on a side stream before a slot is captured (CUDA)


def why_not_captured(agent: Any) -> Optional[str]:
    """The first reason the agent's update cannot be replayed as one graph, or None."""
    for m in (agent.critic_method, agent.actor_method):
        if not getattr(m, "graph_safe", False):
            return f"method {m.name!r} keeps state in Python between updates"
    return None


class _Slot:
    """Static buffers (and, on CUDA, the graph) of one kind of update."""

    def __init__(self, batch: Dict[str, Tensor], noise_shapes: Dict[str, Tuple[int, ...]],
                 draw_shapes: List[List[Tuple[int, ...]]], device: torch.device) -> None:
        self.batch = {k: torch.empty_like(v) for k, v in batch.items() if v is not None}
        self.noise = {k: torch.empty(s, device=device) for k, s in noise_shapes.items()}
        self.draws = [[torch.empty(s, device=device) for s in shapes] for shapes in draw_shapes]
        self.graph: Optional[Any] = None
        self.out: Optional[Dict[str, Any]] = None
        self.calls = 0


class GraphedUpdate:
    """``agent.update``'s step behind static buffers; on CUDA one ``torch.cuda.CUDAGraph`` replay per update."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.why_not = why_not_captured(agent)
        self.capture = agent.device.type == "cuda" and self.why_not is None
        if self.why_not is not None:
            print(f"note: the update is not captured as one graph: {self.why_not}; it runs compiled without it",
                  file=sys.stderr, flush=True)
        self.slots: Dict[Any, _Slot] = {}
        self.pool: Optional[Any] = None
        self.captured = False  # some slot holds a captured graph now
        self.captures = 0
        self.replays = 0

    def reset(self) -> None:
        """Forget every slot (their graphs refer to tensors that are about to be replaced)."""
        self.slots.clear()
        self.captured = False

    def __call__(self, batch: Dict[str, Tensor], do_actor: bool, do_target: bool) -> Dict[str, Any]:
        ag = self.agent
        T, B = batch["reward"].shape
        methods = (ag.critic_method, ag.actor_method) if do_actor else (ag.critic_method,)
        key = (do_actor, do_target, tuple((k, tuple(v.shape), v.dtype) for k, v in batch.items() if v is not None))
        slot = self.slots.get(key)
        if slot is None:
            noise = {"eps_next": (T * B, ag.act_dim)}
            if do_actor:
                noise["eps"] = (T, B, ag.act_dim)
            slot = self.slots[key] = _Slot(batch, noise, [list(m.random_draws()) for m in methods], ag.device)
        for k, buf in slot.batch.items():
            buf.copy_(batch[k], non_blocking=True)
        # Same stream and order as MTSAC.update without the graph: eps', eps, then each method's draws.
        for k in ("eps_next", "eps"):
            if k in slot.noise:
                torch.randn(slot.noise[k].shape, generator=ag.generator, device=ag.device, out=slot.noise[k])
        for bufs in slot.draws:
            for buf in bufs:
                torch.rand(buf.shape, generator=ag.generator, device=ag.device, out=buf)
        if not self.capture:
            return dict(self._run(slot, methods, do_target))
        if slot.graph is None:
            if slot.calls < WARMUP:
                slot.calls += 1
                side = torch.cuda.Stream(device=ag.device)
                side.wait_stream(torch.cuda.current_stream(ag.device))
                with torch.cuda.stream(side):
                    out = self._run(slot, methods, do_target)
                torch.cuda.current_stream(ag.device).wait_stream(side)
                return dict(out)
            self._capture(slot, methods, do_target)
            if slot.graph is None:  # the capture failed: compiled without the graph from now on
                return dict(self._run(slot, methods, do_target))
        slot.graph.replay()
        self.replays += 1
        assert slot.out is not None
        return dict(slot.out)

    def _run(self, slot: _Slot, methods, do_target: bool) -> Dict[str, Any]:
        for m, bufs in zip(methods, slot.draws):
            m.predraw(list(bufs))
        return self.agent.run_step(slot.batch, slot.noise["eps_next"], slot.noise.get("eps"), do_target)

    def _capture(self, slot: _Slot, methods, do_target: bool) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call from another thread of the process (a pinned copy of a worker's chunk) is
            # not an error of this capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._run(slot, methods, do_target)
        except Exception as e:  # noqa: BLE001 - any capture failure: the compiled step without a graph is correct
            self.capture = False
            self.reset()
            from agents.compiled import CompileFallbackError, describe, strict

            print(f"note: CUDA-graph capture of the update failed ({describe(e)}); it runs compiled without the "
                  "graph", file=sys.stderr, flush=True)

            if strict():
                raise CompileFallbackError(f"CUDA-graph capture failed with MTRL_COMPILE_STRICT set: {e}") from e
            return
        if self.pool is None:
            self.pool = graph.pool()  # every slot shares one memory pool
        # The captured kernels read this slot's inputs and the agent's state by address; the hooks read `out`.
        slot.graph, slot.out = graph, out
        self.captured = True
        self.captures += 1
        # The capture recorded the update without running it: this call's update is the first replay.
