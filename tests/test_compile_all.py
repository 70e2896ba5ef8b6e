"""Issue 21: every backbone compiles with every compilable method, each compilable preset compiles at its real
sizes, and the captured-update layer (``agents/graphed.py``) is the plain update. A compile -> eager fallback
fails these tests: they run with ``MTRL_COMPILE_STRICT=1`` (a fallback raises ``CompileFallbackError``) and also
check that the one-graph update is still the compiled one afterwards.

The default run builds every backbone's one graph with ``MTRL_COMPILE_BACKEND=aot_eager`` (Dynamo and
AOTAutograd: the same graph, without Inductor's C++ code generation, which costs 1-4 minutes per backbone on 2
cores) and compiles the ``pcgrad`` preset's real network with Inductor; the slow set compiles every compilable
method on every backbone, and every compilable SAC preset at its real sizes, with Inductor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.sac import MTSAC
from mtrl.config import SACConfig, available_presets, load_preset
from mtrl.gradients import available_methods, get_method
from mtrl.nets import available_backbones

T, B, OBS, ACT = 3, 4, 5, 2
TINY = {"width": 8, "depth": 2}
COMPILABLE = [m for m in available_methods() if get_method(m, T).compilable and m != "mean"]  # mean == mtsac


def _batch(seed, t=T, b=B, obs=OBS, act=ACT):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(t, b, obs, generator=g), "action": torch.rand(t, b, act, generator=g) * 2 - 1,
            "reward": torch.randn(t, b, generator=g), "next_obs": torch.randn(t, b, obs, generator=g),
            "terminated": torch.zeros(t, b)}


def _agent(backbone="mlp", method="mtsac", kwargs=None, cfg=None, t=T, obs=OBS, act=ACT):
    torch.manual_seed(0)  # same initial weights for agents built side by side
    if kwargs is None:  # care and cotasp read their tasks' name embeddings: 3 tasks of a suite
        kwargs = {**TINY, "suite": "dmc-walker"} if backbone in ("care", "cotasp") else TINY
    return MTSAC(obs, act, t, np.ones((t, act), np.float32), cfg or SACConfig(max_grad_norm=1.0), backbone=backbone,
                 backbone_kwargs=dict(kwargs), method=method, device="cpu", seed=0)


def _run(agent, n=4, nan_at=2, **dims):
    """``n`` updates on fixed batches, the one at ``nan_at`` with a NaN reward (its critic step is skipped); the
    global RNG (MENTOR's perturbation noise) seeded alike for every agent. Returns each update's critic losses."""
    torch.manual_seed(1)
    out = []
    for i in range(n):
        b = _batch(i, **dims)
        if i == nan_at:
            b["reward"][1, 0] = float("nan")
        out.append(agent.update(b)["critic_losses"].clone())
    return out


def _assert_close(a, b, exact=False):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True, **tol)


def _assert_same_networks(a, b, exact=False):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    for name in ("critic", "actor", "critic_target"):
        for (k, x), y in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            torch.testing.assert_close(y, x, msg=f"{name}.{k}", **tol)


def _assert_compiled(agent, capsys):
    assert agent._full is not None and agent._full.compiled is not None, "the one-graph update fell back"
    err = capsys.readouterr().err
    assert "runs eagerly" not in err and "failed" not in err, err


@pytest.fixture
def strict(monkeypatch):
    """A fallback raises; and Inductor draws random numbers as eager does (``fallback_random``: MENTOR's gate
    dropout would otherwise get other masks from Inductor's own generator, so compiled and eager losses differ by
    the dropout, not by the compilation)."""
    monkeypatch.setenv("MTRL_COMPILE_STRICT", "1")
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)


# ------------------------------------------------------------------------------------- the captured-update layer
@pytest.mark.parametrize("backbone,method", [("mlp", "mtsac"), ("moe", "pcgrad"), ("harmony", "mtsac")])
def test_graphed_layer_is_the_plain_update_bit_for_bit(backbone, method, one_thread):
    """Static buffers, copy-in, the noise drawn into them and a direct call (what replaces ``replay()`` off CUDA):
    the same losses and weights as the update without the layer, bit for bit, NaN step and hooks included."""
    from agents.graphed import GraphedUpdate

    plain, graphed = _agent(backbone, method), _agent(backbone, method)
    graphed.graph = GraphedUpdate(graphed)
    _assert_close(_run(graphed, n=5), _run(plain, n=5), exact=True)
    _assert_same_networks(plain, graphed, exact=True)
    assert len(graphed.graph.slots) == 1 and not graphed.graph.capture  # one kind of update; no capture on CPU


def test_graphed_layer_is_dropped_when_optimizer_state_is_replaced(one_thread):
    """A resume gives the optimizers new state tensors: a captured graph would write the old ones."""
    ag = _agent()
    ag.compile("off")
    from agents.graphed import GraphedUpdate

    ag.graph = GraphedUpdate(ag)
    _run(ag, n=3, nan_at=-1)
    assert ag.graph.slots
    ag.load_state_dict(ag.state_dict())
    assert not ag.graph.slots


def test_a_method_with_python_state_is_not_captured(capsys):
    from agents.graphed import GraphedUpdate

    g = GraphedUpdate(_agent(method="gradvac"))
    assert not g.capture and "method 'gradvac' keeps state in Python" in capsys.readouterr().err


# --------------------------------------------------------------------------- every backbone builds one graph
@pytest.mark.parametrize("backbone", available_backbones())
def test_every_backbone_compiles_as_one_graph_with_auto(backbone, strict, monkeypatch, capsys, one_thread):
    """``compile=auto`` compiles every backbone (no "runs eagerly" note), as one graph (no fallback), with its
    hooks run after it; the compiled (and layered) update agrees with eager through a skipped NaN step."""
    monkeypatch.setenv("MTRL_COMPILE_BACKEND", "aot_eager")
    eager, comp = _agent(backbone), _agent(backbone)
    assert comp.compile("auto", capture=True) == "default"
    _assert_close(_run(comp), _run(eager))
    _assert_same_networks(eager, comp)
    _assert_compiled(comp, capsys)


def test_strict_mode_turns_a_fallback_into_an_error(strict, monkeypatch, one_thread):
    """What makes the tests above fail on a fallback: a graph that cannot be built raises under strict mode."""
    from agents import compiled

    def f(x):
        torch._dynamo.graph_break()
        return x + 1

    c = compiled.Compiled(f, "default", "the toy step", fullgraph=True)
    with pytest.raises(compiled.CompileFallbackError, match="the toy step"):
        c(torch.ones(2))


def test_a_failing_inductor_pass_is_retried_without_the_pattern_matcher(monkeypatch, capsys, one_thread):
    """An assertion inside Inductor's passes (the pcgrad preset on CUDA) compiles once more without the
    pattern-matcher passes (and without our custom pass) before it would fall back to eager."""
    from agents import compiled, small_matmul

    def broken(self, graph):
        raise AssertionError

    monkeypatch.setattr(small_matmul.SmallMatmulPass, "__call__", broken)
    c = compiled.Compiled(lambda x: (x * 2).sin() + 1, "default", "the toy step")
    x = torch.arange(4.0)
    torch.testing.assert_close(c(x), (x * 2).sin() + 1)
    assert c.compiled is not None and c.retried and c.options["pattern_matcher"] is False
    err = capsys.readouterr().err
    assert "compiling it again without Inductor's pattern-matcher passes" in err and "AssertionError" in err


# ------------------------------------------------------------------------------------- presets, real sizes
def _preset_agent(name, suite="mt10"):
    """A preset's real network and SAC settings on MT10's sizes (10 tasks, obs 39, action 4)."""
    data = load_preset(name, suite)
    cfg = SACConfig(**data.get("sac", {}))
    return _agent(data.get("backbone", "mlp"), data.get("method", "mtsac"), data.get("backbone_kwargs"), cfg,
                  t=10, obs=39, act=4)


SAC_PRESETS = [p for p in available_presets()
               if load_preset(p, "mt10").get("algo", "sac") == "sac"
               and get_method(load_preset(p, "mt10").get("method", "mtsac"), 10).compilable]


def test_the_compilable_sac_presets_are_the_expected_ones():
    assert {"mtsac", "mtmhsac", "pcgrad", "sm", "moore", "paco", "care"} <= set(SAC_PRESETS)


def _compare_preset(name, capsys):
    eager, comp = _preset_agent(name), _preset_agent(name)
    assert comp.compile("auto", one_graph=True, capture=True) == "default"
    dims = dict(t=10, b=8, obs=39, act=4)
    _assert_close(_run(comp, n=3, **dims), _run(eager, n=3, **dims))
    _assert_compiled(comp, capsys)


def test_pcgrad_preset_compiles_with_inductor_at_its_real_sizes(strict, capsys, one_thread):
    """The mission's default run (``--method pcgrad``: multihead 3 x 400, clip 1.0), with Inductor: the preset whose
    compile failed on CUDA and fell back to eager, silently, in the real run of issue 21."""
    _compare_preset("pcgrad", capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in SAC_PRESETS if p != "pcgrad"])
def test_every_compilable_sac_preset_compiles_with_inductor_at_its_real_sizes(name, strict, capsys, one_thread):
    _compare_preset(name, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("method", COMPILABLE)
@pytest.mark.parametrize("backbone", available_backbones())
def test_every_compilable_method_on_every_backbone_compiles_with_inductor(method, backbone, strict, capsys,
                                                                           one_thread):
    eager, comp = _agent(backbone, method), _agent(backbone, method)
    assert comp.compile("auto", one_graph=True, capture=True) == "default"
    _assert_close(_run(comp), _run(eager))
    _assert_compiled(comp, capsys)
