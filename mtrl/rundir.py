"""A run directory's files: its default name, the evaluation protocol recorded in every run, atomic JSON, and
config.yaml + run_info.json (also shown in TensorBoard's TEXT tab)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict

import yaml

from envs import Suite

from .config import Config, to_dict
from .logging import Logger, git_commit, versions


def _slug(name: str) -> str:
    """A name fit for a directory: a plugin reference (``path/x.py:Class``) by its class, a task list
    (``gym:A-v1,B-v0``) without separators."""
    if ":" in name and not name.startswith(("gym:", "dmc:")):
        name = name.rpartition(":")[2]
    name = "".join(c if c.isalnum() or c in "-." else "-" for c in name)
    return name[:60]


def default_run_dir(cfg: Config) -> Path:
    suite = cfg.suite or "custom"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{_slug(suite)}_{_slug(cfg.preset or cfg.method)}_{_slug(cfg.backbone)}_s{cfg.seed}_{stamp}"


def protocol(suite: Suite, cfg: Config) -> Dict[str, Any]:
    from envs.make import REWARD_VERSION

    p: Dict[str, Any] = {"suite": suite.name, "tasks": suite.task_names, "seed": cfg.seed,
                         "eval_episodes_per_task": cfg.eval_episodes, "deterministic_eval": True,
                         "horizon": {t.name: t.horizon for t in suite.tasks}, "step_axis": "env steps, all tasks"}
    kinds = {t.kind for t in suite.tasks}
    if "metaworld" in kinds:
        p.update({"benchmark": "Meta-World v3", "reward_version": REWARD_VERSION, "goals_per_task": 50,
                  "goal_resampling": "on reset", "success": "info['success'] ever 1 in the episode",
                  "task_id": "index beside the observation (backbone decides: one-hot for mlp)"})
    if "dmc" in kinds:
        p.update({"benchmark_dmc": "dm_control suite, state observations, zero-padded", "dmc_metric": "return"})
    if "gym" in kinds:  # envs/custom.py
        p.update({"benchmark_gym": "Gymnasium envs, observations flattened and zero-padded, actions in [-1, 1] "
                                   "rescaled to each task's bounds", "gym_metric": "return"})
    return p


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=float))
    os.replace(tmp, path)


def write_run_files(run_dir: Path, cfg: Config, suite: Suite, logger: Logger, learner: Dict[str, Any]) -> None:
    """config.yaml and run_info.json (versions, commit, protocol, the learner's device, place and compile mode)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    meta = {"versions": versions(), "git_commit": git_commit(), "protocol": protocol(suite, cfg),
            "device": learner["device"], "learner": {"pid": os.getpid(), "host": platform.node(), **learner}}
    _write_json(run_dir / "run_info.json", meta)
    logger.text("config", "```\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "\n```")
    logger.text("run_info", "```\n" + json.dumps(meta, indent=2) + "\n```")
