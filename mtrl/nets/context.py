"""In-context task representations (issue 4: ``t2mir`` with ``use_task_id=false``): a network that is not told
the task infers it from the K most recent transitions of the env it acts in.

* A transition is the vector ``[s, a, r, s′, 1]`` (:func:`transition_dim` = 2·obs + act + 2). The trailing 1 marks
  a real entry: a window that has seen fewer than K transitions (the start of a run) is zero-padded at the front,
  and the encoder averages over real entries only.
* Acting (rollout workers, evaluation): :class:`ContextWindow` keeps the last K transitions of each env, oldest
  first. It is NOT cleared at episode ends (T2MIR's context spans episodes), only when the window is built.
* Learning: :meth:`mtrl.replay.MultiTaskReplay.sample` with ``context_len=K`` gives each sampled transition the K
  transitions stored just before it in that task's ring, i.e. the window the worker held when it acted (each task
  has one env, so a task's ring is that env's stream in order; after a worker restart the first K differ), and
  for its s′ that window shifted by the transition itself (``next_context``).

Everything that holds a context learns only through the agent's batch key ``"context"`` (T, B, K, D) and the
backbone's ``context=`` keyword; a backbone that wants contexts says so with ``context_len > 0`` and takes its
``transition_dim`` from :func:`with_transition_dim`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch


def transition_dim(obs_dim: int, act_dim: int) -> int:
    return 2 * obs_dim + act_dim + 2


def pack(obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """(…, obs), (…, act), (…,), (…, obs) -> (…, transition_dim) float32 with the validity flag set."""
    reward = np.asarray(reward, np.float32)[..., None]
    return np.concatenate([obs, action, reward, next_obs, np.ones_like(reward)], axis=-1).astype(np.float32)


def with_transition_dim(backbone: str, kwargs: Dict[str, Any], obs_dim: int, act_dim: int) -> Dict[str, Any]:
    """``kwargs`` plus ``transition_dim`` for backbones that take it (they set ``takes_transition_dim``); the
    suite's dimensions are known to the agent, not to the user."""
    from .registry import BACKBONES

    out = dict(kwargs)
    if getattr(BACKBONES.get(backbone), "takes_transition_dim", False):
        out.setdefault("transition_dim", transition_dim(obs_dim, act_dim))
    return out


class ContextWindow:
    """The last K transitions of each of ``n`` envs, oldest first: ``(n, K, dim)``."""

    def __init__(self, n: int, K: int, dim: int) -> None:
        self.buf = np.zeros((n, K, dim), np.float32)

    def push(self, i: int, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray) -> None:
        self.buf[i, :-1] = self.buf[i, 1:]
        self.buf[i, -1] = pack(obs, action, np.float32(reward), next_obs)

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.buf.copy())

    def get_state(self) -> torch.Tensor:
        return torch.from_numpy(self.buf.copy())

    def set_state(self, state: torch.Tensor) -> None:
        self.buf = state.numpy().copy()


def context_window(policy: torch.nn.Module, n: int, obs_dim: int, act_dim: int) -> Optional[ContextWindow]:
    """A fresh window for ``n`` envs when the policy reads context (``policy.context_len`` > 0), else None."""
    K = int(getattr(policy, "context_len", 0))
    return ContextWindow(n, K, transition_dim(obs_dim, act_dim)) if K else None


def context_kw(window: Optional[ContextWindow]) -> Dict[str, torch.Tensor]:
    """``{"context": …}`` for ``policy.act`` when there is a window; nothing otherwise (PPO's policy, for one,
    takes no context)."""
    return {} if window is None else {"context": window.tensor()}
