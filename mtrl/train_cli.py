"""``scripts/train.py``, as a module (its logic lives here so that the Python API, ``mtrl.api``,
uses it without the scripts folder). Train one multi-task agent: ``python scripts/train.py --suite mt10 --method mtsac``.

Bad input (unknown flag, suite, task, method, backbone, config key, bad value, missing resume dir) prints ONE line
naming the value and the valid choices and exits with code 2, before any run directory is created.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



from mtrl.cli import OneLineParser


def bad(message: str) -> None:
    sys.stderr.write(f"train.py: error: {message}\n")
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from envs import DMC_SUITES
    from mtrl.config import available_presets
    from mtrl.gradients import available_methods
    from mtrl.nets import available_backbones

    suites = ("mt10, mt25, mt50, mt1-<task> (e.g. mt1-reach-v3), " + ", ".join(DMC_SUITES)
              + ", gym:<Id>,<Id>... (Gymnasium ids), dmc:<domain-task>,... (dm_control tasks)")
    p = OneLineParser(
        prog="train.py",
        description="Multi-task RL training (MT-SAC learner fed by Ray rollout workers).",
        epilog=f"suites: {suites}; or --tasks a,b,c for a custom Meta-World list.  "
               f"methods: {', '.join(available_methods())}.  presets: {', '.join(available_presets())}.  "
               f"backbones: {', '.join(available_backbones())}.  "
               "Settings not exposed as flags: --set key=value (e.g. --set sac.batch_size=64); "
               "see configs/default.yaml for every key.",
    )
    a = p.add_argument
    a("--suite", help=f"task suite: {suites}")
    a("--tasks", help="comma-separated Meta-World v3 tasks for a custom suite, e.g. reach-v3,push-v3")
    a("--method", help=f"how task losses combine (default mtsac): {', '.join(available_methods())}; or a "
                       f"baseline preset (configs/methods/): {', '.join(available_presets())}; "
                       "or stl = single-task reference (one SB3 SAC per task)")  # stl: issue 7
    a("--algo", help="learning algorithm: sac, ppo (or --method mtppo: the PPO preset)")
    a("--backbone", help=f"network: {', '.join(available_backbones())}; or a plugin path/to/file.py:Class or "
                         "package.module:Class (README 'Extending'; also for --method, --critic-backbone)")
    a("--critic-backbone", help="the critic's network when it differs (default: --backbone); its options: "
                                "--set critic_backbone_kwargs.KEY=VALUE")
    a("--seed", type=int)
    a("--total-steps", type=int, help="env steps summed over all tasks (MT10 at 2M/task: 20000000)")
    a("--workers", type=int, help="Ray rollout actors; 0 = one in-process worker (default: min(env slots, "
                                  "cores - 2), at least 1; 2 capped at the slots with --address)")
    a("--envs-per-task", type=int, help="environments per task, spread over the workers (default 1); --workers "
                                        "may then go up to tasks x envs-per-task")
    a("--worker-cpus", type=float, help="CPUs reserved per Ray worker (default 1)")
    a("--device", help="learner device: auto, cpu, cuda (default auto)")
    a("--run-dir", help="run directory (default runs/<suite>_<method>_<backbone>_s<seed>_<time>)")
    a("--eval-every", type=int, help="env steps between evaluations; 0 = only at the end")
    a("--eval-episodes", type=int, help="evaluation episodes per task (default 50 = one per Meta-World goal)")
    a("--checkpoint-every", type=int, help="env steps between checkpoints; 0 = only at the end")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    a("--address", help="join an existing Ray cluster (auto or ray://host:port) instead of a local one")
    a("--config", metavar="FILE.yaml", help="YAML file of settings (applied after the method preset)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting; repeatable")
    a("--no-progress", action="store_true", help="no console progress bar")
    return p


FLAG_KEYS = ["suite", "method", "algo", "backbone", "critic_backbone", "seed", "total_steps", "workers",
             "worker_cpus", "device", "run_dir", "eval_every", "eval_episodes", "checkpoint_every", "address",
             "envs_per_task"]
# What may change when resuming: budgets and placement, not what is being trained.
RESUME_MUTABLE = {"total_steps", "workers", "worker_cpus", "device", "eval_every", "eval_episodes",
                  "checkpoint_every", "address", "progress"}


def make_config(args: argparse.Namespace):
    from mtrl.config import (CONFIG_DIR, Config, ConfigError, apply_mapping, fit_default_workers, fit_preset_options,
                             load_preset, load_yaml, record_set, record_sources, set_key, suite_budget)

    cfg = Config()
    apply_mapping(cfg, load_yaml(CONFIG_DIR / "default.yaml"), "configs/default.yaml")
    file_data = load_yaml(args.config) if args.config else {}
    if not isinstance(file_data, dict):
        raise ConfigError(f"--config {args.config!r}: expected a mapping of settings")
    # The suite is needed before the layers that depend on it (budget, a preset's `suites:` section).
    sets = dict(a.split("=", 1) for a in args.set if "=" in a)
    suite = args.suite or sets.get("suite") or file_data.get("suite")
    tasks = args.tasks or sets.get("tasks") or file_data.get("tasks")
    tasks = [str(t).strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks or []) if str(t).strip()]
    budget = suite_budget(str(suite) if suite else None, tasks or None)
    if budget is not None:
        apply_mapping(cfg, budget, f"the budget of suite {suite or 'custom'}")
    method = args.method or file_data.get("method") or cfg.method
    preset_data = load_preset(str(method), str(suite) if suite else None)
    preset = preset_data is not None
    preset_src = f"configs/methods/{method}.yaml"
    if preset:
        apply_mapping(cfg, preset_data, preset_src)
        record_sources(cfg, preset_data, preset_src)
        cfg.preset = str(method)
    preset_backbone = cfg.backbone  # the backbone the preset's backbone_kwargs describe
    if file_data:
        apply_mapping(cfg, file_data, f"--config {args.config}")
        record_sources(cfg, file_data, f"--config {args.config}")
        if preset and cfg.method == method:  # `method: sm` in the file named the preset, not a gradient method
            cfg.method = preset_data.get("method", method)
    for key in FLAG_KEYS:
        v = getattr(args, key)
        # issue 5: a preset whose own `method:` differs from its name (mtppo = algo ppo + method mtsac) gives that
        # method when `--method <preset>` selected it; every other preset names itself, so nothing changes there.
        if key == "method" and preset and v == method and preset_data.get("method", v) != v:
            v = preset_data["method"]
        if v is not None:
            setattr(cfg, key, v)
            record_sources(cfg, {key: v}, "--" + key.replace("_", "-"))
    if args.tasks is not None:
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not cfg.tasks:
            raise ConfigError("--tasks is empty; give comma-separated Meta-World task names")
    if args.no_progress:
        cfg.progress = False
    for s in args.set:
        set_key(cfg, s)
        record_set(cfg, s)
    if preset:  # issue 22: what the preset's backbone options mean on another backbone (README Backbones)
        fit_preset_options(cfg, preset_backbone, dict(preset_data.get("backbone_kwargs") or {}), preset_src)
    if args.workers is None and "workers" not in sets and "workers" not in file_data and \
            "workers" not in (preset_data or {}):
        fit_default_workers(cfg)  # issue 13: an explicit --workers above the env slots is an error instead
    return cfg


def resume_config(args: argparse.Namespace):
    from mtrl.config import ConfigError, from_dict, load_yaml, set_key

    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {args.resume!r}: no such run directory")
    if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {args.resume!r}: no checkpoint.pt and config.yaml in it")
    cfg = from_dict(load_yaml(run_dir / "config.yaml"))
    for key in FLAG_KEYS:
        v = getattr(args, key)
        if v is None or v == getattr(cfg, key):
            continue
        if key not in RESUME_MUTABLE:
            raise ConfigError(f"--{key.replace('_', '-')} cannot change on --resume (the run has "
                              f"{key}={getattr(cfg, key)!r}); changeable: {', '.join(sorted(RESUME_MUTABLE))}")
        setattr(cfg, key, v)
    if args.no_progress:
        cfg.progress = False
    for s in args.set:
        key = s.split("=", 1)[0].strip()
        if key not in RESUME_MUTABLE:
            raise ConfigError(f"--set {key} cannot change on --resume; changeable: {', '.join(sorted(RESUME_MUTABLE))}")
        set_key(cfg, s)
    cfg.run_dir, cfg.resume = str(run_dir), str(run_dir)
    return cfg, run_dir


def budget_line(cfg) -> str:
    """The run's budget, printed at start-up: env steps and replay per task, and whether they are the suite's
    defaults (mtrl.config.suite_budget) or set explicitly (flag, --set, --config, preset)."""
    from envs import get_suite
    from mtrl.config import suite_budget

    T = get_suite(cfg.suite, cfg.tasks or None).num_tasks
    default = suite_budget(cfg.suite, cfg.tasks or None) or {}
    steps_src = "suite default" if default.get("total_steps") == cfg.total_steps else "set explicitly"
    buf_src = "suite default" if default.get("sac", {}).get("buffer_size") == cfg.sac.buffer_size else "set explicitly"
    line = f"budget: {cfg.total_steps:,} env steps ({cfg.total_steps // T:,} per task; {steps_src})"
    if cfg.algo == "sac":
        line += f", replay {cfg.sac.buffer_size:,} transitions ({cfg.sac.buffer_size // T:,} per task; {buf_src})"
    return line + (f", preset {cfg.preset}" if cfg.preset else "")


def prepare(args: argparse.Namespace):
    """Config, checks and run directory of a run: (cfg, run_dir, checkpoint payload or None). Raises ConfigError
    (one line) on bad input before anything is written; once everything passed, prints the one-line notes on how
    the settings were combined (a preset's backbone options on another backbone: mtrl.config.fit_preset_options).
    Shared with the Python API (``mtrl.train``)."""
    from mtrl.config import ConfigError, notes, validate

    if args.resume:
        cfg, run_dir = resume_config(args)
    else:
        cfg = make_config(args)
        run_dir = None
    validate(cfg)
    from mtrl.cluster import check_address
    from mtrl.runner import default_run_dir, resolve_device

    check_address(cfg.address)  # a dead address fails here in seconds, not after Ray's minutes of retries
    if not (cfg.address and cfg.learner_placement != "driver"):
        resolve_device(cfg.device)  # on a cluster the GPU may be on another node: the learner actor checks
        if cfg.replay_device == "cuda":
            resolve_device("cuda")
    if run_dir is None:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"--run-dir {str(run_dir)!r} already holds a run; use --resume {run_dir} or "
                              "another directory")
        cfg.run_dir = str(run_dir)
    # issue 7: `--method stl` (single-task SB3 reference, mtrl/stl.py) has no checkpoint to resume from.
    if args.resume and cfg.method == "stl":
        raise ConfigError(f"--resume {args.resume!r}: stl runs (single-task reference) cannot be resumed; "
                          "start a new run")
    payload = None
    if args.resume:
        from mtrl.checkpoint import CheckpointError, load

        try:
            payload = load(run_dir / "checkpoint.pt")
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    for line in notes(cfg):
        print(line, flush=True)
    return cfg, run_dir, payload


def run(cfg, run_dir: Path, payload=None) -> dict:
    """Train (or continue) the prepared run; returns the final evaluation. Raises NonFiniteError, WorkerFailure,
    KeyboardInterrupt as the trainers do."""
    if cfg.method == "stl":  # issue 7: the single-task reference, one SB3 SAC per task (mtrl/stl.py)
        from mtrl.stl import run_stl

        print(f"run directory: {run_dir}", flush=True)
        return run_stl(cfg, run_dir)

    from mtrl.runner import Trainer, train_placed

    trainer_cls = Trainer
    if cfg.algo == "ppo":  # issue 5: synchronous on-policy rounds on the same workers, methods and backbones
        from mtrl.onpolicy import OnPolicyTrainer

        trainer_cls = OnPolicyTrainer
    print(f"run directory: {run_dir}", flush=True)
    # In this process, or in a Ray actor holding a GPU (learner_placement; auto = on a cluster with a GPU).
    return train_placed(trainer_cls, cfg, run_dir, payload)


def final_line(final: dict, run_dir: Path) -> str:
    """The last line of a run; success only where it is defined (Meta-World), the return alone otherwise."""
    import math

    sr = final["success_rate"]
    head = "final:" if math.isnan(sr) else f"final: success_rate={sr:.3f}"
    return f"{head} return={final['return']:.1f} ({run_dir}/results.json)"


def main(argv=None) -> int:
    from mtrl.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir, payload = prepare(args)
    except (ConfigError, ValueError) as e:
        bad(str(e))
        return 2
    print(budget_line(cfg), flush=True)

    from mtrl.runner import NonFiniteError, WorkerFailure

    try:
        final = run(cfg, run_dir, payload)
    except NonFiniteError as e:
        sys.stderr.write(f"train.py: stopped: {e}; the last good checkpoint in {run_dir} is kept\n")
        return 1
    except WorkerFailure as e:
        sys.stderr.write(f"train.py: stopped: {e}; checkpoint saved in {run_dir}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"train.py: interrupted; checkpoint saved in {run_dir} (continue with --resume {run_dir})\n")
        return 130
    print(final_line(final, run_dir))
    return 0
