"""The Python API beside the scripts (README *Python API*): ``mtrl.train``, ``mtrl.load``, ``mtrl.evaluate``.

``train`` goes through the very functions of ``scripts/train.py`` (``mtrl/train_cli.py``) (the same Config layers, checks and run
directory; bad settings raise ``mtrl.config.ConfigError`` with the CLI's one line instead of exiting 2), and
``evaluate`` through those of ``scripts/evaluate.py`` (the training-time protocol). ``load`` rebuilds a run's policy
(``evaluate.py``'s loader) and wraps it in :class:`Policy`, whose ``act(obs, task)`` takes a task's own observation
and returns its own action, on the CPU or a GPU.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

# Given as flags, because scripts/train.py reads them before the --set layer (preset, suite budget, resume).
_FLAGS = ("suite", "method", "tasks", "config", "resume")


def _script(name: str) -> Any:
    """The logic of ``scripts/<name>.py`` (``mtrl/<name>_cli.py``)."""
    return importlib.import_module(f"mtrl.{name}_cli")


def _flatten(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``sac={"batch_size": 16}`` -> ``{"sac.batch_size": 16}``; the free-form ``*_kwargs`` mappings stay whole."""
    out: Dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict) and k in ("sac", "ppo") and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def _argv(suite: Optional[str], method: Optional[str], settings: Dict[str, Any]) -> List[str]:
    import yaml

    argv: List[str] = []
    named = {"suite": suite, "method": method, **{k: settings.pop(k) for k in _FLAGS[2:] if k in settings}}
    for key in _FLAGS:
        v = named.get(key)
        if v is None:
            continue
        if key == "tasks" and not isinstance(v, str):
            v = ",".join(v)
        argv += [f"--{key}", str(v)]
    for key, value in _flatten(settings).items():
        text = yaml.safe_dump(value, default_flow_style=True)  # parsed back by the --set layer
        text = (text[:-4] if text.endswith("...\n") else text).strip()
        argv += ["--set", f"{key}={text}"]
    return argv


def train(suite: Optional[str] = None, method: Optional[str] = None, **settings: Any) -> Dict[str, Any]:
    """Train one run, as ``scripts/train.py --suite SUITE --method METHOD`` with every other setting given by its
    config key (``total_steps=...``, ``workers=0``, ``backbone="moe"``, ``run_dir=...``, ``sac={"batch_size": 64}``
    or ``**{"sac.batch_size": 64}``; ``tasks=[...]``, ``config="file.yaml"``, ``resume=run_dir`` as the flags).
    Returns ``results.json`` (``final``, ``history``, ``protocol``, ``config``) plus ``run_dir``. Raises
    ``ConfigError`` (one line) on bad settings, before anything is written; ``NonFiniteError`` / ``WorkerFailure``
    as the CLI's exit code 1."""
    script = _script("train")
    args = script.build_parser().parse_args(_argv(suite, method, dict(settings)))
    cfg, run_dir, payload = script.prepare(args)
    script.run(cfg, run_dir, payload)
    results = json.loads((Path(run_dir) / "results.json").read_text())
    results["run_dir"] = str(run_dir)
    return results


def evaluate(run_dir: Union[str, Path], *, episodes: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
             suite: Optional[str] = None, seed: Optional[int] = None, out: Optional[str] = None) -> Dict[str, Any]:
    """``scripts/evaluate.py RUN_DIR``: the training-time protocol on a run's checkpoint (same numbers as its final
    evaluation by default). Writes RUN_DIR/evaluation_s<seed>_e<episodes>.json (or ``out``) and returns it.
    Raises ValueError (one line) on bad input."""
    argv = [str(run_dir)]
    for flag, v in (("--episodes", episodes), ("--suite", suite), ("--seed", seed), ("--out", out),
                    ("--tasks", None if tasks is None else ",".join(tasks))):
        if v is not None:
            argv += [flag, str(v)]
    script = _script("evaluate")
    res = script.evaluate(script.build_parser().parse_args(argv))
    res.pop("_out", None)
    return res


class Policy:
    """A trained run's deterministic policy (``mtrl.load``).

    ``act(obs, task)``: ``task`` is a task name or index; ``obs`` that task's observation, shaped (obs,) or (B, obs),
    of its own size or padded to the suite's. Returns the action in [-1, 1] on the task's own dimensions, (act,) or
    (B, act), as the run's envs take it (``make_env(task)`` builds one: padded, with the run's action rescaling).
    ``task`` may also be a sequence of B tasks for a (B, obs) batch: the actions are then padded to the suite's
    largest action size, the dimensions a task lacks set to 0.
    """

    def __init__(self, net: Any, cfg: Any, suite: Any, device: Any) -> None:
        import torch

        self.net, self.cfg, self.suite, self.device = net, cfg, suite, torch.device(device)
        self.task_names: List[str] = list(suite.task_names)
        self._mask = torch.as_tensor(suite.action_mask, dtype=torch.float32, device=self.device)

    def task_index(self, task: Union[str, int]) -> int:
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= int(task) < len(self.task_names):
            return int(task)
        if task in self.task_names:
            return self.task_names.index(task)  # type: ignore[arg-type]
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(self.task_names)} or 0..{len(self.task_names) - 1}")

    def act(self, obs: Any, task: Union[str, int, Sequence[Union[str, int]]]) -> np.ndarray:
        import torch

        x = np.asarray(obs, dtype=np.float32)
        single = x.ndim == 1
        x = x[None] if single else x
        batch = not isinstance(task, (str, int, np.integer))
        tids = [self.task_index(t) for t in task] if batch else [self.task_index(task)] * x.shape[0]
        if x.ndim != 2 or len(tids) != x.shape[0]:
            raise ValueError(f"obs of shape {np.shape(obs)} and {len(tids)} task(s): give (obs,) or (B, obs) with one "
                             "task or B tasks")
        dims = {self.suite.tasks[t].obs_dim for t in tids} | {self.suite.obs_dim}
        if x.shape[1] not in dims:
            raise ValueError(f"obs has {x.shape[1]} values; valid: the task's own {sorted(dims)[0]} or the suite's "
                             f"padded {self.suite.obs_dim}")
        padded = np.zeros((x.shape[0], self.suite.obs_dim), np.float32)
        padded[:, : x.shape[1]] = x
        t = torch.as_tensor(tids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            a = self.net.act(torch.as_tensor(padded, device=self.device), t, self._mask[t], True)
        a = a.detach().cpu().numpy()
        if batch:
            return a
        a = a[:, : self.suite.tasks[tids[0]].act_dim]
        return a[0] if single else a

    def make_env(self, task: Union[str, int], seed: Optional[int] = None) -> Any:
        """The task's env as training builds it (padded obs, actions in [-1, 1]); Meta-World with the run's goals."""
        from envs import make_env

        spec = self.suite.tasks[self.task_index(task)]
        return make_env(spec, self.suite.obs_dim, self.suite.act_dim, goal_seed=self.cfg.seed, seed=seed)

    def __repr__(self) -> str:
        return (f"Policy({self.cfg.method}/{self.cfg.backbone} on {self.suite.name}: {len(self.task_names)} tasks, "
                f"device {self.device})")


def load(run_dir: Union[str, Path], device: str = "cpu") -> Policy:
    """The policy of a run directory (or checkpoint file) on ``device`` ("cpu", "cuda", "cuda:1", or "auto").
    Raises ValueError (one line) when the path holds no readable run."""
    from mtrl.checkpoint import CheckpointError, load as load_checkpoint
    from mtrl.devices import resolve_device
    from envs import get_suite

    script = _script("evaluate")
    run, ckpt = script.locate(str(run_dir))
    try:
        payload = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    cfg = script.load_config(run, payload)
    suite = get_suite(cfg.suite, cfg.tasks or None)
    net = script.build_policy(cfg, suite, payload)
    if getattr(net, "context_len", 0):
        raise ValueError(f"{str(run_dir)!r}: its policy reads the task from recent transitions (context_len="
                         f"{net.context_len}); Policy.act does not keep those windows yet: use mtrl.evaluate")
    dev = resolve_device(device) if device in ("auto", "cpu", "cuda") else device
    if cfg.method == "stl":
        if str(dev) != "cpu":
            raise ValueError("stl runs (per-task SB3 policies) load on the CPU only; valid: device='cpu'")
    else:
        net = net.to(dev)
    return Policy(net, cfg, suite, dev)
