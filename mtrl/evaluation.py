"""Evaluation protocols.

Meta-World (the Meta-World+ protocol): deterministic policy, ``num_episodes`` per task (default 50 = one per goal,
the task's 50 training goals cycled once), an episode succeeds if ``info["success"]`` is ever 1 (metaworld's own
``metaworld.evaluation.evaluation`` turns on terminate-on-success and reads the final info). The suite score is the
mean over tasks. DeepMind Control: mean undiscounted return over ``num_episodes``; success is not defined (NaN).

Evaluation envs are built fresh for every evaluation, seeded from ``eval_seed``, so two evaluations of the same
weights with the same seed give the same numbers.

A policy that reads the task from context (``policy.context_len`` > 0) gets one :class:`ContextWindow` per env,
empty when the evaluation starts and carried across that env's episodes, as in training.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch

from mtrl.nets.context import ContextWindow, context_kw, context_window


class RecordContext(gym.Wrapper):
    """Pushes every (s, a, r, s′) of the wrapped env into row ``i`` of a shared :class:`ContextWindow`; s′ is the
    true next observation (before any reset), as in the rollout workers."""

    def __init__(self, env: gym.Env, window: ContextWindow, i: int) -> None:
        super().__init__(env)
        self.window, self.i = window, i
        self._obs: Any = None

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self._obs = obs
        return obs, info

    def step(self, action: Any):
        obs, r, te, tr, info = self.env.step(action)
        self.window.push(self.i, self._obs, np.asarray(action, np.float32), float(r), obs)
        self._obs = obs
        return obs, r, te, tr, info


class _MetaWorldAgent:
    """The ``metaworld.evaluation.Agent`` protocol over our actor: the task index of each sub-env is known."""

    def __init__(self, policy: torch.nn.Module, tids: torch.Tensor, mask: torch.Tensor,
                 window: Optional[ContextWindow] = None) -> None:
        self.policy, self.tids, self.mask, self.window = policy, tids, mask, window

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(observations, dtype=torch.float32)
        return self.policy.act(obs, self.tids, self.mask, deterministic=True, **context_kw(self.window)).numpy()

    def reset(self, env_mask: np.ndarray) -> None:
        del env_mask  # the policy is memoryless


def _eval_metaworld(suite, task_indices: Sequence[int], policy, mask, num_episodes: int, goal_seed: int,
                    eval_seed: int) -> Dict[int, Dict[str, float]]:
    from functools import partial

    from metaworld.evaluation import evaluation

    from envs.make import make_metaworld

    names = [suite.tasks[t].name for t in task_indices]
    window = context_window(policy, len(names), suite.obs_dim, suite.act_dim)

    def make(i: int, n: str, t: int) -> gym.Env:
        env = make_metaworld(n, goal_seed=goal_seed, seed=eval_seed + t, evaluation=True)
        return env if window is None else RecordContext(env, window, i)

    envs = gym.vector.SyncVectorEnv([partial(make, i, n, t) for i, (n, t) in enumerate(zip(names, task_indices))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    try:
        agent = _MetaWorldAgent(policy, torch.as_tensor(list(task_indices)), mask[: len(task_indices)], window)
        _, _, success, returns = evaluation(agent, envs, num_episodes=num_episodes)
    finally:
        envs.close()
    return {t: {"success_rate": float(success[n]), "return": float(np.mean(returns[n]))}
            for n, t in zip(names, task_indices)}


def _eval_dmc(suite, t: int, policy, mask_row: torch.Tensor, num_episodes: int, eval_seed: int) -> Dict[str, float]:
    from envs import make_env

    env = make_env(suite.tasks[t], suite.obs_dim, suite.act_dim, goal_seed=0, seed=eval_seed + t)
    window = context_window(policy, 1, suite.obs_dim, suite.act_dim)
    if window is not None:
        env = RecordContext(env, window, 0)
    returns: List[float] = []
    tid = torch.as_tensor([t])
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=eval_seed + 1000 * t + ep)
        total, done = 0.0, False
        while not done:
            a = policy.act(torch.as_tensor(obs[None], dtype=torch.float32), tid, mask_row[None], True,
                           **context_kw(window)).numpy()[0]
            obs, r, te, tr, _ = env.step(a)
            total += r
            done = te or tr
        returns.append(total)
    env.close()
    return {"success_rate": math.nan, "return": float(np.mean(returns))}


@torch.no_grad()
def evaluate_tasks(suite, task_indices: Sequence[int], policy: torch.nn.Module, mask: torch.Tensor,
                   num_episodes: int, goal_seed: int, eval_seed: int) -> Dict[int, Dict[str, float]]:
    """Per-task ``{"success_rate", "return"}`` for the given task indices (``mask`` rows follow ``task_indices``)."""
    out: Dict[int, Dict[str, float]] = {}
    mw = [i for i, t in enumerate(task_indices) if suite.tasks[t].kind == "metaworld"]
    if mw:
        idx = [task_indices[i] for i in mw]
        out.update(_eval_metaworld(suite, idx, policy, mask[mw], num_episodes, goal_seed, eval_seed))
    for i, t in enumerate(task_indices):
        if suite.tasks[t].kind != "metaworld":  # DMC and Gymnasium tasks: mean return, no success
            out[t] = _eval_dmc(suite, t, policy, mask[i], num_episodes, eval_seed)
    return out


def summarize(suite, per_task: Dict[int, Dict[str, float]]) -> Dict[str, object]:
    """Suite-level numbers (mean over tasks) plus the per-task table keyed by task name."""
    tasks = {suite.tasks[t].name: v for t, v in sorted(per_task.items())}
    succ = [v["success_rate"] for v in tasks.values() if not math.isnan(v["success_rate"])]
    return {
        "success_rate": float(np.mean(succ)) if succ else math.nan,
        "return": float(np.mean([v["return"] for v in tasks.values()])),
        "per_task": tasks,
    }
