"""Cost of one update per gradient method, relative to the plain MT-SAC update, on an MT-SAC-like critic.

Critic: twin Q, each a 3 x 400 MLP on cat(obs 39, act 4, one-hot T); batch 128 per task; loss = MSE of both heads to
fixed targets. The ``.grad`` tensors persist across updates and are zeroed in place (``zero_grad(set_to_none=False)``),
as the agent keeps them: every method, mtsac included, adds into existing gradients. For every method: the time of ``method.backward`` (vmapped forward + per-task gradients where the
method needs them + combination + write-back into ``.grad``) divided by the time of an ``mtsac`` update run just before it
(side by side: each method is timed right after an mtsac update, and the ratio of the pair is kept, so a machine
whose load drifts -- a shared CPU -- biases no method); and, per T, the time of a loop of T ``torch.autograd.grad``
calls (the usual way of getting per-task gradients) divided by the engine's one vmapped pass, timed back to back.
Medians over ``--repeats`` rounds (default 1: one round of T = 10 and 50 takes about 1.5 min on a 2-core CPU).

    python scripts/bench_update.py --tasks 10,50 [--repeats 3] [--methods pcgrad,upgrad] [--device cpu] [--malloc glibc]

Allocator (``--malloc``, CPU only): glibc returns every freed block above its mmap threshold (or at the top of a
heap past its trim threshold) to the OS, so each update's fresh large tensors page-fault again (~1.3 GB/s here: the
T x P per-task gradients of a Jacobian/Gramian method cost ~20 ms of faults at T = 10 and ~100 ms at T = 50, more
than their arithmetic). A GPU learner does not pay this (PyTorch's CUDA caching allocator keeps the blocks), nor a
CPU one run with jemalloc/tcmalloc or tuned glibc. ``reuse`` (default) sets glibc's thresholds with ``mallopt``
(mmap threshold 32 MiB, its maximum; trim threshold 1 GiB) so freed blocks are reused, as a caching allocator does;
``glibc`` keeps glibc's defaults (what the numbers before issue 11 used).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtrl.gradients import available_methods, engine, get_method  # noqa: E402

OBS, ACT, HIDDEN, BATCH = 39, 4, 400, 128
ALIASES = {"mean", "samgs"}  # same classes as mtsac / gss


def mlp(inp: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


class TwinQ(nn.Module):
    def __init__(self, t: int):
        super().__init__()
        self.t = t
        self.q1, self.q2 = mlp(OBS + ACT + t), mlp(OBS + ACT + t)

    def forward(self, obs, act, task_id):
        onehot = (torch.arange(self.t, device=obs.device) == task_id).to(obs.dtype).expand(obs.shape[0], self.t)
        x = torch.cat([obs, act, onehot], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def problem(t: int, device: str):
    torch.manual_seed(0)
    net = TwinQ(t).to(device)

    def loss_fn(p, b, tid):
        q1, q2 = functional_call(net, p, (b["obs"], b["act"], tid))
        return 0.5 * (((q1 - b["target"]) ** 2).mean() + ((q2 - b["target"]) ** 2).mean()) + 1e-3

    batch = {"obs": torch.randn(t, BATCH, OBS, device=device),
             "act": torch.rand(t, BATCH, ACT, device=device) * 2 - 1,
             "target": torch.randn(t, BATCH, device=device) * torch.linspace(0.5, 5, t, device=device)[:, None]}
    return net, loss_fn, batch, torch.arange(t, device=device)


def timed(fn: Callable[[], None], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(t: int, methods: List[str], repeats: int, device: str, malloc: str = "reuse") -> None:
    net, loss_fn, batch, ids = problem(t, device)
    params = dict(net.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    objs = {m: get_method(m, t) for m in methods}

    def update(name: str) -> Callable[[], None]:
        def go() -> None:
            net.zero_grad(set_to_none=False)  # persistent .grad tensors zeroed in place, as the agent keeps them
            objs[name].backward(loss_fn, params, batch, ids)
            objs[name].post_step()
        return go

    def loop_jacobian() -> None:
        rows = []
        for i in range(t):
            bt = {k: v[i] for k, v in batch.items()}
            g = torch.autograd.grad(loss_fn(params, bt, ids[i]), list(params.values()))
            rows.append(torch.cat([x.reshape(-1) for x in g]))
        torch.stack(rows)

    def vmapped_jacobian() -> None:
        engine.compute_jacobian(loss_fn, params, batch, ids, with_gramian=False)

    others = [m for m in methods if m != "mtsac"]
    base_fn = update("mtsac")
    base_fn()  # warm-up: allocator, thread pools (imports happened when the methods were built)
    vmapped_jacobian()
    base_ms: List[float] = []
    ms: Dict[str, List[float]] = {m: [] for m in others}
    ratio: Dict[str, List[float]] = {m: [] for m in others}
    loop_t: List[float] = []
    vmap_t: List[float] = []
    for _ in range(repeats):
        for m in others:  # each method right after an mtsac update: the ratio of neighbours resists drift
            b = timed(base_fn, device)
            x = timed(update(m), device)
            base_ms.append(b)
            ms[m].append(x)
            ratio[m].append(x / b)
        loop_t.append(timed(loop_jacobian, device))
        vmap_t.append(timed(vmapped_jacobian, device))
    med = statistics.median
    base = med(base_ms)
    print(f"\nT={t}  critic params={n_params:,}  batch={BATCH}/task  device={device}  repeats={repeats}  "
          f"malloc={malloc}")
    print(f"  mtsac update: {base * 1e3:.1f} ms (median of {len(base_ms)})")
    print(f"  {'method':<12}{'ms':>10}{'x mtsac':>10}")
    for m in others:
        print(f"  {m:<12}{med(ms[m]) * 1e3:>10.1f}{med(ratio[m]):>10.2f}")
    loop, vm = med(loop_t), med(vmap_t)
    print(f"  per-task Jacobian: loop of {t} autograd.grad {loop * 1e3:.1f} ms, vmapped engine {vm * 1e3:.1f} ms"
          f" -> loop / vmap = {loop / vm:.2f}")


def reuse_freed_memory() -> bool:
    """glibc: keep freed blocks of up to 32 MiB in the heap and do not trim it below 1 GiB (see the docstring)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def main(argv: List[str] | None = None) -> int:
    names = [m for m in available_methods() if m not in ALIASES]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="10,50", help="comma-separated task counts (default 10,50)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per method (median; default 1)")
    ap.add_argument("--methods", default="all", help=f"comma-separated subset of: {','.join(names)} (default all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--malloc", choices=["reuse", "glibc"], default="reuse",
                    help="CPU allocator behaviour: reuse freed blocks (default; as a caching allocator) or glibc's "
                         "defaults (large blocks page-fault on every update)")
    args = ap.parse_args(argv)
    try:
        tasks = [int(x) for x in args.tasks.split(",") if x]
        if not tasks or min(tasks) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --tasks {args.tasks!r} must be comma-separated positive integers, e.g. 10,50", file=sys.stderr)
        return 2
    methods = names if args.methods == "all" else [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in available_methods()]
    if bad:
        print(f"error: unknown method(s) {bad}; valid: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"error: --repeats {args.repeats} must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "reuse" and not reuse_freed_memory():
        print("note: could not tune the C allocator (not glibc?); timing with its defaults", file=sys.stderr)
    methods = ["mtsac"] + [m for m in methods if m not in ("mtsac", "mean")]
    for t in tasks:
        bench(t, methods, args.repeats, args.device, args.malloc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
