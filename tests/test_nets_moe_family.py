"""Issue-14 backbones (mmoe / MMoEEx, dselect, home, cotasp): each rule on a small hand-checkable case, the engine's
per-task Jacobian against a loop, SAC and PPO updates through each; MT10 end to end in the slow set.
(On ``meta`` inside DeviceCheck: tests/test_device_backbones.py.)"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from agents.ppo import MTPPO
from agents.sac import MTSAC
from conftest import TINY
from mtrl.config import PPOConfig, SACConfig
from mtrl.gradients.engine import compute_jacobian, unflatten
from mtrl.nets import available_backbones, build_backbone
from mtrl.nets.dselect import smooth_step

NAMES = ["cotasp", "dselect", "home", "mmoe"]
SMALL = {"mmoe": dict(width=8, num_experts=4, exclusivity=0.5), "dselect": dict(width=8, num_experts=4, top_k=2),
         "home": dict(width=8, lora_rank=2), "cotasp": dict(width=8, depth=2, embedding="random")}
T, B, D, O = 5, 4, 6, 3

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run faster on one thread


def small(name, **kw):
    torch.manual_seed(0)
    return build_backbone(name, D, O, T, **{**SMALL[name], **kw})


def loss_fn(bb):
    def f(params, x, t):
        out, aux = functional_call(bb, params, (x, t), {"return_aux": True})
        return out.pow(2).mean() + out.mean() + aux
    return f


def jacobian(bb, x=None):
    """{name: (T, *shape)} per-task gradients from the engine (one vmapped pass)."""
    params = dict(bb.named_parameters())
    x = torch.randn(T, B, D) if x is None else x
    res = compute_jacobian(loss_fn(bb), params, x, torch.arange(T))
    return unflatten(res.jacobian, params, res.shared_names)


# -- contract ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_vmapped_and_mixed_forward_agree_and_engine_jacobian_equals_loop(name):
    bb = small(name).eval()
    assert name in available_backbones()
    x, ids = torch.randn(T, B, D), torch.arange(T)
    mixed = bb(x.reshape(T * B, D), ids.repeat_interleave(B))
    per_task = vmap(lambda xt, t: bb(xt, t))(x, ids)
    torch.testing.assert_close(mixed.view(T, B, O), per_task, atol=1e-5, rtol=1e-5)
    params = dict(bb.named_parameters())
    jac, f = jacobian(bb, x), loss_fn(bb)
    for t in range(T):
        grads = torch.autograd.grad(f(params, x[t], torch.tensor(t)), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            torch.testing.assert_close(jac[n][t], torch.zeros_like(params[n]) if g is None else g, atol=1e-6,
                                       rtol=1e-5, msg=f"{name}: {n} task {t}")
    d = bb.diagnostics(x.reshape(T * B, D), ids.repeat_interleave(B))
    assert d and all(isinstance(v, torch.Tensor) and not v.requires_grad for v in d.values())


@pytest.mark.parametrize("name,bad", [("mmoe", dict(exclusivity=1.5)), ("mmoe", dict(expert_hidden=[4, 4])),
                                      ("mmoe", dict(num_experts=3, exclusivity=1.0)),
                                      ("dselect", dict(top_k=5)), ("home", dict(groups="0,1")),
                                      ("home", dict(depth=3)), ("cotasp", dict(density=0.0)),
                                      ("cotasp", dict(embedding="bogus")), ("cotasp", dict(embedding="sentence")),
                                      ("dselect", dict(bogus=1))])
def test_bad_options_are_one_line_value_errors(name, bad):
    with pytest.raises(ValueError) as e:
        small(name, **bad)
    assert "\n" not in str(e.value) and name in str(e.value)


# -- MMoE / MMoEEx ---------------------------------------------------------------------------------------------------
def test_mmoe_gates_sum_to_one_and_differ_by_task():
    bb = small("mmoe", exclusivity=0.0)
    x = torch.randn(B, D)
    w = torch.stack([bb.gate(x, torch.tensor(t))[0] for t in range(T)])  # (T, B, E)
    torch.testing.assert_close(w.sum(-1), torch.ones(T, B))
    assert (w > 0).all()
    assert all(not torch.allclose(w[0], w[t]) for t in range(1, T))
    # the gate is softmax(x W_t + b_t): by hand for task 2, row 0
    torch.testing.assert_close(w[2, 0], torch.softmax(x[0] @ bb.gate_w[2] + bb.gate_b[2], -1))


def test_mmoeex_excluded_experts_get_zero_weight_and_zero_gradient():
    bb = small("mmoe", num_experts=6, exclusivity=0.5)
    excluded = ~bb.allowed
    assert excluded.sum() == 3 * (T - 1) and (excluded.sum(0) == T - 1).sum() == 3  # 3 experts, one owner each
    x = torch.randn(T, B, D)
    w = torch.stack([bb.gate(x[t], torch.tensor(t))[0] for t in range(T)])  # (T, B, E)
    assert torch.equal(w[excluded.unsqueeze(1).expand_as(w)], torch.zeros(int(excluded.sum()) * B))
    torch.testing.assert_close(w.sum(-1), torch.ones(T, B))
    jac = jacobian(bb, x)
    for t in range(T):
        for e in range(6):
            g = torch.cat([jac[n][t][e].flatten() for n in jac if n.startswith("experts.")])
            assert (g == 0).all() if excluded[t, e] else (g != 0).any(), (t, e)


def test_mmoeex_heterogeneous_experts_have_their_own_widths():
    bb = small("mmoe", num_experts=3, expert_hidden=[4, 7, 4], exclusivity=0.0)
    shapes = sorted(tuple(s.w[0].shape) for s in bb.experts.stacks)
    assert shapes == [(1, D, 7), (2, D, 4)]
    x = torch.randn(B, D)
    out = bb.experts(x)
    assert out.shape == (3, B, 8)
    torch.testing.assert_close(out[1], bb.experts.stacks[1](x)[0])   # expert 1: the width-7 stack
    torch.testing.assert_close(out[[0, 2]], bb.experts.stacks[0](x))  # experts 0 and 2: the width-4 stack


# -- DSelect-k -------------------------------------------------------------------------------------------------------
def test_dselect_smooth_step_is_0_1_outside_and_a_cubic_inside():
    g = 2.0
    u = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], requires_grad=True)
    s = smooth_step(u, g)
    # S(u) = −u³/4 + 3u/4 + 1/2 for γ = 2: S(∓0.5) = 0.5 ∓ 0.375 ± 0.03125; S(±1) = 1/0 meets the flat parts
    torch.testing.assert_close(s.detach(), torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0]))
    (gr,) = torch.autograd.grad(s.sum(), u)
    assert gr[0] == 0 and gr[1] == 0 and gr[-1] == 0 and gr[-2] == 0  # flat outside (-γ/2, γ/2)
    torch.testing.assert_close(gr[3], torch.tensor(1.5 / g))           # S'(0) = 3/(2γ)


def test_dselect_selects_exactly_k_experts_once_converged():
    bb = small("dselect", num_experts=8, top_k=3)
    with torch.no_grad():  # selectors pick experts 0b101 = 5, 0b000 = 0, 0b011 = 3 (z beyond ±γ/2)
        codes = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.float32)
        bb.z.copy_((codes * 2 - 1).mul(bb.gamma).expand(T, 3, 3))
    w, r = bb.task_weights()
    assert ((w > 0).sum(1) == 3).all() and (bb.diagnostics(torch.randn(2, D), torch.arange(2))["num_selected"]
                                            == 3).all()
    torch.testing.assert_close(w[:, [5, 0, 3]], torch.softmax(bb.alpha, -1))  # weights = softmax(α) exactly
    _, aux = bb(torch.randn(B, D), torch.tensor(0), return_aux=True)
    assert aux == 0  # converged one-hot selectors: zero entropy (8 experts: no missing-code penalty)


def test_dselect_entropy_regulariser_drives_the_gates_to_k_experts():
    bb = small("dselect", num_experts=8, top_k=2, entropy_coef=1.0)
    assert not (bb.task_weights()[0] == 0).any()  # dense at init
    opt = torch.optim.Adam([bb.z], lr=0.05)
    for _ in range(150):
        aux = sum(bb.gate(torch.zeros(1, D), torch.tensor(t))[1] for t in range(T))
        opt.zero_grad()
        aux.backward()
        opt.step()
    w, _ = bb.task_weights()
    assert (bb.z.abs() >= bb.gamma / 2).all()         # every selector converged ...
    assert ((w > 0).sum(1) <= 2).all() and ((w > 0).sum(1) >= 1).all()  # ... to at most k experts
    torch.testing.assert_close(w.sum(1), torch.ones(T))


def test_dselect_penalises_codes_without_an_expert():
    bb = small("dselect", num_experts=3, top_k=1, entropy_coef=0.0)  # 2 bits: code 3 names no expert
    with torch.no_grad():
        bb.z.fill_(bb.gamma)                                           # every selector on code 0b11
    _, aux = bb(torch.randn(B, D), torch.tensor(0), return_aux=True)
    assert aux > 1e6                                                    # 1 / (mass on real experts = 0)
    with torch.no_grad():
        bb.z.fill_(-bb.gamma)                                          # code 0b00: expert 0
    _, aux = bb(torch.randn(B, D), torch.tensor(0), return_aux=True)
    torch.testing.assert_close(aux, torch.tensor(1.0))                 # 1 / 1 per selector, the minimum


# -- HoME -------------------------------------------------------------------------------------------------------------
def test_home_task_experts_get_no_gradient_from_other_tasks_and_groups_are_masked():
    bb = small("home", task_experts=2, groups="0,0,1,1,1")
    jac = jacobian(bb)
    for t in range(T):
        own = torch.cat([jac[n][t][t].flatten() for n in jac if n.startswith("et_")])
        others = torch.cat([jac[n][t][s].flatten() for n in jac if n.startswith("et_") for s in range(T) if s != t])
        assert (own != 0).any() and (others == 0).all(), t
    # level-2 group experts [global 0, 1 | group 0 | group 1]: task 0 (group 0) gives group 1's expert nothing
    g = jac["e2_w"]
    assert (g[0][3] == 0).all() and (g[0][2] != 0).any() and (g[4][2] == 0).all() and (g[4][3] != 0).any()
    d = bb.diagnostics(torch.randn(T * B, D), torch.arange(T).repeat_interleave(B))
    torch.testing.assert_close(d["level2_usage"].sum(1), torch.ones(T))
    assert (d["level2_gate_weights"][:2, 3] == 0).all() and (d["level2_gate_weights"][2:, 2] == 0).all()
    assert set(bb.task_specific_parameters()) >= {"et_w", "gate2_w", "head_w", "self_w"}


def test_home_dense_mixed_task_forward_equals_per_task_groups():
    """Off the host CPU mixed (B,) ids run every task's experts, each row keeping its own (no host read); on the
    CPU each task's rows run separately. Both give the same outputs."""
    bb = small("home", task_experts=2)
    x, ids = torch.randn(4 * T, D), torch.randperm(4 * T) % T
    torch.testing.assert_close(bb._forward_tasks(x, ids), bb(x, ids), atol=1e-5, rtol=1e-5)


def test_home_experts_are_normalised_and_start_with_open_feature_gates():
    bb = small("home", width=16)
    x = torch.randn(64, D) * 10 + 3
    e1 = bb._experts(x, bb._p1)  # Swish(LayerNorm(·)) whatever the input's scale
    z = torch.einsum("bi,eio->ebo", x, bb.e1_w) + bb.e1_b
    zn = torch.nn.functional.layer_norm(z, z.shape[-1:])
    torch.testing.assert_close(e1, torch.nn.functional.silu(zn))  # LoRA B = 0, LN scale 1: gate 2σ(0) = 1


# -- CoTASP ----------------------------------------------------------------------------------------------------------
def test_cotasp_masks_have_the_configured_density_and_masked_weights_get_no_gradient():
    bb = small("cotasp", width=10, density=0.3)
    for m in bb.masks():
        assert torch.equal(m.detach().sum(1), torch.full((T,), 3.0))   # exactly round(0.3 · 10) per task
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    jac = jacobian(bb)
    m0, m1 = (m.detach().bool() for m in bb.masks())
    for t in range(T):
        g0, b0, g1 = jac["layers.0.weight"][t], jac["layers.0.bias"][t], jac["layers.1.weight"][t]
        assert (g0[~m0[t]] == 0).all() and (b0[~m0[t]] == 0).all()     # the masked neurons' incoming weights
        assert (g1[:, ~m0[t]] == 0).all() and (g1[~m1[t]] == 0).all()  # and their outgoing ones
        assert (g0[m0[t]] != 0).any() and (g1[m1[t]][:, m0[t]] != 0).any()
    d = bb.diagnostics(torch.randn(4, D), torch.arange(4))
    torch.testing.assert_close(d["mask_density"], torch.full((T,), 0.3))
    assert d["mask_overlap"].shape == (T, T) and torch.allclose(d["mask_overlap"].diagonal(), torch.ones(T))


def test_cotasp_codes_are_lasso_codes_and_the_sparse_coding_loss_reaches_codes_and_dictionary():
    bb = small("cotasp", width=12, lasso=0.05)
    a, dic, e = bb.codes[0].detach(), bb.dicts[0].detach(), bb.prompt
    # LASSO optimality (KKT): D(e − Dᵀα) = λ sign(α) on the support, |·| ≤ λ off it
    g = (e - a @ dic) @ dic.T
    on = a != 0
    assert on.any() and (~on).any()
    torch.testing.assert_close(g[on], 0.05 * a[on].sign(), atol=2e-3, rtol=0)
    assert (g[~on].abs() <= 0.05 + 2e-3).all()
    _, aux = bb(torch.randn(B, D), torch.tensor(1), return_aux=True)
    grads = torch.autograd.grad(aux, [bb.codes[0], bb.dicts[0]])
    assert (grads[0][1] != 0).any() and (grads[0][[0, 2, 3, 4]] == 0).all() and (grads[1] != 0).any()
    heav = small("cotasp", width=12, density=None)                    # CoTASP's own rule: Heaviside(α)
    torch.testing.assert_close(heav.masks()[0].detach(), (heav.codes[0] > 0).float())


def test_cotasp_reads_the_task_description_embeddings():
    bb = build_backbone("cotasp", D, O, 2, width=8, depth=1, tasks="reach-v3,push-v3")
    from mtrl.nets.care import EMBEDDINGS
    data = json.loads(EMBEDDINGS.read_text())["tasks"]
    torch.testing.assert_close(bb.prompt[1], torch.tensor(data["push-v3"]["embedding"], dtype=torch.float32))


# -- SAC / PPO updates through each ----------------------------------------------------------------------------
SAC_KW = {"mmoe": dict(width=8, num_experts=3, exclusivity=0.4), "dselect": dict(width=8, num_experts=3),
          "home": dict(width=8, lora_rank=2), "cotasp": dict(width=8, depth=2, embedding="random")}


@pytest.mark.parametrize("name", NAMES)
def test_sac_and_ppo_update_through_backbone(name):
    torch.manual_seed(0)
    Tn, obs, act, n = 3, 5, 2, 4
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(Tn, n, obs, generator=g), "action": torch.rand(Tn, n, act, generator=g) * 2 - 1,
             "reward": torch.randn(Tn, n, generator=g), "next_obs": torch.randn(Tn, n, obs, generator=g),
             "terminated": torch.zeros(Tn, n)}
    mask = np.ones((Tn, act), bool)
    for method in ("mtsac", "pcgrad"):
        ag = MTSAC(obs, act, Tn, mask, SACConfig(), backbone=name, backbone_kwargs=SAC_KW[name], method=method,
                   seed=0)
        before = {k: v.detach().clone() for k, v in ag.actor.named_parameters()}
        info = ag.update(batch)
        assert torch.isfinite(info["critic_losses"]).all() and torch.isfinite(info["actor_losses"]).all()
        assert any(not torch.equal(before[k], v) for k, v in ag.actor.named_parameters())
        assert ag.actor.net.diagnostics() and ag.critic.q1.diagnostics()
    ppo = MTPPO(obs, act, Tn, mask.astype(np.float32), PPOConfig(epochs=1, minibatches=1), backbone=name,
                backbone_kwargs=SAC_KW[name], method="pcgrad", seed=0)
    pb = {"obs": batch["obs"], "action": batch["action"], "logp": torch.full((Tn, n), -2.0),
          "value": torch.zeros(Tn, n), "ret": torch.randn(Tn, n, generator=g), "adv": torch.randn(Tn, n, generator=g)}
    before = {k: v.detach().clone() for k, v in ppo.critic.named_parameters()}
    ppo.update(pb)
    assert any(not torch.equal(before[k], v) for k, v in ppo.critic.named_parameters())


# -- end to end (slow) ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
@pytest.mark.parametrize("backbone", NAMES)
def test_train_mt10_end_to_end(tmp_path, backbone, method):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import train
    from conftest import scalars

    run = tmp_path / f"{backbone}_{method}"
    rc = train.main(["--suite", "mt10", "--backbone", backbone, "--method", method, "--total-steps", "400",
                     "--workers", "0", "--eval-every", "0", "--run-dir", str(run), "--set", "log_grad_every=5",
                     *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["env_steps"] >= 400 and res["final"]["updates"] > 0 and len(res["final"]["per_task"]) == 10
    assert any(t.startswith("backbone/actor.net/") for t in scalars(run))
    assert math.isfinite(res["final"].get("success_rate", 0.0))
