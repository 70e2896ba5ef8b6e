#!/usr/bin/env python
"""Run a grid of training runs and plot them: ``python scripts/sweep.py --suite mt10 --methods mtsac,pcgrad --seeds 3``.

The grid is methods × backbones × seeds; every trial is one ``scripts/train.py`` run with its own run directory
``OUT/<suite>_<method>_<backbone>_s<seed>``. Trials run as plain Ray tasks (each reserves ``--trial-cpus`` CPUs and
runs train.py in a subprocess, its log in ``OUT/logs/``), on an embedded local Ray or on a cluster (``--address``);
``--workers 0`` runs them one after another in this process instead (no Ray; handy for tests and debugging). A trial
whose directory already holds a finished run is skipped, so re-running a sweep only does what is missing.

Every finished trial gets the TensorBoard hparams view (``add_hparams(..., run_name=".")``, so no sub-folder): the
method, backbone, seed, suite, budget and every ``--set`` value, with the final ``hparam/success_rate`` and
``hparam/return``. At the end ``scripts/plot.py`` draws all finished trials into ``OUT/plots`` and ``OUT/sweep.json``
lists the trials. Settings not named here reach every trial through ``--set key=value``.

Bad input (unknown suite/method/backbone/key, bad value) prints one line and exits 2 before anything runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


from mtrl.cli import OneLineParser  # noqa: E402


def bad(message: str) -> int:
    sys.stderr.write(f"sweep.py: error: {message}\n")
    return 2


def grid_pairs(methods, backbones):
    """(method, backbone) pairs of the grid. "--methods mtsac,pcgrad,moe": papers put architectures in the same
    comparison as methods, so a backbone name among the methods is one more entry — mtsac on that backbone — while
    the --backbones grid applies to the real methods."""
    from mtrl.gradients import available_methods
    from mtrl.nets import available_backbones

    pairs = []
    for m in methods:
        if m in available_backbones() and m not in available_methods():
            pairs.append(("mtsac", m))
        else:
            pairs += [(m, b) for b in backbones]
    return list(dict.fromkeys(pairs))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sweep.py", description="A grid of train.py runs (Ray tasks), then plot.py.")
    a = p.add_argument
    a("--suite", help="task suite (as train.py --suite)")
    a("--tasks", help="custom Meta-World task list (as train.py --tasks)")
    a("--methods", default="mtsac", help="comma-separated methods (default mtsac); stl = single-task reference; "
                                         "a backbone name (e.g. moe) means mtsac on that backbone")
    a("--backbones", default="mlp", help="comma-separated backbones (default mlp)")
    a("--seeds", type=int, default=3, help="number of seeds (default 3)")
    a("--seed-start", type=int, default=0, help="first seed (default 0)")
    a("--total-steps", type=int)
    a("--eval-every", type=int)
    a("--eval-episodes", type=int)
    a("--checkpoint-every", type=int)
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="setting for every trial; repeatable")
    a("--out", default="runs/sweep", help="folder of the trial run directories (default runs/sweep)")
    a("--workers", type=int, default=2,
      help="trials running at once as Ray tasks (default 2); 0 = one after another in this process, no Ray")
    a("--trial-cpus", type=float, default=1.0, help="CPUs a trial reserves in Ray (default 1)")
    a("--trial-workers", type=int, default=0,
      help="rollout workers inside each trial (train.py --workers; default 0 = in-process in the trial)")
    a("--address", help="Ray cluster to run the trials on (auto or ray://host:port)")
    a("--no-plot", action="store_true", help="skip plot.py at the end")
    a("--reps", type=int, default=2000, help="bootstrap resamples for the plots' CIs")
    return p


def trial_argv(args: argparse.Namespace, method: str, backbone: str, seed: int, run_dir: Path) -> List[str]:
    argv = ["--method", method, "--backbone", backbone, "--seed", str(seed), "--run-dir", str(run_dir),
            "--workers", str(args.trial_workers), "--no-progress"]
    argv += ["--suite", args.suite] if args.suite else []
    argv += ["--tasks", args.tasks] if args.tasks else []
    for flag in ("total_steps", "eval_every", "eval_episodes", "checkpoint_every"):
        v = getattr(args, flag)
        if v is not None:
            argv += [f"--{flag.replace('_', '-')}", str(v)]
    if args.address and args.trial_workers > 0:
        argv += ["--address", args.address]
    for s in args.set:
        argv += ["--set", s]
    return argv


def check_trial(argv: List[str]):
    """Build and validate a trial's config exactly as train.py would; raises ConfigError/ValueError."""
    import train

    targs = train.build_parser().parse_args(argv)
    cfg = train.make_config(targs)
    from mtrl.config import validate

    validate(cfg)
    return cfg


def finished(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        res = json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return res.get("final")


def run_trial_subprocess(argv: List[str], log_path: str) -> int:
    """A Ray task: train.py in a fresh interpreter (its own torch threads, signals and, if asked, its own Ray)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *argv], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)).returncode


def write_hparams(run_dir: Path, hparams: Dict[str, Any], final: Dict[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    metrics = {f"hparam/{k}": float(final[k]) for k in ("success_rate", "return")
               if isinstance(final.get(k), (int, float)) and not math.isnan(float(final[k]))}
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in hparams.items()}
    from torch.utils.tensorboard.summary import hparams

    # What SummaryWriter.add_hparams(..., run_name=".") does, in one events file of the run's own folder (the default
    # run_name makes a timestamped sub-folder, which TensorBoard shows as a separate run).
    step = int(final.get("env_steps", 0))
    w = SummaryWriter(log_dir=str(run_dir))
    try:
        for summary in hparams(clean, metrics):
            w.file_writer.add_summary(summary, step)
        for k, v in metrics.items():
            w.add_scalar(k, v, step)
    finally:
        w.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mtrl.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not methods or not backbones:
        return bad("--methods and --backbones need at least one name each")
    if args.seeds <= 0:
        return bad(f"--seeds={args.seeds} must be > 0")
    if args.workers < 0 or args.trial_workers < 0 or args.trial_cpus <= 0:
        return bad("--workers and --trial-workers must be >= 0 and --trial-cpus > 0")
    if not args.suite and not args.tasks:
        return bad("give --suite or --tasks")
    out = Path(args.out)
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    trials = []
    for (method, backbone), seed in itertools.product(grid_pairs(methods, backbones), seeds):
        name = f"{args.suite or 'custom'}_{method}_{backbone}_s{seed}"
        run_dir = out / name
        targv = trial_argv(args, method, backbone, seed, run_dir)
        try:
            cfg = check_trial(targv)
        except SystemExit as e:  # argparse inside train.py already printed its one line
            return int(e.code or 2)
        except (ConfigError, ValueError) as e:
            return bad(f"trial {method}/{backbone}/s{seed}: {e}")
        hp = {"method": method, "backbone": backbone, "seed": seed, "suite": cfg.suite or ",".join(cfg.tasks),
              "total_steps": cfg.total_steps}
        for s in args.set:
            k, _, v = s.partition("=")
            hp[k.strip()] = v
        trials.append({"name": name, "run_dir": run_dir, "argv": targv, "hparams": hp})

    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for tr in trials:
        if finished(tr["run_dir"]) is not None:
            print(f"{tr['name']}: already finished, skipped", flush=True)
            tr["rc"] = 0
        elif tr["run_dir"].exists() and any(tr["run_dir"].iterdir()):
            return bad(f"{str(tr['run_dir'])!r} holds an unfinished run; remove it or continue it with "
                       f"train.py --resume {tr['run_dir']}")
        else:
            todo.append(tr)

    t0 = time.time()
    if args.workers == 0:
        import train

        for tr in todo:
            print(f"{tr['name']}: running", flush=True)
            tr["rc"] = train.main(tr["argv"])
            print(f"{tr['name']}: exit {tr['rc']} ({time.time() - t0:.0f}s)", flush=True)
    elif todo:
        import ray

        started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_worker_niceness", "0")
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            if args.address:
                ray.init(address=args.address, include_dashboard=False)
            else:
                cpus = max(os.cpu_count() or 1, math.ceil(args.trial_cpus))
                # address="local": a new embedded cluster, never another one that happens to run on this machine.
                ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                         object_store_memory=128 * 1024 * 1024,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
            started = True
        try:
            if __name__ != "__main__":  # imported (tests, other scripts): ship this module's code by value, since
                from ray import cloudpickle  # scripts/ is not an importable package on the Ray workers

                cloudpickle.register_pickle_by_value(sys.modules[__name__])
            remote = ray.remote(num_cpus=args.trial_cpus, max_retries=0)(run_trial_subprocess)
            pending: Dict[Any, Dict[str, Any]] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < args.workers:
                    tr = queue.pop(0)
                    log = str((out / "logs" / f"{tr['name']}.log").resolve())
                    tr["argv"] = [str(Path(a).resolve()) if a == str(tr["run_dir"]) else a for a in tr["argv"]]
                    pending[remote.remote(tr["argv"], log)] = tr
                    print(f"{tr['name']}: submitted (log {log})", flush=True)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    tr = pending.pop(ref)
                    tr["rc"] = ray.get(ref)
                    print(f"{tr['name']}: exit {tr['rc']} ({time.time() - t0:.0f}s)", flush=True)
        finally:
            if started:
                ray.shutdown()

    ok = []
    for tr in trials:
        final = finished(tr["run_dir"]) if tr.get("rc") == 0 else None
        tr["final"] = final
        if final is not None:
            write_hparams(tr["run_dir"], tr["hparams"], final)
            ok.append(tr["run_dir"])
    summary = [{"name": tr["name"], "run_dir": str(tr["run_dir"]), "rc": tr.get("rc"), "hparams": tr["hparams"],
                "final_success_rate": (tr["final"] or {}).get("success_rate"),
                "final_return": (tr["final"] or {}).get("return")} for tr in trials]
    (out / "sweep.json").write_text(json.dumps({"trials": summary, "seconds": time.time() - t0}, indent=2,
                                               default=float))
    failed = [tr["name"] for tr in trials if tr["final"] is None]
    if failed:
        sys.stderr.write(f"sweep.py: {len(failed)} trial(s) failed: {', '.join(failed)} (logs in {out / 'logs'})\n")
    if ok and not args.no_plot:
        import plot

        rc = plot.main([*map(str, ok), "--out", str(out / "plots"), "--reps", str(args.reps)])
        if rc != 0:
            return rc
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    sys.exit(main())
