"""T2MIR with task ids hidden (issue 4): context windows in workers and evaluation, contexts from the replay, the
context-reading backbone under the engine, and its contrastive router on real MT10 transitions."""

import functools

import numpy as np
import pytest
import torch
from torch.func import functional_call

from agents.sac import MTSAC, Actor
from envs import get_suite
from mtrl.config import SACConfig
from mtrl.gradients.engine import compute_jacobian, unflatten
from mtrl.nets import build_backbone
from mtrl.nets.context import pack, transition_dim
from mtrl.replay import MultiTaskReplay
from mtrl.rollout import RolloutWorker, WorkerSpec

CTX = {"width": 16, "task_dim": 8, "use_task_id": False, "context_len": 4, "expert_dropout": 0.0}


def _stream(n, obs_dim=3, act_dim=2, seed=0):
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, obs_dim)).astype(np.float32), g.normal(size=(n, act_dim)).astype(np.float32),
            g.normal(size=n).astype(np.float32), g.normal(size=(n, obs_dim)).astype(np.float32),
            np.zeros(n, np.float32))


def test_replay_context_is_the_k_transitions_stored_before_each_sample_with_padding_and_wraparound():
    K, C = 3, 8
    rb = MultiTaskReplay(2, C, 3, 2, seed=0)
    o, a, r, o2, te = _stream(11)
    rb.add(0, o[:5], a[:5], r[:5], o2[:5], te[:5])
    rb.add(1, o[:5], a[:5], r[:5], o2[:5], te[:5])
    rb.add(1, o[5:], a[5:], r[5:], o2[5:], te[5:])  # 11 > C: the ring wrapped, the oldest kept is transition 3
    full = pack(o, a, r, o2)
    got = rb.contexts(np.array([[1, 4], [2, 7]]), K)
    # task 0, index 1: only transition 0 precedes it -> two zero rows (validity 0), then transition 0
    np.testing.assert_array_equal(got[0, 0], np.stack([np.zeros_like(full[0]), np.zeros_like(full[0]), full[0]]))
    np.testing.assert_array_equal(got[0, 1], full[1:4])
    # task 1: ring slot 2 holds transition 10 (slots 0..2 were overwritten by 8, 9, 10); before it: 7, 8, 9
    np.testing.assert_array_equal(got[1, 0], full[7:10])
    # slot 7 holds transition 7; before it 4, 5, 6; slot 3 holds transition 3, the oldest: nothing before it
    np.testing.assert_array_equal(got[1, 1], full[4:7])
    oldest = rb.contexts(np.array([[0], [3]]), K)[1, 0]
    assert not oldest.any()
    b = rb.sample(5, context_len=K)
    assert b["context"].shape == b["next_context"].shape == (2, 5, K, transition_dim(3, 2))
    # the window at s′: the sampled transition appended to the window at s
    now = torch.cat([b["obs"], b["action"], b["reward"][..., None], b["next_obs"], torch.ones(2, 5, 1)], -1)
    torch.testing.assert_close(b["next_context"], torch.cat([b["context"][:, :, 1:], now[:, :, None]], 2))


def _spec(indices, backbone="t2mir", bk=None, learning_starts=0, seed=0):
    return WorkerSpec(suite="mt10", tasks=[], task_indices=indices, goal_seed=0,
                      env_seeds=[seed * 100 + i for i in indices], policy_seed=seed, learning_starts=learning_starts,
                      start_steps=[0] * len(indices), backbone=backbone, backbone_kwargs=dict(bk or CTX),
                      log_std_min=-20.0, log_std_max=2.0)


def test_worker_window_is_what_the_replay_gives_the_learner():
    """The context a worker acts with after its chunk equals the replay's context for the next transition."""
    w = RolloutWorker(_spec([0, 3], learning_starts=5))
    assert w.window is not None and not w.window.buf.any()
    rb = MultiTaskReplay(10, 100, w.obs.shape[1], 4)
    for _ in range(2):
        out = w.collect(7)
        for k, t in enumerate(out["task_indices"]):
            rb.add(t, out["obs"][k], out["action"][k], out["reward"][k], out["next_obs"][k], out["terminated"][k])
    for k, t in enumerate([0, 3]):
        nxt = np.full((10, 1), 0)
        nxt[t, 0] = rb.pos[t]
        np.testing.assert_array_equal(rb.contexts(nxt, 4)[t, 0], w.window.buf[k])
        # next_context of the newest transition is also the window the worker holds now
        last = np.full((10, 1), 0)
        last[t, 0] = rb.pos[t] - 1
        now = pack(*(getattr(rb, f)[t, last[t, 0]] for f in ("obs", "action", "reward", "next_obs")))
        np.testing.assert_array_equal(np.concatenate([rb.contexts(last, 4)[t, 0, 1:], now[None]]), w.window.buf[k])
    assert w.window.buf[:, :, -1].all()  # 14 steps > K: every slot real


def test_worker_state_round_trip_keeps_the_window_and_the_next_actions():
    w = RolloutWorker(_spec([1], learning_starts=0))
    w.collect(6)
    state = w.get_state()
    a = w.collect(5)
    w2 = RolloutWorker(_spec([1], learning_starts=0, seed=7))
    w2.set_state(state)
    b = w2.collect(5)
    np.testing.assert_array_equal(a["action"], b["action"])
    np.testing.assert_array_equal(w.window.buf, w2.window.buf)


def test_policy_reads_the_task_from_context_not_from_the_id():
    s = get_suite("mt10")
    torch.manual_seed(0)
    pol = Actor(s.obs_dim, s.act_dim, 10, "t2mir", CTX, -20.0, 2.0).eval()
    assert pol.context_len == 4
    obs = torch.randn(5, s.obs_dim)
    ctx = torch.randn(5, 4, transition_dim(s.obs_dim, s.act_dim))
    ctx[..., -1] = 1.0
    m1, _ = pol(obs, torch.zeros(5, dtype=torch.long), context=ctx)
    m2, _ = pol(obs, torch.arange(5), context=ctx)
    torch.testing.assert_close(m1, m2, rtol=0, atol=0)  # the id is not an input
    m3, _ = pol(obs, torch.arange(5), context=ctx.flip(0))
    assert not torch.allclose(m2, m3)  # the context is
    with pytest.raises(ValueError, match="needs context"):
        pol(obs, torch.arange(5))
    # An empty window (start of a run) is valid input: the encoder averages over no entries.
    m4, _ = pol(obs, torch.arange(5), context=torch.zeros_like(ctx))
    assert torch.isfinite(m4).all()


def test_engine_jacobian_equals_loop_with_contexts_and_contrastive_views():
    T, B, D, K = 4, 5, 6, 4
    Dt = 9
    torch.manual_seed(0)
    bb = build_backbone("t2mir", D, 3, T, **{**CTX, "transition_dim": Dt}).eval()
    params = dict(bb.named_parameters())
    ctx = torch.randn(T, B, K, Dt)
    ctx[..., -1] = 1.0
    batch = {"x": torch.randn(T, B, D), "context": ctx}
    contrast = ctx[:, :2]

    def f(p, b, t, *, contrast):
        out, aux = functional_call(bb, p, (b["x"], t), {"return_aux": True, "context": b["context"],
                                                        "contrast": contrast})
        return out.pow(2).mean() + aux

    fn = functools.partial(f, contrast=contrast)
    res = compute_jacobian(fn, params, batch, torch.arange(T))
    for t in range(T):
        one = {k: v[t] for k, v in batch.items()}
        grads = torch.autograd.grad(fn(params, one, torch.tensor(t)), list(params.values()), allow_unused=True)
        row = unflatten(res.jacobian[t], params, res.shared_names)
        for n, g in zip(params, grads):
            torch.testing.assert_close(row[n], torch.zeros_like(params[n]) if g is None else g, atol=1e-6,
                                       rtol=1e-5, msg=f"{n} task {t}")
    assert res.jacobian[:, [i for i, n in enumerate(res.shared_names)]].abs().sum() > 0


def test_sac_update_requires_and_uses_contexts():
    T, O, A = 3, 5, 2
    ag = MTSAC(O, A, T, np.ones((T, A), bool), SACConfig(), backbone="t2mir", backbone_kwargs=CTX, seed=0)
    rb = MultiTaskReplay(T, 50, O, A)
    for t in range(T):
        rb.add(t, *_stream(20, O, A, seed=t))
    with pytest.raises(ValueError, match="context"):
        ag.update(rb.sample(8))
    before = {k: v.clone() for k, v in ag.actor.net.encoder.state_dict().items()}
    info = ag.update(rb.sample(8, context_len=4))
    assert torch.isfinite(info["critic_losses"]).all() and torch.isfinite(info["actor_losses"]).all()
    assert any(not torch.equal(before[k], v) for k, v in ag.actor.net.encoder.state_dict().items())


def test_context_encoder_separates_two_mt10_tasks_from_real_transitions():
    """The issue's check: a few hundred updates of the router's InfoNCE on contexts of reach-v3 and push-v3 drawn
    from a replay of real (random-action) transitions; contrastive accuracy on fresh contexts beats chance (1/2)."""
    torch.manual_seed(0)
    s = get_suite("mt10")
    w = RolloutWorker(_spec([0, 1], learning_starts=10**9))
    rb = MultiTaskReplay(2, 1000, s.obs_dim, s.act_dim, seed=0)
    out = w.collect(300)
    for k in range(2):
        rb.add(k, out["obs"][k], out["action"][k], out["reward"][k], out["next_obs"][k], out["terminated"][k])
    bb = build_backbone("t2mir", s.obs_dim, 2, 2, **{**CTX, "transition_dim": transition_dim(s.obs_dim, s.act_dim),
                                                      "balance_coef": 0.0, "contrastive_coef": 1.0,
                                                      "context_len": 8})
    enc = [p for n, p in bb.named_parameters() if n.startswith(("encoder", "task_gate", "contrast_w"))]
    opt = torch.optim.Adam(enc, lr=1e-3)

    def accuracy():
        with torch.no_grad():
            c = rb.sample(2, context_len=8)["context"]  # (2 tasks, 2 views, K, D)
            q = bb.task_gate(bb.encoder(c[:, 0]))
            k = bb.target_logits(bb.encoder(c[:, 1]))
            return float(((q @ bb.contrast_w @ k.T).argmax(1) == torch.arange(2)).float().mean())

    chance_run = np.mean([accuracy() for _ in range(50)])
    for _ in range(300):
        c = rb.sample(2, context_len=8)["context"]
        loss = bb.contrastive(torch.tensor(0), c) + bb.contrastive(torch.tensor(1), c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bb.after_step({})
    acc = np.mean([accuracy() for _ in range(50)])
    print(f"contrastive accuracy before {chance_run:.2f} after {acc:.2f}")
    assert acc > 0.9 and acc > chance_run


@pytest.mark.parametrize("suite,task", [("mt10", 2), ("dmc-walker", 0)])
def test_evaluation_feeds_the_window(suite, task):
    from mtrl.evaluation import evaluate_tasks

    s = get_suite(suite)
    torch.manual_seed(0)
    pol = Actor(s.obs_dim, s.act_dim, s.num_tasks, "t2mir", CTX, -20.0, 2.0).eval()
    seen = []
    orig = pol.net.forward

    def spy(x, task_id, return_aux=False, context=None, contrast=None):
        seen.append(context.clone())
        return orig(x, task_id, return_aux, context, contrast)

    pol.net.forward = spy
    mask = torch.as_tensor(s.action_mask[[task]], dtype=torch.float32)
    res = evaluate_tasks(s, [task], pol, mask, num_episodes=1, goal_seed=0, eval_seed=0)
    assert set(res) == {task}
    assert not seen[0].any()  # empty at the start of an evaluation
    assert seen[-1][..., -1].all()  # full after K steps: every slot a real transition
