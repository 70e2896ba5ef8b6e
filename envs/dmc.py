"""A DeepMind Control suite task as a gymnasium Env (state observations, flattened in the spec's key order)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import gymnasium as gym
import numpy as np


class DMCEnv(gym.Env):
    """dm_control ``suite.load(domain, task)`` with gymnasium's API.

    The agent acts in [-1, 1]^A; actions are rescaled to the task's bounds. A dm_control episode ends at its time
    limit with discount 1 (truncation: the learner bootstraps) or, for tasks that have one, with discount 0
    (termination: no bootstrap).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, name: str, seed: Optional[int] = None) -> None:
        from dm_control import suite

        domain, task = name.split("-", 1)
        self.name = name
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self._env.action_spec()
        self._low = spec.minimum.astype(np.float64)
        self._high = spec.maximum.astype(np.float64)
        obs_dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)

    @staticmethod
    def _flatten(obs: Dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in obs.values()])

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, Dict]:
        if seed is not None:
            # dm_control tasks draw initial states from task.random; reseed it in place.
            self._env.task._random = np.random.RandomState(seed)
        ts = self._env.reset()
        return self._flatten(ts.observation), {}

    def step(self, action: np.ndarray) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        a = self._low + (a + 1.0) * 0.5 * (self._high - self._low)
        ts = self._env.step(a)
        last = ts.last()
        terminated = bool(last and ts.discount == 0.0)
        truncated = bool(last and not terminated)
        return self._flatten(ts.observation), float(ts.reward or 0.0), terminated, truncated, {}

    def render(self) -> np.ndarray:
        return self._env.physics.render(height=240, width=320, camera_id=0)
