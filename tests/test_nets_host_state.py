"""Host-side backbone state (MENTOR snapshots, harmony score EMAs) survives a ``weights_only`` checkpoint, so a resumed
run perturbs / flips exactly as the uninterrupted one; MENTOR's optimizer reset after a perturbation."""

import io
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from agents.sac import MTSAC
from mtrl.config import SACConfig
from mtrl.nets import build_backbone

T, B, D, O = 3, 5, 4, 2
MOE = dict(width=16, snapshot_interval=1, perturb_interval=3, tp_set_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run faster on one thread


def roundtrip(obj):
    """torch.save + torch.load(weights_only=True), as mtrl.checkpoint does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, where="state"):
    """Exact equality of nested host states (tensors bit for bit, NaN equal to NaN)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def params_of(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


# --- moe ----------------------------------------------------------------------------------------------------------
def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"obs": torch.randn(T, B, D, generator=g), "y": torch.randn(T, B, O, generator=g)} for _ in range(n)]


def moe_setup(seed=0, **kw):
    """A moe backbone and an extra module ("the other Q net") stepped by one Adam, as SAC's critic optimizer does."""
    torch.manual_seed(seed)
    bb = build_backbone("moe", D, O, T, **{**MOE, **kw})
    other = torch.nn.Linear(D, O)
    opt = torch.optim.Adam(list(bb.parameters()) + list(other.parameters()), lr=1e-2)
    return bb, other, opt


def moe_update(bb, other, opt, batch, n):
    """One real update: per-task losses (+ aux), Adam step, then after_step with the agents' ctx."""
    ids = torch.arange(T)
    losses, aux = [], 0.0
    for t in range(T):
        out, a = bb(batch["obs"][t], ids[t], return_aux=True)
        losses.append((out - batch["y"][t]).pow(2).mean() + other(batch["obs"][t]).pow(2).mean())
        aux = aux + a
    losses = torch.stack(losses)
    opt.zero_grad(set_to_none=True)
    (losses.sum() + aux).backward()
    opt.step()
    return bb.after_step({"role": "critic", "num_updates": n, "loss_fn": None, "batch": batch,
                          "params": dict(bb.named_parameters()), "task_ids": ids,
                          "info": {"losses": losses.detach()}, "optimizer": opt})


def test_moe_host_state_roundtrip_gives_identical_next_perturbation():
    bb, other, opt = moe_setup()
    data = batches(6)
    for n in range(4):  # snapshots at every update (the set of 2 fills, then replaces), a perturbation at update 3
        moe_update(bb, other, opt, data[n], n)
    assert bb.n_perturbations == 1 and len(bb.snapshots()) == 2 and math.isfinite(bb._loss_ema)

    state = roundtrip(bb.host_state())
    assert_same(state, bb.host_state())
    assert isinstance(state["snapshots"][0]["score"], float) and state["steps"] == 4

    # A fresh run (other initial weights) resumed from the checkpoint: weights, optimizer and host state.
    bb2, other2, opt2 = moe_setup(seed=1)
    bb2.load_state_dict(roundtrip(bb.state_dict()))
    other2.load_state_dict(other.state_dict())
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    bb2.load_host_state(state)
    assert_same(bb2.host_state(), bb.host_state())
    # The same weights without the host state: no snapshots, so its next perturbation differs (or does not happen).
    bb3, other3, opt3 = moe_setup(seed=1)
    bb3.load_state_dict(bb.state_dict())
    other3.load_state_dict(other.state_dict())
    opt3.load_state_dict(opt.state_dict())

    before = params_of(bb)
    for m, o, op in ((bb, other, opt), (bb2, other2, opt2), (bb3, other3, opt3)):
        torch.manual_seed(123)  # gate dropout and the perturbation's noise
        for n in (4, 5):
            moe_update(m, o, op, data[n], n)
    assert bb.n_perturbations == 2 and bb2.n_perturbations == 2 and bb3.n_perturbations == 0
    assert any(not torch.equal(before[n], p) for n, p in bb.named_parameters())
    for n, p in bb.named_parameters():
        assert torch.equal(p, dict(bb2.named_parameters())[n]), n
    assert any(not torch.equal(p, dict(bb3.named_parameters())[n]) for n, p in bb.named_parameters())
    assert_same(bb2.host_state(), bb.host_state())


def test_moe_host_state_is_not_aliased_to_live_parameters_and_rejects_other_networks():
    bb, other, opt = moe_setup()
    data = batches(2)
    moe_update(bb, other, opt, data[0], 0)
    state = bb.host_state()
    saved = {n: t.clone() for n, t in state["snapshots"][0]["params"].items()}
    moe_update(bb, other, opt, data[1], 1)  # an Adam step changes every parameter in place
    for n, t in state["snapshots"][0]["params"].items():
        assert torch.equal(t, saved[n]) and not torch.equal(t, dict(bb.named_parameters())[n]), n
    wider = build_backbone("moe", D, O, T, **{**MOE, "width": 8})
    with pytest.raises(ValueError, match="does not match"):
        wider.load_host_state(roundtrip(state))
    smaller = build_backbone("moe", D, O, T, **{**MOE, "tp_set_size": 1})
    smaller.load_host_state(bb.host_state())  # keeps the best snapshot of the two
    best = max(s for s, _ in bb.snapshots())
    assert [s for s, _ in smaller.snapshots()] == [best]


@pytest.mark.parametrize("reset", [True, False])
def test_moe_perturbation_resets_only_this_backbones_optimizer_state(reset):
    bb, other, opt = moe_setup(reset_optimizer=reset)
    data = batches(4)
    for n in range(2):
        moe_update(bb, other, opt, data[n], n)
    assert all(int(opt.state[p]["step"]) == 2 for p in bb.parameters())
    moe_update(bb, other, opt, data[2], 2)  # update 3: perturbation
    assert bb.n_perturbations == 1
    for p in other.parameters():  # the other module in the same optimizer keeps its moments
        assert int(opt.state[p]["step"]) == 3 and opt.state[p]["exp_avg"].abs().sum() > 0
    if reset:
        assert not any(p in opt.state for p in bb.parameters())
    else:
        assert all(int(opt.state[p]["step"]) == 3 for p in bb.parameters())
    moe_update(bb, other, opt, data[3], 3)  # Adam restarts the reset entries at step 1
    assert all(int(opt.state[p]["step"]) == (1 if reset else 4) for p in bb.parameters())
    assert all(int(opt.state[p]["step"]) == 4 for p in other.parameters())


def test_moe_reset_optimizer_option_is_validated_and_ctx_without_optimizer_is_fine():
    with pytest.raises(ValueError, match="reset_optimizer"):
        build_backbone("moe", D, O, T, **MOE, reset_optimizer="yes")
    bb = build_backbone("moe", D, O, T, **MOE)
    ctx = {"info": {"losses": torch.ones(T)}, "task_ids": torch.arange(T), "batch": batches(1)[0]}
    for _ in range(3):
        bb.after_step(ctx)
    assert bb.n_perturbations == 1


# --- harmony ------------------------------------------------------------------------------------------------------
HARMONY = dict(width=16, depth=3, score_interval=1, mask_interval=2, eta_max=20, total_updates=8)


def harmony_ctx(bb, batch, n):
    def loss_fn(params, b, t):
        return (functional_call(bb, params, (b["obs"], t)) - b["y"]).pow(2).mean()
    return {"role": "critic", "num_updates": n, "loss_fn": loss_fn, "batch": batch,
            "params": dict(bb.named_parameters()), "task_ids": torch.arange(T), "info": {"losses": torch.ones(T)}}


def test_harmony_host_state_roundtrip_gives_identical_next_flip():
    torch.manual_seed(0)
    bb = build_backbone("harmony", D, O, T, **HARMONY)
    data = batches(4, seed=1)
    for n in range(3):  # scores every update, a flip at update 2
        bb.after_step(harmony_ctx(bb, data[n], n))
    assert bb.flips > 0 and set(bb._ema_g) == set(bb.masked)

    state = roundtrip(bb.host_state())
    assert set(state["ema_g"]) == {str(i) for i in bb.masked}
    assert_same(state, bb.host_state())
    torch.manual_seed(1)
    bb2 = build_backbone("harmony", D, O, T, **HARMONY, seed=1)  # other weights and masks until loaded
    bb2.load_state_dict(roundtrip(bb.state_dict()))
    bb2.load_host_state(state)
    assert_same(bb2.host_state(), bb.host_state())
    before = {i: bb.mask(i).clone() for i in bb.masked}
    taken = bb.host_state()
    frozen = roundtrip(taken)
    for m in (bb, bb2):
        m.after_step(harmony_ctx(m, data[3], 3))  # update 4: scores, then a flip
    for i in bb.masked:
        assert not torch.equal(bb.mask(i), before[i])
        assert torch.equal(bb.mask(i), bb2.mask(i))
    assert_same(bb2.host_state(), bb.host_state())
    # host_state is a copy: the in-place EMA updates do not reach a state already taken.
    assert_same(taken, frozen)
    assert not torch.equal(taken["ema_g"][str(bb.masked[0])], bb._ema_g[bb.masked[0]])


def test_harmony_load_host_state_rejects_other_layers():
    torch.manual_seed(0)
    bb = build_backbone("harmony", D, O, T, **HARMONY)
    bb.after_step(harmony_ctx(bb, batches(1)[0], 0))
    state = bb.host_state()
    state["ema_g"]["0"] = state["ema_g"].pop("1")  # layer 0 is not masked (mask_input_layer=false)
    with pytest.raises(ValueError, match="does not match"):
        bb.load_host_state(state)


# --- the agent path -----------------------------------------------------------------------------------------------
def sac_agent(seed):
    torch.manual_seed(seed)
    Tn, act = 3, 2
    return MTSAC(5, act, Tn, np.ones((Tn, act), bool), SACConfig(), backbone="moe",
                 backbone_kwargs=dict(width=8, snapshot_interval=1, perturb_interval=2, tp_set_size=2), seed=seed)


def sac_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(3, 4, 5, generator=g), "action": torch.rand(3, 4, 2, generator=g) * 2 - 1,
            "reward": torch.randn(3, 4, generator=g), "next_obs": torch.randn(3, 4, 5, generator=g),
            "terminated": torch.zeros(3, 4)}


def test_mtsac_checkpoint_carries_moe_host_state_and_resumes_identically():
    ag = sac_agent(0)
    for n in range(3):
        ag.update(sac_batch(n))
    mods = lambda a: {"actor": a.actor.net, "q1": a.critic.q1, "q2": a.critic.q2}  # noqa: E731
    for m in mods(ag).values():
        assert len(m.snapshots()) == 2 and m.n_perturbations == 1

    state = roundtrip(ag.state_dict())
    assert set(state["host_state"]) == {"0.net", "1.q1", "1.q2"}
    ag2 = sac_agent(1)
    assert all(m.n_perturbations == 0 for m in mods(ag2).values())
    ag2.load_state_dict(state)
    for k, m in mods(ag).items():
        assert_same(mods(ag2)[k].host_state(), m.host_state(), k)

    # The next update perturbs (update 4) in both, from the same snapshots: bit-identical weights.
    for a in (ag, ag2):
        torch.manual_seed(7)
        a.update(sac_batch(3))
    for k, m in mods(ag).items():
        assert m.n_perturbations == 2
        for (n, p), (_, p2) in zip(m.named_parameters(), mods(ag2)[k].named_parameters()):
            assert torch.equal(p, p2), f"{k}.{n}"
