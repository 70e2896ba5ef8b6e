"""The whole learner step on the ``meta`` device: no host synchronisation, no device mixing (issue 11).

``meta`` raises on ``.item()``/``bool()``/``.cpu()``/numpy; ``DeviceCheck`` raises when one op gets tensors of two
devices (what ``meta`` alone misses in ``mm``/indexing). So an ``MTSAC.update`` / ``MTPPO`` minibatch update that
passes here has no host sync and creates every tensor on the device of its inputs: on CUDA it neither stalls nor
crashes. The methods and backbones are checked piece by piece in tests/test_device_methods.py and
tests/test_device_backbones.py; this file checks the agents that put them together, plus checkpoints that move
between devices and the compiled step against the eager one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from agents.ppo import MTPPO
from agents.sac import MTSAC
from mtrl.config import PPOConfig, SACConfig
from mtrl.devices import DeviceCheck, DeviceMixError
from mtrl.nets import available_backbones

from test_device_methods import EXEMPT, SYNC_FREE

META = torch.device("meta")
T, B, OBS, ACT = 3, 4, 5, 2
SMALL = {"width": 8, "depth": 2}


def _batch(device, sac=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if sac:
        b = {"obs": torch.randn(T, B, OBS, generator=g), "action": torch.rand(T, B, ACT, generator=g) * 2 - 1,
             "reward": torch.randn(T, B, generator=g), "next_obs": torch.randn(T, B, OBS, generator=g),
             "terminated": torch.zeros(T, B)}
    else:
        b = {k: torch.randn(T, B, generator=g) for k in ("logp", "value", "ret", "adv")}
        b.update({"obs": torch.randn(T, B, OBS, generator=g), "action": torch.randn(T, B, ACT, generator=g)})
    return {k: v.to(device) for k, v in b.items()}


def _sac(device, method="mtsac", backbone="mlp", **kw):
    torch.manual_seed(0)  # same initial weights for agents built side by side
    return MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), SACConfig(max_grad_norm=1.0), backbone=backbone,
                 backbone_kwargs=dict(SMALL), method=method, device=device, seed=0, **kw)


def _ppo(device, method="mtsac", backbone="mlp"):
    return MTPPO(OBS, ACT, T, np.ones((T, ACT), np.float32), PPOConfig(epochs=1, minibatches=1), backbone=backbone,
                 backbone_kwargs=dict(SMALL), method=method, device=device, seed=0)


@pytest.mark.parametrize("method", SYNC_FREE)
def test_sac_update_on_meta_is_sync_free_and_device_clean(method, one_thread):
    ag = _sac(META, method=method)
    batch = _batch(META)
    with DeviceCheck():
        for _ in range(2):  # the second update runs with optimizer state and method state in place
            info = ag.update(batch)
    assert info["critic_losses"].device.type == "meta" and info["actor_losses"].shape == (T,)


@pytest.mark.parametrize("method", SYNC_FREE)
def test_ppo_minibatch_update_on_meta_is_sync_free_and_device_clean(method, one_thread):
    ag = _ppo(META, method=method)
    batch = _batch(META, sac=False)
    with DeviceCheck():
        info = ag.update(batch)
    assert info["steps"] == 1 and info["actor_losses"].device.type == "meta"


@pytest.mark.parametrize("backbone", sorted(set(available_backbones()) - {"mlp"}))
def test_sac_update_on_meta_for_every_backbone(backbone, one_thread):
    kw = {"suite": "dmc-walker"} if backbone in ("care", "cotasp") else {}  # they read the task names' embeddings
    ag = MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), SACConfig(), backbone=backbone,
               backbone_kwargs={**SMALL, **kw}, method="pcgrad", device=META, seed=0)
    with DeviceCheck():
        for _ in range(2):
            ag.update(_batch(META))


@pytest.mark.parametrize("backbone", ["mlp", "moe", "harmony"])
def test_graphed_update_on_meta_is_sync_free_and_device_clean(backbone, one_thread):
    """The captured-update layer (agents/graphed.py): copy-in, noise drawn into its static buffers, the step and
    the hooks after it; what runs around ``graph.replay()`` on CUDA."""
    from agents.graphed import GraphedUpdate

    ag = MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), SACConfig(), backbone=backbone,
               backbone_kwargs=dict(SMALL), method="pcgrad", device=META, seed=0)
    ag.graph = GraphedUpdate(ag)
    with DeviceCheck():
        for _ in range(3):
            info = ag.update(_batch(META))
    assert ag.graph.slots and info["critic_losses"].device.type == "meta"


def test_exact_solvers_are_the_listed_exceptions():
    """mgda, upgrad, dualproj, cagrad, nashmtl keep one T x T copy on the host (exact float64 active-set or Newton
    solvers, see tests/test_device_methods.py for the reason each); everything else in SYNC_FREE runs here."""
    assert set(EXEMPT) == {"mgda", "upgrad", "dualproj", "cagrad", "nashmtl"}
    ag = _sac(META, method="mgda")
    with pytest.raises((RuntimeError, NotImplementedError)):  # the host copy is a sync: meta refuses it
        with DeviceCheck():
            ag.update(_batch(META))


def test_the_harness_catches_a_sync_and_a_device_mix_in_the_update(monkeypatch, one_thread):
    ag = _sac(META)
    orig = ag.compute_targets

    def with_item(batch, alpha, eps):
        y = orig(batch, alpha, eps)
        return y * float(y.mean().item() != 0)  # a host read, as the old finiteness checks did

    monkeypatch.setattr(ag, "compute_targets", with_item)
    with pytest.raises((RuntimeError, NotImplementedError)):
        with DeviceCheck():
            ag.update(_batch(META))

    ag = _sac(META)
    ag.target_entropy = torch.full((T,), -2.0)  # a tensor created without the device of its inputs
    with pytest.raises((DeviceMixError, RuntimeError)):
        with DeviceCheck():
            ag.update(_batch(META))


# ------------------------------------------------------------------------------- checkpoints across devices
def test_checkpoint_moves_between_devices_with_a_note_for_the_rng(one_thread):
    """A checkpoint of another device (its generator state cannot be loaded here) restores everything else
    exactly and re-derives the update stream deterministically, saying so in one line."""
    from mtrl.devices import derived_seed

    src = _sac("cpu")
    src.update(_batch("cpu"))
    state = src.state_dict()
    assert state["generator"]["device"] == "cpu"
    foreign = dict(state, generator=dict(state["generator"], device="cuda", state=torch.zeros(16, dtype=torch.uint8)))
    a, b = _sac("cpu"), _sac("cpu")
    a.load_state_dict(foreign)
    b.load_state_dict(foreign)
    assert a.restore_note and "re-derived" in a.restore_note and "\n" not in a.restore_note
    assert a.generator.initial_seed() == derived_seed(state["generator"]["seed"], state["num_updates"])
    torch.testing.assert_close(a.update(_batch("cpu"))["critic_losses"], b.update(_batch("cpu"))["critic_losses"])
    for k, v in src.critic.state_dict().items():
        assert torch.equal(v, _loaded(state, k))
    same = _sac("cpu")
    same.load_state_dict(state)
    assert same.restore_note is None and torch.equal(same.generator.get_state(), src.generator.get_state())


def _loaded(state, key):
    return state["critic"][key]


def test_old_checkpoint_generator_state_still_loads(one_thread):
    src = _sac("cpu")
    state = src.state_dict()
    state["generator"] = src.generator.get_state()  # the bare tensor older checkpoints saved
    ag = _sac("cpu")
    ag.load_state_dict(state)
    assert ag.restore_note is None and torch.equal(ag.generator.get_state(), src.generator.get_state())


# ------------------------------------------------------------------------------------- compiled vs eager
@pytest.mark.parametrize("method", ["mtsac"])
def test_compiled_update_agrees_with_eager_on_a_fixed_batch(method, one_thread):
    """Compiling costs tens of seconds on 2 cores: mtsac here, every compilable method in the slow set."""
    _compare(method)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in SYNC_FREE if m not in ("mtsac", "dwa", "uw", "famo")])
def test_compiled_update_agrees_with_eager_for_every_compilable_method(method, one_thread):
    _compare(method)


# Methods whose whole update is known to compile into one graph (MTSAC.full_step; the default for mtsac only).
ONE_GRAPH = ("mtsac", "pcgrad")


def _compare(method):
    """Four updates on fixed batches, the third with a NaN reward in task 1 (its critic loss is NaN: the critic
    step must be skipped, parameters, Adam moments and step counts untouched, the actor and alpha steps taken),
    then the compiled agent's checkpoint continued by an eager agent. From the second update on, the compiled
    agent runs the whole update as one graph where the method allows it (``MTSAC.full_step``)."""
    from agents.sac import NonFiniteLoss

    eager, comp = _sac("cpu", method=method), _sac("cpu", method=method)
    assert comp.compile("default", one_graph=True if method in ONE_GRAPH else None) == "default"
    for i in range(4):
        batch = _batch("cpu", seed=i)
        if i == 2:
            batch["reward"][1, 0] = float("nan")
        ie, ic = eager.update(batch), comp.update(batch)
        torch.testing.assert_close(ic["critic_losses"], ie["critic_losses"], rtol=1e-4, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(ic["actor_losses"], ie["actor_losses"], rtol=1e-4, atol=1e-5)
        if i == 2:
            assert torch.isnan(ic["critic_losses"][1]) and torch.isfinite(ic["actor_losses"]).all()
    _assert_same_learner(comp, eager)
    steps = {k: int(comp.critic_opt.state[p]["step"]) for k, p in comp.critic.named_parameters()}
    assert set(steps.values()) == {3}, steps  # 4 updates, one critic step skipped
    assert int(comp.actor_opt.state[comp.actor_opt.param_groups[0]["params"][0]]["step"]) == 4
    for ag in (eager, comp):
        with pytest.raises(NonFiniteLoss) as err:
            ag.nonfinite()
        assert err.value.loss == "critic" and err.value.task == 1 and err.value.count == 1
    if method in ONE_GRAPH:
        assert comp._full is not None and comp._full.compiled is not None  # not fallen back to the split graphs
    # The compiled steps kept the optimizers' own state: an eager agent resumes from the checkpoint exactly.
    resumed = _sac("cpu", method=method)
    resumed.load_state_dict(copy.deepcopy(comp.state_dict()))  # as through a file: Adam would share its tensors
    batch = _batch("cpu", seed=9)
    torch.testing.assert_close(resumed.update(batch)["critic_losses"], comp.update(batch)["critic_losses"],
                               rtol=1e-4, atol=1e-5)
    _assert_same_learner(comp, resumed)


def _assert_same_learner(a, b):
    for name in ("critic", "actor", "critic_target"):
        for (k, x), y in zip(getattr(b, name).state_dict().items(), getattr(a, name).state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
    torch.testing.assert_close(a.log_alpha, b.log_alpha)
    for opt in ("critic_opt", "actor_opt", "alpha_opt"):
        sa, sb = getattr(a, opt).state_dict()["state"], getattr(b, opt).state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(sa[i][k], sb[i][k], rtol=1e-4, atol=1e-6, msg=f"{opt}[{i}].{k}")


def test_compile_auto_stays_eager_with_a_note_where_a_method_does_not_compile(capsys):
    ag = _sac("cpu", method="mgda")
    assert ag.compile("auto") == "off"
    assert "method 'mgda'" in capsys.readouterr().err
    assert _sac(META).compile("auto") == "off"  # nothing to generate kernels for


@pytest.mark.slow
def test_two_compiled_agents_of_different_sizes_in_one_process(one_thread):
    """Both agents' methods share one code object: each must get its own graph (a guard filter once made the
    second agent run the first one's 3 x 8 graph on 3 x 400 weights)."""
    for width in (8, 16):
        torch.manual_seed(0)
        eager = MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), SACConfig(), backbone_kwargs={"width": width},
                      device="cpu", seed=0)
        torch.manual_seed(0)
        comp = MTSAC(OBS, ACT, T, np.ones((T, ACT), np.float32), SACConfig(), backbone_kwargs={"width": width},
                     device="cpu", seed=0)
        comp.compile("default")
        for i in range(3):  # the first update is eager, the next ones run the one-graph update
            b = _batch("cpu", seed=i)
            torch.testing.assert_close(comp.update(b)["critic_losses"], eager.update(b)["critic_losses"])
        assert comp._full is not None and comp._full.compiled is not None  # compiled, not fallen back


@pytest.mark.slow
def test_compiled_ppo_minibatch_update_agrees_with_eager(one_thread):
    torch.manual_seed(0)
    eager = _ppo("cpu")
    torch.manual_seed(0)
    comp = _ppo("cpu")
    assert comp.compile("default") == "default"
    b = _batch("cpu", sac=False)
    ie, ic = eager.update(b), comp.update(b)
    torch.testing.assert_close(ic["actor_losses"], ie["actor_losses"], rtol=1e-4, atol=1e-5)
    for a, c in zip(eager.actor.parameters(), comp.actor.parameters()):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_compiled_falls_back_to_eager_when_a_later_graph_variant_fails_to_compile(capsys, one_thread):
    """The first variant compiles; a later one (another argument value) cannot be one graph: it runs eagerly,
    with a note, instead of killing the run."""
    from agents.compiled import Compiled

    def f(x: torch.Tensor, flag: bool) -> torch.Tensor:
        if flag:
            torch._dynamo.graph_break()  # a no-op eagerly; unbuildable under fullgraph=True
        return x * 2 + 1

    c = Compiled(f, "default", "the toy step", fullgraph=True)
    x = torch.arange(3.0)
    torch.testing.assert_close(c(x, False), x * 2 + 1)
    assert c.compiled is not None
    torch.testing.assert_close(c(x, True), x * 2 + 1)
    assert c.compiled is None
    assert "torch.compile of the toy step failed" in capsys.readouterr().err
