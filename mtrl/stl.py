"""Single-task reference (``--method stl``): one Stable-Baselines3 SAC per task, evaluated with our protocol.

Each task of the suite gets its own SB3 ``SAC("MlpPolicy")`` trained on that task's env alone, with the run's SAC
hyperparameters: hidden layers ``[width] * depth`` from ``backbone_kwargs`` (default 3×400, the MT-SAC size),
``sac.batch_size`` per update, ``sac.actor_lr`` (SB3 has one learning rate for actor, critic and α), ``tau``,
``gamma``, ``learning_starts`` uniform-random steps, ``init_alpha`` as the initial α (``ent_coef="auto_<α>"``,
target entropy −|A_t|), ``target_update_every``, ``updates_per_step`` gradient steps per env step, and the per-task
replay capacity of the multi-task run (``buffer_size // T``). ``max_grad_norm`` has no SB3 counterpart (unused).
The budget is the multi-task one split evenly: ``total_steps // T`` env steps per task.

Tasks run as Ray tasks in parallel (``workers > 0``, each reserving ``worker_cpus``) or one after another in this
process (``workers == 0``). Every task is evaluated with ``mtrl.evaluation.evaluate_tasks`` on the same evaluation
envs as a multi-task run of the same seed (goals from the run seed, env seed ``seed + 10_000 + task``) every
``eval_every // T`` of its own steps; the step axis of TensorBoard and results.json is "env steps, all tasks"
(per-task steps × T), so curves line up with multi-task runs. Each task writes ``eval/<task>/success_rate``,
``eval/<task>/return`` and ``train/<task>/alpha`` into the run directory (its own events file); the driver writes
``eval/success_rate`` and ``eval/return`` (means over tasks), ``results.json`` in the runner's format, and
``checkpoint.pt`` holding every task's SB3 actor weights (loads with ``weights_only=True``; scripts/evaluate.py
rebuilds the actors from it).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import yaml

METHOD = "stl"


def sb3_kwargs(cfg, num_tasks: int) -> Dict[str, Any]:
    """SB3 SAC keyword arguments from our config (see the module docstring)."""
    s = cfg.sac
    width = int(cfg.backbone_kwargs.get("width", 400))
    depth = int(cfg.backbone_kwargs.get("depth", 3))
    per_task_steps = max(1, cfg.total_steps // num_tasks)
    ups = float(s.updates_per_step)
    train_freq, grad_steps = (1, max(1, int(round(ups)))) if ups >= 1 else (max(1, int(round(1 / ups))), 1)
    return {
        "learning_rate": s.actor_lr,
        "buffer_size": int(max(1, min(s.buffer_size // num_tasks, per_task_steps))),
        "learning_starts": int(s.learning_starts),
        "batch_size": int(s.batch_size),
        "tau": float(s.tau),
        "gamma": float(s.gamma),
        "train_freq": train_freq,
        "gradient_steps": grad_steps,
        "ent_coef": f"auto_{float(s.init_alpha)}",
        "target_update_interval": int(s.target_update_every),
        "policy_kwargs": {"net_arch": [width] * depth},
    }


class STLPolicy(torch.nn.Module):
    """Our policy interface (``act(obs, task, mask, deterministic)``) over one SB3 actor per task."""

    def __init__(self, actors: Dict[int, Any], act_dims: Dict[int, int], act_dim: int) -> None:
        super().__init__()
        self.actors = dict(actors)
        self.act_dims = dict(act_dims)
        self.act_dim = act_dim
        for t, a in self.actors.items():
            self.add_module(f"task{t}", a)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, task: torch.Tensor, mask: torch.Tensor, deterministic: bool,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        task = task.reshape(-1).expand(obs.shape[0]) if task.numel() == 1 else task
        out = torch.zeros(obs.shape[0], self.act_dim)
        for t in torch.unique(task).tolist():
            rows = task == t
            a = self.actors[int(t)](obs[rows], deterministic=deterministic)  # tanh-squashed, in [-1, 1]
            out[rows, : self.act_dims[int(t)]] = a
        return out * mask


def _real_act_dim(suite, t: int) -> int:
    return int(np.asarray(suite.action_mask[t]).sum())


def train_task(cfg_dict: Dict[str, Any], t: int, run_dir: str, env_seed: int, model_seed: int) -> Dict[str, Any]:
    """Train and evaluate SB3 SAC on task ``t``; returns its evaluation history and actor weights (numpy)."""
    torch.set_num_threads(1)
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from torch.utils.tensorboard import SummaryWriter

    from envs import get_suite, make_env

    from .config import from_dict
    from .evaluation import evaluate_tasks

    cfg = from_dict(cfg_dict)
    suite = get_suite(cfg.suite, cfg.tasks or None)
    T, name = suite.num_tasks, suite.tasks[t].name
    k = _real_act_dim(suite, t)
    # Observations padded to the suite's size (as the evaluation envs give them); actions only the task's own.
    env = make_env(suite.tasks[t], suite.obs_dim, k, goal_seed=cfg.seed, seed=env_seed)
    kw = sb3_kwargs(cfg, T)
    model = SAC("MlpPolicy", env, seed=model_seed, device="cpu", verbose=0, **kw)
    policy = STLPolicy({t: model.actor}, {t: k}, suite.act_dim)
    mask = torch.as_tensor(suite.action_mask[[t]], dtype=torch.float32)
    per_task_steps = max(1, cfg.total_steps // T)
    every = cfg.eval_every // T if cfg.eval_every > 0 else 0
    writer = SummaryWriter(log_dir=run_dir, filename_suffix=f".{name}")
    history: List[Dict[str, Any]] = []

    def run_eval(steps: int) -> None:
        t0 = time.time()
        model.actor.eval()
        r = evaluate_tasks(suite, [t], policy, mask, cfg.eval_episodes, goal_seed=cfg.seed,
                           eval_seed=cfg.seed + 10_000)[t]
        model.actor.train()
        step = steps * T  # "env steps, all tasks", the axis of multi-task runs
        if not math.isnan(r["success_rate"]):
            writer.add_scalar(f"eval/{name}/success_rate", r["success_rate"], step)
        writer.add_scalar(f"eval/{name}/return", r["return"], step)
        alpha = float(torch.exp(model.log_ent_coef.detach()).item()) if model.log_ent_coef is not None else math.nan
        if not math.isnan(alpha):
            writer.add_scalar(f"train/{name}/alpha", alpha, step)
        writer.flush()
        history.append({"task_steps": steps, "env_steps": step, "updates": int(model._n_updates),
                        "success_rate": r["success_rate"], "return": r["return"], "eval_seconds": time.time() - t0})

    class EvalCallback(BaseCallback):
        def _on_step(self) -> bool:
            if every > 0 and self.num_timesteps % every == 0 and self.num_timesteps < per_task_steps:
                run_eval(self.num_timesteps)
            return True

    try:
        model.learn(total_timesteps=per_task_steps, callback=EvalCallback())
        run_eval(per_task_steps)
    finally:
        writer.close()
        env.close()
    actor = {k_: v.detach().cpu().numpy() for k_, v in model.actor.state_dict().items()}
    return {"t": t, "task": name, "history": history, "actor": actor}


def run_stl(cfg, run_dir: Path) -> Dict[str, Any]:
    """Train the per-task references, write TensorBoard, results.json and checkpoint.pt; return the final result."""
    from envs import get_suite

    from . import checkpoint
    from .cluster import start_ray
    from .config import to_dict
    from .evaluation import summarize
    from .logging import Logger, git_commit, versions
    from .rundir import _write_json, protocol

    run_dir = Path(run_dir)
    suite = get_suite(cfg.suite, cfg.tasks or None)
    T = suite.num_tasks
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    kw = sb3_kwargs(cfg, T)
    proto = protocol(suite, cfg)
    proto["single_task_reference"] = {"library": "stable-baselines3 SAC (MlpPolicy), one model per task",
                                      "env_steps_per_task": max(1, cfg.total_steps // T), "sb3_kwargs": kw}
    import importlib.metadata as md

    vers = versions()
    vers["stable_baselines3"] = md.version("stable-baselines3")
    meta = {"versions": vers, "git_commit": git_commit(), "protocol": proto, "device": "cpu"}
    _write_json(run_dir / "run_info.json", meta)
    logger = Logger(run_dir, suite.task_names)
    logger.text("config", "```\n" + yaml.safe_dump(cfg_dict, sort_keys=False) + "\n```")
    logger.text("run_info", "```\n" + json.dumps(meta, indent=2) + "\n```")

    seqs = np.random.SeedSequence(cfg.seed).spawn(T)
    seeds = [[int(x) for x in s.generate_state(2)] for s in seqs]
    t0 = time.time()
    started = False
    try:
        if cfg.workers > 0:
            import ray

            started = start_ray(cfg)
            remote = ray.remote(num_cpus=cfg.worker_cpus, max_retries=0)(train_task)
            refs = [remote.remote(cfg_dict, t, str(run_dir), *seeds[t]) for t in range(T)]
            outs = ray.get(refs)
        else:
            outs = []
            for t in range(T):
                outs.append(train_task(cfg_dict, t, str(run_dir), *seeds[t]))
                if cfg.progress:
                    print(f"stl: {suite.tasks[t].name} done ({time.time() - t0:.0f}s)", flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    outs.sort(key=lambda o: o["t"])

    # Combine: evaluation i of every task -> one history entry in the runner's format.
    n = min(len(o["history"]) for o in outs)
    history = []
    for i in range(n):
        per_task = {o["t"]: {"success_rate": o["history"][i]["success_rate"], "return": o["history"][i]["return"]}
                    for o in outs}
        res = summarize(suite, per_task)
        res.update({"env_steps": int(sum(o["history"][i]["task_steps"] for o in outs)),
                    "updates": int(sum(o["history"][i]["updates"] for o in outs)),
                    "eval_seconds": float(sum(o["history"][i]["eval_seconds"] for o in outs))})
        history.append(res)
        logger.scalar("eval/success_rate", res["success_rate"], res["env_steps"])
        logger.scalar("eval/return", res["return"], res["env_steps"])
    logger.scalar("time/wall_s", time.time() - t0, history[-1]["env_steps"])
    logger.close()
    final = history[-1]
    _write_json(run_dir / "results.json", {"final": final, "history": history, "protocol": proto,
                                           "config": cfg_dict})
    payload = {
        "stl_actors": {o["task"]: {k: torch.from_numpy(np.array(v)) for k, v in o["actor"].items()} for o in outs},
        "counters": {"env_steps": final["env_steps"], "updates": final["updates"]},
        "config": yaml.safe_dump(cfg_dict, sort_keys=False),
        "sb3_kwargs": json.dumps(kw),
    }
    checkpoint.save(run_dir / checkpoint.CKPT_NAME, payload)
    return final


def policy_from_checkpoint(cfg, suite, payload: Dict[str, Any]) -> STLPolicy:
    """Rebuild every task's SB3 actor from an stl checkpoint (weights only, no pickled objects)."""
    import gymnasium as gym
    from stable_baselines3.sac.policies import SACPolicy

    actors, dims = {}, {}
    kw = json.loads(payload.get("sb3_kwargs", "{}")) or sb3_kwargs(cfg, suite.num_tasks)
    for t, spec in enumerate(suite.tasks):
        state = payload.get("stl_actors", {}).get(spec.name)
        if state is None:
            raise ValueError(f"the stl checkpoint has no actor for task {spec.name!r}")
        k = _real_act_dim(suite, t)
        obs_space = gym.spaces.Box(-np.inf, np.inf, (suite.obs_dim,), np.float32)
        act_space = gym.spaces.Box(-1.0, 1.0, (k,), np.float32)
        pol = SACPolicy(obs_space, act_space, lambda _: kw.get("learning_rate", 3e-4),
                        net_arch=kw.get("policy_kwargs", {}).get("net_arch", [400, 400, 400]))
        pol.actor.load_state_dict(state)
        pol.actor.eval()
        actors[t], dims[t] = pol.actor, k
    return STLPolicy(actors, dims, suite.act_dim)
