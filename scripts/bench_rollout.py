#!/usr/bin/env python
"""Collection throughput: raw gymnasium vector env vs our Ray rollout workers, measured side by side in one run.

    python scripts/bench_rollout.py --suite mt10 --workers 1,2 --seconds 20

With --learner it also runs the real training loop and prints the learner's updates/s while collecting.
For each worker count N it prints transitions/s delivered to the learner's process and the ratio to N x the raw
single-core rate (goal: >= 0.85 per core used). Workers run the real policy (3x400 MLP, batch = their envs) unless
--random-actions; the raw loop steps a ``gymnasium.vector.SyncVectorEnv`` of the same envs with random actions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def raw_rate(suite, seconds: float) -> float:
    import gymnasium as gym
    import numpy as np

    from envs import make_env

    envs = gym.vector.SyncVectorEnv(
        [lambda t=t: make_env(t, suite.obs_dim, suite.act_dim, goal_seed=0, seed=i) for i, t in enumerate(suite.tasks)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        envs.step(rng.uniform(-1, 1, (suite.num_tasks, suite.act_dim)).astype(np.float32))
        n += suite.num_tasks
    rate = n / (time.perf_counter() - t0)
    envs.close()
    return rate


def ray_rate(suite, workers: int, seconds: float, chunk: int, random_actions: bool) -> float:
    import numpy as np

    from agents.sac import MTSAC
    from mtrl.config import SACConfig
    from mtrl.rollout import WorkerPool, WorkerSpec, split_tasks

    specs = [WorkerSpec(suite=suite.name, tasks=[], task_indices=sl, goal_seed=0, env_seeds=list(range(len(sl))),
                        policy_seed=i, learning_starts=10**12 if random_actions else 0, start_steps=[0] * len(sl),
                        backbone="mlp", backbone_kwargs={}, log_std_min=-20.0, log_std_max=2.0)
             for i, sl in enumerate(split_tasks(suite.num_tasks, workers))]
    pool = WorkerPool(specs, use_ray=True)
    agent = MTSAC(suite.obs_dim, suite.act_dim, suite.num_tasks, suite.action_mask, SACConfig())
    pool.broadcast(agent.policy_state())
    for i in pool.idle():  # warm-up round (first calls pay imports and allocation)
        pool.submit_collect(i, 5)
    while pool.pending:
        pool.ready(block=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in pool.idle():
            pool.submit_collect(i, chunk)
        for _, res in pool.ready(block=True):
            n += int(res["steps"])
            np.asarray(res["obs"]).sum()  # touch the data in the learner's process
    rate = n / (time.perf_counter() - t0)
    pool.shutdown()
    return rate


def learner_rate(suite, workers: int, seconds: float):
    """The real training loop (MT-SAC 3x400, batch 128/task) with ``workers`` Ray workers: updates/s and env
    steps/s while collection overlaps the updates, after the random-action warm-up."""
    import tempfile

    from mtrl.config import Config
    from mtrl.runner import Trainer

    cfg = Config(suite=suite.name, workers=workers, eval_every=0, checkpoint_every=0, progress=False)
    cfg.sac.learning_starts = 200
    tr = Trainer(cfg, Path(tempfile.mkdtemp(prefix="bench_")))
    tr.start()
    try:
        tr.run_until(tr.warm_steps + 2 * cfg.chunk_steps * suite.num_tasks)
        t0, u0, s0 = time.perf_counter(), tr.updates, tr.env_steps
        while time.perf_counter() - t0 < seconds:
            tr.run_until(tr.env_steps + cfg.chunk_steps * suite.num_tasks)
        dt = time.perf_counter() - t0
        return (tr.updates - u0) / dt, (tr.env_steps - s0) / dt
    finally:
        tr.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="mt10")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--seconds", type=float, default=15.0, help="measurement time per configuration")
    p.add_argument("--chunk", type=int, default=50, help="env steps per task per worker call")
    p.add_argument("--random-actions", action="store_true", help="workers skip the policy forward")
    p.add_argument("--learner", action="store_true", help="also run the real training loop: learner updates/s "
                   "while collecting, per worker count")
    a = p.parse_args()

    import ray

    from envs import get_suite

    suite = get_suite(a.suite)
    counts = [int(x) for x in a.workers.split(",")]
    cpus = max(os.cpu_count() or 1, max(counts))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    raw = raw_rate(suite, a.seconds)
    print(f"suite {suite.name} ({suite.num_tasks} tasks), {os.cpu_count()} cores, chunk {a.chunk}, "
          f"{'random actions' if a.random_actions else 'policy actions (3x400 MLP)'} in workers")
    print(f"raw SyncVectorEnv, 1 core:           {raw:9.0f} steps/s")
    for n in counts:
        r = ray_rate(suite, n, a.seconds, a.chunk, a.random_actions)
        print(f"Ray workers={n}:                       {r:9.0f} steps/s   ratio per core = {r / (n * raw):.2f}")
    if a.learner:
        for n in counts:
            ups, fps = learner_rate(suite, n, a.seconds)
            print(f"training loop, workers={n}:            {ups:9.2f} updates/s, {fps:7.0f} env steps/s consumed "
                  f"(updates_per_step 1: one update per {suite.num_tasks} env steps)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
