"""Per-task replay: one preallocated ring buffer per task, sampled as (T, B, ...) tensors in one call.

Capacity is split evenly over tasks (the published MT-SAC setting: 1M transitions in total). Every update samples
B transitions from EVERY task, so a task's loss is always computed from its own data (``agents.sac`` relies on it).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class MultiTaskReplay:
    def __init__(self, num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int, seed: int = 0) -> None:
        if capacity_per_task < 1:
            raise ValueError(f"replay capacity per task must be >= 1, got {capacity_per_task}")
        self.num_tasks = num_tasks
        self.capacity = capacity_per_task
        T, C = num_tasks, capacity_per_task
        # np.zeros is lazily backed by the OS: the 1M-transition MT10 buffer costs memory only as it fills.
        self.obs = np.zeros((T, C, obs_dim), np.float32)
        self.next_obs = np.zeros((T, C, obs_dim), np.float32)
        self.action = np.zeros((T, C, act_dim), np.float32)
        self.reward = np.zeros((T, C), np.float32)
        self.terminated = np.zeros((T, C), np.float32)
        self.pos = np.zeros(T, np.int64)
        self.size = np.zeros(T, np.int64)
        self.rng = np.random.default_rng(seed)

    def add(self, task: int, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """Append n transitions of one task (arrays with leading axis n), overwriting the oldest when full."""
        n = len(reward)
        if n == 0:
            return
        if n > self.capacity:  # only the newest `capacity` survive anyway
            obs, action, reward, next_obs, terminated = (a[-self.capacity:] for a in
                                                         (obs, action, reward, next_obs, terminated))
            n = self.capacity
        idx = (self.pos[task] + np.arange(n)) % self.capacity
        self.obs[task, idx] = obs
        self.action[task, idx] = action
        self.reward[task, idx] = reward
        self.next_obs[task, idx] = next_obs
        self.terminated[task, idx] = terminated
        self.pos[task] = (self.pos[task] + n) % self.capacity
        self.size[task] = min(self.capacity, self.size[task] + n)

    def can_sample(self, batch_per_task: int) -> bool:
        return bool(np.all(self.size >= min(batch_per_task, self.capacity)))

    def sample(self, batch_per_task: int, device: Optional[torch.device] = None,
               context_len: int = 0) -> Dict[str, torch.Tensor]:
        """A dict of (T, B, ...) float32 tensors: obs, action, reward, next_obs, terminated; with ``context_len``
        K > 0 also ``context`` (T, B, K, D): the K transitions stored before each sampled one in its task's ring
        (see ``mtrl.nets.context``), and ``next_context``: the window at s′, i.e. ``context`` shifted by one with
        the sampled transition itself appended (what the worker held when it acted in s′)."""
        if np.any(self.size == 0):
            empty = [int(t) for t in np.flatnonzero(self.size == 0)]
            raise RuntimeError(f"cannot sample: no transitions yet for task index(es) {empty}")
        idx = (self.rng.random((self.num_tasks, batch_per_task)) * self.size[:, None]).astype(np.int64)
        rows = np.arange(self.num_tasks)[:, None]
        out = {name: torch.from_numpy(getattr(self, name)[rows, idx]) for name in FIELDS}
        if context_len > 0:
            from mtrl.nets.context import pack

            ctx = self.contexts(idx, context_len)
            now = pack(*(out[f].numpy() for f in ("obs", "action", "reward", "next_obs")))
            out["context"] = torch.from_numpy(ctx)
            out["next_context"] = torch.from_numpy(np.concatenate([ctx[:, :, 1:], now[:, :, None]], axis=2))
        if device is not None and device.type != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def contexts(self, idx: np.ndarray, K: int) -> np.ndarray:
        """(T, B, K, D) windows: for stored index i of task t, entries i-K .. i-1 of that task in insertion order,
        oldest first; positions before the oldest stored entry are zero (validity flag 0)."""
        from mtrl.nets.context import pack

        C = self.capacity
        oldest = np.where(self.size == C, self.pos, 0)[:, None]             # (T, 1) ring index of the oldest
        age = (idx - oldest) % C                                              # (T, B) insertion rank of i
        back = np.arange(K, 0, -1)                                            # K .. 1 steps back, oldest first
        src = (idx[..., None] - back) % C                                     # (T, B, K)
        valid = (age[..., None] >= back).astype(np.float32)
        rows = np.arange(self.num_tasks)[:, None, None]
        ctx = pack(self.obs[rows, src], self.action[rows, src], self.reward[rows, src], self.next_obs[rows, src])
        return ctx * valid[..., None]

    def __len__(self) -> int:
        return int(self.size.sum())

    def state_dict(self) -> Dict[str, object]:
        """Only the filled part, so a checkpoint of a young buffer stays small."""
        n = int(self.size.max())
        state: Dict[str, object] = {name: torch.from_numpy(getattr(self, name)[:, :n].copy()) for name in FIELDS}
        state["pos"] = torch.from_numpy(self.pos.copy())
        state["size"] = torch.from_numpy(self.size.copy())
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        n = state["obs"].shape[1]  # type: ignore[union-attr]
        for name in FIELDS:
            getattr(self, name)[:, :n] = state[name].numpy()  # type: ignore[union-attr]
        self.pos[:] = state["pos"].numpy()  # type: ignore[union-attr]
        self.size[:] = state["size"].numpy()  # type: ignore[union-attr]
