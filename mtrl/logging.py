"""TensorBoard writer and the tag scheme (design.md §6; SB3-like namespaces).

    eval/success_rate, eval/return, eval/<task>/success_rate, eval/<task>/return
    rollout/ep_rew_mean, rollout/success_rate, rollout/<task>/ep_return
    train/critic_loss, train/actor_loss, train/alpha_loss, train/entropy, train/<task>/alpha,
    train/<task>/critic_loss, train/<task>/actor_loss
    grad/conflict_fraction, grad/cosine (image), grad/<task>/norm, grad/<task>/weight
    time/fps, time/updates_per_s
The step axis is environment steps summed over all tasks. Per-task curves are grouped with one custom-scalars
layout (regexes over the tags above) instead of ``add_scalars``, which would make one run folder per key.
"""

from __future__ import annotations

import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "metaworld", "mujoco", "dm_control", "gymnasium", "ray", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Logger:
    def __init__(self, run_dir: Path, task_names: Iterable[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.task_names = list(task_names)
        self.writer.add_custom_scalars({
            "eval": {
                "success rate per task": ["Multiline", [r"eval/.*/success_rate"]],
                "return per task": ["Multiline", [r"eval/.*/return"]],
            },
            "train": {
                "alpha per task": ["Multiline", [r"train/.*/alpha"]],
                "critic loss per task": ["Multiline", [r"train/.*/critic_loss"]],
            },
            "rollout": {"episode return per task": ["Multiline", [r"rollout/.*/ep_return"]]},
        })

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self.writer.add_scalar(tag, float(value), step)

    def per_task(self, prefix: str, name: str, values: Iterable[float], step: int) -> None:
        for task, v in zip(self.task_names, values):
            self.scalar(f"{prefix}/{task}/{name}", float(v), step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, img, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def cosine_image(cos: np.ndarray, cell: int = 16) -> np.ndarray:
    """A T×T cosine matrix as an RGB picture: red = conflict (−1), white = orthogonal, blue = aligned (+1)."""
    c = np.clip(cos, -1.0, 1.0)
    r = np.where(c < 0, 1.0, 1.0 - c)
    b = np.where(c > 0, 1.0, 1.0 + c)
    g = 1.0 - np.abs(c)
    img = (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
    return np.kron(img, np.ones((cell, cell, 1), dtype=np.uint8))


class Progress:
    """A console progress bar over environment steps (tqdm), silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar: Optional[object] = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int, **postfix: object) -> None:
        if self.bar is not None:
            self.bar.update(n)  # type: ignore[attr-defined]
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # type: ignore[attr-defined]


def log_gradients(lg: "Logger", step: int, info: Dict[str, Any]) -> None:
    """Gradient-conflict diagnostics of an update's ``{critic,actor}_diag``, when the method formed a Gramian
    (Jacobian methods): conflict fraction, cosine image, per-task norms and weights. Reads the device here."""
    for name in ("critic", "actor"):
        diag = info.get(f"{name}_diag") or {}
        gram = diag.get("gramian")
        if gram is None:
            continue
        g = gram.detach().double().cpu()
        norms = g.diagonal().clamp_min(0).sqrt()
        cos = (g / (norms[:, None] * norms[None, :]).clamp_min(1e-30)).numpy()
        iu = np.triu_indices(len(cos), 1)
        if len(iu[0]):
            lg.scalar(f"grad/{name}/conflict_fraction", float((cos[iu] < 0).mean()), step)
        lg.per_task("grad", f"{name}_norm", norms.numpy(), step)
        lg.image(f"grad/{name}/cosine", cosine_image(cos), step)
        if diag.get("weights") is not None:
            lg.per_task("grad", f"{name}_weight", diag["weights"].detach().cpu().numpy(), step)


def log_backbones(lg: "Logger", step: int, roles: Dict[str, Any], task_names: List[str]) -> None:
    """What each backbone has inside (expert load, gate entropy, mask density/overlap, Gram check...):
    ``diagnostics()`` of every submodule of the ``roles`` modules, device tensors (or host ints) read here."""
    import torch

    T = len(task_names)
    for role, module in roles.items():
        for mname, m in module.named_modules():
            if m is module or not callable(getattr(m, "diagnostics", None)):
                continue
            prefix = f"backbone/{role}.{mname}" if mname else f"backbone/{role}"
            for key, value in m.diagnostics().items():
                v = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float)
                if v.ndim == 0:
                    lg.scalar(f"{prefix}/{key}", float(v), step)
                elif v.ndim == 1 and len(v) == T:
                    for task, x in zip(task_names, v):
                        lg.scalar(f"{prefix}/{key}/{task}", float(x), step)
                elif v.ndim == 1 and len(v) <= 64:  # e.g. expert load (E,)
                    for j, x in enumerate(v):
                        lg.scalar(f"{prefix}/{key}/{j}", float(x), step)
                elif v.ndim == 2 and v.shape[0] == T:  # task x task overlap, task x expert load
                    lg.image(f"{prefix}/{key}", cosine_image(v / max(1e-12, float(np.abs(v).max()))), step)


def log_rollout_and_time(lg: "Logger", step: int, recent_ret: List[Iterable[float]],
                         recent_succ: List[Iterable[float]], with_success: bool, now: tuple, prev: tuple,
                         replay_size: Optional[int], worker_restarts: int) -> None:
    """rollout/* over the last episodes of each task, time/fps and time/updates_per_s since ``prev``
    ((time, env steps, updates), like ``now``), time/replay_size, workers/restarts."""
    rets = [r for d in recent_ret for r in d]
    if rets:
        lg.scalar("rollout/ep_rew_mean", float(np.mean(rets)), step)
        lg.per_task("rollout", "ep_return", [np.mean(list(d)) if len(d) else math.nan for d in recent_ret], step)
        if with_success:
            lg.scalar("rollout/success_rate", float(np.mean([s for d in recent_succ for s in d])), step)
    dt = max(now[0] - prev[0], 1e-9)
    lg.scalar("time/fps", (now[1] - prev[1]) / dt, step)
    lg.scalar("time/updates_per_s", (now[2] - prev[2]) / dt, step)
    if replay_size is not None:
        lg.scalar("time/replay_size", replay_size, step)
    lg.scalar("workers/restarts", worker_restarts, step)


def log_eval(lg: "Logger", res: Dict[str, Any], step: int) -> None:
    """eval/* from an evaluation summary. Success exists for Meta-World tasks only; DMC and Gymnasium tasks log
    their return alone."""
    if not math.isnan(res["success_rate"]):
        lg.scalar("eval/success_rate", res["success_rate"], step)
    lg.scalar("eval/return", res["return"], step)
    for task, v in res["per_task"].items():
        if not math.isnan(v["success_rate"]):
            lg.scalar(f"eval/{task}/success_rate", v["success_rate"], step)
        lg.scalar(f"eval/{task}/return", v["return"], step)
    lg.flush()
