#!/usr/bin/env python
"""Stable-Baselines3 SAC on one Meta-World task, evaluated with the SAME protocol as our runs, for the learning check.

    python scripts/sb3_reference.py --task reach-v3 --total-steps 60000 --eval-every 5000 --out runs/sb3_reach

Same env build (metaworld v3, reward v2, 500 steps, 50 goals from the run seed), same SAC hyperparameters as our
MT-SAC defaults (3x400 unless --width/--depth, batch 128, lr 3e-4, tau 0.005, gamma 0.99, 1500 random steps, auto entropy), and
metaworld's own evaluation (deterministic, one episode per goal, success if ever). Writes results.json with the
curve in the same shape as scripts/train.py's, so scripts/plot_learning_check.py draws both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="reach-v3")
    p.add_argument("--total-steps", type=int, default=60000)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import gymnasium as gym
    import torch
    from metaworld.evaluation import evaluation
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    from envs.make import make_metaworld

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_metaworld(a.task, goal_seed=a.seed, seed=a.seed + 1)
    model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=1_000_000, learning_starts=1500, batch_size=128,
                tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1, ent_coef="auto",
                policy_kwargs={"net_arch": [a.width] * a.depth}, seed=a.seed, device="cpu", verbose=0)

    class Agent:
        def eval_action(self, obs):
            return model.predict(obs, deterministic=True)[0]

        def reset(self, env_mask):
            pass

    history = []
    t0 = time.time()

    def run_eval(steps: int) -> None:
        envs = gym.vector.SyncVectorEnv([lambda: make_metaworld(a.task, goal_seed=a.seed, seed=a.seed + 10_000,
                                                                 evaluation=True)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        sr, ret, _, _ = evaluation(Agent(), envs, num_episodes=a.eval_episodes)
        envs.close()
        history.append({"env_steps": steps, "success_rate": sr, "return": ret, "wall_s": time.time() - t0})
        print(f"step {steps}: success {sr:.2f} return {ret:.1f} ({time.time() - t0:.0f}s)", flush=True)
        (out / "results.json").write_text(json.dumps({"final": history[-1], "history": history,
                                                      "algo": "sb3-sac", "task": a.task}, indent=2))

    class EvalCallback(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % a.eval_every == 0:
                run_eval(self.num_timesteps)
            return True

    model.learn(total_timesteps=a.total_steps, callback=EvalCallback())
    if not history or history[-1]["env_steps"] != a.total_steps:
        run_eval(a.total_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
