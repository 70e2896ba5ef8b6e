"""Rollout workers: each owns the environments of a slice of the tasks and a CPU copy of the policy.

``RolloutWorker`` is a plain class. ``WorkerPool`` runs N of them as Ray actors (``--workers N``) or one in the
learner's process (``--workers 0``); the training loop talks only to the pool. Transitions travel in chunks of
``chunk_steps`` per task (a Ray round-trip costs ~1 ms, so per-step calls would cap collection at ~1k steps/s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its envs and policy (picklable, small)."""

    suite: Optional[str]
    tasks: List[str]  # custom Meta-World list, or [] for a named suite
    task_indices: List[int]
    goal_seed: int
    env_seeds: List[int]  # one per owned task, from the run's SeedSequence
    policy_seed: int
    learning_starts: int  # per task: uniform random actions before this many steps
    start_steps: List[int]  # per owned task: env steps already taken (non-zero when resuming)
    backbone: str
    backbone_kwargs: Dict[str, Any]
    log_std_min: float
    log_std_max: float


class RolloutWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(1)  # a worker is one core; the learner owns the rest
        from envs import get_suite, make_env
        from agents.sac import Actor

        self.spec = spec
        self.suite = get_suite(spec.suite, spec.tasks or None)
        s = self.suite
        self.task_indices = list(spec.task_indices)
        self.envs = [make_env(s.tasks[t], s.obs_dim, s.act_dim, goal_seed=spec.goal_seed, seed=seed)
                     for t, seed in zip(self.task_indices, spec.env_seeds)]
        self.policy = Actor(s.obs_dim, s.act_dim, s.num_tasks, spec.backbone, dict(spec.backbone_kwargs),
                            spec.log_std_min, spec.log_std_max)
        self.policy.eval()
        self.mask = torch.as_tensor(s.action_mask[self.task_indices], dtype=torch.float32)
        self.tids = torch.as_tensor(self.task_indices, dtype=torch.long)
        self.rng = np.random.default_rng(spec.policy_seed)
        self.gen = torch.Generator().manual_seed(spec.policy_seed)
        self.steps = np.asarray(spec.start_steps, dtype=np.int64)
        self.obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(self.envs, spec.env_seeds)])
        self.ep_ret = np.zeros(len(self.envs))
        self.ep_len = np.zeros(len(self.envs), dtype=np.int64)
        self.ep_success = np.zeros(len(self.envs), dtype=bool)

    def ping(self) -> int:
        return os.getpid()

    def set_weights(self, state: Dict[str, np.ndarray]) -> None:
        self.policy.load_state_dict({k: torch.tensor(v) for k, v in state.items()})  # copy: Ray hands read-only arrays

    def _actions(self, deterministic: bool = False) -> np.ndarray:
        obs = torch.as_tensor(self.obs, dtype=torch.float32)
        act = self.policy.act(obs, self.tids, self.mask, deterministic, generator=self.gen).numpy()
        random = self.steps < self.spec.learning_starts
        if random.any():
            uni = self.rng.uniform(-1.0, 1.0, size=act.shape).astype(np.float32) * self.mask.numpy()
            act = np.where(random[:, None], uni, act)
        return act

    def collect(self, n_steps: int) -> Dict[str, Any]:
        """Step every owned env ``n_steps`` times. Returns per-task transition arrays and finished episodes."""
        k, d_o, d_a = len(self.envs), self.obs.shape[1], self.suite.act_dim
        obs = np.empty((k, n_steps, d_o), np.float32)
        nxt = np.empty((k, n_steps, d_o), np.float32)
        act = np.empty((k, n_steps, d_a), np.float32)
        rew = np.empty((k, n_steps), np.float32)
        term = np.empty((k, n_steps), np.float32)
        episodes: List[Tuple[int, float, float, int]] = []
        for s in range(n_steps):
            a = self._actions()
            obs[:, s] = self.obs
            act[:, s] = a
            for i, env in enumerate(self.envs):
                o2, r, te, tr, info = env.step(a[i])
                nxt[i, s] = o2  # the true final observation on truncation: the learner bootstraps from it
                rew[i, s] = r
                term[i, s] = float(te)
                self.ep_ret[i] += r
                self.ep_len[i] += 1
                self.ep_success[i] |= bool(info.get("success", 0.0))
                if te or tr:
                    episodes.append((self.task_indices[i], float(self.ep_ret[i]), float(self.ep_success[i]),
                                     int(self.ep_len[i])))
                    self.ep_ret[i], self.ep_len[i], self.ep_success[i] = 0.0, 0, False
                    o2, _ = env.reset()
                self.obs[i] = o2
            self.steps += 1
        return {"task_indices": self.task_indices, "obs": obs, "action": act, "reward": rew, "next_obs": nxt,
                "terminated": term, "episodes": episodes, "steps": k * n_steps}

    def evaluate(self, num_episodes: int, eval_seed: int) -> Dict[int, Dict[str, float]]:
        """Deterministic policy on fresh evaluation envs. Meta-World: metaworld's own protocol helper (success if
        ``info["success"]`` is ever 1; with 50 episodes each of the task's 50 goals exactly once). DMC: mean return.
        """
        from .evaluation import evaluate_tasks

        return evaluate_tasks(self.suite, self.task_indices, self.policy, self.mask, num_episodes,
                              goal_seed=self.spec.goal_seed, eval_seed=eval_seed)


def split_tasks(num_tasks: int, num_workers: int) -> List[List[int]]:
    """Round-robin slices, so slow and fast tasks mix across workers."""
    n = max(1, min(num_workers, num_tasks))
    return [list(range(i, num_tasks, n)) for i in range(n)]


class _Ready:
    """A finished in-process call, shaped like a Ray future for the pool."""

    def __init__(self, value: Any) -> None:
        self.value = value


class WorkerPool:
    """N Ray actors (or one in-process worker when ``num_workers == 0``) with a tiny async interface."""

    def __init__(self, specs: Sequence[WorkerSpec], use_ray: bool, worker_cpus: float = 1.0) -> None:
        self.use_ray = use_ray
        if use_ray:
            import ray

            cls = ray.remote(num_cpus=worker_cpus)(RolloutWorker)
            self.workers = [cls.remote(s) for s in specs]
            ray.get([w.ping.remote() for w in self.workers])
        else:
            self.workers = [RolloutWorker(s) for s in specs]
        self.pending: Dict[int, Any] = {}  # worker index -> in-flight collect

    def __len__(self) -> int:
        return len(self.workers)

    def _call(self, i: int, method: str, *args: Any) -> Any:
        w = self.workers[i]
        if self.use_ray:
            return getattr(w, method).remote(*args)
        return _Ready(getattr(w, method)(*args))

    def submit_collect(self, i: int, n_steps: int) -> None:
        self.pending[i] = self._call(i, "collect", n_steps)

    def idle(self) -> List[int]:
        return [i for i in range(len(self.workers)) if i not in self.pending]

    def ready(self, block: bool) -> List[Tuple[int, Dict[str, Any]]]:
        """Finished collects (worker index, result); waits for at least one when ``block`` and any is pending."""
        if not self.pending:
            return []
        if not self.use_ray:
            out = [(i, f.value) for i, f in self.pending.items()]
            self.pending.clear()
            return out
        import ray

        refs = list(self.pending.values())
        if block:
            ray.wait(refs, num_returns=1)
        done_set = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        out = []
        for i, ref in list(self.pending.items()):
            if ref in done_set:
                out.append((i, ray.get(ref)))
                del self.pending[i]
        return out

    def broadcast(self, state: Dict[str, np.ndarray]) -> None:
        if self.use_ray:
            import ray

            ref = ray.put(state)  # one serialisation shared by every worker
            for w in self.workers:
                w.set_weights.remote(ref)
        else:
            for w in self.workers:
                w.set_weights(state)

    def evaluate(self, num_episodes: int, eval_seed: int) -> Dict[int, Dict[str, float]]:
        futures = [self._call(i, "evaluate", num_episodes, eval_seed) for i in range(len(self.workers))]
        if self.use_ray:
            import ray

            results = ray.get(futures)
        else:
            results = [f.value for f in futures]
        merged: Dict[int, Dict[str, float]] = {}
        for r in results:
            merged.update(r)
        return merged

    def discard_pending(self) -> None:
        if self.use_ray:
            import ray

            for ref in self.pending.values():
                ray.cancel(ref, force=False)
        self.pending.clear()

    def shutdown(self) -> None:
        self.discard_pending()
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w)
        self.workers = []
