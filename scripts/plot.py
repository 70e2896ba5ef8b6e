#!/usr/bin/env python
"""Pictures and a table from run directories: ``python scripts/plot.py runs/A runs/B ... --out plots/``.

Writes, for runs of one suite grouped by (method, backbone) from their config.yaml:
  curves.png            evaluation success rate (Meta-World) or return (DMC) over env steps; IQM over
                        (seeds x tasks) with 95% stratified-bootstrap CIs over seeds (rliable)
  task_bars.png         final per-task score, mean over seeds, whiskers min..max
  conflict_heatmap.png  fraction of conflicting task-gradient pairs over training (only when the runs logged
                        grad/*/conflict_fraction, i.e. Jacobian methods)
  results.md            method-comparison Markdown table (IQM [CI], mean ± std, per task)
Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from mtrl.cli import OneLineParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="plot.py", description="IQM curves, per-task bars, conflict heatmap, comparison table.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (config.yaml + results.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs and results.md")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mtrl.plotting import PlotError, make_all

    if args.reps <= 0:
        sys.stderr.write(f"plot.py: error: --reps={args.reps} must be > 0\n")
        return 2
    try:
        files = make_all(args.runs, args.out, reps=args.reps)
    except PlotError as e:
        sys.stderr.write(f"plot.py: error: {e}\n")
        return 2
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
