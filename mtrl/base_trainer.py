"""What the off-policy and on-policy training loops share (``mtrl/runner.py``, ``mtrl/onpolicy.py``): the run
directory and its files, the learner (``mtrl/learner.py``), the rollout workers (Ray actors or in-process; their
specs, pool and restarts are in ``mtrl/supply.py``), the periodic non-finite check, evaluation, checkpoints and
``--resume``, and the rollout/time, gradient and backbone logging. A subclass supplies ``run_until`` (its loop) and
its worker class.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

import numpy as np
import torch
import yaml

from agents.sac import NonFiniteLoss
from envs import get_suite

from . import checkpoint
from .cluster import install_sigterm
from .config import Config, to_dict
from .devices import resolve_device
from .evaluation import summarize
from .learner import Learner
from .logging import Logger, Progress, log_backbones, log_eval, log_gradients, log_rollout_and_time
from .rundir import _write_json, protocol, write_run_files
from .rollout import RolloutWorker, WorkerPool
from .supply import WorkerFailure, WorkerSupply

__all__ = ["BaseTrainer", "NonFiniteError", "WorkerFailure", "apply_matmul_precision"]


def matmul_precision_for(setting: str, device: torch.device) -> str:
    """``matmul_precision`` resolved for the learner's device: ``auto`` is ``high`` (TF32 GEMMs) on CUDA -- the
    JAX reference's default GPU precision runs float32 matmuls in TF32 too -- and ``highest`` (torch's own default:
    CPU numerics unchanged) elsewhere; any other value as given."""
    if setting == "auto":
        return "high" if torch.device(device).type == "cuda" else "highest"
    return setting


def apply_matmul_precision(setting: str, device: torch.device) -> str:
    """``torch.set_float32_matmul_precision`` for ``setting`` on ``device`` (:func:`matmul_precision_for`);
    returns the precision that was in force before, so a caller can put it back."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision_for(setting, device))
    return before


class NonFiniteError(RuntimeError):
    """A loss became NaN/inf; the message names the loss and the task."""


class BaseTrainer(WorkerSupply):
    worker_cls: type = RolloutWorker  # issue 5: the on-policy trainer (mtrl/onpolicy.py) uses its own worker class
    on_policy = False  # the learner holds MT-SAC and a replay; the on-policy trainer's holds MT-PPO

    def __init__(self, cfg: Config, run_dir: Path, resume: Optional[Dict[str, Any]] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.suite = get_suite(cfg.suite, cfg.tasks or None)
        self.device = resolve_device(cfg.device)
        # Once per process, before the networks and the compiled graphs exist (Inductor reads it when it compiles);
        # close() puts the previous one back (the Python API may run several trainings in one process).
        self._matmul_before = apply_matmul_precision(cfg.matmul_precision, self.device)
        self.matmul_precision = torch.get_float32_matmul_precision()
        T = self.suite.num_tasks
        self.T = T
        ss = np.random.SeedSequence(cfg.seed)
        torch_seq, replay_seq, worker_seq, agent_seq = ss.spawn(4)
        torch.manual_seed(int(torch_seq.generate_state(1)[0]))
        self.learner = Learner(cfg, self.suite, self.device, int(agent_seq.generate_state(1)[0]),
                               int(replay_seq.generate_state(1)[0]), on_policy=self.on_policy)
        self.env_steps = 0
        self.updates = 0
        self.task_steps = np.zeros(T, dtype=np.int64)
        self.episodes = 0
        self.resumes = 0  # how many times this run was resumed: picks fresh worker RNG streams each time
        self.history: List[Dict[str, Any]] = []
        self.next_eval = cfg.eval_every if cfg.eval_every > 0 else math.inf
        self.next_ckpt = cfg.checkpoint_every if cfg.checkpoint_every > 0 else math.inf
        self.worker_restarts = 0
        self.nan_skipped = 0
        self._worker_state: Optional[Dict[str, Any]] = None
        if resume is not None:
            self._restore(resume)
        self.worker_seq = worker_seq
        self.recent_ret: List[Deque[float]] = [deque(maxlen=10) for _ in range(T)]
        self.recent_succ: List[Deque[float]] = [deque(maxlen=10) for _ in range(T)]
        self.pool: Optional[WorkerPool] = None
        self.logger: Optional[Logger] = None
        self.failures_in_a_row: List[int] = []
        self.worker_time = np.zeros(2)  # seconds in policy calls, in env steps (from the workers' results)
        self._started_ray = False

    # --- set-up ---------------------------------------------------------------------------------------------
    @property
    def agent(self) -> Any:
        return self.learner.agent

    @property
    def replay(self) -> Any:
        return self.learner.replay

    def _restore(self, payload: Dict[str, Any]) -> None:
        for note in self.learner.load_state_dict(payload):
            print(note, file=sys.stderr, flush=True)
        c = payload["counters"]
        self.env_steps, self.updates, self.episodes = int(c["env_steps"]), int(c["updates"]), int(c["episodes"])
        self.resumes = int(c["resumes"]) + 1
        self.worker_restarts = int(c["worker_restarts"])
        self.nan_skipped = int(c["nan_skipped"])
        self.task_steps = payload["task_steps"].numpy().astype(np.int64)
        self.next_eval = float(c["next_eval"])
        self.next_ckpt = float(c["next_ckpt"])
        self.history = json.loads(payload["history"])
        if "worker_state" in payload and self.cfg.workers == 0:
            self._worker_state = payload["worker_state"]  # applied once the in-process worker exists

    # --- the loop -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run directory files, TensorBoard writer, workers (and Ray), first weight broadcast."""
        self.logger = Logger(self.run_dir, self.suite.task_names)
        compile_mode = self.learner.compile()  # the graphs are built at the first update (the time is printed)
        write_run_files(self.run_dir, self.cfg, self.suite, self.logger,
                        {"device": str(self.device), "compile": compile_mode,
                         "matmul_precision": self.matmul_precision,
                         "replay": type(self.replay).__name__ if self.replay is not None else None})
        if self.cfg.workers > 0 and not self.cfg.address:
            # The local workers each hold `worker_cpus` cores; the learner takes what is left (at least one) —
            # on CUDA too, where its host-side work (dispatch, replay gathers) would otherwise contend with them.
            busy = math.ceil(self.cfg.workers * self.cfg.worker_cpus)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - busy))
        self.pool = self._make_pool()
        self.pool.broadcast(self.agent.policy_state())
        if self._worker_state is not None:
            self.pool.workers[0].set_state(self._worker_state)  # exact resume: envs mid-episode, RNGs, policy
            self._worker_state = None
        self._t_log = (time.time(), self.env_steps, self.updates)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.logger is not None:
            self.logger.close()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
        if getattr(self, "_matmul_before", None) is not None:
            torch.set_float32_matmul_precision(self._matmul_before)
            self._matmul_before = None

    def train(self) -> Dict[str, Any]:
        """The whole run: collect and learn to ``total_steps``, final evaluation and checkpoint."""
        cfg = self.cfg
        progress = Progress(cfg.total_steps, min(self.env_steps, cfg.total_steps), cfg.progress)
        prev_term = None
        try:
            self.start()
            # After start(): ray.init installs Ray's own SIGTERM handler (a stack dump, then death, no checkpoint);
            # ours must be the one in place.
            prev_term = install_sigterm()
            self.run_until(cfg.total_steps, progress)
            final = self.evaluate(final=True)
            self.save_checkpoint()
        except NonFiniteError:
            raise  # keep the last good checkpoint: nothing from the bad update is written
        except (KeyboardInterrupt, Exception):
            # SIGINT/SIGTERM, a worker that keeps failing, or any crash: keep everything done so far
            # (`--resume RUN_DIR` continues from here).
            if self.pool is not None:
                self.pool.discard_pending()
                self.save_checkpoint()
            raise
        finally:
            progress.close()
            if prev_term is not None:
                signal.signal(signal.SIGTERM, prev_term)
            self.close()
        return final

    @staticmethod
    def _next(steps: int, every: int) -> float:
        return (steps // every + 1) * every if every > 0 else math.inf

    def _non_finite(self, e: NonFiniteLoss) -> None:
        """nan_policy "stop": raise NonFiniteError naming the task and the loss. "skip": count and log it."""
        where = f"task {self.suite.task_names[e.task]!r}" if e.task is not None else "the combined update"
        msg = (f"non-finite {e.loss} {e.kind} for {where} in {e.count} update step(s) up to update {self.updates} "
               f"(env step {self.env_steps}); those steps were skipped")
        if self.cfg.nan_policy == "stop":
            raise NonFiniteError(msg) from None
        self.nan_skipped += e.count
        assert self.logger is not None
        self.logger.scalar("train/nan_skipped", self.nan_skipped, self.env_steps)

    def check_nonfinite(self) -> None:
        """Read the learner's device-side record of skipped non-finite steps (one host read): under
        nan_policy=stop raise NonFiniteError naming the loss and task, under "skip" count them. Called every
        ``log_every`` updates, before a checkpoint and at the end of the loop; the update step itself never
        synchronises, and a non-finite step never touches the parameters (it is skipped on the device)."""
        try:
            self.learner.check()
        except NonFiniteLoss as e:
            self._non_finite(e)

    def run_until(self, total_steps: int, progress: Optional[Progress] = None) -> None:
        """Collect and learn until ``total_steps`` env steps (the subclass's loop)."""
        raise NotImplementedError

    # --- logging --------------------------------------------------------------------------------------------
    def _log_rollout_and_time(self, step: int) -> None:
        """rollout/* (last 10 episodes per task), time/*, workers/restarts; shared with the on-policy trainer."""
        assert self.logger is not None
        now = time.time()
        log_rollout_and_time(self.logger, step, self.recent_ret, self.recent_succ, self.suite.has_success,
                             (now, self.env_steps, self.updates), self._t_log,
                             None if self.replay is None else len(self.replay), self.worker_restarts)
        # issue 13: every task's share of env steps (max - min over tasks; at most one chunk of a task's envs).
        self.logger.scalar("rollout/env_steps_spread", int(np.ptp(self.task_steps)), step)
        if self.worker_time.sum() > 0:  # where the workers' time went since the last log: policy vs simulator
            self.logger.scalar("workers/policy_time_share", self.worker_time[0] / self.worker_time.sum(), step)
            self.worker_time[:] = 0.0
        self._t_log = (now, self.env_steps, self.updates)

    def _log_grad(self, info: Dict[str, Any]) -> None:
        assert self.logger is not None
        log_gradients(self.logger, self.env_steps, info)

    def _log_backbones(self) -> None:
        assert self.logger is not None
        log_backbones(self.logger, self.env_steps, {"actor": self.agent.actor, "critic": self.agent.critic},
                      self.suite.task_names)

    # --- evaluation and checkpoints -------------------------------------------------------------------------
    def evaluate(self, final: bool) -> Dict[str, Any]:
        """Evaluate the learner's current policy. The workers evaluate it on their evaluation envs without taking
        it as their collection policy, so an evaluation changes nothing in the run (collection keeps its weight-sync
        schedule)."""
        assert self.pool is not None and self.logger is not None
        weights = self.agent.policy_state()
        t0 = time.time()
        per_task: Dict[int, Dict[str, float]] = {}
        while len(per_task) < self.T:
            got, failed = self.pool.evaluate(self.cfg.eval_episodes, eval_seed=self.cfg.seed + 10_000,
                                             weights=weights)
            per_task.update(got)
            for i, err in failed.items():
                self._worker_failed(i, err)
        res = summarize(self.suite, per_task)
        res.update({"env_steps": self.env_steps, "updates": self.updates, "eval_seconds": time.time() - t0,
                    "task_steps": dict(zip(self.suite.task_names, self.task_steps.tolist())),
                    "env_steps_spread": int(np.ptp(self.task_steps)), "worker_chunks": list(self.chunks_done),
                    "worker_restarts": self.worker_restarts,
                    "nan_skipped": self.nan_skipped})
        log_eval(self.logger, res, self.env_steps)
        self.history.append(res)
        # Advanced here, not by the caller: an evaluation at the end of a run schedules the next one exactly as a
        # mid-run evaluation would, so a resumed run keeps the uninterrupted run's schedule.
        self.next_eval = self._next(self.env_steps, self.cfg.eval_every)
        _write_json(self.run_dir / "results.json", {
            "final": res if final else None, "history": self.history, "protocol": protocol(self.suite, self.cfg),
            "config": to_dict(self.cfg)})
        return res

    def save_checkpoint(self) -> None:
        self.check_nonfinite()  # a run that must stop for a non-finite loss stops before writing anything
        self.next_ckpt = self._next(self.env_steps, self.cfg.checkpoint_every)
        payload: Dict[str, Any] = {
            "counters": {"env_steps": self.env_steps, "updates": self.updates, "episodes": self.episodes,
                         "worker_restarts": self.worker_restarts, "nan_skipped": self.nan_skipped,
                         "resumes": self.resumes, "next_eval": float(self.next_eval),
                         "next_ckpt": float(self.next_ckpt)},
            "task_steps": torch.from_numpy(self.task_steps.copy()),
            "history": json.dumps(self.history, default=float),
            "config": yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
            **self.learner.state_dict(save_replay=self.cfg.save_replay),
        }
        # The in-process worker's envs mid-episode, RNGs and policy: with the replay (off-policy) or on its own
        # (on-policy, which has no replay), a resumed run collects exactly what the uninterrupted one would.
        if self.cfg.save_replay or self.replay is None:
            if self.cfg.workers == 0 and self.pool is not None and self.pool.workers:
                try:
                    payload["worker_state"] = self.pool.workers[0].get_state()
                except Exception:  # a broken worker has no state worth keeping; resume rebuilds it
                    pass
        checkpoint.save(self.run_dir / checkpoint.CKPT_NAME, payload)
