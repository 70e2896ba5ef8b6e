#!/usr/bin/env python
"""Parameter count and forward+backward time of every backbone at MT10 size, and the width-matched MLP.

    python scripts/bench_backbones.py [--backbones moe,moore] [--device cuda] [--repeats 5] [--json out.json]

Sizes: actor network in = 39 (obs), out = 8 (mean, log-std of 4 actions); one critic network in = 39 + 4, out = 1;
T = 10 tasks, batch 10 × 128. Timing: one training-style step of one network — the per-task losses from ONE
vmapped forward over the task axis (as ``mtsac`` does), then ``losses.mean().backward()`` — median of
``--repeats`` after a warm-up, in default (train) mode; "ms" columns are the best run (robust to other load on a
shared machine), the JSON also holds the medians. "matched MLP width": the width of the suite's 3-layer MT-SAC
MLP on [x, one_hot(t)] with the same parameter count (the fair baseline, architectures.md §7.2).
``t2mir-hidden`` is t2mir with task ids hidden: each row also carries a context of 16 transitions, encoded in the
same forward.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from mtrl.gradients import task_losses  # noqa: E402
from mtrl.nets import available_backbones, build_backbone  # noqa: E402
from mtrl.nets.context import transition_dim, with_transition_dim  # noqa: E402

T, B, OBS, ACT = 10, 128, 39, 4
VARIANTS = {"t2mir-hidden": ("t2mir", {"use_task_id": False})}  # bench name -> (backbone, options)


def build(name: str, in_dim: int, out_dim: int) -> torch.nn.Module:
    backbone, options = VARIANTS.get(name, (name, {}))
    return build_backbone(backbone, in_dim, out_dim, T, **with_transition_dim(backbone, options, OBS, ACT))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def matched_width(params: int, in_dim: int, out_dim: int, depth: int = 3, tasks: int = T) -> int:
    """Width w of an MLP (in+T) -> w x depth -> out with about ``params`` parameters."""
    a = depth - 1                          # w^2 terms
    b = (in_dim + tasks) + depth + out_dim  # linear terms: first layer, biases, last layer
    c = out_dim - params
    return int(round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))) if a else int(round(-c / b))


def time_step(net: torch.nn.Module, in_dim: int, device: torch.device, repeats: int) -> Tuple[float, float]:
    """(best, median) seconds of one vmapped forward + backward over ``repeats`` runs after a warm-up."""
    x = {"x": torch.randn(T, B, in_dim, device=device)}
    ids = torch.arange(T, device=device)
    aux = getattr(net, "has_aux_loss", False)
    K = int(getattr(net, "context_len", 0))
    if K:
        x["context"] = torch.randn(T, B, K, transition_dim(OBS, ACT), device=device)
        contrast = x["context"][:, :2]

    def loss(params, xt, t):
        kw = {"context": xt["context"]} if K else {}
        if aux:
            kw.update({"contrast": contrast} if K else {})
            out, a = functional_call(net, params, (xt["x"], t), {"return_aux": True, **kw})
            return out.pow(2).mean() + a
        return functional_call(net, params, (xt["x"], t), kw).pow(2).mean()

    params = dict(net.named_parameters())
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        net.zero_grad(set_to_none=True)
        task_losses(loss, params, x, ids).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default=",".join(available_backbones() + list(VARIANTS)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    head = f"{'backbone':12s} {'actor params':>12s} {'critic params':>13s} {'actor ms':>9s} {'critic ms':>10s} " \
           f"{'MLP width (actor)':>17s}"
    print(f"MT10 size: T={T}, batch {T}x{B}, actor {OBS}->{2 * ACT}, critic {OBS + ACT}->1, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(head)
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        actor = build(name, OBS, 2 * ACT).to(device)
        critic = build(name, OBS + ACT, 1).to(device)
        (a_best, a_med), (c_best, c_med) = (time_step(actor, OBS, device, args.repeats),
                                            time_step(critic, OBS + ACT, device, args.repeats))
        row = {"backbone": name, "actor_params": n_params(actor), "critic_params": n_params(critic),
               "actor_ms": 1e3 * a_best, "critic_ms": 1e3 * c_best, "actor_ms_median": 1e3 * a_med,
               "critic_ms_median": 1e3 * c_med}
        row["mlp_width_actor"] = matched_width(row["actor_params"], OBS, 2 * ACT)
        row["mlp_width_critic"] = matched_width(row["critic_params"], OBS + ACT, 1)
        rows.append(row)
        print(f"{name:12s} {row['actor_params']:12,d} {row['critic_params']:13,d} {row['actor_ms']:9.1f} "
              f"{row['critic_ms']:10.1f} {row['mlp_width_actor']:17d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
