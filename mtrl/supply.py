"""The trainers' supply of rollout workers (a mixin of ``mtrl.base_trainer.BaseTrainer``): each worker's spec
with fresh seed streams, the pool over the env slots (``mtrl.rollout.split_envs``), and replacing a worker that
failed, up to ``max_worker_restarts`` times in a row."""

from __future__ import annotations

import sys
from typing import List, Tuple

from envs import registered_suites

from .cluster import start_ray
from .rollout import WorkerPool, WorkerSpec, split_envs

__all__ = ["WorkerFailure", "WorkerSupply"]


class WorkerFailure(RuntimeError):
    """A rollout worker kept failing (e.g. an env that raises on every reset); the message names its tasks."""


class WorkerSupply:
    """Needs from the trainer: ``cfg``, ``suite``, ``T``, ``run_dir``, ``task_steps``, ``resumes``,
    ``worker_seq``, ``worker_cls``, ``pool``, ``logger``, ``env_steps``, ``worker_restarts``."""

    def _worker_spec(self, i: int, slots: List[Tuple[int, int]]) -> WorkerSpec:
        """Worker ``i``'s spec for its env ``slots`` (task, env index) with the next fresh seed stream: a restarted
        worker does not replay old randomness. ``learning_starts`` counts a task's steps over its N envs, so each
        env takes ceil(learning_starts / N) random steps (and, on a resume, 1/N of its task's steps so far)."""
        cfg, s, n = self.cfg, self.suite, self.cfg.envs_per_task
        env_seq, pol_seq = self._seed_seq.spawn(1)[0].spawn(2)
        tasks = [t for t, _ in slots]
        return WorkerSpec(
            # A suite registered from Python exists only in this process: its Suite (with the builders) travels.
            suite=s if s.name in registered_suites() else (s.name if s.name != "custom" else None),
            tasks=list(cfg.tasks), task_indices=tasks,
            goal_seed=cfg.seed, env_seeds=[int(x) for x in env_seq.generate_state(len(slots))],
            policy_seed=int(pol_seq.generate_state(1)[0]), learning_starts=-(-cfg.sac.learning_starts // n),
            start_steps=[int(self.task_steps[t]) // n for t in tasks], backbone=cfg.backbone,
            backbone_kwargs=dict(cfg.backbone_kwargs), log_std_min=cfg.sac.log_std_min,
            log_std_max=cfg.sac.log_std_max, name=f"worker{i}", pid_dir=str(self.run_dir / "workers"),
            fault=cfg.fault_inject, env_indices=[j for _, j in slots])

    def _make_pool(self) -> WorkerPool:
        cfg = self.cfg
        self.slots = split_envs(self.T, max(1, cfg.workers), cfg.envs_per_task)
        # One stream per resume, then one child per worker (re)start, in order.
        self._seed_seq = self.worker_seq.spawn(self.resumes + 1)[self.resumes]
        specs = [self._worker_spec(i, sl) for i, sl in enumerate(self.slots)]
        self.failures_in_a_row = [0] * len(specs)
        self.chunks_done = [0] * len(specs)  # per worker, for the equal-share rule (mtrl/runner.py)
        if cfg.workers > 0:
            self._started_ray |= start_ray(cfg)
        return WorkerPool(specs, use_ray=cfg.workers > 0, worker_cpus=cfg.worker_cpus, worker_cls=self.worker_cls)

    def _worker_failed(self, i: int, error: str) -> None:
        """Replace worker ``i`` (its delivered episodes are kept; its partial episodes are lost with it), or stop
        the run when it failed ``max_worker_restarts`` times in a row."""
        assert self.pool is not None and self.logger is not None
        names = [self.suite.task_names[t] for t in dict.fromkeys(self.pool.specs[i].task_indices)]
        self.failures_in_a_row[i] += 1
        if self.failures_in_a_row[i] > self.cfg.max_worker_restarts:
            raise WorkerFailure(f"rollout worker for task(s) {', '.join(names)} failed "
                                f"{self.failures_in_a_row[i]} times in a row; last error: {error}")
        self.worker_restarts += 1
        self.logger.scalar("workers/restarts", self.worker_restarts, self.env_steps)
        print(f"warning: rollout worker {i} ({', '.join(names)}) failed: {error}; restarting "
              f"({self.failures_in_a_row[i]}/{self.cfg.max_worker_restarts})", file=sys.stderr, flush=True)
        self.pool.replace(i, self._worker_spec(i, self.slots[i]))
