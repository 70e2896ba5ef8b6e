"""agents/small_matmul.py: which products the pass rewrites, and that a compiled forward + backward through it
equals eager (the whole MT-SAC update through it: tests/test_device.py::_compare)."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from agents import small_matmul
from agents.compiled import Compiled, inductor_options


class _Node:
    """Stands for an FX node: the pass reads only ``meta['val']``."""

    def __init__(self, *shape: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.meta = {"val": torch.empty(shape, device=device, dtype=dtype)}


@pytest.mark.parametrize("a,b,small", [
    ((1280, 53), (53, 8), True),  # a width-8 critic's first layer on an MT10 batch
    ((1280, 8), (8, 8), True),  # the next layers
    ((1280, 8), (8, 53), True),  # the input gradient of the first layer
    ((8, 1280), (1280, 53), False),  # a weight gradient: a long reduction, which BLAS does well
    ((1280, 53), (53, 400), False),  # a 3 x 400 network's first layer: BLAS is fast there
    ((1280, 400), (400, 400), False),
    ((400, 1280), (1280, 400), False),
    ((1280, 64), (64, 64), False),  # 5.2M multiply-adds: over the size bound
])
def test_size_rule(a, b, small):
    assert small_matmul.is_small(_Node(*a), _Node(*b)) is small


def test_only_2d_floating_cpu_products_are_rewritten():
    assert not small_matmul.is_small(_Node(10, 8, 8), _Node(10, 8, 8))
    assert not small_matmul.is_small(_Node(128, 8, device="meta"), _Node(8, 8, device="meta"))
    assert not small_matmul.is_small(_Node(128, 8, dtype=torch.int64), _Node(8, 8, dtype=torch.int64))


def test_compiled_mlp_gradient_through_the_pass_equals_eager(one_thread):
    """A width-8 MLP's loss gradient (forward addmm, backward mm): the pass rewrites the forward and input-gradient
    products and the compiled gradient equals eager to float tolerance."""
    g = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(d_in, d_out, generator=g) * 0.3 for i, (d_in, d_out) in
              enumerate(((53, 8), (8, 8), (8, 1)))}
    params.update({f"b{i}": torch.randn(d, generator=g) for i, d in enumerate((8, 8, 1))})
    x = torch.randn(1280, 53, generator=g)

    def loss(p, x):
        h = torch.addmm(p["b0"], x, p["w0"]).relu()
        h = torch.addmm(p["b1"], h, p["w1"]).relu()
        return torch.addmm(p["b2"], h, p["w2"]).square().mean()

    step = grad(loss)
    before = sum(small_matmul.REWRITES.values())
    compiled = Compiled(step, "default", "the toy gradient", fullgraph=True)
    # A graph from Inductor's on-disk cache skips the passes: compile afresh so the rewrite count is this run's.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = compiled(params, x)
    assert compiled.compiled is not None
    assert sum(small_matmul.REWRITES.values()) - before >= 5  # 3 forward products, 2 input gradients
    for k, v in step(params, x).items():
        torch.testing.assert_close(out[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_options_keep_the_mode_and_add_the_pass():
    assert set(inductor_options("default")) == {"post_grad_custom_pre_pass"}
    assert inductor_options("default", small_matmul=False) == {}
    opts = inductor_options("max-autotune")
    assert opts["max_autotune"] is True and isinstance(opts["post_grad_custom_pre_pass"],
                                                       small_matmul.SmallMatmulPass)
    assert small_matmul.SmallMatmulPass().uuid() != small_matmul.SmallMatmulPass(max_dim=8).uuid()


def test_the_pass_is_on_by_default_except_on_intel_cpus(monkeypatch, tmp_path):
    """Measured: +19-54% at width 8 on the AMD EPYC machine, -13-15% on an Intel Xeon (agents/small_matmul.py)."""
    import builtins

    real_open = builtins.open
    for vendor, on in (("GenuineIntel", False), ("AuthenticAMD", True)):
        info = tmp_path / vendor
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        assert small_matmul.pays_here() is on
