"""The off-policy training loop: Ray rollout workers -> per-task replay -> MT-SAC learner (design.md §3).

Workers collect continuously (one ``collect`` call in flight per worker); the learner keeps a fixed
update-to-data ratio — ``sac.updates_per_step`` updates per vector step (one env step of every environment: T x
``envs_per_task`` env steps; with N envs per task that is N times fewer updates per env step than with one, so
``updates_per_step=N`` keeps the replay ratio of N = 1) once every task has ``sac.learning_starts`` random-action
steps. A worker's next chunk is only requested while collection is less than ``max_lag_steps`` ahead of that
ratio, so a slow learner throttles collection instead of falling behind. Weights go to the workers every
``weight_sync_every`` updates.

Per update the loop does no host work beyond feeding the replay (issue 21): chunks enter a device replay through
pinned memory (``mtrl/replay.py``); the weights are read back only on the sync updates, and with a CUDA learner and
Ray workers without a host sync (:class:`WeightCopy`: non-blocking copies into pinned buffers, broadcast once the
copy's event has completed, typically at the next update); with Ray workers, finished chunks are looked for at most
every ``POLL_S`` seconds while the learner owes updates (``ray.wait`` costs ~0.1 ms, about a tenth of a captured
GPU update). CPU runs and the in-process worker keep the synchronous path, so their runs are unchanged.

Every task gets its share (issue 13): a worker may start its next chunk only when no worker has delivered fewer
chunks than it, so delivered chunk counts differ by at most one between workers and per-task env steps stay within
one chunk (``chunk_steps`` x the task's envs) of each other; a faster worker waits. ``rollout/env_steps_spread``
logs the max - min of per-task env steps.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import numpy as np
import torch

from .base_trainer import BaseTrainer, NonFiniteError, WorkerFailure
from .cluster import train_placed
from .devices import resolve_device
from .logging import Progress
from .rollout import WorkerError
from .rundir import _write_json, default_run_dir, protocol

# What scripts/train.py and mtrl/stl.py import from here.
__all__ = ["Trainer", "NonFiniteError", "WorkerFailure", "default_run_dir", "protocol", "_write_json",
           "train_placed", "resolve_device"]


class WeightCopy:
    """The actor's weights on their way to the host for a broadcast, without a host synchronisation (CUDA).

    :meth:`start` enqueues a non-blocking copy of every actor tensor into pinned host buffers (allocated once) on
    the current stream, after the update that was just queued and before the next one, and records an event;
    :meth:`take` returns them as numpy arrays (what ``MTSAC.policy_state`` gives) once that event has completed,
    or None before (``wait=True``: waits for it)."""

    def __init__(self, actor: torch.nn.Module) -> None:
        self.actor = actor
        self.buffers: Dict[str, torch.Tensor] = {}
        self.event: Optional[Any] = None

    @property
    def pending(self) -> bool:
        return self.event is not None

    def start(self) -> None:
        for k, v in self.actor.state_dict().items():
            b = self.buffers.get(k)
            if b is None or b.shape != v.shape or b.dtype != v.dtype:
                b = self.buffers[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            b.copy_(v.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def take(self, wait: bool = False) -> Optional[Dict[str, np.ndarray]]:
        if self.event is None or not (wait or self.event.query()):
            return None
        self.event.synchronize()
        self.event = None
        return {k: b.numpy().copy() for k, b in self.buffers.items()}


class Trainer(BaseTrainer):
    """``--algo sac``: continuous collection by the workers, a fixed update-to-data ratio for the learner."""

    POLL_S = 0.002  # with Ray workers, while updates are due: seconds between looks for finished chunks
    _weight_copy: Optional[WeightCopy] = None

    # --- counters -------------------------------------------------------------------------------------------
    @property
    def warm_steps(self) -> int:
        return self.T * self.cfg.sac.learning_starts

    @property
    def vector_step(self) -> int:
        """Env steps in one vector step of all environments (T x envs_per_task)."""
        return self.T * self.cfg.envs_per_task

    def target_updates(self) -> int:
        return int(max(0, self.env_steps - self.warm_steps) * self.cfg.sac.updates_per_step / self.vector_step)

    def lag(self) -> float:
        """Env steps collected beyond what the update-to-data ratio has consumed."""
        consumed = self.warm_steps + self.updates * self.vector_step / self.cfg.sac.updates_per_step
        return self.env_steps - consumed

    def max_lag(self) -> float:
        if self.cfg.max_lag_steps > 0:
            return self.cfg.max_lag_steps
        return max(2 * self.cfg.chunk_steps * self.vector_step, 2 * self.vector_step / self.cfg.sac.updates_per_step)

    def _may_submit(self, total_steps: int) -> bool:
        return self.env_steps < total_steps and (self.env_steps < self.warm_steps or self.lag() < self.max_lag())

    def _my_turn(self, i: int) -> bool:
        """Worker ``i`` is not ahead: no worker has delivered fewer chunks (the equal-share rule)."""
        return self.chunks_done[i] <= min(self.chunks_done)

    def start(self) -> None:
        super().start()
        assert self.pool is not None
        self._weight_copy = None
        if self.device.type == "cuda" and self.pool.use_ray:
            copy = WeightCopy(self.agent.actor)
            # Only where it ships exactly what policy_state() does (the same tensors under the same names).
            if set(copy.actor.state_dict()) == set(self.agent.policy_state()):
                self._weight_copy = copy

    def _broadcast_copied(self, wait: bool = False) -> None:
        """Broadcast the weights of the last sync update once their copy to the host has completed."""
        if self._weight_copy is not None and self._weight_copy.pending:
            weights = self._weight_copy.take(wait=wait)
            if weights is not None:
                assert self.pool is not None
                self.pool.broadcast(weights)

    def run_until(self, total_steps: int, progress: Optional[Progress] = None) -> None:
        """Collect and learn until ``total_steps`` env steps; periodic evaluation and checkpoints on the way."""
        cfg, pool = self.cfg, self.pool
        assert pool is not None, "call start() first"
        last_poll = -float("inf")
        while True:
            for i in pool.idle():
                if self._may_submit(total_steps) and self._my_turn(i):
                    pool.submit_collect(i, cfg.chunk_steps)
            due = self.target_updates() > self.updates and self.learner.can_update()
            if not due and not pool.pending:
                break  # nothing to learn, nothing to collect: the budget is spent
            if pool.use_ray and due:
                # The learner owes updates: a chunk takes tens of ms to collect, so looking every POLL_S is enough
                # and spares most updates the ray.wait (the in-process pool is always read: exact resume).
                now = time.perf_counter()
                poll = now - last_poll >= self.POLL_S
                if poll:
                    last_poll = now
            else:
                poll = True
            for i, result in (pool.ready(block=not due) if poll else ()):
                if isinstance(result, WorkerError):
                    self._worker_failed(i, result.message)
                    continue
                self.failures_in_a_row[i] = 0
                self.chunks_done[i] += 1
                n = self._ingest(result)
                if progress is not None:
                    progress.update(n, updates=self.updates)
            if due:
                self._update()
            while not pool.use_ray and self.target_updates() > self.updates and self.learner.can_update():
                # In-process collection waits for the learner anyway: pay the whole debt now, so that after each
                # iteration the state is the same whether the run goes on or stops here (exact resume).
                self._update()
            if self.env_steps >= self.next_eval and self.env_steps < total_steps:
                self.evaluate(final=False)
            if self.env_steps >= self.next_ckpt and self.env_steps < total_steps:
                self.save_checkpoint()  # records the state as it is: taking it changes nothing in the run
        self._broadcast_copied(wait=True)
        pool.discard_pending()
        self.check_nonfinite()

    def _ingest(self, result: Dict[str, Any]) -> int:
        self.learner.add(result)
        for k, t in enumerate(result["task_indices"]):
            self.task_steps[t] += len(result["reward"][k])
        for t, ret, succ, _length in result["episodes"]:
            self.recent_ret[t].append(ret)
            self.recent_succ[t].append(succ)
            self.episodes += 1
        n = int(result["steps"])
        self.env_steps += n
        self.worker_time += (result.get("time_policy", 0.0), result.get("time_env", 0.0))
        return n

    def _update(self) -> None:
        cfg = self.cfg
        self._broadcast_copied()  # the last sync update's weights, if their copy has landed (CUDA + Ray)
        info = self.learner.update()
        self.updates += 1
        if self.updates % cfg.weight_sync_every == 0:
            assert self.pool is not None
            if self._weight_copy is not None:
                self._broadcast_copied(wait=True)  # at most one copy in flight
                self._weight_copy.start()
            else:
                self.pool.broadcast(self.agent.policy_state())  # the host read happens only on sync updates
        if self.updates % cfg.log_every == 0:
            self.check_nonfinite()
            self._log_train(info)
        if self.updates % cfg.log_grad_every == 0:
            self._log_grad(info)
            self._log_backbones()

    # --- logging --------------------------------------------------------------------------------------------
    def _log_train(self, info: Dict[str, Any]) -> None:
        lg, step = self.logger, self.env_steps
        assert lg is not None
        crit = info["critic_losses"].cpu().numpy()
        lg.scalar("train/critic_loss", crit.mean(), step)
        lg.per_task("train", "critic_loss", crit, step)
        if "actor_losses" in info:
            act = info["actor_losses"].cpu().numpy()
            lg.scalar("train/actor_loss", act.mean(), step)
            lg.per_task("train", "actor_loss", act, step)
            lg.scalar("train/alpha_loss", info["alpha_losses"].mean().item(), step)
            lg.scalar("train/entropy", info["entropy"].mean().item(), step)
        alpha = info["alpha"].cpu().numpy()
        lg.scalar("train/alpha", alpha.mean(), step)
        lg.per_task("train", "alpha", alpha, step)
        lg.scalar("train/n_updates", self.updates, step)
        self._log_rollout_and_time(step)

