"""Updates per second of the real learner update (``MTSAC.update``, ``MTPPO``'s minibatch step), eager vs
compiled vs compiled-and-captured as one CUDA graph, measured side by side in one run.

Sizes: MT10 (10 tasks x 128 per task; obs 39, action 4), networks 3 x 400 (the published MT-SAC size) and 3 x 8
(arithmetic ~0: what is left is the framework's overhead, the floor a compiled learner removes). For each
(algorithm, method, backbone, width) the eager and the compiled agent are built from the same seed and timed in
alternating rounds (eager, compiled, eager, ...), so a machine whose load drifts biases neither; the table shows
medians over ``--repeats`` rounds and the ratio compiled / eager. Compilation (paid once, at the first update) is
shown separately and excluded from the timing. For SAC on CUDA a third agent is compiled with
``MTSAC.compile(mode, capture=True)`` (the compiled update captured as ONE CUDA graph and replayed,
``agents/graphed.py``) and timed in the same rounds: the "graph" columns (the "compiled" agent then has
``capture=False``); they read "n/a" on CPU, for PPO, and where ``MTSAC.compile`` takes no ``capture``, and the mode
column says whether the graph was captured and how often it was replayed. ``--split`` adds, for SAC, the earlier compiled form (only the
critic and actor gradients compiled, the optimizer steps eager: ``MTSAC.compile(one_graph=False)``) as a third
column, so the gain of the one-graph update is measured in the same run. ``--ablate-small-matmul`` adds the
compiled update with the other setting of the small-matmul graph pass (``agents/small_matmul.py``) as a column:
"no-pass" where the pass is on by default, "with-pass" where it is off (Intel CPUs, ``small_matmul.pays_here``). "matmuls-only" is
the rate of an update that spent nothing but the eager update's matrix-multiply kernel time (profiled,
``matmul_seconds``): the ceiling for any compiled form that does the same arithmetic with these BLAS kernels, and so
the largest compiled/eager ratio this machine allows at that size unless the products leave BLAS (at small widths
the pass turns them into generated loops, so there the compiled update may pass it).

    python scripts/bench_learner.py [--device cpu|cuda] [--threads 1] [--repeats 5] [--widths 8,400]
                                    [--methods mtsac,pcgrad,moe] [--algos sac,ppo] [--compile default]
                                    [--matmul-precision auto] [--split] [--one-graph] [--ablate-small-matmul]
                                    [--profile]

A name among ``--methods`` is, in this order: a gradient method (``pcgrad``: that method on a 3-layer ``mlp``);
a backbone (``moe``, ``t2mir``, ``harmony``, ``mmoe``: ``mtsac`` on that backbone, 3 layers); or a preset of
``configs/methods/`` (``mtmhsac``, ``sm``: its ``method``, ``actor_method``, ``method_kwargs``, ``backbone``,
``backbone_kwargs`` and ``sac`` settings as for MT10, with ``width`` set to each of ``--widths``).
``preset:NAME`` forces the preset where NAME is also a method or backbone (``preset:pcgrad`` is PCGrad on the
preset's ``multihead`` network with ``max_grad_norm`` 1). ``--matmul-precision`` (the run's ``matmul_precision``
setting, ``auto`` = ``high``/TF32 on CUDA, ``highest`` on CPU) applies to every column.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.ppo import MTPPO  # noqa: E402
from agents.sac import MTSAC  # noqa: E402
from mtrl.config import MATMUL_PRECISIONS, PPOConfig, SACConfig, apply_mapping, load_preset  # noqa: E402
from mtrl.nets import available_backbones  # noqa: E402

T, B, OBS, ACT = 10, 128, 39, 4  # MT10's real sizes (every MT10 task has 4 action dimensions)


def case_spec(name: str, width: Optional[int] = None) -> Dict[str, Any]:
    """What a ``--methods`` name means (module docstring): MTSAC keyword arguments plus ``sac`` (a SACConfig).
    ``width`` None keeps the network's own width (a preset's, or 400)."""
    from mtrl.gradients import available_methods
    from mtrl.nets.registry import BACKBONES

    forced = name.startswith("preset:")
    key = name[len("preset:"):] if forced else name
    sac = SACConfig()
    if not forced and key in available_methods():
        spec: Dict[str, Any] = {"method": key, "backbone": "mlp", "backbone_kwargs": {"width": 400, "depth": 3}}
    elif not forced and key in available_backbones():
        spec = {"method": "mtsac", "backbone": key, "backbone_kwargs": {"width": 400, "depth": 3}}
    else:
        preset = load_preset(key, "mt10")
        if preset is None:
            print(f"bench_learner.py: {name!r} is no gradient method, backbone or preset; valid: "
                  f"{', '.join(sorted(available_methods()))}; {', '.join(sorted(available_backbones()))}; or a name "
                  "in configs/methods/", file=sys.stderr)
            raise SystemExit(2)
        spec = {"method": preset.get("method", "mtsac"), "backbone": preset.get("backbone", "mlp"),
                "backbone_kwargs": dict(preset.get("backbone_kwargs") or {})}
        for k in ("actor_method", "method_kwargs", "critic_backbone", "critic_backbone_kwargs"):
            if preset.get(k):
                spec[k] = preset[k]
        apply_mapping(sac, preset.get("sac") or {}, f"configs/methods/{key}.yaml")
    if width is not None:
        spec["backbone_kwargs"]["width"] = width
    for role, kw in (("backbone", "backbone_kwargs"), ("critic_backbone", "critic_backbone_kwargs")):
        bb = spec.get(role)
        if bb and getattr(BACKBONES.get(bb), "needs_task_names", False):
            spec.setdefault(kw, {}).setdefault("suite", "mt10")  # care, cotasp: MT10's task descriptions
    spec["sac"] = sac
    return spec


def takes_capture(agent: Any) -> bool:
    """Whether ``agent.compile`` has the ``capture`` parameter (the CUDA-graph layer, ``agents/graphed.py``)."""
    return "capture" in inspect.signature(agent.compile).parameters


def sac_agent(name: str, width: Optional[int], device: torch.device, mode: str, one_graph: Optional[bool] = None,
              small_matmul: Optional[bool] = None, capture: Optional[bool] = None):
    """An MTSAC for ``name`` (:func:`case_spec`) at MT10 size, compiled with ``mode`` (``off``: eager);
    ``capture`` is passed on where ``compile`` takes it. Returns (agent, the mode used)."""
    torch.manual_seed(0)
    spec = case_spec(name, width)
    sac = spec.pop("sac")
    agent = MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), sac, device=device, seed=0, **spec)
    if mode == "off":
        return agent, "off"
    kw: Dict[str, Any] = {"one_graph": one_graph, "small_matmul": small_matmul}
    if capture is not None and takes_capture(agent):
        kw["capture"] = capture
    return agent, agent.compile(mode, **kw)


def sac_batch(device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"obs": torch.randn(T, B, OBS, generator=g), "action": torch.rand(T, B, ACT, generator=g) * 2 - 1,
             "reward": torch.randn(T, B, generator=g), "next_obs": torch.randn(T, B, OBS, generator=g),
             "terminated": torch.zeros(T, B)}
    return {k: v.to(device) for k, v in batch.items()}


def sac_case(name: str, width: int, device: torch.device, mode: str, one_graph: Optional[bool] = None,
             small_matmul: Optional[bool] = None, capture: Optional[bool] = None):
    agent, used = sac_agent(name, width, device, mode, one_graph, small_matmul, capture)
    batch = sac_batch(device)
    return (lambda: agent.update(batch)), used, agent


def ppo_case(name: str, width: int, device: torch.device, mode: str,
             one_graph: Optional[bool] = None, small_matmul: Optional[bool] = None, capture: Optional[bool] = None):
    spec = case_spec(name, width)
    torch.manual_seed(0)
    cfg = PPOConfig(epochs=1, minibatches=1)
    agent = MTPPO(OBS, ACT, T, np.ones((T, ACT), np.float32), cfg, backbone=spec["backbone"],
                  backbone_kwargs=spec["backbone_kwargs"], method=spec["method"],
                  method_kwargs=spec.get("method_kwargs"), device=device, seed=0)
    used = agent.compile(mode) if mode != "off" else "off"
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(T, B, OBS, generator=g), "action": torch.randn(T, B, ACT, generator=g),
             "logp": torch.randn(T, B, generator=g), "value": torch.randn(T, B, generator=g),
             "ret": torch.randn(T, B, generator=g), "adv": torch.randn(T, B, generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    return (lambda: agent.update(batch)), used, agent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, device: torch.device, seconds: float) -> float:
    """Updates per second over at least ``seconds`` (and at least 3 updates)."""
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return n / (time.perf_counter() - t0)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def op_self_us(fn, device: torch.device, n: int) -> Dict[str, Tuple[float, int]]:
    """{op name: (self time in microseconds, calls)} per call of ``fn`` over ``n`` profiled calls (after one
    unprofiled warm-up call); device time for CUDA, CPU time otherwise."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (getattr(e, attr) / n, e.count // n) for e in prof.key_averages()}


def matmul_seconds(fn, device: torch.device, n: int = 3) -> float:
    """Seconds per call that ``fn`` spends inside matrix-multiply kernels (profiler self time of the ATen matmul
    ops, on the device for CUDA). ``1 / matmul_seconds`` is the rate of an update that did nothing but its
    matmuls, at this machine's GEMM speed for these shapes: no compiler that keeps the arithmetic can beat it."""
    return sum(us for k, (us, _) in op_self_us(fn, device, n).items() if k in MATMULS) / 1e6


def print_profile(fn, device: torch.device, title: str, n: int = 20) -> None:
    """Milliseconds per update by op (self time), the top 12, for ``n`` updates of ``fn``: Inductor's generated
    kernels, the ATen calls it leaves (matmuls), and Dynamo's per-call cost (its cache lookup)."""
    rows = sorted(op_self_us(fn, device, n).items(), key=lambda kv: -kv[1][0])[:12]
    print(f"  profile of {title}, ms per update by op (self time):")
    for key, (us, calls) in rows:
        print(f"    {us / 1e3:7.3f} ms  {calls:4d} calls  {key[:90]}")


def graph_state(agent: Any) -> Tuple[bool, int]:
    """(captured, replays) of the agent's CUDA graph (``agent.graph``; (False, 0) without one)."""
    g = getattr(agent, "graph", None)
    return bool(getattr(g, "captured", False)), int(getattr(g, "replays", 0) or 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum time per timed round")
    ap.add_argument("--widths", default="8,400")
    ap.add_argument("--methods", default="mtsac,pcgrad,moe",
                    help="gradient methods, backbones (mtsac on them) or presets (configs/methods/; preset:NAME "
                         "forces the preset)")
    ap.add_argument("--algos", default="sac")
    ap.add_argument("--compile", default="default", help="the compiled side's mode (default, reduce-overhead, ...)")
    ap.add_argument("--matmul-precision", default="auto", choices=MATMUL_PRECISIONS,
                    help="torch.set_float32_matmul_precision, as the run's matmul_precision setting (auto: high "
                         "on CUDA, highest on CPU)")
    ap.add_argument("--split", action="store_true",
                    help="SAC: also time the earlier compiled form (critic and actor gradients compiled apart, the "
                         "optimizer steps eager) next to the compiled update")
    ap.add_argument("--one-graph", action="store_true",
                    help="SAC: compile the whole update as one graph for every method (default: mtsac only)")
    ap.add_argument("--ablate-small-matmul", action="store_true",
                    help="SAC: also time the compiled update with the other setting of the small-matmul graph pass "
                         "(agents/small_matmul.py: without it where it is on by default, with it on Intel CPUs), "
                         "so what it buys is measured in the same run")
    ap.add_argument("--profile", action="store_true",
                    help="also print where one compiled update's time goes (torch.profiler, top ops by self time)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch; valid here: cpu", file=sys.stderr)
        return 2
    from agents.small_matmul import pays_here
    from mtrl.base_trainer import apply_matmul_precision

    pass_default = pays_here() and args.device == "cpu"  # what MTSAC.compile(small_matmul=None) does here

    names = [n for n in args.methods.split(",") if n]
    for name in names:
        case_spec(name)  # a bad name exits with one line before anything is built
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    apply_matmul_precision(args.matmul_precision, device)
    rows: List[Tuple[str, ...]] = []
    print(f"device {device}, {args.threads} thread(s), MT10 batch {T}x{B}, medians of {args.repeats} rounds "
          f"of >= {args.seconds:g} s, matmul precision {torch.get_float32_matmul_precision()}, "
          f"torch {torch.__version__}", flush=True)
    for algo in args.algos.split(","):
        case = sac_case if algo == "sac" else ppo_case
        split = args.split and algo == "sac"
        ablate = args.ablate_small_matmul and algo == "sac"
        for name in names:
            for width in (int(w) for w in args.widths.split(",")):
                fns = {"eager": case(name, width, device, "off")[0]}
                fns["compiled"], used, agent = case(name, width, device, args.compile,
                                                    one_graph=True if args.one_graph else None, capture=False)
                graph_agent = None
                if algo == "sac" and device.type == "cuda" and takes_capture(agent):
                    fns["graph"], _, graph_agent = case(name, width, device, args.compile,
                                                        one_graph=True if args.one_graph else None, capture=True)
                if split:
                    fns["split"] = case(name, width, device, args.compile, one_graph=False, capture=False)[0]
                if ablate:  # the other side of the pass's default here (off where it does not pay: with it)
                    fns["no pass"] = case(name, width, device, args.compile,
                                          one_graph=True if args.one_graph else None, small_matmul=not pass_default,
                                          capture=False)[0]
                t0 = time.perf_counter()
                fns["compiled"]()
                fns["compiled"]()
                sync(device)
                compile_s = time.perf_counter() - t0
                graph_s = "n/a"
                if graph_agent is not None:  # compile, then capture (a few updates), paid once and not timed
                    t0 = time.perf_counter()
                    for _ in range(8):
                        fns["graph"]()
                        if graph_state(graph_agent)[0]:
                            break
                    fns["graph"]()
                    sync(device)
                    graph_s = f"{time.perf_counter() - t0:.0f}"
                if getattr(agent, "_full", None) is not None:  # MT-SAC whose whole update compiled as one graph
                    used += ", one graph"
                for k in ("eager", "split", "no pass"):
                    if k in fns:
                        fns[k](), fns[k]()
                r: Dict[str, List[float]] = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        r[k].append(rate(fn, device, args.seconds))
                e, c = statistics.median(r["eager"]), statistics.median(r["compiled"])
                graph_cols: Tuple[str, ...] = ("n/a", "n/a")
                if graph_agent is not None:
                    g = statistics.median(r["graph"])
                    graph_cols = (f"{g:.1f}", f"{g / e:.2f}")
                    captured, replays = graph_state(graph_agent)
                    used += f", graph {'captured' if captured else 'NOT captured'}, {replays} replays"
                extra = ("-", "-") if args.split else ()
                if split:
                    sp = statistics.median(r["split"])
                    extra = (f"{sp:.1f}", f"{sp / e:.2f}")
                if args.ablate_small_matmul:
                    extra += ((f"{statistics.median(r['no pass']):.1f}", f"{statistics.median(r['no pass']) / e:.2f}")
                              if ablate else ("-", "-"))
                if args.profile:
                    print_profile(fns["compiled"], device, f"{algo} {name} width {width}, compiled ({used})")
                floor = 1.0 / matmul_seconds(fns["eager"], device)
                rows.append((algo, name, str(width), f"{e:.1f}", f"{c:.1f}", f"{c / e:.2f}", *graph_cols, *extra,
                             f"{floor:.1f}", f"{floor / e:.2f}", used, f"{compile_s:.0f}", graph_s))
                print("  " + " | ".join(rows[-1]), flush=True)
    flip = "no-pass" if pass_default else "with-pass"
    head = ("algo", "method", "width", "eager upd/s", "compiled upd/s", "compiled/eager", "graph upd/s",
            "graph/eager",
            *(("split upd/s", "split/eager") if args.split else ()),
            *((f"{flip} upd/s", f"{flip}/eager") if args.ablate_small_matmul else ()),
            "matmuls-only upd/s", "matmuls-only/eager",
            "mode", "compile s", "graph s")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
