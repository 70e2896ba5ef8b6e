"""``scripts/evaluate.py``, as a module (its logic lives here so that the Python API, ``mtrl.api``,
uses it without the scripts folder). Evaluate a trained checkpoint: ``python scripts/evaluate.py RUN_DIR_OR_CHECKPOINT [--episodes 50] [--video]``.

Loads ``checkpoint.pt`` with ``torch.load(weights_only=True)`` (mtrl.checkpoint.load) and the run's config
(``config.yaml`` beside the checkpoint, else the copy inside the checkpoint), rebuilds the actor with the same
backbone, and evaluates it with ``mtrl.evaluation.evaluate_tasks`` — the very function the training run's workers
call. Defaults reproduce the training-time evaluation: the run's ``eval_episodes``, goals from the run seed, and
evaluation envs seeded ``seed + 10_000`` (``--seed`` replaces the run seed in that formula only; the 50 goals are
always the run's training goals). So the final evaluation in ``results.json`` is reproduced exactly.

  --suite S / --tasks a,b   evaluate only these of the run's tasks (a suite must be a subset of the run's tasks)
  --out FILE.json           where the numbers go (default RUN_DIR/evaluation_s<seed>_e<episodes>.json)
  --video [--video-dir D]   also render episodes offscreen (MuJoCo EGL, else OSMesa) to one file per task
                            (default D = RUN_DIR/videos): ``--video-format gif`` (default) or ``mp4`` (H.264 through
                            the ffmpeg binary that imageio-ffmpeg installs from PyPI; HEIGHT and WIDTH must be even),
                            and into TensorBoard as animated images (tag ``video/<task>``, in RUN_DIR's events,
                            always a GIF: the Images tab plays those; encoded with imageio, so moviepy — which
                            SummaryWriter.add_video needs — is not required)

Single-task reference runs (``--method stl``) are evaluated the same way with their per-task SB3 policies.
Bad input (missing path, not a checkpoint, unknown suite or task) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple



from mtrl.cli import OneLineParser


class EvalError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate.py", description="Evaluate a checkpoint with the training-time protocol.")
    a = p.add_argument
    a("path", metavar="RUN_DIR_OR_CHECKPOINT")
    a("--suite", help="evaluate only this suite's tasks (must be among the run's tasks); default: the run's suite")
    a("--tasks", help="comma-separated subset of the run's tasks")
    a("--episodes", type=int, help="episodes per task (default: the run's eval_episodes; 50 = one per goal)")
    a("--seed", type=int, help="evaluation seed base: envs are seeded SEED + 10000 + task (default: the run seed)")
    a("--out", metavar="FILE.json", help="output JSON (default RUN_DIR/evaluation_s<seed>_e<episodes>.json)")
    a("--video", action="store_true", help="render episodes offscreen to GIFs and TensorBoard")
    a("--video-dir", help="where the video files go (default RUN_DIR/videos)")
    a("--video-format", default="gif", help="video files: gif (default) or mp4")
    a("--video-episodes", type=int, default=1, help="rendered episodes per task (default 1)")
    a("--video-size", default="240x320", help="HEIGHTxWIDTH of the frames (default 240x320)")
    a("--video-every", type=int, default=4, help="keep every N-th env step as a frame (default 4)")
    a("--video-max-steps", type=int, default=0, help="stop a rendered episode after N steps (0 = full episode)")
    a("--fps", type=int, default=30, help="video frame rate (default 30)")
    return p


# --- loading ------------------------------------------------------------------------------------------------------
def locate(path: str) -> Tuple[Path, Path]:
    """(run_dir, checkpoint file) from a run directory or a checkpoint path."""
    from mtrl.checkpoint import CKPT_NAME

    p = Path(path)
    if p.is_dir():
        ckpt = p / CKPT_NAME
        if not ckpt.is_file():
            raise EvalError(f"{path!r} holds no {CKPT_NAME}; give a run directory or a checkpoint file")
        return p, ckpt
    if p.is_file():
        return p.parent, p
    raise EvalError(f"{path!r}: no such run directory or checkpoint file")


def load_config(run_dir: Path, payload: Dict[str, Any]):
    from mtrl.config import ConfigError, from_dict, load_yaml

    import yaml

    try:
        if (run_dir / "config.yaml").is_file():
            return from_dict(load_yaml(run_dir / "config.yaml"))
        if isinstance(payload.get("config"), str):
            return from_dict(yaml.safe_load(payload["config"]))
    except (ConfigError, yaml.YAMLError) as e:
        raise EvalError(f"config of {str(run_dir)!r} is unreadable: {str(e).splitlines()[0]}") from None
    raise EvalError(f"no config.yaml in {str(run_dir)!r} and none inside the checkpoint")


def select_tasks(run_suite, suite_name: Optional[str], tasks: Optional[str]) -> List[int]:
    """Indices (into the run's suite) of the tasks to evaluate."""
    from envs import get_suite

    names = run_suite.task_names
    if suite_name is None and tasks is None:
        return list(range(len(names)))
    try:
        want = get_suite(suite_name, None).task_names if suite_name else []
    except ValueError as e:
        raise EvalError(str(e)) from None
    if tasks:
        want += [t.strip() for t in tasks.split(",") if t.strip()]
    missing = [t for t in want if t not in names]
    if missing or not want:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise EvalError(f"task(s) {shown or '(none)'} not in this run; valid: {', '.join(names)}")
    return [names.index(t) for t in dict.fromkeys(want)]


def build_policy(cfg, suite, payload: Dict[str, Any]):
    """The evaluation policy: our actor (same backbone as training) or, for stl runs, the per-task SB3 actors."""
    if cfg.method == "stl":
        from mtrl.stl import policy_from_checkpoint

        try:
            return policy_from_checkpoint(cfg, suite, payload)
        except (KeyError, ValueError, RuntimeError) as e:
            raise EvalError(f"stl checkpoint: {str(e).splitlines()[0]}") from None
    from agents.sac import build_actor

    if "agent" not in payload or "actor" not in payload["agent"]:
        raise EvalError("the checkpoint holds no actor weights")
    if cfg.algo == "ppo":  # issue 5: the Gaussian PPO policy (its obs statistics are part of its weights)
        from agents.ppo import build_policy as build_ppo_policy

        actor = build_ppo_policy(suite.obs_dim, suite.act_dim, suite.num_tasks, cfg.ppo, cfg.backbone,
                                 cfg.backbone_kwargs)
    else:
        actor = build_actor(suite.obs_dim, suite.act_dim, suite.num_tasks, cfg.sac, cfg.backbone,
                            cfg.backbone_kwargs)
    try:
        actor.load_state_dict(payload["agent"]["actor"])
    except RuntimeError as e:
        raise EvalError(f"actor weights do not fit the run's config: {str(e).splitlines()[0]}") from None
    actor.eval()
    return actor


def eval_slices(cfg, num_tasks: int, indices: List[int]) -> List[List[int]]:
    """Batches of tasks evaluated together: the training run's rollout-worker slices (each worker evaluates its own
    tasks as one vector env), restricted to ``indices``. Same batches as training -> bit-identical actions."""
    from mtrl.rollout import split_envs

    if cfg.method == "stl":
        return [[t] for t in indices]  # mtrl.stl evaluates each task on its own
    n = cfg.envs_per_task
    # A worker evaluates the tasks whose env 0 it holds (mtrl/rollout.py); runs from before issue 13 capped
    # --workers at the number of tasks.
    slots = split_envs(num_tasks, min(max(1, cfg.workers), num_tasks * n), n)
    out = [[t for t, j in sl if j == 0 and t in indices] for sl in slots]
    return [sl for sl in out if sl]


# --- video --------------------------------------------------------------------------------------------------------
def probe_gl() -> Optional[str]:
    """The first offscreen GL backend that can render a MuJoCo scene here (MUJOCO_GL=egl, else osmesa), probed in
    a subprocess (a failed GL init can take the process down); None when neither works. Changes nothing."""
    import subprocess

    probe = ("import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); "
             "r = mujoco.Renderer(m, 8, 8); r.update_scene(mujoco.MjData(m)); r.render()")
    for gl in ("egl", "osmesa"):
        env = dict(os.environ, MUJOCO_GL=gl, PYOPENGL_PLATFORM=gl)
        try:
            if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0:
                return gl
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def setup_gl() -> Optional[str]:
    """Select an offscreen GL backend before MuJoCo is imported (an explicit MUJOCO_GL=egl/osmesa is kept)."""
    if os.environ.get("MUJOCO_GL") in ("egl", "osmesa"):
        return os.environ["MUJOCO_GL"]
    gl = probe_gl()
    if gl is None or "mujoco" in sys.modules:
        return None  # nothing works, or too late to choose this process's backend
    os.environ["MUJOCO_GL"] = gl
    os.environ["PYOPENGL_PLATFORM"] = gl
    return gl


class _Frames:
    """Offscreen frames of one env (MuJoCo's Renderer for Meta-World, dm_control's physics.render for DMC)."""

    def __init__(self, env, height: int, width: int) -> None:
        self.env, self.h, self.w = env, height, width
        u = env.unwrapped
        self.dmc = hasattr(u, "_env") and hasattr(u._env, "physics")
        if not self.dmc:
            import mujoco

            self.renderer = mujoco.Renderer(u.model, height, width)
            names = [u.model.camera(i).name for i in range(u.model.ncam)]
            # Meta-World's corner cameras have their image y axis pointing down: flip the frame vertically.
            self.camera = "corner2" if "corner2" in names else -1
            self.flip = self.camera != -1

    def __call__(self):
        u = self.env.unwrapped
        if self.dmc:
            return u._env.physics.render(height=self.h, width=self.w, camera_id=0)
        self.renderer.update_scene(u.data, camera=self.camera)
        img = self.renderer.render()
        return (img[::-1] if self.flip else img).copy()

    def close(self) -> None:
        if not self.dmc:
            self.renderer.close()


def render_episodes(suite, t: int, policy, mask_row, goal_seed: int, eval_seed: int, episodes: int, size: Tuple[int, int],
                    every: int, max_steps: int) -> Tuple[List[Any], List[Dict[str, float]]]:
    """Deterministic-policy episodes of task ``t`` on an evaluation env built like evaluate_tasks' (same goals, seed
    ``eval_seed + t``), rendered. A Meta-World episode stops 10 steps after the first success (the protocol counts
    it a success) or at the horizon."""
    import torch

    from envs import make_env

    from mtrl.evaluation import RecordContext
    from mtrl.nets.context import context_kw, context_window

    env = make_env(suite.tasks[t], suite.obs_dim, suite.act_dim, goal_seed=goal_seed, seed=eval_seed + t,
                   evaluation=True)
    frames_of = _Frames(env, *size)
    window = context_window(policy, 1, suite.obs_dim, suite.act_dim)  # policies that read the task from context
    if window is not None:
        env = RecordContext(env, window, 0)
    frames, stats = [], []
    tid = torch.as_tensor([t])
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=eval_seed + 1000 * t + ep) if suite.tasks[t].kind == "dmc" else env.reset()
            ret, success, after, step, done = 0.0, False, 0, 0, False
            frames.append(frames_of())
            while not done:
                with torch.no_grad():
                    a = policy.act(torch.as_tensor(obs[None], dtype=torch.float32), tid, mask_row[None], True,
                                   **context_kw(window))
                obs, r, te, tr, info = env.step(a.numpy()[0])
                ret += float(r)
                step += 1
                success |= bool(info.get("success", 0.0))
                after += int(success)
                if step % every == 0:
                    frames.append(frames_of())
                done = te or tr or after > 10 or (max_steps > 0 and step >= max_steps)
            stats.append({"return": ret, "success": float(success), "steps": step})
    finally:
        frames_of.close()
        env.close()
    return frames, stats


def write_videos(run_dir: Path, video_dir: Path, suite, indices: Sequence[int], policy, mask, cfg, eval_seed: int,
                 args, env_steps: int) -> Dict[str, str]:
    import imageio.v3 as iio
    import numpy as np
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    h, w = (int(x) for x in args.video_size.lower().split("x"))
    video_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(run_dir))  # a new events file beside the training ones
    out: Dict[str, str] = {}
    try:
        for i, t in enumerate(indices):
            name = suite.tasks[t].name
            frames, stats = render_episodes(suite, t, policy, mask[i], cfg.seed, eval_seed, args.video_episodes,
                                            (h, w), max(1, args.video_every), args.video_max_steps)
            gif = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=int(1000 / args.fps), loop=0)
            path = video_dir / f"{name}.{args.video_format}"
            if args.video_format == "gif":
                path.write_bytes(gif)
            else:  # H.264 through imageio-ffmpeg's bundled ffmpeg; sizes are even (checked), so no resizing
                iio.imwrite(path, np.stack(frames), extension=".mp4", fps=args.fps, macro_block_size=2)
            # An animated GIF inside an image summary is what SummaryWriter.add_video writes (it needs moviepy only
            # to encode the GIF); TensorBoard's Images tab plays it.
            img = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
            writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"video/{name}", image=img)]),
                                                  env_steps)
            out[name] = str(path)
            print(f"video {name}: {path} ({len(frames)} frames; "
                  + ", ".join(f"return {s['return']:.1f} success {s['success']:.0f}" for s in stats) + ")")
    finally:
        writer.close()
    return out


# --- main ---------------------------------------------------------------------------------------------------------
def format_table(res: Dict[str, Any]) -> str:
    rows = [f"{'task':<32} {'success':>8} {'return':>10}"]
    for task, v in res["per_task"].items():
        sr = v["success_rate"]
        rows.append(f"{task:<32} {('-' if math.isnan(sr) else f'{sr:.3f}'):>8} {v['return']:>10.1f}")
    sr = res["success_rate"]
    rows.append(f"{'mean':<32} {('-' if math.isnan(sr) else f'{sr:.3f}'):>8} {res['return']:>10.1f}")
    return "\n".join(rows)


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything but printing; raises EvalError on bad input."""
    from mtrl.checkpoint import CheckpointError, load

    run_dir, ckpt = locate(args.path)
    if args.episodes is not None and args.episodes <= 0:
        raise EvalError(f"--episodes={args.episodes} must be > 0")
    if args.video:
        try:
            h, w = (int(x) for x in args.video_size.lower().split("x"))
            assert h > 0 and w > 0
        except (ValueError, AssertionError):
            raise EvalError(f"--video-size {args.video_size!r} is not HEIGHTxWIDTH, e.g. 240x320") from None
        if args.video_format not in ("gif", "mp4"):
            raise EvalError(f"--video-format {args.video_format!r}: valid: gif, mp4")
        if args.video_format == "mp4" and (h % 2 or w % 2):
            raise EvalError(f"--video-size {args.video_size!r}: mp4 (H.264, yuv420p) needs an even height and width")
        if args.fps <= 0:
            raise EvalError(f"--fps={args.fps} must be > 0")
        gl = setup_gl()  # before anything imports mujoco
        if gl is None:
            raise EvalError("--video: no offscreen OpenGL (tried MUJOCO_GL=egl and osmesa; install libegl1 or "
                            "libosmesa6 (scripts/setup.sh does, as root), or set MUJOCO_GL before starting)")
    try:
        payload = load(ckpt)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    cfg = load_config(run_dir, payload)

    import torch

    from envs import get_suite
    from mtrl.evaluation import evaluate_tasks, summarize

    # The training run's evaluation happens in a rollout worker, which runs torch on one thread; a different thread
    # count can change the last bits of a batched matmul (and so, rarely, an action and a return).
    torch.set_num_threads(1)

    try:
        suite = get_suite(cfg.suite, cfg.tasks or None)
    except ValueError as e:
        raise EvalError(f"the run's suite: {e}") from None
    indices = select_tasks(suite, args.suite, args.tasks)
    policy = build_policy(cfg, suite, payload)
    episodes = args.episodes or cfg.eval_episodes
    seed = cfg.seed if args.seed is None else args.seed
    eval_seed = seed + 10_000  # as mtrl.runner.Trainer.evaluate
    mask = torch.as_tensor(suite.action_mask[indices], dtype=torch.float32)
    t0 = time.time()
    per_task: Dict[int, Dict[str, float]] = {}
    for sl in eval_slices(cfg, suite.num_tasks, indices):
        rows = [indices.index(t) for t in sl]
        per_task.update(evaluate_tasks(suite, sl, policy, mask[rows], episodes, goal_seed=cfg.seed,
                                       eval_seed=eval_seed))
    res = summarize(suite, per_task)
    counters = payload.get("counters", {})
    res.update({"env_steps": int(counters.get("env_steps", 0)), "updates": int(counters.get("updates", 0)),
                "eval_seconds": time.time() - t0, "checkpoint": str(ckpt), "method": cfg.method,
                "backbone": cfg.backbone, "suite": suite.name, "episodes_per_task": episodes, "seed": seed,
                "eval_seed": eval_seed, "goal_seed": cfg.seed})
    info = run_dir / "run_info.json"
    if info.is_file():
        res["protocol"] = json.loads(info.read_text()).get("protocol")
    if args.video:
        vdir = Path(args.video_dir) if args.video_dir else run_dir / "videos"
        res["videos"] = write_videos(run_dir, vdir, suite, indices, policy, mask, cfg, eval_seed, args,
                                     res["env_steps"])
    out = Path(args.out) if args.out else run_dir / f"evaluation_s{seed}_e{episodes}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    res["_out"] = str(out)
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = evaluate(args)
    except EvalError as e:
        sys.stderr.write(f"evaluate.py: error: {e}\n")
        return 2
    print(f"{res['suite']} | {res['method']}/{res['backbone']} | env steps {res['env_steps']} | "
          f"{res['episodes_per_task']} episodes/task | eval seed {res['eval_seed']}")
    print(format_table(res))
    print(f"written: {res['_out']}")
    return 0
