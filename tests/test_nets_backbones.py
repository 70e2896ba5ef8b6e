"""Issue-4 backbones (moe, t2mir, harmony, softmod, care, moore, paco): shapes, sizes, gates, aux-loss gradients,
orthogonality, masks, the engine's per-task Jacobian against a loop, and SAC updates through every backbone."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from agents.sac import MTSAC
from mtrl.config import SACConfig
from mtrl.gradients.engine import compute_jacobian, unflatten
from mtrl.nets import available_backbones, build_backbone

NEW = ["care", "harmony", "moe", "moore", "paco", "softmod", "t2mir"]
# Small sizes for the per-backbone checks (dropout off so the Jacobian check is deterministic).
SMALL = {"moe": dict(width=16, gate_dropout=0.0), "t2mir": dict(width=16, task_dim=8),
         "harmony": dict(width=16, depth=3), "softmod": dict(width=16, module_width=8, gating_hidden=8,
                                                            num_layers=3, num_modules=3),
         "care": dict(width=16, depth=2, encoder_dim=8, context_dim=8, suite="dmc-mixed"),
         "moore": dict(width=16, depth=2, n_experts=3), "paco": dict(width=16, depth=2, num_param_sets=3)}
T, B, D, O = 7, 6, 9, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run faster on one thread


def small(name, **kw):
    torch.manual_seed(0)
    return build_backbone(name, D, O, T, **{**SMALL[name], **kw})


def loss_fn(bb):
    aux = getattr(bb, "has_aux_loss", False)

    def f(params, x, t):
        if aux:
            out, a = functional_call(bb, params, (x, t), {"return_aux": True})
            return out.pow(2).mean() + out.mean() + a
        out = functional_call(bb, params, (x, t))
        return out.pow(2).mean() + out.mean()
    return f


def test_all_registered():
    assert set(NEW) <= set(available_backbones())


@pytest.mark.parametrize("name", NEW)
def test_shapes_vmap_and_grouped_forward_agree(name):
    bb = small(name).eval()
    x = torch.randn(T, B, D)
    ids = torch.arange(T)
    mixed = bb(x.reshape(T * B, D), ids.repeat_interleave(B))
    assert mixed.shape == (T * B, O)
    per_task = vmap(lambda xt, t: bb(xt, t), randomness="different")(x, ids)
    torch.testing.assert_close(mixed.view(T, B, O), per_task, atol=1e-5, rtol=1e-5)
    out = bb(x[0], ids[0], return_aux=True)
    assert isinstance(out, tuple) and out[0].shape == (B, O) and out[1].dim() == 0


@pytest.mark.parametrize("name", NEW)
def test_engine_jacobian_equals_loop_of_autograd(name):
    bb = small(name).eval()
    f = loss_fn(bb)
    params = dict(bb.named_parameters())
    x = torch.randn(T, B, D)
    res = compute_jacobian(f, params, x, torch.arange(T))
    for t in range(T):
        grads = torch.autograd.grad(f(params, x[t], torch.tensor(t)), list(params.values()), allow_unused=True)
        row = unflatten(res.jacobian[t], params, res.shared_names)
        for n, g in zip(params, grads):
            torch.testing.assert_close(row[n], torch.zeros_like(params[n]) if g is None else g, atol=1e-6,
                                       rtol=1e-5, msg=f"{name}: {n} task {t}")


@pytest.mark.parametrize("name", NEW)
def test_train_mode_forward_runs_under_vmap_with_randomness(name):
    bb = small(name, **({"gate_dropout": 0.1} if name == "moe" else {})).train()
    f = loss_fn(bb)
    res = compute_jacobian(f, dict(bb.named_parameters()), torch.randn(T, B, D), torch.arange(T))
    assert torch.isfinite(res.jacobian).all()


@pytest.mark.parametrize("name", NEW)
def test_unknown_or_bad_option_is_a_one_line_value_error(name):
    with pytest.raises(ValueError, match="unknown option"):
        build_backbone(name, D, O, T, **SMALL[name], bogus=1)
    with pytest.raises(ValueError) as e:
        build_backbone(name, D, O, T, **{**SMALL[name], "width": 0})
    assert "\n" not in str(e.value)


def test_parameter_counts_at_mt10_size():
    """MOORE and PaCo MT10 actors match the reference counts (architectures.md §4.1, §7.2)."""
    def n(name, in_dim=39, out=8, **kw):
        return sum(p.numel() for p in build_backbone(name, in_dim, out, 10, **kw).parameters())
    assert n("moore") == 1_379_320
    assert n("paco") == 1_700_090
    # MENTOR's MoE at its own size (width 1024, 16 experts of 1024-256-1024): 525,568 per expert.
    moe = build_backbone("moe", 39, 8, 10, width=1024)
    assert sum(p.numel() for p in moe.experts.parameters()) == 16 * 525_568
    assert sum(p.numel() for p in moe.gate.parameters()) == 1024 * 256 + 256 + 256 * 16 + 16  # ~266k
    # Soft Modularization shallow MT10: (base 39-400-400, em 10-400-400, gating 400-256-256, 2x2 modules of 256).
    sm = build_backbone("softmod", 39, 8, 10)
    assert sum(p.numel() for p in sm.modules_.parameters()) == 2 * (400 * 256 + 256) + 2 * (256 * 256 + 256)


def test_moe_gate_selects_k_and_renormalises():
    bb = small("moe", num_experts=6, top_k=3)
    h = torch.randn(20, 16)
    probs, weights, idx = bb._route(h)
    assert ((weights > 0).sum(-1) == 3).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(20))
    top = torch.topk(probs, 3).values
    torch.testing.assert_close(torch.sort(weights, -1, descending=True).values[:, :3], top / top.sum(-1, True))


def test_t2mir_gates_select_k_and_renormalise():
    bb = small("t2mir", token_experts=5, token_top_k=2)
    u = torch.randn(20, 16)
    for mode in (bb.train, bb.eval):
        mode()
        w, load, _ = bb.token_route(u)
        assert ((w > 0).sum(-1) == 2).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(20))
        assert load.shape == (5,)


def _gate_grad(bb, gate_params, task=0, **fw):
    x = torch.randn(B, D)
    _, aux = bb(x, torch.tensor(task), return_aux=True)
    assert aux.item() != 0.0
    grads = torch.autograd.grad(aux, gate_params, allow_unused=True)
    return [0.0 if g is None else g.abs().sum().item() for g in grads]


def test_moe_balance_term_alone_reaches_the_gate():
    bb = small("moe", entropy_coef=0.0, aux_scale=1.0)  # the fixed load-balance term only
    assert all(g > 0 for g in _gate_grad(bb, list(bb.gate.parameters())))
    bb = small("moe", balance_coef=0.0)                  # the entropy term only
    assert all(g > 0 for g in _gate_grad(bb, list(bb.gate.parameters())))


def test_t2mir_balance_and_contrastive_terms_reach_their_gates():
    bb = small("t2mir", contrastive_coef=0.0).train()
    assert any(g > 0 for g in _gate_grad(bb, list(bb.token_gate.parameters())))
    assert _gate_grad(bb, [bb.token_noise.weight])[0] > 0  # the load term's gradient through the noise std
    bb = small("t2mir", balance_coef=0.0)
    assert all(g > 0 for g in _gate_grad(bb, list(bb.task_gate.parameters()) + [bb.contrast_w]))


def test_t2mir_context_mode_needs_transition_dim_and_encoder_shapes():
    from mtrl.nets.t2mir import ContextEncoder, info_nce
    with pytest.raises(ValueError, match="needs transition_dim"):
        build_backbone("t2mir", D, O, T, use_task_id=False)
    assert build_backbone("t2mir", D, O, T, use_task_id=False, transition_dim=5, context_len=3).context_len == 3
    assert build_backbone("t2mir", D, O, T).context_len == 0
    enc = ContextEncoder(transition_dim=5, out_dim=4)
    z = enc(torch.randn(3, 8, 5))
    assert z.shape == (3, 4)
    assert info_nce(z, z.detach(), torch.eye(4)).dim() == 0


def test_moore_basis_is_orthonormal():
    bb = build_backbone("moore", 39, 8, 10)
    u = bb.basis(torch.randn(64, 39) * 3).transpose(0, 1)  # (B, k, D)
    eye = torch.eye(bb.k).expand(64, -1, -1)
    assert (u @ u.transpose(1, 2) - eye).abs().max().item() < 1e-5
    assert bb.diagnostics(torch.randn(8, 39), torch.arange(8) % 10)["gram_max_error"] < 1e-5


def test_harmony_masked_weights_untouched_by_their_task():
    bb = small("harmony")
    f = loss_fn(bb)
    params = dict(bb.named_parameters())
    res = compute_jacobian(f, params, torch.randn(T, B, D), torch.arange(T))
    for i in bb.masked:
        name = f"layers.{i}.weight"
        g = unflatten(res.jacobian, params, res.shared_names)[name]  # (T, out, in)
        m = bb.mask(i)
        assert (g[~m] == 0).all() and (g[m] != 0).any()
        # One SGD step on task 0's loss alone leaves task 0's masked-out weights exactly as they were.
        w0 = bb.layers[i].weight.detach().clone()
        loss = f(params, torch.randn(B, D), torch.tensor(0))
        (gw,) = torch.autograd.grad(loss, [bb.layers[i].weight])
        w1 = w0 - 0.1 * gw
        assert torch.equal(w1[~m[0]], w0[~m[0]]) and not torch.equal(w1[m[0]], w0[m[0]])


def test_harmony_flip_keeps_density_and_prunes_conflicts():
    bb = small("harmony", eta_max=20, total_updates=4)
    before = {i: bb.mask(i).clone() for i in bb.masked}
    g = {i: torch.randn(T, *bb.mask(i).shape[1:]) for i in bb.masked}
    bb.update_scores(g)
    assert bb.eta(2) == 20 and bb.eta(0) == 0 and bb.eta(4) == 0
    assert bb.flip(20) > 0
    for i in bb.masked:
        torch.testing.assert_close(bb.mask(i).float().sum((1, 2)), before[i].float().sum((1, 2)))
        assert not torch.equal(bb.mask(i), before[i])
    d = bb.diagnostics(torch.randn(4, D), torch.arange(4))
    assert d["mask_overlap"].shape == (T, T) and np.allclose(d["mask_density"], 0.8, atol=0.01)


def test_moe_perturbation_moves_toward_snapshots():
    bb = small("moe", snapshot_interval=1, perturb_interval=3, tp_set_size=2)
    ctx = {"info": {"losses": torch.ones(T)}, "task_ids": torch.arange(T), "batch": {"obs": torch.randn(T, B, D)}}
    w0 = bb.head.weight.detach().clone()
    for _ in range(2):
        bb.after_step(ctx)
    with torch.no_grad():
        bb.head.weight.add_(1.0)
    bb.after_step(ctx)  # third call: perturb toward the (two, identical) snapshots' mean
    assert bb.n_perturbations == 1 and 0.2 <= bb.last_alpha <= 0.95
    expected = bb.last_alpha * (w0 + 1.0) + (1 - bb.last_alpha) * w0
    torch.testing.assert_close(bb.head.weight.detach(), expected, atol=1e-5, rtol=1e-5)
    assert bb.diagnostics()["perturbations"] == 1


def test_paco_resets_extreme_task_to_convex_combination():
    bb = small("paco")
    losses = torch.zeros(T)
    losses[2] = 1e4
    bb.after_step({"info": {"losses": losses}})
    w = bb.task_w.detach()
    assert bb.resets == 1 and w[2].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_care_embeddings_cover_every_task_and_load_for_mt10():
    from envs import DMC_TASKS, metaworld_task_names
    from mtrl.nets.care import EMBEDDINGS
    data = json.loads(EMBEDDINGS.read_text())
    assert data["dim"] == 384 and set(metaworld_task_names()) | set(DMC_TASKS) <= set(data["tasks"])
    e = np.array(data["tasks"]["reach-v3"]["embedding"])
    assert abs(np.linalg.norm(e) - 1) < 1e-4
    bb = build_backbone("care", 39, 8, 10)  # T = 10 without names: the MT10 order
    assert bb.task_names[0] == "reach-v3" and bb.task_embedding.shape == (10, 384)
    with pytest.raises(ValueError, match="backbone_kwargs.tasks"):
        build_backbone("care", 39, 8, 3)
    with pytest.raises(ValueError, match="no description"):
        build_backbone("care", 39, 8, 2, tasks="reach-v3,unknown-task")


# --- SAC updates through every backbone (the after_step hooks, aux losses, target sync) --------------------------
SAC_KW = {"moe": dict(width=8, snapshot_interval=1, perturb_interval=2), "t2mir": dict(width=8, task_dim=4),
          "harmony": dict(width=8, depth=2, score_interval=1, mask_interval=2, eta_max=10, total_updates=4),
          "softmod": dict(width=8, module_width=8, gating_hidden=8), "care": dict(width=8, depth=2, suite="dmc-walker"),
          "moore": dict(width=8, depth=2), "paco": dict(width=8, depth=2)}


@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
@pytest.mark.parametrize("name", NEW)
def test_sac_updates_through_backbone(name, method):
    torch.manual_seed(0)
    Tn, obs, act = 3, 5, 2
    ag = MTSAC(obs, act, Tn, np.ones((Tn, act), bool), SACConfig(), backbone=name, backbone_kwargs=SAC_KW[name],
               method=method, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {"obs": torch.randn(Tn, 4, obs, generator=g), "action": torch.rand(Tn, 4, act, generator=g) * 2 - 1,
             "reward": torch.randn(Tn, 4, generator=g), "next_obs": torch.randn(Tn, 4, obs, generator=g),
             "terminated": torch.zeros(Tn, 4)}
    masks0 = {k: v.clone() for k, v in ag.critic.named_buffers() if "mask" in k}
    for _ in range(2):
        info = ag.update(batch)
        assert torch.isfinite(info["critic_losses"]).all() and torch.isfinite(info["actor_losses"]).all()
    for mod in (ag.actor.net, ag.critic.q1):
        d = mod.diagnostics()
        assert d and all(isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and not v.requires_grad)
                         for v in d.values())  # detached device tensors, or host-side counters
    if name == "harmony":  # masks flipped at update 2, and the target critic shares them
        assert any(not torch.equal(masks0[k], v) for k, v in ag.critic.named_buffers() if "mask" in k)
        for (k, v), (k2, v2) in zip(ag.critic.named_buffers(), ag.critic_target.named_buffers()):
            assert k == k2 and torch.equal(v, v2)
    if name == "moe":
        assert ag.actor.net.n_perturbations == 1 and ag.critic.q1.n_perturbations == 1


def test_t2mir_context_encoder_contrastive_accuracy():
    """ContextEncoder + info_nce learn to tell tasks apart from K transitions (chance = 1/6)."""
    from mtrl.nets.t2mir import ContextEncoder, info_nce
    torch.manual_seed(0)
    n_tasks, K = 6, 16
    w_task = torch.randn(n_tasks, 3) * 2  # tasks differ only in their reward function r = w_t . s

    def contexts():
        s = torch.randn(n_tasks, K, 3)
        a = torch.randn(n_tasks, K, 1)
        r = (s * w_task[:, None]).sum(-1, keepdim=True) + 0.1 * torch.randn(n_tasks, K, 1)
        return torch.cat([s, a, r], -1)

    enc = ContextEncoder(5, 8, hidden=64)
    w = torch.nn.Parameter(torch.eye(8))
    opt = torch.optim.Adam(list(enc.parameters()) + [w], lr=3e-3)
    for _ in range(800):
        loss = info_nce(enc(contexts()), enc(contexts()), w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = sum((enc(contexts()) @ w @ enc(contexts()).T).argmax(1).eq(torch.arange(n_tasks)).float().mean()
                  for _ in range(10)) / 10
    assert acc > 0.9


def test_bench_script_counts_and_matched_width(capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_backbones
    assert bench_backbones.matched_width(344_008, 39, 8) == 400  # the MT-SAC 3 x 400 MLP matches itself
    assert bench_backbones.main(["--backbones", "moore,paco", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "1,379,320" in out and "1,700,090" in out
