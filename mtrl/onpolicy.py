"""The on-policy training loop (issue 5): synchronous PPO rounds on the same rollout workers.

Each round every task gets ``ppo.rollout_steps`` env steps (each of its ``envs_per_task`` envs a 1/N share, on
whichever workers hold them) with the current policy
(``PPOWorker.collect_rollout``: behaviour log-probs, terminated vs truncated kept apart, the true final next_obs);
the learner (``agents.ppo.MTPPO``) computes per-task GAE and runs ``epochs`` x ``minibatches`` updates, merges the
round's observations into the observation statistics and broadcasts weights + statistics. A worker that dies or
raises during a round is replaced (``Trainer._worker_failed``: bounded restarts) and its share of the round is
collected again by the replacement with the same, unchanged policy; the other workers' data is kept.

Reused from ``mtrl.base_trainer.BaseTrainer``: run directory files, Ray start, worker specs and seed streams, the pool,
failure handling, evaluation (``pool.evaluate`` + ``summarize`` + results.json), checkpoints and ``--resume``,
rollout/time logging and the gradient/backbone diagnostics. Budget: rounds are whole, so a run stops at the first
round boundary at or past ``total_steps`` (it may overshoot by up to one round, T x rollout_steps env steps).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from agents.ppo import build_policy, explained_variance

from .config import PPOConfig
from .logging import Progress
from .rollout import RolloutWorker, WorkerError, WorkerSpec
from .base_trainer import BaseTrainer


@dataclass
class PPOWorkerSpec(WorkerSpec):
    """WorkerSpec plus the policy settings of PPO (the SAC ``log_std_*`` fields are unused)."""

    ppo: Dict[str, Any] = dataclasses.field(default_factory=dict)  # PPOConfig as a dict


class PPOWorker(RolloutWorker):
    """A RolloutWorker holding a Gaussian PPO policy (``agents.ppo.GaussianPolicy``) instead of the SAC actor.

    ``evaluate`` is inherited: it calls ``policy.act(obs, tids, mask, deterministic=True)``, which normalises the
    raw observation with the shipped statistics and returns the clipped mean action.
    """

    def __init__(self, spec: PPOWorkerSpec) -> None:
        super().__init__(spec)
        cfg = PPOConfig(**spec.ppo)
        s = self.suite
        self.policy = build_policy(s.obs_dim, s.act_dim, s.num_tasks, cfg, spec.backbone, spec.backbone_kwargs)
        self.policy.eval()

    def collect_rollout(self, n_steps: int) -> Dict[str, Any]:
        """Step every owned env ``n_steps`` times with the current stochastic policy.

        Returns per-task arrays (k, n_steps, ...): raw ``obs``; the unclipped sampled ``action`` (the env got
        ``clip(action, -1, 1)``) and its behaviour ``logp``; ``reward``; ``terminated`` and ``truncated`` apart;
        ``next_obs`` = the TRUE next observation (the final one at an episode end, before the reset). Plus the
        finished episodes and the step count, as ``collect`` returns them.
        """
        k, d_o, d_a = len(self.envs), self.obs.shape[1], self.suite.act_dim
        obs = np.empty((k, n_steps, d_o), np.float32)
        nxt = np.empty((k, n_steps, d_o), np.float32)
        act = np.empty((k, n_steps, d_a), np.float32)
        logp = np.empty((k, n_steps), np.float32)
        rew = np.empty((k, n_steps), np.float32)
        term = np.empty((k, n_steps), np.float32)
        trunc = np.empty((k, n_steps), np.float32)
        episodes: List[Tuple[int, float, float, int]] = []
        t0, self.time_policy = time.perf_counter(), 0.0
        for s in range(n_steps):
            t1 = time.perf_counter()
            with torch.inference_mode():
                a, lp = self.policy.sample(torch.as_tensor(self.obs, dtype=torch.float32), self.tids, self.mask,
                                           generator=self.gen)
            a, lp = a.numpy(), lp.numpy()
            self.time_policy += time.perf_counter() - t1
            obs[:, s] = self.obs
            act[:, s] = a
            logp[:, s] = lp
            env_a = np.clip(a, -1.0, 1.0)
            for i in range(k):
                nxt[i, s], rew[i, s], te, tr = self._step_env(i, env_a[i], episodes)
                term[i, s], trunc[i, s] = float(te), float(tr)
            self.steps += 1
        return {"task_indices": self.task_indices, "env_indices": self.env_indices, "obs": obs, "action": act,
                "logp": logp, "reward": rew, "next_obs": nxt, "terminated": term, "truncated": trunc,
                "episodes": episodes, "steps": k * n_steps, **self._times(t0)}


class OnPolicyTrainer(BaseTrainer):
    """``--algo ppo``: the Trainer's machinery with synchronous collection rounds and PPO updates."""

    worker_cls = PPOWorker
    on_policy = True  # the learner holds MT-PPO and no replay

    def _worker_spec(self, i: int, task_slice: List[int]) -> PPOWorkerSpec:
        base = super()._worker_spec(i, task_slice)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(WorkerSpec)}
        fields["learning_starts"] = 0  # on-policy: never random actions
        return PPOWorkerSpec(**fields, ppo=dataclasses.asdict(self.cfg.ppo))

    # --- the loop -------------------------------------------------------------------------------------------
    def _collect_round(self) -> Dict[str, np.ndarray]:
        """One synchronous round: every task's ``rollout_steps``, split evenly over its ``envs_per_task`` envs
        (wherever they are). Failed workers are replaced and their share collected again (same weights: the
        replacement gets the last broadcast). Returns (T, rollout_steps, ...) arrays: env j of task t fills
        columns [j n, (j + 1) n), its last step marked truncated so that GAE bootstraps there and does not run on
        into the next env's steps (for N = 1 that is the round's end, where GAE bootstraps anyway)."""
        n_task = self.cfg.ppo.rollout_steps
        pool, n = self.pool, n_task // self.cfg.envs_per_task
        assert pool is not None
        todo = set(range(len(pool)))
        parts: Dict[int, Dict[str, Any]] = {}
        while todo:
            for i in sorted(todo):
                pool.submit_collect(i, n, method="collect_rollout")
            while pool.pending:
                for i, result in pool.ready(block=True):
                    if isinstance(result, WorkerError):
                        self._worker_failed(i, result.message)  # raises WorkerFailure past the restart bound
                        continue
                    self.failures_in_a_row[i] = 0
                    self.chunks_done[i] += 1
                    parts[i] = result
                    todo.discard(i)
        keys = ("obs", "action", "logp", "reward", "next_obs", "terminated", "truncated")
        out = {k: np.empty((self.T, n_task) + parts[0][k].shape[2:], np.float32) for k in keys}
        for res in parts.values():
            for e, (t, j) in enumerate(zip(res["task_indices"], res["env_indices"])):
                for k in keys:
                    out[k][t, j * n:(j + 1) * n] = res[k][e]
                out["truncated"][t, (j + 1) * n - 1] = 1.0
                self.task_steps[t] += n
            for t, ret, succ, _length in res["episodes"]:
                self.recent_ret[t].append(ret)
                self.recent_succ[t].append(succ)
                self.episodes += 1
            self.env_steps += int(res["steps"])
            self.worker_time += (res.get("time_policy", 0.0), res.get("time_env", 0.0))
        return out

    def run_until(self, total_steps: int, progress: Optional[Progress] = None) -> None:
        cfg, pool = self.cfg, self.pool
        assert pool is not None, "call start() first"
        while self.env_steps < total_steps:
            before = self.env_steps
            if cfg.ppo.anneal_lr:
                self.agent.set_lr(cfg.ppo.lr * max(0.0, 1.0 - before / total_steps))
            rollout = self._collect_round()
            if progress is not None:
                progress.update(self.env_steps - before, updates=self.updates)
            batch = self.agent.prepare(rollout)
            ev = explained_variance(batch["value"].cpu().numpy(), batch["ret"].cpu().numpy())
            info = self.agent.update(batch)  # non-finite minibatch steps are skipped on the device
            self.check_nonfinite()  # raises under nan_policy=stop; "skip": counts them
            self.updates = self.agent.num_updates
            self.agent.update_obs_norm(rollout["obs"])
            pool.broadcast(self.agent.policy_state())
            self._log_round(info, ev, batch)
            if self.agent.num_rounds % max(1, math.ceil(cfg.log_grad_every / max(info["steps"], 1))) == 0:
                self._log_grad(info)
                self._log_backbones()
            if self.env_steps >= self.next_eval and self.env_steps < total_steps:
                self.evaluate(final=False)
                self.next_eval = (self.env_steps // cfg.eval_every + 1) * cfg.eval_every
            if self.env_steps >= self.next_ckpt and self.env_steps < total_steps:
                self.save_checkpoint()
                self.next_ckpt = (self.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        pool.discard_pending()

    # --- logging --------------------------------------------------------------------------------------------
    def _log_round(self, info: Dict[str, Any], ev: np.ndarray, batch: Dict[str, torch.Tensor]) -> None:
        """Once per round (a round is many updates): train/* means over the round's minibatch steps."""
        lg, step = self.logger, self.env_steps
        assert lg is not None
        if info["steps"] > 0:
            for key, tag in (("actor_losses", "policy_loss"), ("critic_losses", "value_loss"),
                             ("approx_kl", "approx_kl"), ("clip_fraction", "clip_fraction"),
                             ("entropy", "entropy")):
                v = info[key].cpu().numpy()
                lg.scalar(f"train/{tag}", float(v.mean()), step)
                if tag in ("policy_loss", "value_loss"):
                    lg.per_task("train", tag, v, step)
        if "std" in info:
            std = info["std"].cpu().numpy()
            lg.scalar("train/std", float(std.mean()), step)
            lg.per_task("train", "std", std, step)
        lg.per_task("train", "explained_variance", ev, step)
        lg.scalar("train/explained_variance", float(np.nanmean(ev)) if np.isfinite(ev).any() else math.nan, step)
        lg.scalar("train/epochs_done", info["epochs_done"], step)
        lg.scalar("train/kl_stop", float(info["kl_stop"]), step)
        lg.scalar("train/n_updates", self.updates, step)
        lg.scalar("train/lr", self.agent.actor_opt.param_groups[0]["lr"], step)
        lg.scalar("train/adv_raw_std", float(batch["adv_raw"].std()), step)
        self._log_rollout_and_time(step)
        lg.flush()
