"""The contract every task-combination method follows.

A *method* turns T per-task losses into one update of the shared parameters. The agents never see how: they hand
over a per-task loss function and the batch, and read back the `.grad` fields of the parameters.

``loss_fn(params, batch_t, task_id) -> scalar`` is the loss of ONE task: ``params`` is a dict name -> tensor (as
for ``torch.func.functional_call``), ``batch_t`` a pytree of tensors holding that task's slice of the (T, B, ...)
batch (leading task axis removed), ``task_id`` a 0-d long tensor. Because each task's loss depends only on its own
slice, ``torch.func.vmap`` over the task axis gives all T losses (and, with ``torch.func.grad``, all T gradients)
in one batched pass.

Three families share the ``Method`` contract (``backward(loss_fn, params, batch, task_ids, *, task_specific=None)
-> dict``):

* :class:`LossWeightingMethod` -- one vmapped forward, one backward of a weighted loss (no Jacobian);
* :class:`JacobianMethod` -- the engine forms the T x P Jacobian of the shared parameters in one vmapped pass
  (``engine.compute_jacobian``), the method aggregates it into one P-vector (``aggregate``), the engine writes it
  back into ``.grad``; ``method(J) -> Tensor[P]`` aggregates a given Jacobian;
* :class:`GramianMethod` -- a Jacobian method whose aggregation is ``d = w^T J`` with ``w = weights(J J^T)``.

``task_specific`` (a set of parameter names) marks parameters that only one task's loss touches (heads, per-task
embeddings): a Gramian method gives them the gradient of the loss its weights combine, ``sum_i w_i L_i`` (the
same objective as its shared update; ``GramianMethod.task_specific_weights``), other Jacobian methods the gradient
of the MEAN task loss, i.e. what ordinary autograd of the averaged loss gives. Options are keyword arguments; an unknown option or a bad value raises ``ValueError`` with a
one-line message naming the bad value and the valid choices.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.func import vmap

LossFn = Callable[[Dict[str, Tensor], Any, Tensor], Tensor]


def task_losses(loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor) -> Tensor:
    """All T losses, shape (T,), from one vmapped forward. Differentiable w.r.t. ``params``.

    ``randomness="different"``: a loss that samples (e.g. the SAC actor's reparameterised actions) draws
    independent numbers for every task, as a loop over tasks would.
    """
    return vmap(loss_fn, in_dims=(None, 0, 0), randomness="different")(params, batch, task_ids)


# --------------------------------------------------------------------------------------------------- options
def parse_options(method: str, kwargs: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults updated by ``kwargs``; an unknown key raises ValueError naming the valid ones."""
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) if defaults else "none (it takes no options)"
        raise ValueError(f"method {method!r} got unknown option(s) {unknown}; valid options: {valid}")
    out = dict(defaults)
    out.update(kwargs)
    return out


def bad_option(method: str, option: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"method {method!r}: option {option}={value!r} is invalid; expected {expected}")


def check_float(method: str, option: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float within [lo, hi] (open ends where asked), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise bad_option(method, option, value, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}"
                                                f"{')' if hi_open else ']'}")
    v = float(value)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise bad_option(method, option, value, f"a number in {'(' if lo_open else '['}{lo}, {hi}"
                                                f"{')' if hi_open else ']'}")
    return v


def check_int(method: str, option: str, value: Any, lo: int = 0, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_option(method, option, value, f"an integer {rng}")
    return int(value)


def check_choice(method: str, option: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise bad_option(method, option, value, f"one of {choices}")
    return value


def check_bool(method: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_option(method, option, value, "true or false")
    return value


# --------------------------------------------------------------------------------------------------- methods
class Method:
    """Base class: one object per optimised loss (the critic and the actor each get their own instance).

    Subclasses declare their options with defaults in ``OPTIONS`` and check them in ``_check_options``; the parsed
    values are in ``self.options``.
    """

    name: str = "base"
    kind: str = "base"  # "mean" | "loss" | "jacobian" | "gramian" | "perturbation" | "wrapper"
    OPTIONS: Dict[str, Any] = {}
    accepts_task_specific: bool = True  # backward(..., task_specific=...) is understood
    # backward() is pure tensor code with no host sync and no Tensor.backward(): torch.compile traces it into one
    # graph (agents/compiled.py; compile=auto compiles only such methods).
    compilable: bool = False
    # MT-SAC compiles its whole update as one graph by default for this method (MTSAC.compile): set where that
    # graph is tested against eager (tests/test_device.py::ONE_GRAPH) and measured faster than the split form at
    # width 8 (within this machine's noise of it at 3 x 400; scripts/bench_learner.py --split --one-graph).
    one_graph: bool = False
    # A replay of a captured ``backward`` is a correct update (agents/graphed.py): no state kept in Python between
    # updates (counters, tensors re-assigned each step) that a CUDA-graph replay, which runs no Python, would
    # freeze. Set on the stateless compilable methods; gradvac (its phi EMA is a new tensor each step) is not.
    graph_safe: bool = False

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"method {self.name!r}: num_tasks={num_tasks!r} is invalid; expected an integer >= 1")
        if kwargs and not self.OPTIONS:
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {sorted(kwargs)}; it takes none (valid options: none)"
            )
        self.num_tasks = num_tasks
        self.options = parse_options(self.name, kwargs, self.OPTIONS)
        self._check_options()

    def _check_options(self) -> None:
        """Validate ``self.options`` (raise ``bad_option``) and set derived attributes."""

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        """Write the combined gradient into ``p.grad`` for every tensor in ``params``.

        Returns diagnostics; always ``{"losses": Tensor[T] (detached)}`` plus what the method knows (task weights,
        Gramian, ...).
        """
        raise NotImplementedError

    # ---- randomness and health (sync-free hot path)
    generator: Optional[torch.Generator] = None

    def set_generator(self, generator: Optional[torch.Generator]) -> None:
        """Random draws of this method (PCGrad/GradVac orders, GradDrop's thresholds) come from ``generator``;
        None: torch's global RNG. The generator must be on the device of the tensors the method works on (a CPU
        generator also serves the ``meta`` device). Passed on to inner methods (wrappers)."""
        self.generator = generator
        for v in vars(self).values():
            if isinstance(v, Method):
                v.set_generator(generator)

    _predrawn: Any = ()

    def random_draws(self) -> List[Tuple[int, ...]]:
        """Shapes of the uniform [0, 1) float32 tensors one ``backward`` draws from the generator, in order (none by
        default). A compiled update draws them eagerly before its graph (a ``torch.Generator`` cannot enter one)
        and hands them over with :meth:`predraw`; the stream is the one the eager update uses. A method that draws
        without declaring it here still works, but its update does not compile into one graph."""
        return []

    def predraw(self, draws: List[Tensor]) -> None:
        """The draws of :meth:`random_draws` for the next ``backward``, taken in order by :meth:`uniform`."""
        self._predrawn = list(draws)

    def uniform(self, shape: Tuple[int, ...], device: torch.device) -> Tensor:
        """The next tensor given to :meth:`predraw`, else a fresh uniform draw from the method's generator."""
        if self._predrawn:
            return self._predrawn.pop(0)
        return torch.rand(shape, generator=self.generator, device=device)

    def health(self) -> Optional[Tensor]:
        """A 0-d bool device tensor, True when an input broke the method's assumptions since the last
        ``check()`` (e.g. FAMO's losses <= min_losses), or None when the method has nothing to report. Reading it
        is a host sync: fold it into a periodic check, not every update."""
        flags = [f for f in (v.health() for v in vars(self).values() if isinstance(v, Method)) if f is not None]
        if not flags:
            return None
        return torch.stack(flags).any()

    def check(self) -> None:
        """Raise ``ValueError`` if ``health()`` is set (a host sync: call it at periodic checks), then clear it."""
        for v in vars(self).values():
            if isinstance(v, Method):
                v.check()

    def post_step(self) -> None:
        """Call after ``optimizer.step()`` (optional). Methods that look at the loss after the step (FAMO) use it;
        if it is never called they do that work at the start of the next ``backward`` instead."""

    def reset(self) -> None:
        """Forget any state kept across updates (stateless methods: nothing to do)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        del state

    def _check_num_tasks(self, t: int) -> None:
        if t != self.num_tasks:
            raise ValueError(
                f"method {self.name!r} was built for num_tasks={self.num_tasks} but got a batch with {t} tasks"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(num_tasks={self.num_tasks}{', ' if opts else ''}{opts})"


ENGINE_OPTIONS: Dict[str, Any] = {
    # Largest size (MiB) of one chunk's per-task gradients; past it the vmap runs over chunks of the task axis.
    "memory_budget_mb": None,
    # Force a chunk size over the task axis (None: from the memory budget).
    "chunk_size": None,
}


class JacobianMethod(Method):
    """A method that needs the T x P Jacobian of the shared parameters (formed by ``engine``)."""

    kind = "jacobian"

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        self.OPTIONS = {**ENGINE_OPTIONS, **type(self).OPTIONS}
        super().__init__(num_tasks, **kwargs)
        mb = self.options["memory_budget_mb"]
        if mb is not None:
            check_float(self.name, "memory_budget_mb", mb, 0.0, lo_open=True)
        cs = self.options["chunk_size"]
        if cs is not None:
            check_int(self.name, "chunk_size", cs, 1)

    # ---- the universal entry
    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        from . import engine

        res = engine.compute_jacobian(loss_fn, params, batch, task_ids, task_specific=task_specific,
                                      **self._engine_kwargs())
        self._check_num_tasks(res.num_tasks)
        vec, info = self.aggregate(res.jacobian, res.gramian)
        engine.write_back(params, res.shared_names, vec)
        engine.write_task_specific(params, res.task_specific_mean(), fresh=True)
        return {"losses": res.losses, "gramian": res.gramian, **info}

    def _engine_kwargs(self) -> Dict[str, Any]:
        mb = self.options["memory_budget_mb"]
        return {"memory_budget": None if mb is None else int(mb * 2**20), "chunk_size": self.options["chunk_size"]}

    def __call__(self, jacobian: Tensor) -> Tensor:
        """Aggregate a (T, P) Jacobian into one P-vector (stateful methods update their state)."""
        from . import engine

        if jacobian.dim() != 2:
            raise ValueError(f"method {self.name!r} expects a (T, P) Jacobian, got shape {tuple(jacobian.shape)}")
        self._check_num_tasks(jacobian.shape[0])
        vec, _ = self.aggregate(jacobian, engine.gramian(jacobian))
        return vec

    def aggregate(self, jacobian: Tensor, gramian: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        """(T, P) Jacobian and its (T, T) Gramian -> (P-vector, extra diagnostics)."""
        raise NotImplementedError

    def combined_loss_weights(self, info: Dict[str, Any]) -> Optional[Tensor]:
        """Given ``aggregate``'s diagnostics, the (T,) weights w of the loss sum_i w_i L_i whose gradient the
        task-specific parameters get (wrappers use it); None: the mean loss."""
        del info
        return None


class GramianMethod(JacobianMethod):
    """``d = w^T J`` with ``w = self.weights(G)``.

    ``weights`` gets the Gramian as float64 on its own device and must stay there, with no data-dependent
    Python control flow (``torch.where`` and masks instead): the update step then has no host synchronisation.
    Methods with ``host_solver = True`` (the exact active-set / Newton solvers: mgda, upgrad, dualproj, cagrad,
    nashmtl) get a float64 CPU copy instead -- one T x T copy to the host and the weights back, per update.

    ``backward`` never forms the T x P matrix J: G is summed over per-parameter blocks and ``w^T J`` is written
    block by block straight into ``.grad`` (``engine.write_combined``).
    """

    kind = "gramian"
    host_solver = False

    @property
    def compilable(self) -> bool:  # type: ignore[override]
        return not self.host_solver

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        from . import engine

        res = engine.compute_jacobian(loss_fn, params, batch, task_ids, task_specific=task_specific,
                                      **self._engine_kwargs())
        self._check_num_tasks(res.num_tasks)
        w = self.gramian_weights(res.gramian)
        engine.write_combined(params, res.shared_names, res.blocks, w)
        engine.write_task_specific(params, res.task_specific_combined(self.task_specific_weights(w)), fresh=True)
        return {"losses": res.losses, "gramian": res.gramian, "weights": w.to(torch.float32)}

    def combined_loss_weights(self, info: Dict[str, Any]) -> Optional[Tensor]:
        return self.task_specific_weights(info["weights"])

    def task_specific_weights(self, weights: Tensor) -> Tensor:
        """Weights of the loss whose gradient the task-specific parameters get: by default the shared update's
        (d = sum_i w_i g_i, so heads and trunk follow one combined loss sum_i w_i L_i)."""
        return weights

    def aggregate(self, jacobian: Tensor, gramian: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        from . import engine

        w = self.gramian_weights(gramian)
        return engine.combine(w, jacobian), {"weights": w.to(torch.float32)}

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        """(T, T) Gramian -> (T,) float64 weights on the Gramian's device."""
        from . import engine

        g = gramian.detach()
        # A non-finite task loss makes the Gramian non-finite; that step is skipped anyway (the NaN monitor, on the
        # device), but the solvers must not see it (pinv's SVD raises on NaN): the identity keeps them defined.
        g = torch.where(torch.isfinite(g).all(), g, torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        if not self.host_solver:
            return self.weights(g.to(torch.float64))
        with engine.single_thread():
            w = self.weights(g.to("cpu", torch.float64))
        return w.to(device=g.device, dtype=torch.float64)

    def weights(self, gramian: Tensor) -> Tensor:
        """(T, T) float64 Gramian (on its device; on the CPU where ``host_solver``) -> (T,) float64 weights."""
        raise NotImplementedError


class LossWeightingMethod(Method):
    """No Jacobian: one vmapped forward and one backward of ``self.combine(losses)``.

    The weighted loss reaches every parameter, task-specific ones included, as in the reference implementations
    (LibMTL, FAMO, IGB4MTL back-propagate the weighted loss into the task heads too).
    """

    kind = "loss"

    def backward(self, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any, task_ids: Tensor, *,
                 task_specific: Optional[Set[str]] = None) -> Dict[str, Any]:
        del task_specific
        losses = task_losses(loss_fn, params, batch, task_ids)
        self._check_num_tasks(losses.shape[0])
        total, info = self.combine(losses)
        total.backward()
        self.after_backward(losses.detach())
        return {"losses": losses.detach(), **info}

    def combine(self, losses: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        """(T,) differentiable losses -> (scalar to back-propagate, diagnostics incl. "weights")."""
        raise NotImplementedError

    def after_backward(self, losses: Tensor) -> None:
        """Hook after the backward (e.g. step the method's own optimiser)."""
