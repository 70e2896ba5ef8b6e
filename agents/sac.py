"""Multi-task SAC (Haarnoja et al. 2018; multi-task form: Yu et al., Meta-World, CoRL 2019).

Twin critics with Polyak-averaged targets, a tanh-squashed Gaussian actor, and one learnable temperature per task
(log α_t, target entropy −|A_t|). Task identity enters through the backbone (default: MLP on [s, one_hot(t)]).

Every loss is first written for ONE task's slice of the (T, B, ...) batch; ``torch.func.vmap`` over the task axis
gives the per-task losses of shape (T,). A *method* (``mtrl.gradients``) turns them into one update of the shared
parameters — ``mtsac`` averages them. Per task t, with y = r + γ (1 − terminated) (min_j Q̄_j(s′, a′) − α_t log π(a′|s′)):

    critic:  L_Q,t = ½ Σ_j mean_B (Q_j(s, a) − y)²
    actor:   L_π,t = mean_B (α_t log π(ã|s) − min_j Q_j(s, ã)),    ã = tanh(μ + σ ε)
    alpha:   L_α,t = −mean_B log α_t (log π(ã|s) + H̄_t),           H̄_t = −|A_t|

With ``task_weights`` (Soft Modularization), L_Q,t and L_π,t are multiplied by w_t = T · softmax(−log α)_t,
detached (:meth:`MTSAC._weights`).

Padded action dimensions (``action_mask``) are forced to 0 and excluded from log π, so a task with fewer actions
has its own entropy target. Time-limit truncation bootstraps (the replay stores ``terminated`` only).

A backbone with ``context_len`` K > 0 (``t2mir`` with task ids hidden) reads the task from K recent transitions:
the batch then carries ``context`` (T, B, K, D) for s and ``next_context`` for s′ (the window one transition
later; ``context`` serves both when it is absent), and the first two rows' contexts of every task are the
backbone's contrastive views (``contrast``, bound unvmapped).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from agents import compiled
from agents.optim import FlatGrads, NonFiniteMonitor, adam, guarded_step, plain_adam_ready
from mtrl.config import SACConfig
from mtrl.devices import generator_state, restore_generator
from mtrl.gradients import get_method, task_losses
from mtrl.nets import build_backbone
from mtrl.nets.context import with_transition_dim
from mtrl.nets.init import ACTOR_HEAD_BOUND, CRITIC_HEAD_BOUND, init_network


def _prefixed_task_specific(module: nn.Module, prefix: str) -> Set[str]:
    names: Set[str] = set()
    for mod_name, mod in module.named_modules():
        fn = getattr(mod, "task_specific_parameters", None)
        if callable(fn):
            base = f"{mod_name}." if mod_name else ""
            names |= {prefix + base + n for n in fn()}
    return names


def squash(mean: Tensor, log_std: Tensor, eps: Tensor, mask: Tensor):
    """a = tanh(mean + std·eps) on the real action dimensions, and log π(a) summed over those dimensions."""
    u = mean + log_std.exp() * eps
    # log N(u; mean, std) with eps = (u - mean)/std, minus the tanh Jacobian log(1 - tanh(u)^2), written stably.
    logp = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    logp = logp - 2 * (math.log(2.0) - u - nn.functional.softplus(-2 * u))
    return torch.tanh(u) * mask, (logp * mask).sum(-1)


class Actor(nn.Module):
    """Squashed Gaussian policy: backbone(obs, task) -> (mean, log_std)."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, backbone: str, backbone_kwargs: Dict[str, Any],
                 log_std_min: float, log_std_max: float) -> None:
        super().__init__()
        self.net = build_backbone(backbone, obs_dim, 2 * act_dim, num_tasks,
                                  **with_transition_dim(backbone, backbone_kwargs, obs_dim, act_dim))
        self.context_len = int(getattr(self.net, "context_len", 0))  # the actor may read context, the critic not
        self.act_dim = act_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: Tensor, task: Tensor, return_aux: bool = False, context: Optional[Tensor] = None,
                contrast: Optional[Tensor] = None):
        kw = context_kwargs(context, contrast if return_aux else None) if self.context_len else {}
        out = self.net(obs, task, return_aux=True, **kw) if return_aux else self.net(obs, task, **kw)
        aux = None
        if return_aux:
            out, aux = out
        mean, log_std = out.chunk(2, dim=-1)
        # tanh-rescaled bounds as in CleanRL / SAC-AE: smooth, never saturates the clamp's zero gradient.
        log_std = torch.tanh(log_std)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1)
        return (mean, log_std, aux) if return_aux else (mean, log_std)

    def sample(self, obs: Tensor, task: Tensor, eps: Tensor, mask: Tensor, context: Optional[Tensor] = None):
        """Reparameterised action and its log-probability over the real (unmasked) dimensions."""
        return squash(*self(obs, task, context=context), eps, mask)

    @torch.no_grad()
    def act(self, obs: Tensor, task: Tensor, mask: Tensor, deterministic: bool,
            generator: Optional[torch.Generator] = None, context: Optional[Tensor] = None) -> Tensor:
        mean, log_std = self(obs, task, context=context)
        if deterministic:
            return torch.tanh(mean) * mask
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return torch.tanh(mean + log_std.exp() * eps) * mask


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, backbone: str,
                 backbone_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        bk = with_transition_dim(backbone, backbone_kwargs, obs_dim, act_dim)
        self.q1 = build_backbone(backbone, obs_dim + act_dim, 1, num_tasks, **bk)
        self.q2 = build_backbone(backbone, obs_dim + act_dim, 1, num_tasks, **bk)
        self.context_len = int(getattr(self.q1, "context_len", 0))

    def forward(self, obs: Tensor, act: Tensor, task: Tensor, return_aux: bool = False,
                context: Optional[Tensor] = None, contrast: Optional[Tensor] = None):
        x = torch.cat([obs, act], dim=-1)
        if not self.context_len:
            context = contrast = None
        if return_aux:
            kw = context_kwargs(context, contrast)
            (q1, a1), (q2, a2) = self.q1(x, task, return_aux=True, **kw), self.q2(x, task, return_aux=True, **kw)
            return q1.squeeze(-1), q2.squeeze(-1), a1 + a2
        kw = context_kwargs(context, None)
        return self.q1(x, task, **kw).squeeze(-1), self.q2(x, task, **kw).squeeze(-1)


def context_kwargs(context: Optional[Tensor], contrast: Optional[Tensor]) -> Dict[str, Tensor]:
    """Keyword arguments for a backbone call: only the ones given, so backbones without contexts never see them."""
    kw = {}
    if context is not None:
        kw["context"] = context
    if contrast is not None:
        kw["contrast"] = contrast
    return kw


def contrast_views(context: Tensor) -> Tensor:
    """(T, 2, K, D): two contexts of every task (its first two batch rows; the first twice when B = 1)."""
    return context[:, :2] if context.shape[1] >= 2 else context[:, [0, 0]]


def has_aux_loss(module: nn.Module) -> bool:
    """Backbones with an auxiliary loss (MoE balance, router contrast...) set ``has_aux_loss = True`` and accept
    ``forward(x, task_id, return_aux=True) -> (out, aux_scalar)``; the aux scalar is already weighted and is added
    to each task's loss, so it reaches the method like any other part of that task's loss."""
    return any(getattr(m, "has_aux_loss", False) for m in module.modules())


class NonFiniteLoss(RuntimeError):
    """A per-task loss (or the combined gradient) was NaN/inf. The update step never raises it (that would need a
    host synchronisation per step): the step is skipped on the device and :class:`~agents.optim.NonFiniteMonitor`
    records it; the training loop raises this from :meth:`MTSAC.nonfinite` at its next check. ``task`` is the
    first bad task's index, or None for a combined gradient whose task is not known."""

    def __init__(self, loss: str, task: Optional[int], kind: str = "loss", count: int = 1) -> None:
        where = f"task index {task}" if task is not None else "the combined update"
        super().__init__(f"non-finite {loss} {kind} for {where}")
        self.loss, self.task, self.kind, self.count = loss, task, kind, count


def method_grads(module: nn.Module, method, loss_fn, batch, task_ids: Tensor, task_specific: Set[str]
                 ) -> Dict[str, Any]:
    """The method's combined gradient of ``module`` written into its (zeroed) ``.grad`` views; returns the
    method's diagnostics. The part of a step that ``torch.compile`` traces (no optimizer, no hooks)."""
    kwargs = {"task_specific": task_specific} if task_specific and getattr(method, "accepts_task_specific",
                                                                           False) else {}
    return method.backward(loss_fn, dict(module.named_parameters()), batch, task_ids, **kwargs)


def apply_step(name: str, module: nn.Module, opt: torch.optim.Optimizer, method, info, loss_fn, batch,
               task_ids: Tensor, max_grad_norm: float, hooks, num_updates: int, grads: FlatGrads,
               monitor: NonFiniteMonitor, extra: Optional[Dict[str, Any]] = None, traced: bool = False) -> Tensor:
    """Given the gradient in ``grads``: finiteness (recorded in ``monitor``; a non-finite per-task loss or
    combined gradient makes the step a no-op on the device, ``guarded_step``), clipping, the optimizer step, the
    method's ``post_step`` and then the modules' ``after_step`` hooks (:func:`run_hooks`; MT-SAC passes none here
    and runs them after the whole update). No host sync. ``traced``: inside one compiled update
    (``guarded_step``). Returns the step's ``ok`` flag (0-d bool)."""
    norm = grads.norm(traced)
    ok = monitor.record(name, info["losses"], torch.isfinite(norm))
    if max_grad_norm > 0:
        grads.clip_(norm, max_grad_norm, traced)
    guarded_step(opt, ok, grads, traced)
    method.post_step()
    if hooks:
        run_hooks(hooks, hook_context(name, module, opt, info, loss_fn, batch, task_ids, num_updates, ok, extra))
    return ok


def hook_context(name: str, module: nn.Module, opt: torch.optim.Optimizer, info, loss_fn, batch, task_ids: Tensor,
                 num_updates: int, ok: Tensor, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What an ``after_step(ctx)`` hook is given about the step of one network (``role`` ``name``)."""
    return {"role": name, "num_updates": num_updates, "loss_fn": loss_fn, "batch": batch,
            "params": dict(module.named_parameters()), "task_ids": task_ids, "info": info, "optimizer": opt,
            "ok": ok, **(extra or {})}


def run_hooks(hooks, ctx: Dict[str, Any]) -> bool:
    """Every hook's ``after_step(ctx)``, eagerly; True when any of them changed buffers."""
    changed = False
    for m in hooks:
        changed |= bool(m.after_step(ctx))
    return changed


def wire_methods(agent: Any, num_tasks: int, method: str, method_kwargs: Optional[Dict[str, Any]],
                 actor_method: Optional[str], seed: int) -> None:
    """What an agent with ``actor`` and ``critic`` modules needs to step them through methods (MT-SAC and MT-PPO):
    one method instance per optimised loss (stateful methods such as FAMO or Nash-MTL keep separate state), the
    task ids, which modules add an auxiliary loss, the ``after_step`` hooks, the task-specific parameter names, the
    noise generator and the update counter."""
    mk = dict(method_kwargs or {})
    agent.critic_method = get_method(method, num_tasks, **mk)
    agent.actor_method = (get_method(actor_method, num_tasks) if actor_method and actor_method != method
                          else get_method(method, num_tasks, **mk))
    agent.task_ids = torch.arange(num_tasks, device=agent.device)
    agent.critic_aux, agent.actor_aux = has_aux_loss(agent.critic), has_aux_loss(agent.actor)
    # Modules that act after each optimizer step (mask updates, perturbations...): `after_step(ctx)`.
    agent.hooks = {role: [m for m in mod.modules() if callable(getattr(m, "after_step", None))]
                   for role, mod in (("critic", agent.critic), ("actor", agent.actor))}
    agent.critic_task_specific = _prefixed_task_specific(agent.critic, "")
    agent.actor_task_specific = _prefixed_task_specific(agent.actor, "")
    agent.generator = update_generator(agent.device, seed)
    for m in (agent.critic_method, agent.actor_method):
        if callable(getattr(m, "set_generator", None)):
            m.set_generator(agent.generator)  # PCGrad's task orders come from the update's own stream
    agent.grads = {"critic": FlatGrads(agent.critic.parameters()), "actor": FlatGrads(agent.actor.parameters())}
    agent.monitor = NonFiniteMonitor()
    agent.restore_note: Optional[str] = None  # set by load_state_dict when an RNG stream had to be re-derived
    agent.num_updates = 0


def update_generator(device: torch.device, seed: int) -> torch.Generator:
    """The update's random stream on the learner's device. ``meta`` (the device tests) has no generator of its own;
    a CPU one is accepted there by ``torch.randn(..., device="meta", generator=g)``."""
    gen = torch.Generator(device="cpu" if device.type == "meta" else device)
    gen.manual_seed(seed)
    return gen


def raise_nonfinite(monitor: NonFiniteMonitor, *methods) -> None:
    """Raise :class:`NonFiniteLoss` for the first loss with skipped steps since the last check (host read), then
    the methods' own deferred checks (``Method.check``: e.g. FAMO's losses <= min_losses, a ValueError)."""
    for m in methods:
        m.check()
    bad = monitor.collect()
    if bad:
        name, task, count = bad[0]
        raise NonFiniteLoss(name, task, kind="loss" if task is not None else "gradient",
                            count=sum(c for _, _, c in bad))


def critic_network(backbone: str, backbone_kwargs: Dict[str, Any], critic_backbone: Optional[str],
                   critic_backbone_kwargs: Optional[Dict[str, Any]]):
    """(name, options) of the critic's backbone: its own when ``critic_backbone`` is given, else the actor's."""
    if critic_backbone:
        return critic_backbone, dict(critic_backbone_kwargs or {})
    return backbone, backbone_kwargs


def host_states(*modules: nn.Module) -> Dict[str, Any]:
    """State that backbones keep outside parameters and buffers (MENTOR snapshots, harmony gradient EMAs...):
    every submodule with ``host_state()`` contributes ``{"<i>.<module name>": host_state()}`` (plain tensors and
    numbers, so a ``weights_only`` checkpoint can hold it). Not part of ``state_dict``: the workers' policy copies
    never need it."""
    out: Dict[str, Any] = {}
    for i, mod in enumerate(modules):
        for name, m in mod.named_modules():
            fn = getattr(m, "host_state", None)
            if callable(fn):
                out[f"{i}.{name}"] = fn()
    return out


def load_host_states(states: Dict[str, Any], *modules: nn.Module) -> None:
    for i, mod in enumerate(modules):
        for name, m in mod.named_modules():
            key = f"{i}.{name}"
            if key in states and callable(getattr(m, "load_host_state", None)):
                m.load_host_state(states[key])


class MTSAC:
    """The learner-side agent. ``update(batch)`` does one gradient step on critic, actor and temperatures."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, action_mask: np.ndarray, cfg: SACConfig, *,
                 backbone: str = "mlp", backbone_kwargs: Optional[Dict[str, Any]] = None, method: str = "mtsac",
                 method_kwargs: Optional[Dict[str, Any]] = None, actor_method: Optional[str] = None,
                 device: str | torch.device = "cpu", seed: int = 0, critic_backbone: Optional[str] = None,
                 critic_backbone_kwargs: Optional[Dict[str, Any]] = None) -> None:
        """``critic_backbone`` (None: ``backbone`` with ``backbone_kwargs``) builds the twin Q networks with
        ``critic_backbone_kwargs``."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_tasks, self.obs_dim, self.act_dim = num_tasks, obs_dim, act_dim
        bk = dict(backbone_kwargs or {})
        cb, cbk = critic_network(backbone, bk, critic_backbone, critic_backbone_kwargs)
        self.actor = Actor(obs_dim, act_dim, num_tasks, backbone, bk, cfg.log_std_min, cfg.log_std_max).to(self.device)
        self.critic = TwinQ(obs_dim, act_dim, num_tasks, cb, cbk).to(self.device)
        init_network(self.actor.net, cfg.init, ACTOR_HEAD_BOUND)
        for q in (self.critic.q1, self.critic.q2):
            init_network(q, cfg.init, CRITIC_HEAD_BOUND)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # > 0: batches must carry "context" (T, B, K, D); one K serves both networks (each reads it if it wants).
        lens = {m.context_len for m in (self.actor, self.critic) if m.context_len}
        if len(lens) > 1:
            raise ValueError(f"actor and critic read contexts of different lengths {sorted(lens)}: use one "
                             "context_len")
        self.context_len = lens.pop() if lens else 0
        self.log_alpha = nn.Parameter(torch.full((num_tasks,), math.log(cfg.init_alpha), device=self.device))
        self.action_mask = torch.as_tensor(action_mask, dtype=torch.float32, device=self.device)
        self.target_entropy = -self.action_mask.sum(-1)
        self.actor_opt = adam(self.actor.parameters(), cfg.actor_lr, self.device, eps=cfg.adam_eps)
        self.critic_opt = adam(self.critic.parameters(), cfg.critic_lr, self.device, eps=cfg.adam_eps)
        self.alpha_opt = adam([self.log_alpha], cfg.alpha_lr, self.device, eps=cfg.adam_eps)
        self.alpha_grads = FlatGrads([self.log_alpha])
        wire_methods(self, num_tasks, method, method_kwargs, actor_method, seed)
        self._critic_grads, self._actor_grads = self.critic_grads, self.actor_grads
        self._full: Optional[compiled.Compiled] = None  # the whole update in one graph (compile())
        self._full_ready = False  # every optimizer has its state: the full graph can step it (plain_adam_ready)
        self.graph: Optional[Any] = None  # the update as one captured graph (compile(capture=...), graphed.py)

    # --- per-task losses (one task's slice; vmapped over the task axis) ---------------------------------------
    def critic_loss_one(self, params: Dict[str, Tensor], b: Dict[str, Tensor], task: Tensor, *,
                        contrast: Optional[Tensor] = None) -> Tensor:
        """``contrast`` (all tasks' contrastive contexts, context backbones only) is bound unvmapped."""
        kw = context_kwargs(b.get("context"), contrast)
        if self.critic_aux:
            q1, q2, aux = functional_call(self.critic, params, (b["obs"], b["action"], task), {"return_aux": True, **kw})
        else:
            (q1, q2), aux = functional_call(self.critic, params, (b["obs"], b["action"], task), kw), 0.0
        y = b["target"]
        loss = 0.5 * ((q1 - y).pow(2).mean() + (q2 - y).pow(2).mean())
        return (loss * b["weight"] if "weight" in b else loss) + aux

    def actor_loss_one(self, params: Dict[str, Tensor], b: Dict[str, Tensor], task: Tensor, *,
                       critic_params: Dict[str, Tensor], contrast: Optional[Tensor] = None) -> Tensor:
        """``critic_params`` (detached, shared by every task) and ``contrast`` are bound with functools.partial:
        not vmapped."""
        kw = context_kwargs(b.get("context"), contrast)  # `contrast` only reaches a backbone with return_aux
        if self.actor_aux:
            mean, log_std, aux = functional_call(self.actor, params, (b["obs"], task), {"return_aux": True, **kw})
        else:
            (mean, log_std), aux = functional_call(self.actor, params, (b["obs"], task), kw), 0.0
        a, logp = squash(mean, log_std, b["eps"], b["mask"])
        q1, q2 = functional_call(self.critic, critic_params, (b["obs"], a, task), kw)
        loss = (b["alpha"] * logp - torch.min(q1, q2)).mean()
        return (loss * b["weight"] if "weight" in b else loss) + aux

    # --- the update -----------------------------------------------------------------------------------------
    def _weights(self, alpha: Tensor) -> Dict[str, Tensor]:
        """``{"weight": w}`` with w_t = T · softmax(−log α)_t (detached) when ``task_weights`` is on, else ``{}``.

        Soft Modularization (Yang et al. 2020; official RchalYang/Soft-Module ``temp_reweight``; Meta-World+
        ``extract_task_weights`` in rl/algorithms/mtsac.py): a task whose temperature is still high (its policy has
        not settled) counts less; the weights average 1, so the loss scale is that of the plain mean. They multiply
        each task's critic and actor loss (not the temperature's), before the method combines them."""
        if not self.cfg.task_weights:
            return {}
        return {"weight": self.num_tasks * torch.softmax(-alpha.detach().log(), dim=0)}

    def _flat(self, x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.reshape(-1, *x.shape[2:])

    def _context(self, batch: Dict[str, Tensor]) -> Tuple[Optional[Tensor], Dict[str, Tensor], Dict[str, Tensor]]:
        """(the batch's context or None, the entry for the vmapped loss batches, the keyword to bind into the loss
        functions); the last two are empty without context."""
        if not self.context_len:
            return None, {}, {}
        if batch.get("context") is None:
            raise ValueError(f"this backbone reads the task from context: the batch needs 'context' of shape "
                             f"(T, B, {self.context_len}, D) (MultiTaskReplay.sample(..., context_len=K))")
        ctx = batch["context"]
        return ctx, {"context": ctx}, {"contrast": contrast_views(ctx)}

    def compute_targets(self, batch: Dict[str, Tensor], alpha: Tensor, eps: Tensor) -> Tensor:
        """y = r + γ (1 − terminated) (min_j Q̄_j(s′, a′) − α log π(a′|s′)), a′ from the noise ``eps`` (T·B, A)."""
        T, B = batch["reward"].shape
        with torch.no_grad():
            tasks = self.task_ids.repeat_interleave(B)
            mask = self.action_mask.repeat_interleave(B, dim=0)
            next_obs = self._flat(batch["next_obs"])
            ctx = None
            if self.context_len:
                ctx = self._flat(batch["next_context"] if batch.get("next_context") is not None
                                 else batch.get("context"))
            a2, logp2 = self.actor.sample(next_obs, tasks, eps, mask, context=ctx)
            q1, q2 = self.critic_target(next_obs, a2, tasks, context=ctx)
            v = (torch.min(q1, q2) - alpha.repeat_interleave(B) * logp2).view(T, B)
            return batch["reward"] + self.cfg.gamma * (1.0 - batch["terminated"]) * v

    def update(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """One update from a (T, B, ...) batch. Returns detached diagnostics (tensors; no host sync here).

        The noise is drawn here from the update's generator (eager: a generator cannot enter a compiled graph);
        the rest is :meth:`step`, then the backbones' ``after_step`` hooks (:meth:`_after_update`), eagerly. With
        a captured graph (:meth:`compile` ``capture``, ``agents/graphed.py``) the noise is drawn into the graph's
        static buffers and the step is one replay."""
        T, B = batch["reward"].shape
        do_actor = self.num_updates % self.cfg.actor_update_every == 0
        do_target = self.num_updates % self.cfg.target_update_every == 0
        if self.graph is not None and self._ready():
            info = self.graph(batch, do_actor, do_target)
        else:
            eps_next = torch.randn((T * B, self.act_dim), generator=self.generator, device=self.device)
            eps = (torch.randn((T, B, self.act_dim), generator=self.generator, device=self.device) if do_actor
                   else None)
            if self._full is not None and self._ready():
                # The methods' own random draws (PCGrad's orders), in the order the eager update makes them.
                for m in (self.critic_method, self.actor_method) if do_actor else (self.critic_method,):
                    m.predraw([torch.rand(s, generator=self.generator, device=self.device) for s in m.random_draws()])
                info = self.run_step(batch, eps_next, eps, do_target)
            else:
                info = self.step(batch, eps_next, eps, do_target)
        self._after_update(batch, info)
        self.num_updates += 1
        return info

    def run_step(self, batch: Dict[str, Tensor], eps_next: Tensor, eps: Optional[Tensor], do_target: bool
                 ) -> Dict[str, Tensor]:
        """The compiled step on drawn noise (and predrawn method draws): the one-graph update where it is active
        and the optimizers have their state (:meth:`_ready`), else :meth:`step` with its compiled parts. What the
        captured graph (``agents/graphed.py``) records."""
        if self._full is not None and self._ready():
            for g in (*self.grads.values(), self.alpha_grads):
                g.separate()
            return self._full(batch, eps_next, eps, do_target)
        return self.step(batch, eps_next, eps, do_target)

    def step(self, batch: Dict[str, Tensor], eps_next: Tensor, eps: Optional[Tensor], do_target: bool,
             traced: bool = False) -> Dict[str, Tensor]:
        """The update given its noise: critic, temperatures and actor (when ``eps`` is given), Polyak targets.

        The gradients come from :meth:`critic_grads` / :meth:`actor_grads`. Eagerly (or with only those two
        compiled) the optimizer steps are fused Adam kernels; ``traced`` (:meth:`full_step`, the whole update in
        one compiled graph) steps with ``traced_adam_step`` on the same state and skips the host-side check of
        the gradient views (the gradients are separate tensors then: ``FlatGrads.separate``).

        The backbones' ``after_step`` hooks are not run here but after the whole update (:meth:`_after_update`),
        so the step is pure tensor code that compiles and captures with every backbone; with hooks the step
        returns what they read under ``info["hooks"]`` (each network's loss batch and ``ok`` flag, and the
        scale-free TD loss the MoE snapshot ranking uses)."""
        alpha = self.log_alpha.detach().exp()
        info: Dict[str, Tensor] = {}
        hooked = any(self.hooks.values())
        hooks: Dict[str, Any] = {}
        self.grads["critic"].zero(traced)
        cinfo, cb = self._critic_grads(batch, eps_next, alpha)
        ok = self._apply("critic", self.critic_opt, self.critic_method, cinfo, traced)
        info["critic_losses"] = cinfo["losses"]
        info["critic_diag"] = cinfo  # type: ignore[assignment]
        if hooked:
            # A scale-free per-task quality signal for the hooks that rank snapshots (moe): the TD loss relative to
            # the variance of its targets, which grows with the Q scale as the raw loss does
            # (mtrl/nets/README_BACKBONES.md). Only hooks read it, so an agent without any skips the work.
            hooks["rank_losses"] = cinfo["losses"].detach() / (cb["target"].var(dim=1, unbiased=False) + 1e-8)
            hooks["critic"] = (cb, ok)

        if eps is not None:
            self.grads["actor"].zero(traced)
            ainfo, ab, alpha_losses, entropy = self._actor_grads(batch, eps, alpha)
            guarded_step(self.alpha_opt, self.monitor.record("alpha", alpha_losses), self.alpha_grads, traced)
            ok = self._apply("actor", self.actor_opt, self.actor_method, ainfo, traced)
            info["alpha_losses"] = alpha_losses
            info["entropy"] = entropy
            info["actor_losses"] = ainfo["losses"]
            info["actor_diag"] = ainfo  # type: ignore[assignment]
            if hooked:
                hooks["actor"] = (ab, ok)

        if do_target:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()),
                                     self.cfg.tau)
        info["alpha"] = self.log_alpha.detach().exp()
        if hooked:
            info["hooks"] = hooks  # type: ignore[assignment]
        return info

    def _after_update(self, batch: Dict[str, Tensor], info: Dict[str, Any]) -> None:
        """The backbones' ``after_step`` hooks of this update, eagerly and in the order critic, actor: after the
        whole update, so between graph replays (eagerly as well, so compiled and eager runs agree). Before issue 21
        the critic's hooks ran before the actor's step; now a hook's change (a harmony mask flip, a MENTOR
        perturbation) reaches the actor loss one update later, and the Polyak step of the same update comes
        before the perturbation of the target critic."""
        pending = info.pop("hooks", None)
        if not pending:
            return
        _, _, bind = self._context(batch)
        extra = {"rank_losses": pending["rank_losses"]}
        for name, module, opt in (("critic", self.critic, self.critic_opt), ("actor", self.actor, self.actor_opt)):
            if name not in pending or not self.hooks[name]:
                continue
            lb, ok = pending[name]
            loss_fn = (functools.partial(self.critic_loss_one, **bind) if name == "critic" else
                       functools.partial(self.actor_loss_one, critic_params=self._frozen_critic(), **bind))
            changed = run_hooks(self.hooks[name], hook_context(name, module, opt, info[f"{name}_diag"], loss_fn, lb,
                                                               self.task_ids, self.num_updates, ok, extra))
            # [issue 4] An after_step that returns True changed buffers (e.g. harmony's per-task masks): the target
            # critic shares them, so copy the critic's buffers into it (Polyak averaging only moves parameters).
            if changed and name == "critic":
                with torch.no_grad():
                    for dst, src in zip(self.critic_target.buffers(), self.critic.buffers()):
                        dst.copy_(src)
                # A perturbed critic backbone (moe) moves its target the same way (MENTOR perturbs both).
                for src, dst in zip(self.critic.modules(), self.critic_target.modules()):
                    if callable(getattr(src, "apply_last_perturbation", None)):
                        src.apply_last_perturbation(dst)
        # A hook may drop optimizer state (moe's reset_optimizer): look again before the next compiled step.
        self._full_ready = False

    def critic_grads(self, batch: Dict[str, Tensor], eps_next: Tensor, alpha: Tensor):
        """Targets, per-task critic losses and the method's combined gradient in the critic's ``.grad``.
        Returns (the method's diagnostics, the loss batch)."""
        _, extra, bind = self._context(batch)
        target = self.compute_targets(batch, alpha, eps_next)
        cb = {"obs": batch["obs"], "action": batch["action"], "target": target, **extra, **self._weights(alpha)}
        return method_grads(self.critic, self.critic_method, functools.partial(self.critic_loss_one, **bind), cb,
                            self.task_ids, self.critic_task_specific), cb

    def actor_grads(self, batch: Dict[str, Tensor], eps: Tensor, alpha: Tensor):
        """Temperature and actor gradients on the noise ``eps`` (T, B, A): α's analytic gradient into its
        ``.grad``, the method's combined actor gradient into the actor's. Returns (actor diagnostics, the actor's
        loss batch, α losses (T,), entropy (T,))."""
        T, B = batch["reward"].shape
        context, extra, bind = self._context(batch)
        mask = self.action_mask[:, None, :].expand(T, B, self.act_dim)
        # Temperature: log π from a no-grad pass on the same noise the actor step uses (SB3's ordering).
        with torch.no_grad():
            _, logp = self.actor.sample(self._flat(batch["obs"]), self.task_ids.repeat_interleave(B),
                                        self._flat(eps), self._flat(mask), context=self._flat(context))
            gap = logp.view(T, B) + self.target_entropy[:, None]
            alpha_losses = -(self.log_alpha.detach()[:, None] * gap).mean(1)
            # d/d log α_t of −mean_B log α_t (log π + H̄_t): each α_t sees only its own task's loss.
            self.alpha_grads.buffer.copy_(-gap.mean(1))
        actor_loss = functools.partial(self.actor_loss_one, critic_params=self._frozen_critic(), **bind)
        ab = {"obs": batch["obs"], "eps": eps, "mask": self.action_mask, "alpha": alpha, **extra,
              **self._weights(alpha)}
        ainfo = method_grads(self.actor, self.actor_method, actor_loss, ab, self.task_ids, self.actor_task_specific)
        return ainfo, ab, alpha_losses, -logp.view(T, B).mean(1)

    def compile(self, mode: str = "auto", one_graph: Optional[bool] = None, small_matmul: Optional[bool] = None,
                capture: Optional[bool] = None) -> str:
        """Compile the update (``agents/compiled.py``); returns the mode used.

        The whole update after the noise draws (:meth:`full_step`) as one graph, from the second update on (the
        first creates the optimizers' state through the eager step); the backbones' ``after_step`` hooks run
        eagerly after it (:meth:`_after_update`), so every backbone compiles. Where that graph does not build, or
        with ``one_graph=False`` (the earlier split, kept for comparison in scripts/bench_learner.py):
        :meth:`critic_grads` and :meth:`actor_grads` compiled, the rest eager.

        ``one_graph=None`` (default): one graph where both methods say so (``Method.one_graph``: ``mtsac`` and
        ``pcgrad``, the two whose one graph is tested against eager; in scripts/bench_learner.py on the 2-core AMD
        EPYC one graph beat the split form at width 8 by 23-68% (mtsac) and 50-70% (pcgrad), and was within
        -7%..+3% of it at 3 x 400, in three runs; on the Intel Xeon of issue 21 by 29% and 59%, and 1-2% behind
        it at 3 x 400); the
        other compilable methods keep the split unless ``one_graph=True``. ``small_matmul``: the CPU small-matmul
        graph pass (``agents/small_matmul.py``): None (default) where it pays (``small_matmul.pays_here``: not on
        Intel CPUs), True/False to force it (``scripts/bench_learner.py --ablate-small-matmul`` measures it).

        ``capture`` (None: True on CUDA, False elsewhere): the compiled step (:meth:`run_step`) behind
        :class:`agents.graphed.GraphedUpdate`: static input buffers, the noise drawn into them, and on CUDA one
        ``torch.cuda.CUDAGraph`` replay per update (``auto`` then compiles in Inductor's ``default`` mode: the
        capture replaces ``reduce-overhead``'s CUDA-graph trees, which skip a graph that mutates its inputs). On
        another device the replay is a direct call, so CPU tests drive the same layer."""
        if capture is None:
            capture = self.device.type == "cuda"
        if small_matmul is None:
            from agents.small_matmul import pays_here

            small_matmul = pays_here()
        # The pass rewrites CPU products only; elsewhere it would only add a custom pass to Inductor's pipeline.
        small_matmul = small_matmul and self.device.type == "cpu"
        used = compiled.resolve(mode, self.device, [self.critic_method, self.actor_method], [self.actor, self.critic],
                                capture=capture)
        if used == "off":
            return used
        if one_graph is None:
            one_graph = all(m.one_graph for m in (self.critic_method, self.actor_method))
        if capture and used == "reduce-overhead":
            print("note: compile=reduce-overhead replays Inductor's own CUDA graphs: the update is not captured "
                  "again as one graph (agents/graphed.py)", file=sys.stderr, flush=True)
        elif capture:
            from agents.graphed import GraphedUpdate

            self.graph = GraphedUpdate(self)
        if not one_graph:
            self._compile_parts(used, small_matmul)
            return used

        def split(*args: Any) -> Dict[str, Tensor]:
            self._full = None
            self._compile_parts(used, small_matmul)
            return self.step(*args)

        self._full = compiled.Compiled(self.full_step, used, "the whole update", self._zero_grads, fullgraph=True,
                                       fallback=(split, "the critic and actor gradients compiled apart"),
                                       small_matmul=small_matmul)
        return used

    def _compile_parts(self, mode: str, small_matmul: bool = True) -> None:
        self._critic_grads = compiled.Compiled(self.critic_grads, mode, "the critic gradient", self._zero_grads,
                                               small_matmul=small_matmul)
        self._actor_grads = compiled.Compiled(self.actor_grads, mode, "the actor gradient", self._zero_grads,
                                              small_matmul=small_matmul)

    def _zero_grads(self) -> None:
        for g in (*self.grads.values(), self.alpha_grads):
            g.zero()

    def full_step(self, batch: Dict[str, Tensor], eps_next: Tensor, eps: Optional[Tensor], do_target: bool
                  ) -> Dict[str, Tensor]:
        """:meth:`step` with the optimizer steps in traced tensor ops: what :meth:`compile` turns into one graph."""
        return self.step(batch, eps_next, eps, do_target, traced=True)

    def _ready(self) -> bool:
        """Every optimizer has its Adam state (checked until true; reset by :meth:`load_state_dict`)."""
        if not self._full_ready:
            self._full_ready = all(plain_adam_ready(o, list(g.params)) for o, g in
                                   ((self.critic_opt, self.grads["critic"]), (self.actor_opt, self.grads["actor"]),
                                    (self.alpha_opt, self.alpha_grads)))
            if not self._full_ready and self.graph is not None:
                self.graph.reset()  # the eager step that follows makes new state tensors: capture again after it
        return self._full_ready

    def nonfinite(self) -> None:
        """Host check, every ``log_every`` updates: raise :class:`NonFiniteLoss` if a step was skipped since."""
        raise_nonfinite(self.monitor, self.critic_method, self.actor_method)

    def _frozen_critic(self) -> Dict[str, Tensor]:
        return {k: v.detach() for k, v in self.critic.named_parameters()}

    def _apply(self, name: str, opt: torch.optim.Optimizer, method, info, traced: bool = False) -> Tensor:
        module = self.critic if name == "critic" else self.actor
        return apply_step(name, module, opt, method, info, None, None, self.task_ids, self.cfg.max_grad_norm, [],
                          self.num_updates, self.grads[name], self.monitor, traced=traced)

    def losses(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Per-task losses (T,) for critic, actor and α on a batch, without updating anything."""
        T, B = batch["reward"].shape
        alpha = self.log_alpha.detach().exp()
        context, extra, bind = self._context(batch)
        target = self.compute_targets(batch, alpha, torch.randn((T * B, self.act_dim), generator=self.generator,
                                                                device=self.device))
        cparams = self._frozen_critic()
        aparams = {k: v.detach() for k, v in self.actor.named_parameters()}
        eps = torch.randn((T, B, self.act_dim), generator=self.generator, device=self.device)
        with torch.no_grad():
            w = self._weights(alpha)
            critic = task_losses(functools.partial(self.critic_loss_one, **bind), cparams,
                                 {"obs": batch["obs"], "action": batch["action"], "target": target, **extra, **w},
                                 self.task_ids)
            ab = {"obs": batch["obs"], "eps": eps, "mask": self.action_mask, "alpha": alpha, **extra, **w}
            actor = task_losses(functools.partial(self.actor_loss_one, critic_params=cparams, **bind), aparams, ab,
                                self.task_ids)
            mask = self.action_mask[:, None, :].expand(T, B, self.act_dim)
            _, logp = self.actor.sample(self._flat(batch["obs"]), self.task_ids.repeat_interleave(B),
                                        self._flat(eps), self._flat(mask), context=self._flat(context))
            alpha_l = -(self.log_alpha[:, None] * (logp.view(T, B) + self.target_entropy[:, None])).mean(1)
        return {"critic": critic, "actor": actor, "alpha": alpha_l}

    # --- acting and state -----------------------------------------------------------------------------------
    def policy_state(self) -> Dict[str, np.ndarray]:
        """Actor weights as numpy arrays, for the rollout workers (cheap to ship through Ray's object store)."""
        return {k: v.detach().cpu().numpy() for k, v in self.actor.state_dict().items()}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "critic_method": self.critic_method.state_dict(),
            "actor_method": self.actor_method.state_dict(),
            "generator": generator_state(self.generator),
            "num_updates": self.num_updates,
            "host_state": host_states(self.actor, self.critic),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.critic_method.load_state_dict(state["critic_method"])
        self.actor_method.load_state_dict(state["actor_method"])
        self.num_updates = int(state["num_updates"])
        self._full_ready = False  # new optimizer state tensors (or none yet): checked again at the next update
        if self.graph is not None:
            self.graph.reset()  # a captured graph holds the addresses of the old state tensors
        self.restore_note = restore_generator(self.generator, state["generator"], salt=self.num_updates)
        load_host_states(state.get("host_state", {}), self.actor, self.critic)


def build_actor(obs_dim: int, act_dim: int, num_tasks: int, cfg: SACConfig, backbone: str,
                backbone_kwargs: Dict[str, Any]) -> Actor:
    """The CPU policy a rollout worker holds (same architecture as the learner's actor)."""
    return Actor(obs_dim, act_dim, num_tasks, backbone, dict(backbone_kwargs), cfg.log_std_min, cfg.log_std_max)
