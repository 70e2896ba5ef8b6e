#!/usr/bin/env python
"""Collection throughput: raw gymnasium vector env vs our Ray rollout workers, measured side by side in one run.

    python scripts/bench_rollout.py --suite mt1-reach-v3 --workers 1,2 --envs-per-task 1,4 --cluster

For each envs-per-task N it steps a raw ``gymnasium.vector.SyncVectorEnv`` of the suite's T x N envs with random
actions on one core (the simulator's own rate); for each (workers W, N) it runs W Ray rollout workers holding the
T x N envs (``mtrl.rollout.split_envs``, as training does) with the real policy in the loop (the 3x400 MLP actor,
one batched call per vector step) and prints env steps/s delivered to the learner's process, steps/s per core, the
ratio to the raw one-core rate of the same N, and where the workers' time went (policy forward vs the rest: the
simulator and bookkeeping, as the workers time it). ``--actions random`` is the warm-up (uniform actions, no
forward); ``--actions forward-random`` runs the forward every vector step but steps the envs with uniform random
actions, so the physics is that of the raw loop and the difference to it is the policy's cost alone (a fresh
policy's actions can make the simulator slower or faster than random ones). The raw loops and the Ray
configurations are timed in alternating rounds (``--repeats`` rounds of ``--seconds`` each; the pools stay up
between rounds), each ratio is taken within its round, and medians are printed: the machine's speed drifts too
much over minutes for rates measured one after the other. ``--cluster`` repeats the largest
(W, N) on a loopback two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and a second node on this host,
one CPU each) and prints which node each worker ran on and its share of the steps. ``--learner`` also runs the
real training loop and prints the learner's updates/s while collecting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def raw_rate(suite, envs_per_task: int, seconds: float) -> float:
    """Random actions through a SyncVectorEnv of every task's ``envs_per_task`` envs, in this process (one core)."""
    import gymnasium as gym
    import numpy as np

    from envs import make_env

    tasks = [t for _ in range(envs_per_task) for t in suite.tasks]
    envs = gym.vector.SyncVectorEnv(
        [lambda t=t, i=i: make_env(t, suite.obs_dim, suite.act_dim, goal_seed=0, seed=i) for i, t in enumerate(tasks)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        envs.step(rng.uniform(-1, 1, (len(tasks), suite.act_dim)).astype(np.float32))
        n += len(tasks)
    rate = n / (time.perf_counter() - t0)
    envs.close()
    return rate


def forward_ms(suite, envs_per_task: int, seconds: float = 1.0) -> float:
    """The 3x400 actor's forward for the T x N observations of one vector step, called back to back in this
    process (weights stay in cache): milliseconds per call, to set beside the workers' in-the-loop figure."""
    import torch

    from agents.sac import Actor

    k = suite.num_tasks * envs_per_task
    actor = Actor(suite.obs_dim, suite.act_dim, suite.num_tasks, "mlp", {}, -20.0, 2.0).eval()
    obs, tids = torch.randn(k, suite.obs_dim), torch.arange(k) % suite.num_tasks
    mask, gen = torch.ones(k, suite.act_dim), torch.Generator().manual_seed(0)
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            actor.act(obs, tids, mask, False, generator=gen)
            n += 1
    return (time.perf_counter() - t0) / n * 1e3


def _node_of(worker) -> str:
    import ray

    return ray.get(worker.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def _forward_random_worker():
    """A RolloutWorker that runs the policy forward every vector step, then steps uniform random actions."""
    import numpy as np

    from mtrl.rollout import RolloutWorker

    class ForwardRandom(RolloutWorker):
        def _actions(self, deterministic: bool = False):
            super()._actions(deterministic)  # the forward, timed as in training
            return self.rng.uniform(-1.0, 1.0, size=(len(self.envs), self.suite.act_dim)).astype(np.float32)

    return ForwardRandom


def start_pool(suite, workers: int, envs_per_task: int, actions: str):
    """``workers`` Ray workers holding the T x N envs (as training deals them), a fresh policy broadcast, a warm-up
    call each (the first calls pay imports and allocation). Returns (pool, each worker's Ray node id)."""
    from agents.sac import MTSAC
    from mtrl.config import SACConfig
    from mtrl.rollout import WorkerPool, WorkerSpec, split_envs

    slots = split_envs(suite.num_tasks, workers, envs_per_task)
    specs = [WorkerSpec(suite=suite.name, tasks=[], task_indices=[t for t, _ in sl], goal_seed=0,
                        env_seeds=[100 * i + k for k in range(len(sl))], policy_seed=i,
                        learning_starts=10**12 if actions == "random" else 0, start_steps=[0] * len(sl),
                        backbone="mlp", backbone_kwargs={}, log_std_min=-20.0, log_std_max=2.0,
                        env_indices=[j for _, j in sl])
             for i, sl in enumerate(slots)]
    pool = WorkerPool(specs, use_ray=True,
                      worker_cls=_forward_random_worker() if actions == "forward-random" else None)
    agent = MTSAC(suite.obs_dim, suite.act_dim, suite.num_tasks, suite.action_mask, SACConfig())
    pool.broadcast(agent.policy_state())
    nodes = [_node_of(w) for w in pool.workers]
    for i in pool.idle():
        pool.submit_collect(i, 5)
    while pool.pending:
        pool.ready(block=True)
    return pool, nodes


def measure(pool, nodes: List[str], seconds: float, chunk: int) -> Tuple[float, Dict[str, int], Tuple[float, float]]:
    """Env steps/s the pool delivers to this process over ``seconds`` (one collect in flight per worker, as the
    training loop keeps it), env steps per Ray node, and the workers' seconds per vector step in the policy and
    in the rest (the simulator and bookkeeping)."""
    import numpy as np

    per_node: Counter = Counter()
    n, t0, vsteps, t_pol, t_env = 0, time.perf_counter(), 0, 0.0, 0.0
    while time.perf_counter() - t0 < seconds:
        for i in pool.idle():
            pool.submit_collect(i, chunk)
        for i, res in pool.ready(block=True):
            n += int(res["steps"])
            per_node[nodes[i]] += int(res["steps"])
            vsteps += chunk
            t_pol, t_env = t_pol + res["time_policy"], t_env + res["time_env"]
            np.asarray(res["obs"]).sum()  # touch the data in the learner's process
    rate = n / (time.perf_counter() - t0)
    while pool.pending:  # the next round starts with idle workers
        pool.ready(block=True)
    return rate, dict(per_node), (t_pol / vsteps, t_env / vsteps)


def learner_rate(suite, workers: int, envs_per_task: int, seconds: float):
    """The real training loop (MT-SAC 3x400, batch 128/task) with ``workers`` Ray workers: updates/s and env
    steps/s while collection overlaps the updates, after the random-action warm-up."""
    import tempfile

    from mtrl.config import Config
    from mtrl.runner import Trainer

    cfg = Config(suite=suite.name, workers=workers, envs_per_task=envs_per_task, eval_every=0, checkpoint_every=0,
                 progress=False)
    cfg.sac.learning_starts = 200
    tr = Trainer(cfg, Path(tempfile.mkdtemp(prefix="bench_")))
    tr.start()
    try:
        tr.run_until(tr.warm_steps + 2 * cfg.chunk_steps * tr.vector_step)
        t0, u0, s0 = time.perf_counter(), tr.updates, tr.env_steps
        while time.perf_counter() - t0 < seconds:
            tr.run_until(tr.env_steps + cfg.chunk_steps * tr.vector_step)
        dt = time.perf_counter() - t0
        return (tr.updates - u0) / dt, (tr.env_steps - s0) / dt
    finally:
        tr.close()


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="mt1-reach-v3")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--envs-per-task", default="1,4", help="comma-separated environments per task")
    p.add_argument("--seconds", type=float, default=5.0, help="measurement time per configuration and round")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians are printed)")
    p.add_argument("--chunk", type=int, default=50, help="env steps per environment per worker call")
    p.add_argument("--actions", choices=("policy", "random", "forward-random"), default="policy",
                   help="policy: the policy's actions; random: uniform, no forward (the warm-up); forward-random: "
                   "the forward every vector step, uniform actions stepped (the raw loop's physics)")
    p.add_argument("--cluster", action="store_true", help="also run the largest (workers, envs-per-task) on a "
                   "loopback two-node Ray cluster (head + one node on this host, one CPU each)")
    p.add_argument("--learner", action="store_true", help="also run the real training loop: learner updates/s "
                   "while collecting, per (workers, envs-per-task)")
    a = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as mtrl.cluster: workers are the learner's supply
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    import ray
    import torch

    from envs import get_suite

    torch.set_num_threads(1)  # the raw loop and the driver: one core, as each worker
    suite = get_suite(a.suite)
    counts, per_task = _ints(a.workers), _ints(a.envs_per_task)
    grid = [(w, n) for n in per_task for w in counts if w <= suite.num_tasks * n]
    cpus = max(os.cpu_count() or 1, sum(w for w, _ in grid))  # every pool stays up (idle between its rounds)
    policy = {"policy": "policy actions (3x400 MLP, one call per vector step)",
              "random": "random actions (no policy forward)",
              "forward-random": "3x400 MLP forward every vector step, random actions stepped"}[a.actions]
    print(f"suite {suite.name} ({suite.num_tasks} tasks), {os.cpu_count()} cores, chunk {a.chunk}, {policy} in "
          "workers")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        pools = {(w, n): start_pool(suite, w, n, a.actions) for w, n in grid}
        # Alternating rounds (raw, then each Ray configuration, repeated): this machine's speed drifts by +-20%
        # over minutes, so every ratio is taken within one round and the medians are reported.
        raw: Dict[int, List[float]] = {n: [] for n in per_task}
        rates: Dict[Tuple[int, int], List[float]] = {k: [] for k in grid}
        ratio: Dict[Tuple[int, int], List[float]] = {k: [] for k in grid}
        scale: Dict[Tuple[int, int], List[float]] = {k: [] for k in grid}
        split: Dict[Tuple[int, int], List[Tuple[float, float]]] = {k: [] for k in grid}
        for _ in range(a.repeats):
            for n in per_task:
                raw[n].append(raw_rate(suite, n, a.seconds))
            for w, n in grid:
                r, _, times = measure(*pools[w, n], a.seconds, a.chunk)
                rates[w, n].append(r)
                split[w, n].append(times)
                ratio[w, n].append(r / (w * raw[n][-1]))
                scale[w, n].append(r / rates[min(counts), n][-1] if (min(counts), n) in rates else 1.0)
        med = statistics.median
        for n in per_task:
            print(f"raw SyncVectorEnv, {suite.num_tasks * n} envs ({n}/task), random actions, 1 core: "
                  f"{med(raw[n]):9.0f} steps/s; the 3x400 forward for its {suite.num_tasks * n} observations, back to "
                  f"back in one process: {forward_ms(suite, n):.2f} ms per call")
        for w, n in grid:
            pol, env = med(t for t, _ in split[w, n]), med(t for _, t in split[w, n])
            print(f"Ray workers={w} envs-per-task={n}: {med(rates[w, n]):9.0f} steps/s, "
                  f"{med(rates[w, n]) / w:8.0f} per core, per core / raw({n}/task) = {med(ratio[w, n]):.2f}, "
                  f"vs workers={min(counts)}: {med(scale[w, n]):.2f}x; per worker vector step: policy "
                  f"{pol * 1e3:.2f} ms, envs {env * 1e3:.2f} ms (raw: {suite.num_tasks * n / med(raw[n]) * 1e3:.2f} "
                  "ms for all its envs)")
        for pool, _ in pools.values():
            pool.shutdown()
        if a.learner:
            for w, n in grid:
                ups, fps = learner_rate(suite, w, n, a.seconds)
                print(f"training loop, workers={w} envs-per-task={n}: {ups:9.2f} updates/s, {fps:7.0f} env steps/s "
                      f"consumed (updates_per_step 1: one update per {suite.num_tasks * n} env steps)")
    finally:
        ray.shutdown()
    if a.cluster and grid:
        from ray.cluster_utils import Cluster

        w, n = grid[-1]
        cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            r, per_node, _ = measure(*start_pool(suite, w, n, a.actions), a.seconds, a.chunk)
            shares = ", ".join(f"node {k[:8]}: {v / sum(per_node.values()):.0%}" for k, v in per_node.items())
            print(f"two-node loopback cluster, workers={w} envs-per-task={n}: {r:9.0f} steps/s over "
                  f"{len(per_node)} node(s) ({shares})")
        finally:
            ray.shutdown()
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
