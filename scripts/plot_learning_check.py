#!/usr/bin/env python
"""Draw success-rate curves of several runs (our results.json files and scripts/sb3_reference.py's) in one PNG.

    python scripts/plot_learning_check.py OURS_RUN/results.json:ours SB3_OUT/results.json:sb3 --out docs/x.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="PATH/results.json:LABEL")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="Meta-World v3 reach-v3 (MT1): success rate, 50 eval episodes")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for spec in a.runs:
        path, _, label = spec.rpartition(":")
        hist = json.loads(Path(path).read_text())["history"]
        xs = [h["env_steps"] for h in hist]
        ys = [h["success_rate"] for h in hist]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
        print(f"{label}: " + ", ".join(f"{x}:{y:.2f}" for x, y in zip(xs, ys)))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(a.title, fontsize=10)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
