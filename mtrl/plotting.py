"""Results of many runs as pictures and a table (design.md §6): the library behind ``scripts/plot.py``.

A run directory holds ``config.yaml`` (method, backbone, seed, suite) and ``results.json`` (every evaluation in
``history``, each with per-task numbers). Runs are grouped by (method, backbone); within a group the seeds are the
"runs" of rliable (Agarwal et al. 2021): at every evaluation point the score matrix is (seeds, tasks) and the
aggregate is the interquartile mean (IQM) with a 95% stratified-bootstrap confidence interval.

Meta-World runs are scored by success rate; DMC runs (success undefined) by undiscounted return. Gradient-conflict
diagnostics (``grad/<critic|actor>/conflict_fraction``) come from the TensorBoard events when a method logged them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml


class PlotError(ValueError):
    """Bad input to plotting (not a run directory, nothing to plot): one line naming the problem."""


@dataclass
class Run:
    path: Path
    method: str
    backbone: str
    seed: int
    suite: str
    tasks: List[str]
    history: List[Dict[str, Any]]
    metric: str  # "success_rate" or "return"
    conflict: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (steps, values)

    @property
    def group(self) -> Tuple[str, str]:
        return (self.method, self.backbone)


def group_label(group: Tuple[str, str]) -> str:
    method, backbone = group
    return "stl (SB3 SAC per task)" if method == "stl" else f"{method} / {backbone}"


def _metric_for(history: List[Dict[str, Any]]) -> str:
    """Success rate when every task defines it (Meta-World); else return (DMC, and mixed suites)."""
    for v in history[-1].get("per_task", {}).values():
        sr = v.get("success_rate")
        if sr is None or (isinstance(sr, float) and math.isnan(sr)):
            return "return"
    return "success_rate"


def read_conflict(run_dir: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``grad/<name>/conflict_fraction`` scalars from the TensorBoard events (empty when none were logged)."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("grad/") and tag.endswith("/conflict_fraction"):
            name = tag[len("grad/"):-len("/conflict_fraction")] or "all"
            ev = acc.Scalars(tag)
            out[name] = (np.array([e.step for e in ev], float), np.array([e.value for e in ev], float))
    return out


def load_run(path: Path | str, with_events: bool = True) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise PlotError(f"{str(path)!r} is not a directory; give run directories (with config.yaml and results.json)")
    cfg_file, res_file = p / "config.yaml", p / "results.json"
    if not cfg_file.is_file() or not res_file.is_file():
        raise PlotError(f"{str(path)!r} is not a finished run: it needs config.yaml and results.json")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        res = json.loads(res_file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise PlotError(f"{str(path)!r}: unreadable config.yaml/results.json ({type(e).__name__})") from None
    history = [h for h in res.get("history", []) if h.get("per_task")]
    if not history:
        raise PlotError(f"{str(path)!r}: results.json has no evaluations yet")
    tasks = list(history[-1]["per_task"])
    suite = cfg.get("suite") or ("custom:" + ",".join(cfg.get("tasks") or tasks))
    return Run(path=p, method=str(cfg.get("method", "?")), backbone=str(cfg.get("backbone", "?")),
               seed=int(cfg.get("seed", 0)), suite=str(suite), tasks=tasks, history=history,
               metric=_metric_for(history), conflict=read_conflict(p) if with_events else {})


def group_runs(runs: Sequence[Run]) -> Dict[Tuple[str, str], List[Run]]:
    groups: Dict[Tuple[str, str], List[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.seed)
    return dict(sorted(groups.items()))


# --- statistics ---------------------------------------------------------------------------------------------------
def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of a (runs, tasks) score matrix (rliable's ``aggregate_iqm``)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(scores, float)))


def iqm_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0, confidence: float = 0.95) -> Tuple[float, float, float]:
    """IQM and its stratified-bootstrap percentile CI over runs (rliable ``get_interval_estimates``).

    ``scores`` is (runs, tasks). rliable's bootstrap draws from NumPy's global RNG; it is seeded here and the
    caller's global state restored, so the same input gives the same interval.
    """
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(scores, float)
    if scores.ndim == 1:
        scores = scores[:, None]
    state = np.random.get_state()
    np.random.seed(seed)  # rliable's StratifiedBootstrap.update_indices draws from np.random
    try:
        point, interval = rly.get_interval_estimates(
            {"x": scores}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps,
            confidence_interval_size=confidence)
    finally:
        np.random.set_state(state)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def score_matrix(runs: Sequence[Run], index: int, metric: str, tasks: Sequence[str]) -> np.ndarray:
    """(runs, tasks) scores at evaluation ``index`` of every run (-1 = final)."""
    return np.array([[r.history[index]["per_task"][t][metric] for t in tasks] for r in runs], float)


def curve(runs: Sequence[Run], metric: str, reps: int = 2000, seed: int = 0) -> Dict[str, np.ndarray]:
    """IQM and CI at every evaluation step shared by the group (steps aligned by interpolation onto the first run's
    evaluation steps, up to where every run has data)."""
    tasks = runs[0].tasks
    steps_each = [np.array([h["env_steps"] for h in r.history], float) for r in runs]
    end = min(s[-1] for s in steps_each)
    grid = steps_each[0][steps_each[0] <= end]
    per_run = []  # (runs, steps, tasks)
    for r, s in zip(runs, steps_each):
        vals = np.array([[h["per_task"][t][metric] for t in tasks] for h in r.history], float)
        per_run.append(np.stack([np.interp(grid, s, vals[:, k]) for k in range(len(tasks))], axis=1))
    arr = np.stack(per_run)
    pts, lo, hi = zip(*(iqm_ci(arr[:, i, :], reps=reps, seed=seed) for i in range(len(grid))))
    return {"steps": grid, "iqm": np.array(pts), "lo": np.array(lo), "hi": np.array(hi)}


# --- figures ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: Dict[Tuple[str, str], List[Run]], metric: str, out: Path, reps: int, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, (g, runs) in enumerate(groups.items()):
        c = curve(runs, metric, reps=reps)
        color = f"C{i}"
        ax.plot(c["steps"], c["iqm"], marker="o", ms=3, color=color, label=f"{group_label(g)} (n={len(runs)})")
        ax.fill_between(c["steps"], c["lo"], c["hi"], color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("environment steps (all tasks)")
    ax.set_ylabel(("success rate" if metric == "success_rate" else "return") + " — IQM, 95% bootstrap CI")
    if metric == "success_rate":
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    return _finish(plt, fig, ax, title, out)


def _finish(plt: Any, fig: Any, ax: Any, title: str, out: Path) -> Path:
    """Legend, title, tight layout, save, close: the common tail of every figure here."""
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_task_bars(groups: Dict[Tuple[str, str], List[Run]], metric: str, out: Path, title: str) -> Path:
    """Final per-task score: mean over seeds per group, whiskers = min..max over seeds."""
    plt = _plt()
    tasks = next(iter(groups.values()))[0].tasks
    n = len(groups)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(tasks) * max(1, n / 2) + 2), 4.8), dpi=120)
    x = np.arange(len(tasks))
    for i, (g, runs) in enumerate(groups.items()):
        m = score_matrix(runs, -1, metric, tasks)
        mean = m.mean(0)
        err = np.stack([mean - m.min(0), m.max(0) - mean])
        ax.bar(x + (i - (n - 1) / 2) * width, mean, width, yerr=err if len(runs) > 1 else None, capsize=2,
               color=f"C{i}", label=f"{group_label(g)} (n={len(runs)})")
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("final " + ("success rate" if metric == "success_rate" else "return") + " (mean over seeds)")
    if metric == "success_rate":
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    return _finish(plt, fig, ax, title, out)


def plot_conflict(groups: Dict[Tuple[str, str], List[Run]], out: Path, bins: int = 40) -> Optional[Path]:
    """Heatmap: one row per (group, critic/actor), columns = training-step bins, colour = fraction of task pairs
    whose gradients conflict (cosine < 0), averaged over seeds and over the logs falling in each bin."""
    rows: List[Tuple[str, np.ndarray, np.ndarray]] = []
    for g, runs in groups.items():
        names = sorted({n for r in runs for n in r.conflict})
        for name in names:
            steps = np.concatenate([r.conflict[name][0] for r in runs if name in r.conflict])
            vals = np.concatenate([r.conflict[name][1] for r in runs if name in r.conflict])
            rows.append((f"{group_label(g)}: {name}", steps, vals))
    if not rows:
        return None
    plt = _plt()
    hi = max(float(s.max()) for _, s, _ in rows)
    lo = min(float(s.min()) for _, s, _ in rows)
    nb = int(min(bins, max(1, len(np.unique(np.concatenate([s for _, s, _ in rows]))))))
    edges = np.linspace(lo, hi if hi > lo else lo + 1, nb + 1)
    mat = np.full((len(rows), nb), np.nan)
    for i, (_, s, v) in enumerate(rows):
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nb - 1)
        for b in range(nb):
            sel = idx == b
            if sel.any():
                mat[i, b] = v[sel].mean()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)), dpi=120)
    ax.set_facecolor("#d9d9d9")  # grey = no diagnostics logged in that bin (white = no conflict)
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="Reds", vmin=0, vmax=1,
                   extent=(edges[0], edges[-1], len(rows) - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xlabel("environment steps (all tasks)")
    ax.set_title("gradient conflict: fraction of task pairs with cosine < 0 (grey: not logged)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown_table(groups: Dict[Tuple[str, str], List[Run]], metric: str, reps: int) -> str:
    tasks = next(iter(groups.values()))[0].tasks
    name = "success" if metric == "success_rate" else "return"
    fmt = (lambda v: f"{v:.3f}") if metric == "success_rate" else (lambda v: f"{v:.1f}")
    lines = [f"| method | backbone | seeds | env steps | final {name} IQM [95% CI] | mean ± std over seeds |",
             "|---|---|---|---|---|---|"]
    for (method, backbone), runs in groups.items():
        m = score_matrix(runs, -1, metric, tasks)
        point, lo, hi = iqm_ci(m, reps=reps)
        per_seed = m.mean(1)
        steps = sorted({int(r.history[-1]["env_steps"]) for r in runs})
        lines.append(f"| {method} | {backbone} | {len(runs)} | {', '.join(map(str, steps))} | "
                     f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}] | {fmt(per_seed.mean())} ± {fmt(per_seed.std())} |")
    lines += ["", f"Per task (final {name}, mean over seeds):", "",
              "| task | " + " | ".join(group_label(g) for g in groups) + " |",
              "|---|" + "---|" * len(groups)]
    means = {g: score_matrix(runs, -1, metric, tasks).mean(0) for g, runs in groups.items()}
    for k, t in enumerate(tasks):
        lines.append(f"| {t} | " + " | ".join(fmt(means[g][k]) for g in groups) + " |")
    return "\n".join(lines) + "\n"


def make_all(run_dirs: Sequence[Path | str], out_dir: Path | str, reps: int = 2000) -> Dict[str, Path]:
    """Every picture and the table for the given runs; returns {name: path}. Runs of different suites are refused."""
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise PlotError("no run directories given")
    suites = sorted({r.suite for r in runs})
    if len(suites) > 1:
        raise PlotError(f"runs are from different suites ({', '.join(suites)}); plot one suite at a time")
    task_sets = {tuple(r.tasks) for r in runs}
    if len(task_sets) > 1:
        raise PlotError("runs evaluate different task lists; plot runs of one suite at a time")
    metric = runs[0].metric if len({r.metric for r in runs}) == 1 else "return"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    suite = suites[0]
    label = "success rate" if metric == "success_rate" else "return"
    files: Dict[str, Path] = {
        "curves": plot_curves(groups, metric, out / "curves.png", reps, f"{suite}: evaluation {label} over training"),
        "task_bars": plot_task_bars(groups, metric, out / "task_bars.png", f"{suite}: final {label} per task"),
    }
    if metric == "success_rate":  # returns move long before successes do: useful for short runs
        files["curves_return"] = plot_curves(groups, "return", out / "curves_return.png", reps,
                                             f"{suite}: evaluation return over training")
    heat = plot_conflict(groups, out / "conflict_heatmap.png")
    if heat is not None:
        files["conflict_heatmap"] = heat
    table = out / "results.md"
    table.write_text(f"# {suite}: {label}\n\n" + markdown_table(groups, metric, reps))
    files["table"] = table
    return files
