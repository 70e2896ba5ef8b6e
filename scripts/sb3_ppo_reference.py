#!/usr/bin/env python
"""Stable-Baselines3 PPO on one Meta-World task, evaluated with the SAME protocol as our runs (issue 5 learning check).

    python scripts/sb3_ppo_reference.py --task reach-v3 --total-steps 120000 --eval-every 24000 --out runs/sb3_ppo

Same env build as ours (metaworld v3, reward v2, 500 steps, 50 goals from the run seed: ``envs.make.make_metaworld``)
and the same PPO settings as the matching ``scripts/train.py --algo ppo`` run: rollout 2048 steps, 10 epochs,
32 minibatches (batch 64), gamma 0.99, GAE lambda 0.95, clip 0.2, no value clip, entropy 0, lr 3e-4, grad-norm clip
0.5, normalised advantages, observations normalised by running mean/std (SB3's VecNormalize, clip 10; no reward
normalisation, as ours), state-independent log-std initialised at 0, separate policy and value MLPs --width x --depth
with ReLU (ours: the `mlp` backbone). Left at SB3's own choice: orthogonal init (ours: PyTorch default init) and
SB3's per-minibatch (not per-round) advantage normalisation. Evaluation: metaworld's own ``evaluation`` --
deterministic, one episode per goal, success if ever. Writes results.json in the shape scripts/plot_learning_check.py
reads.
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
    p.add_argument("--total-steps", type=int, default=120000)
    p.add_argument("--eval-every", type=int, default=24000)
    p.add_argument("--eval-episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rollout-steps", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--minibatches", type=int, default=32)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import gymnasium as gym
    import torch
    from metaworld.evaluation import evaluation
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from envs.make import make_metaworld

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    venv = VecNormalize(DummyVecEnv([lambda: make_metaworld(a.task, goal_seed=a.seed, seed=a.seed + 1)]),
                        norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=0.99)
    arch = [a.width] * a.depth
    model = PPO("MlpPolicy", venv, learning_rate=3e-4, n_steps=a.rollout_steps,
                batch_size=a.rollout_steps // a.minibatches, n_epochs=a.epochs, gamma=0.99, gae_lambda=a.gae_lambda,
                clip_range=0.2, clip_range_vf=None, normalize_advantage=True, ent_coef=0.0, vf_coef=0.5,
                max_grad_norm=0.5, target_kl=None,
                policy_kwargs={"net_arch": {"pi": arch, "vf": arch}, "activation_fn": torch.nn.ReLU,
                               "log_std_init": 0.0},
                seed=a.seed, device="cpu", verbose=0)

    class Agent:
        def eval_action(self, obs):
            return model.predict(venv.normalize_obs(obs), deterministic=True)[0]

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
                                                      "algo": "sb3-ppo", "task": a.task, "args": vars(a)},
                                                     indent=2))

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
