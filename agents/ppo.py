"""Multi-task PPO (Schulman et al. 2017; multi-task form: the Meta-World+ MTPPO baseline, McLean et al. 2025).

Synchronous rounds: the workers collect ``rollout_steps`` env steps of EVERY task with the current policy
(``mtrl/onpolicy.py``), the learner computes per-task GAE and then runs ``epochs`` x ``minibatches`` updates.

Networks and losses (one task's slice of a (T, b, ...) minibatch; ``torch.func.vmap`` over the task axis gives
per-task losses of shape (T,), so every method of ``mtrl.gradients`` combines them unchanged):

    actor:   L_pi,t = -mean_b min(r A, clip(r, 1-eps, 1+eps) A) - ent_coef * H_t + aux,   r = pi(a|s) / pi_old(a|s)
    critic:  L_V,t  = vf_coef * 1/2 mean_b max((V - R)^2, (V_old + clip(V - V_old, +-vf_clip) - R)^2) + aux

Actor and critic are SEPARATE networks (each built from the chosen backbone) with separate Adam optimizers and
separate method instances: the method combines the actor losses and, separately, the critic losses, exactly as
for SAC (design.md §4). ``vf_coef`` therefore only rescales the critic's loss (with Adam it matters little; it is
kept so the per-task critic losses read as in SB3/CleanRL). The gradient-norm clip is applied per network after
the method wrote the combined gradient.

Policy: a diagonal Gaussian over the *unsquashed* action, mean from the backbone, log-std either a per-task
state-independent parameter (``ppo.log_std=param``, default, as SB3/CleanRL) or a second head of the backbone
(``state``, tanh-rescaled into [-5, 2]). Sampled actions are stored unclipped (their log-prob is the Gaussian's);
the ENV receives ``clip(a, -1, 1)`` (SB3's convention). Padded action dimensions (``action_mask``) are forced to 0
and excluded from the log-prob and the entropy.

Observations are normalised by per-task running mean/variance (``ObsNorm``, buffers of the policy module, so they
travel to the workers with the weights and live in checkpoints). The statistics are frozen during collection and
the update of a round and are updated with the round's raw observations AFTER its update, so the log-probs the
workers return and the learner's first recomputation agree (ratio = 1 at the first minibatch).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Set

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from agents import compiled
from agents.optim import adam
from agents.sac import (NonFiniteLoss, apply_step, critic_network, host_states, load_host_states, method_grads,
                        raise_nonfinite, wire_methods)
from mtrl.devices import generator_state, restore_generator
from mtrl.config import PPOConfig
from mtrl.nets import build_backbone
from mtrl.nets.init import ACTOR_HEAD_BOUND, CRITIC_HEAD_BOUND, init_network

LOG_2PI = math.log(2 * math.pi)
STATE_LOG_STD = (-5.0, 2.0)

__all__ = ["ObsNorm", "GaussianPolicy", "MTPPO", "gae", "normalize_advantages", "stratified_minibatches",
           "gaussian_logp", "NonFiniteLoss"]


# ----------------------------------------------------------------------------------------------- pieces
class ObsNorm(nn.Module):
    """Per-task running mean/variance of observations (parallel-variance merge, as SB3's RunningMeanStd)."""

    def __init__(self, num_tasks: int, obs_dim: int, clip: float = 10.0, enabled: bool = True) -> None:
        super().__init__()
        self.clip, self.enabled = clip, enabled
        self.register_buffer("mean", torch.zeros(num_tasks, obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(num_tasks, obs_dim, dtype=torch.float64))
        self.register_buffer("count", torch.full((num_tasks,), 1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, task: int, x: Tensor) -> None:
        """Merge a (N, obs_dim) batch of raw observations of task ``task``."""
        x = x.to(torch.float64).reshape(-1, self.mean.shape[1])
        n = x.shape[0]
        if n == 0:
            return
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        m, v, c = self.mean[task], self.var[task], self.count[task]
        delta, tot = bm - m, c + n
        self.mean[task] = m + delta * n / tot
        self.var[task] = (v * c + bv * n + delta.pow(2) * c * n / tot) / tot
        self.count[task] = tot

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        """Normalise raw ``obs`` (B, d) of tasks ``task`` (B,)."""
        if not self.enabled:
            return obs
        m = self.mean.index_select(0, task.reshape(-1)).to(obs.dtype)
        s = self.var.index_select(0, task.reshape(-1)).to(obs.dtype).add(1e-8).sqrt()
        return ((obs - m) / s).clamp(-self.clip, self.clip)


def gaussian_logp(action: Tensor, mean: Tensor, log_std: Tensor, mask: Tensor) -> Tensor:
    """log N(action; mean, exp(log_std)) summed over the real (mask = 1) action dimensions."""
    z = (action - mean) * torch.exp(-log_std)
    return ((-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI) * mask).sum(-1)


def gaussian_entropy(log_std: Tensor, mask: Tensor) -> Tensor:
    return ((log_std + 0.5 * (1.0 + LOG_2PI)) * mask).sum(-1)


class GaussianPolicy(nn.Module):
    """``forward(obs_normalised, task) -> (mean, log_std)``; ``act``/``sample`` take RAW observations."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, backbone: str, backbone_kwargs: Dict[str, Any],
                 log_std: str = "param", init_log_std: float = 0.0, obs_clip: float = 10.0,
                 norm_obs: bool = True) -> None:
        super().__init__()
        self.act_dim, self.mode = act_dim, log_std
        self.obs_norm = ObsNorm(num_tasks, obs_dim, obs_clip, norm_obs)
        self.net = build_backbone(backbone, obs_dim, act_dim * (2 if log_std == "state" else 1), num_tasks,
                                  **dict(backbone_kwargs))
        if log_std == "param":
            self.log_std = nn.Parameter(torch.full((num_tasks, act_dim), float(init_log_std)))

    def task_specific_parameters(self) -> Set[str]:
        """Row t of the per-task log-std only enters task t's loss."""
        return {"log_std"} if self.mode == "param" else set()

    def forward(self, obs: Tensor, task: Tensor, return_aux: bool = False):
        out = self.net(obs, task, return_aux=True) if return_aux else self.net(obs, task)
        aux = None
        if return_aux:
            out, aux = out
        if self.mode == "state":
            mean, ls = out.chunk(2, dim=-1)
            lo, hi = STATE_LOG_STD
            log_std = lo + 0.5 * (hi - lo) * (torch.tanh(ls) + 1)
        else:
            mean = out
            # (1, A) under vmap (0-d task), (B, A) otherwise; broadcasts against mean either way.
            log_std = self.log_std.index_select(0, task.reshape(-1)).expand_as(mean)
        return (mean, log_std, aux) if return_aux else (mean, log_std)

    @torch.no_grad()
    def sample(self, obs: Tensor, task: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None):
        """Unclipped Gaussian action (padded dims 0) and its log-prob, from RAW observations."""
        mean, log_std = self(self.obs_norm(obs, task), task)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        a = (mean + log_std.exp() * eps) * mask
        return a, gaussian_logp(a, mean, log_std, mask)

    @torch.no_grad()
    def act(self, obs: Tensor, task: Tensor, mask: Tensor, deterministic: bool,
            generator: Optional[torch.Generator] = None) -> Tensor:
        """The action the ENV receives: clipped to [-1, 1] (evaluation: the mean)."""
        if deterministic:
            mean, _ = self(self.obs_norm(obs, task), task)
            return mean.clamp(-1.0, 1.0) * mask
        return self.sample(obs, task, mask, generator)[0].clamp(-1.0, 1.0)


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, num_tasks: int, backbone: str, backbone_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.net = build_backbone(backbone, obs_dim, 1, num_tasks, **dict(backbone_kwargs))

    def forward(self, obs: Tensor, task: Tensor, return_aux: bool = False):
        if return_aux:
            v, aux = self.net(obs, task, return_aux=True)
            return v.squeeze(-1), aux
        return self.net(obs, task).squeeze(-1)


def build_policy(obs_dim: int, act_dim: int, num_tasks: int, cfg: PPOConfig, backbone: str,
                 backbone_kwargs: Dict[str, Any]) -> GaussianPolicy:
    """The CPU policy a rollout worker holds (same architecture as the learner's)."""
    return GaussianPolicy(obs_dim, act_dim, num_tasks, backbone, backbone_kwargs, cfg.log_std, cfg.init_log_std,
                          cfg.obs_clip, cfg.norm_obs)


# ----------------------------------------------------------------------------------------------- GAE etc.
def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
        truncated: np.ndarray, gamma: float, lam: float):
    """Per-task GAE over (T, N) arrays in time order. ``next_values`` = V(true next obs) of every step.

    delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t): truncation (time limit, or the end of the round)
    bootstraps from V of the TRUE final observation; termination does not bootstrap. The recursion
    A_t = delta_t + gamma lam (1 - done_t) A_{t+1} stops at every episode end (done = terminated or truncated).
    Returns (advantages, returns = advantages + values), float32.
    """
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    term = np.asarray(terminated, np.float64)
    done = np.maximum(term, np.asarray(truncated, np.float64))
    delta = r + gamma * (1.0 - term) * np.asarray(next_values, np.float64) - v
    adv = np.zeros_like(delta)
    last = np.zeros(delta.shape[0])
    for t in range(delta.shape[1] - 1, -1, -1):
        last = delta[:, t] + gamma * lam * (1.0 - done[:, t]) * last
        adv[:, t] = last
    return adv.astype(np.float32), (adv + v).astype(np.float32)


def normalize_advantages(adv: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit std per task (row) of a (T, N) tensor: no task's advantage scale dominates the others'."""
    return (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True, unbiased=False) + eps)


def stratified_minibatches(num_tasks: int, n: int, minibatches: int, generator: torch.Generator,
                           device: torch.device | str = "cpu"):
    """Index tensors (T, b_i), one per minibatch: an independent permutation of each task's N samples split into
    ``minibatches`` near-equal parts, so every task appears in every minibatch with (almost) the same count."""
    perm = torch.argsort(torch.rand(num_tasks, n, generator=generator, device=device), dim=1)
    return list(torch.tensor_split(perm, minibatches, dim=1))


def explained_variance(values: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Per task (row): 1 - Var[R - V] / Var[R] (nan where Var[R] = 0)."""
    var_r = returns.var(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var_r > 0, 1.0 - (returns - values).var(1) / var_r, np.nan)


# ----------------------------------------------------------------------------------------------- the agent
class MTPPO:
    """Learner-side multi-task PPO. ``prepare(rollout)`` -> batch; ``update(batch)`` runs the epochs."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, action_mask: np.ndarray, cfg: PPOConfig, *,
                 backbone: str = "mlp", backbone_kwargs: Optional[Dict[str, Any]] = None, method: str = "mtsac",
                 method_kwargs: Optional[Dict[str, Any]] = None, actor_method: Optional[str] = None,
                 device: str | torch.device = "cpu", seed: int = 0, critic_backbone: Optional[str] = None,
                 critic_backbone_kwargs: Optional[Dict[str, Any]] = None) -> None:
        """``critic_backbone`` (None: ``backbone`` with ``backbone_kwargs``) builds the value network with
        ``critic_backbone_kwargs``."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_tasks, self.obs_dim, self.act_dim = num_tasks, obs_dim, act_dim
        bk = dict(backbone_kwargs or {})
        cb, cbk = critic_network(backbone, bk, critic_backbone, critic_backbone_kwargs)
        self.actor = build_policy(obs_dim, act_dim, num_tasks, cfg, backbone, bk).to(self.device)
        self.critic = ValueNet(obs_dim, num_tasks, cb, cbk).to(self.device)
        self.action_mask = torch.as_tensor(action_mask, dtype=torch.float32, device=self.device)
        init_network(self.actor.net, cfg.init, ACTOR_HEAD_BOUND)
        init_network(self.critic.net, cfg.init, CRITIC_HEAD_BOUND)
        self.actor_opt = adam(self.actor.parameters(), cfg.lr, self.device, eps=cfg.adam_eps)
        self.critic_opt = adam(self.critic.parameters(), cfg.lr, self.device, eps=cfg.adam_eps)
        wire_methods(self, num_tasks, method, method_kwargs, actor_method, seed)  # num_updates: minibatch steps
        self._grad_fns = self._gradient_functions()
        self.num_rounds = 0

    def set_lr(self, lr: float) -> None:
        """Learning rate of both networks (the trainer's ``anneal_lr`` schedule)."""
        for opt in (self.actor_opt, self.critic_opt):
            for group in opt.param_groups:
                group["lr"] = lr

    # --- per-task losses (one task's slice; vmapped over the task axis) ---------------------------------------
    def actor_loss_one(self, params: Dict[str, Tensor], b: Dict[str, Tensor], task: Tensor) -> Tensor:
        if self.actor_aux:
            mean, log_std, aux = functional_call(self.actor, params, (b["obs"], task), {"return_aux": True})
        else:
            (mean, log_std), aux = functional_call(self.actor, params, (b["obs"], task)), 0.0
        logp = gaussian_logp(b["action"], mean, log_std, b["mask"])
        ratio = torch.exp(logp - b["logp"])
        adv = b["adv"]
        eps = self.cfg.clip
        surr = torch.min(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps) * adv).mean()
        ent = gaussian_entropy(log_std, b["mask"]).mean()
        return -surr - self.cfg.ent_coef * ent + aux

    def critic_loss_one(self, params: Dict[str, Tensor], b: Dict[str, Tensor], task: Tensor) -> Tensor:
        if self.critic_aux:
            v, aux = functional_call(self.critic, params, (b["obs"], task), {"return_aux": True})
        else:
            v, aux = functional_call(self.critic, params, (b["obs"], task)), 0.0
        err = (v - b["ret"]).pow(2)
        if self.cfg.vf_clip > 0:
            vc = b["value"] + (v - b["value"]).clamp(-self.cfg.vf_clip, self.cfg.vf_clip)
            err = torch.max(err, (vc - b["ret"]).pow(2))
        return self.cfg.vf_coef * 0.5 * err.mean() + aux

    # --- data ----------------------------------------------------------------------------------------------
    def _flat_tasks(self, n: int) -> Tensor:
        return self.task_ids.repeat_interleave(n)

    @torch.no_grad()
    def values(self, obs_n: Tensor) -> Tensor:
        """V of (T, N, d) normalised observations -> (T, N), in chunks."""
        T, N = obs_n.shape[:2]
        flat, tasks = obs_n.reshape(T * N, -1), self._flat_tasks(N)
        out = [self.critic(flat[i:i + 65536], tasks[i:i + 65536]) for i in range(0, T * N, 65536)]
        return torch.cat(out).view(T, N)

    @torch.no_grad()
    def normalize_obs(self, obs: Tensor) -> Tensor:
        T, N = obs.shape[:2]
        return self.actor.obs_norm(obs.reshape(T * N, -1), self._flat_tasks(N)).view(T, N, -1)

    @torch.no_grad()
    def prepare(self, rollout: Dict[str, np.ndarray]) -> Dict[str, Tensor]:
        """(T, N, ...) numpy rollout (raw obs, unclipped actions, behaviour log-probs, rewards, terminated,
        truncated, true next obs) -> the learner's batch with normalised obs, values, advantages and returns."""
        dev, cfg = self.device, self.cfg
        obs = self.normalize_obs(torch.as_tensor(rollout["obs"], dtype=torch.float32, device=dev))
        nxt = self.normalize_obs(torch.as_tensor(rollout["next_obs"], dtype=torch.float32, device=dev))
        v, v2 = self.values(obs), self.values(nxt)
        adv, ret = gae(rollout["reward"], v.cpu().numpy(), v2.cpu().numpy(), rollout["terminated"],
                       rollout["truncated"], cfg.gamma, cfg.gae_lambda)
        adv_t = torch.as_tensor(adv, device=dev)
        return {"obs": obs, "action": torch.as_tensor(rollout["action"], dtype=torch.float32, device=dev),
                "logp": torch.as_tensor(rollout["logp"], dtype=torch.float32, device=dev),
                "value": v, "ret": torch.as_tensor(ret, device=dev),
                "adv": normalize_advantages(adv_t) if cfg.norm_adv else adv_t, "adv_raw": adv_t}

    @torch.no_grad()
    def update_obs_norm(self, raw_obs: np.ndarray) -> None:
        """Merge the round's raw observations (T, N, d) into the per-task statistics (after the update)."""
        if not self.cfg.norm_obs:
            return
        x = torch.as_tensor(raw_obs, device=self.device)
        for t in range(self.num_tasks):
            self.actor.obs_norm.update(t, x[t])

    # --- the update -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ratio_stats(self, mb: Dict[str, Tensor]):
        T, b = mb["logp"].shape
        mean, log_std = self.actor(mb["obs"].reshape(T * b, -1), self._flat_tasks(b))
        mask = self.action_mask.repeat_interleave(b, dim=0)
        logp = gaussian_logp(mb["action"].reshape(T * b, -1), mean, log_std, mask).view(T, b)
        log_ratio = logp - mb["logp"]
        ratio = log_ratio.exp()
        approx_kl = ((ratio - 1) - log_ratio).mean(1)  # per task (Schulman's k3 estimator, as SB3/CleanRL)
        clip_frac = ((ratio - 1).abs() > self.cfg.clip).float().mean(1)
        entropy = gaussian_entropy(log_std, mask).view(T, b).mean(1)
        return approx_kl, clip_frac, entropy

    def update(self, batch: Dict[str, Tensor]) -> Dict[str, Any]:
        """``epochs`` x ``minibatches`` steps on a prepared batch. Returns per-task means over the steps taken."""
        cfg = self.cfg
        T, N = batch["logp"].shape
        keys = ("obs", "action", "logp", "value", "ret", "adv")
        sums: Dict[str, Tensor] = {}
        steps, stopped = 0, False
        last: Dict[str, Any] = {}
        epochs_done = 0
        for _epoch in range(cfg.epochs):
            for idx in stratified_minibatches(T, N, cfg.minibatches, self.generator, self.device):
                rows = self.task_ids[:, None]
                mb = {k: batch[k][rows, idx] for k in keys}
                kl, cf, ent = self._ratio_stats(mb)
                if cfg.target_kl > 0 and float(kl.mean()) > 1.5 * cfg.target_kl:
                    stopped = True
                    break
                ab = {"obs": mb["obs"], "action": mb["action"], "logp": mb["logp"], "adv": mb["adv"],
                      "mask": self.action_mask}
                ainfo = self._step("actor", self.actor, self.actor_opt, self.actor_method, self.actor_loss_one, ab,
                                   self.actor_task_specific)
                cb = {"obs": mb["obs"], "ret": mb["ret"], "value": mb["value"]}
                cinfo = self._step("critic", self.critic, self.critic_opt, self.critic_method,
                                   self.critic_loss_one, cb, self.critic_task_specific)
                for k, v in (("actor_losses", ainfo["losses"]), ("critic_losses", cinfo["losses"]),
                             ("approx_kl", kl), ("clip_fraction", cf), ("entropy", ent)):
                    sums[k] = sums.get(k, 0) + v.detach()
                steps += 1
                self.num_updates += 1
                last = {"actor_diag": ainfo, "critic_diag": cinfo}
            if stopped:
                break
            epochs_done += 1
        self.num_rounds += 1
        info: Dict[str, Any] = {k: v / max(steps, 1) for k, v in sums.items()}
        info.update(last)
        info.update({"steps": steps, "epochs_done": epochs_done, "kl_stop": stopped})
        if self.actor.mode == "param":
            info["std"] = self.actor.log_std.detach().exp().mul(self.action_mask).sum(1) / self.action_mask.sum(1)
        return info

    def _step(self, name: str, module: nn.Module, opt: torch.optim.Optimizer, method, loss_fn, batch,
              task_specific: Set[str]) -> Dict[str, Any]:
        """One minibatch step of one network: the (possibly compiled) gradient, then the eager optimizer step."""
        self.grads[name].zero()
        info = self._grad_fns[name](batch)
        apply_step(name, module, opt, method, info, loss_fn, batch, self.task_ids, self.cfg.max_grad_norm,
                   self.hooks[name], self.num_updates, self.grads[name], self.monitor)
        return info

    def _gradient_functions(self) -> Dict[str, Any]:
        """name -> batch -> the method's combined gradient in that network's ``.grad`` (``method_grads``)."""
        return {name: functools.partial(method_grads, module, method, loss_fn, task_ids=self.task_ids,
                                        task_specific=ts)
                for name, module, method, loss_fn, ts in (
                    ("actor", self.actor, self.actor_method, self.actor_loss_one, self.actor_task_specific),
                    ("critic", self.critic, self.critic_method, self.critic_loss_one, self.critic_task_specific))}

    def compile(self, mode: str = "auto") -> str:
        """Compile the minibatch gradients of both networks (``agents/compiled.py``); returns the mode used."""
        used = compiled.resolve(mode, self.device, [self.critic_method, self.actor_method], [self.actor, self.critic])
        if used != "off":
            from agents.small_matmul import pays_here

            reset = lambda: [g.zero() for g in self.grads.values()]  # noqa: E731
            self._grad_fns = {name: compiled.Compiled(fn, used, f"the PPO {name} gradient", reset,
                                                      small_matmul=self.device.type == "cpu" and pays_here())
                              for name, fn in self._gradient_functions().items()}
        return used

    def nonfinite(self) -> None:
        """Host check, once per round: raise :class:`NonFiniteLoss` if a minibatch step was skipped since."""
        raise_nonfinite(self.monitor, self.critic_method, self.actor_method)

    # --- acting and state -----------------------------------------------------------------------------------
    def policy_state(self) -> Dict[str, np.ndarray]:
        """Policy weights AND observation statistics, as numpy arrays, for the rollout workers."""
        return {k: v.detach().cpu().numpy() for k, v in self.actor.state_dict().items()}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),  # includes obs_norm.{mean,var,count}
            "critic": self.critic.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "critic_method": self.critic_method.state_dict(),
            "actor_method": self.actor_method.state_dict(),
            "generator": generator_state(self.generator),
            "num_updates": self.num_updates,
            "num_rounds": self.num_rounds,
            "host_state": host_states(self.actor, self.critic),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.critic_method.load_state_dict(state["critic_method"])
        self.actor_method.load_state_dict(state["actor_method"])
        self.num_updates = int(state["num_updates"])
        self.restore_note = restore_generator(self.generator, state["generator"], salt=self.num_updates)
        self.num_rounds = int(state["num_rounds"])
        load_host_states(state.get("host_state", {}), self.actor, self.critic)
