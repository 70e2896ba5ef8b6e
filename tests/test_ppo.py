"""Issue 5: multi-task PPO (agents/ppo.py, mtrl/onpolicy.py) — GAE, advantage normalisation, stratified
minibatches, the clipped surrogate at its boundaries, masked action dims, exact checkpoint restore, worker
replacement mid-round, and tiny end-to-end runs (MT10, dmc-walker, x pcgrad, x moe), all in-process."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.ppo import (MTPPO, GaussianPolicy, gae, gaussian_entropy, gaussian_logp, normalize_advantages,
                        stratified_minibatches)
from mtrl.config import Config, ConfigError, PPOConfig, validate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402

MT10 = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"]
WALKER = ["walker-stand", "walker-walk", "walker-run"]
# Tiny PPO: 20 steps per task per round, 2 epochs x 4 minibatches, 2x32 networks, one eval episode.
TINY_PPO = ["--set", "ppo.rollout_steps=20", "--set", "ppo.epochs=2", "--set", "ppo.minibatches=4",
            "--set", "backbone_kwargs.width=32", "--set", "backbone_kwargs.depth=2", "--eval-episodes", "1",
            "--no-progress", "--workers", "0"]


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------------ GAE
def test_gae_matches_hand_computation_with_truncation_and_termination():
    g, lam = 0.9, 0.8
    # Task 0: steps 0..5. Step 1 terminates (no bootstrap), step 3 is truncated (bootstrap from V(final obs) = 10,
    # which differs from V of the reset obs at step 4), step 5 ends the round (bootstrap from V(next) = 7).
    r = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    v = np.array([[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]])
    nv = np.array([[1.0, 99.0, 2.0, 10.0, 3.0, 7.0]])  # 99: must be ignored (terminated)
    term = np.array([[0, 1, 0, 0, 0, 0]])
    trunc = np.array([[0, 0, 0, 1, 0, 0]])
    adv, ret = gae(r, v, nv, term, trunc, g, lam)
    d = [1 + g * 1.0 - 0.5, 2 - 1.0, 3 + g * 2.0 - 1.5, 4 + g * 10.0 - 2.0, 5 + g * 3.0 - 2.5, 6 + g * 7.0 - 3.0]
    a5 = d[5]
    a4 = d[4] + g * lam * a5
    a3 = d[3]  # truncated: the recursion stops, the bootstrap is inside delta
    a2 = d[2] + g * lam * a3
    a1 = d[1]  # terminated
    a0 = d[0] + g * lam * a1
    expected = np.array([[a0, a1, a2, a3, a4, a5]])
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(ret, expected + v, rtol=1e-6)


def test_gae_tasks_are_independent():
    rng = np.random.default_rng(0)
    r, v, nv = rng.normal(size=(3, 7)), rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    term = (rng.random((3, 7)) < 0.2).astype(float)
    trunc = (rng.random((3, 7)) < 0.2).astype(float)
    adv, _ = gae(r, v, nv, term, trunc, 0.99, 0.95)
    for t in range(3):
        one, _ = gae(r[t:t + 1], v[t:t + 1], nv[t:t + 1], term[t:t + 1], trunc[t:t + 1], 0.99, 0.95)
        np.testing.assert_allclose(adv[t], one[0], rtol=1e-6)


def test_advantages_are_normalised_per_task():
    adv = torch.stack([torch.randn(500) * 1000 + 50, torch.randn(500) * 1e-3 - 2, torch.randn(500)]).double()
    out = normalize_advantages(adv)
    assert torch.allclose(out.mean(1), torch.zeros(3, dtype=out.dtype), atol=1e-6)
    assert torch.allclose(out.std(1, unbiased=False), torch.ones(3, dtype=out.dtype), atol=1e-4)


def test_stratified_minibatches_hold_every_task_and_cover_each_sample_once():
    T, N, M = 5, 103, 8
    mbs = stratified_minibatches(T, N, M, torch.Generator().manual_seed(0))
    assert len(mbs) == M
    for idx in mbs:
        assert idx.shape[0] == T and idx.shape[1] in (N // M, N // M + 1)  # every task, near-equal counts
    allidx = torch.cat(mbs, dim=1)
    for t in range(T):
        assert sorted(allidx[t].tolist()) == list(range(N))


# ------------------------------------------------------------------------------------------------ losses
def _agent(T=2, A=3, mask=None, **kw):
    cfg = PPOConfig(**{"ent_coef": 0.0, **kw})
    mask = np.ones((T, A), np.float32) if mask is None else mask
    torch.manual_seed(0)
    return MTPPO(4, A, T, mask, cfg, backbone="mlp", backbone_kwargs={"width": 16, "depth": 2})


def _actor_grad(agent, ratio_target, adv):
    """Gradient of task 0's actor loss for one sample whose ratio pi/pi_old is exactly ``ratio_target``."""
    obs, task = torch.randn(1, 4), torch.tensor(0)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in agent.actor.named_parameters()}
    with torch.no_grad():
        mean, log_std = agent.actor(obs, task.reshape(1))
        action = mean + 0.3
        logp = gaussian_logp(action, mean, log_std, agent.action_mask[0])
    b = {"obs": obs, "action": action, "logp": logp - math.log(ratio_target), "adv": torch.tensor([adv]),
         "mask": agent.action_mask[0]}
    loss = agent.actor_loss_one(params, b, task)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_clipped_surrogate_gradient_vanishes_outside_the_clip_on_the_clipped_side(adv):
    agent = _agent(clip=0.2)
    d = 1e-3
    if adv > 0:  # A > 0: clipped above 1 + eps, active below
        assert _actor_grad(agent, 1.2 + d, adv) == 0.0
        assert _actor_grad(agent, 1.2 - d, adv) > 0.0
        assert _actor_grad(agent, 0.5, adv) > 0.0  # the other side is never clipped
    else:  # A < 0: clipped below 1 - eps, active above
        assert _actor_grad(agent, 0.8 - d, adv) == 0.0
        assert _actor_grad(agent, 0.8 + d, adv) > 0.0
        assert _actor_grad(agent, 1.5, adv) > 0.0


def test_value_clip_limits_the_move_from_the_old_value():
    agent = _agent(vf_clip=0.1, vf_coef=1.0)
    params = dict(agent.critic.named_parameters())
    obs, task = torch.randn(6, 4), torch.tensor(1)
    with torch.no_grad():
        v = agent.critic(obs, task.reshape(1).expand(6))
    ret = v + 5.0
    far = {"obs": obs, "ret": ret, "value": v - 3.0}  # V moved 3 >> 0.1 toward R: the clipped error dominates
    near = {"obs": obs, "ret": ret, "value": v}
    lf = agent.critic_loss_one(params, far, task)
    assert torch.isclose(lf, 0.5 * ((v - 3.0 + 0.1 - ret) ** 2).mean(), rtol=1e-5)
    assert torch.isclose(agent.critic_loss_one(params, near, task), 0.5 * ((v - ret) ** 2).mean(), rtol=1e-5)


def test_masked_action_dims_do_not_enter_log_prob_or_entropy():
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    agent = _agent(mask=mask)
    m = agent.action_mask[0]
    mean, log_std = torch.zeros(2, 3), torch.full((2, 3), -0.5)
    a1 = torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, 0.0]])
    a2 = a1.clone()
    a2[:, 2] = 5.0
    assert torch.allclose(gaussian_logp(a1, mean, log_std, m), gaussian_logp(a2, mean, log_std, m))
    assert torch.allclose(gaussian_entropy(log_std, m), torch.tensor(2 * (-0.5 + 0.5 * (1 + math.log(2 * math.pi)))))
    pol: GaussianPolicy = agent.actor
    a, _ = pol.sample(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), m)
    assert torch.all(a[:, 2] == 0)


def test_log_std_param_under_vmap_equals_the_batched_forward():
    agent = _agent(T=3)
    with torch.no_grad():
        agent.actor.log_std.copy_(torch.randn(3, 3))
    obs = torch.randn(3, 5, 4)
    from torch.func import functional_call, vmap

    params = dict(agent.actor.named_parameters())
    m1, s1 = vmap(lambda o, t: functional_call(agent.actor, params, (o, t)))(obs, agent.task_ids)
    m2, s2 = agent.actor(obs.reshape(15, 4), agent.task_ids.repeat_interleave(5))
    assert torch.allclose(m1.reshape(15, 3), m2, atol=1e-6) and torch.allclose(s1.reshape(15, 3), s2)


def test_ppo_config_validation():
    for bad in ("ppo.clip=0", "ppo.gae_lambda=1.5", "ppo.minibatches=0", "ppo.log_std=foo", "ppo.lr=-1"):
        cfg = Config(suite="dmc-walker", algo="ppo")
        train_cfg = cfg
        from mtrl.config import set_key

        set_key(train_cfg, bad)
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            validate(train_cfg)
    cfg = Config(suite="dmc-walker", algo="ppo")
    cfg.ppo.rollout_steps, cfg.ppo.minibatches = 4, 8
    with pytest.raises(ConfigError, match="ppo.minibatches"):
        validate(cfg)


def test_mtppo_preset_sets_algo_ppo_and_the_mean_method():
    args = train.build_parser().parse_args(["--suite", "mt10", "--method", "mtppo"])
    cfg = train.make_config(args)
    assert cfg.algo == "ppo" and cfg.method == "mtsac"
    assert (cfg.ppo.rollout_steps, cfg.ppo.epochs, cfg.ppo.gae_lambda) == (10_000, 16, 0.97)
    args = train.build_parser().parse_args(["--suite", "mt10", "--method", "pcgrad", "--algo", "ppo"])
    cfg = train.make_config(args)
    assert cfg.algo == "ppo" and cfg.method == "pcgrad"


# ------------------------------------------------------------------------------------------------ the trainer
def _trainer(tmp_path, suite="dmc-walker", **ppo):
    from mtrl.onpolicy import OnPolicyTrainer

    cfg = Config(suite=suite, algo="ppo", workers=0, eval_episodes=1, progress=False,
                 backbone_kwargs={"width": 32, "depth": 2})
    cfg.ppo.rollout_steps, cfg.ppo.epochs, cfg.ppo.minibatches = 20, 2, 4
    for k, v in ppo.items():
        setattr(cfg.ppo, k, v)
    validate(cfg)
    return OnPolicyTrainer(cfg, tmp_path / "run")


def test_worker_log_probs_match_the_learner_so_the_first_ratio_is_one(tmp_path):
    tr = _trainer(tmp_path)
    tr.start()
    try:
        for _round in range(2):  # the second round runs with updated weights AND updated obs statistics
            ro = tr._collect_round()
            assert ro["obs"].shape == (3, 20, tr.suite.obs_dim) and ro["truncated"].shape == (3, 20)
            batch = tr.agent.prepare(ro)
            kl, cf, _ = tr.agent._ratio_stats({k: batch[k] for k in ("obs", "action", "logp")})
            assert float(kl.abs().max()) < 1e-5 and float(cf.max()) == 0.0
            tr.agent.update(batch)
            tr.agent.update_obs_norm(ro["obs"])
            tr.pool.broadcast(tr.agent.policy_state())
        assert float(tr.agent.actor.obs_norm.count.min()) >= 40
    finally:
        tr.close()


def _flat_state(x, prefix=""):
    out = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_flat_state(v, f"{prefix}{k}."))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_flat_state(v, f"{prefix}{i}."))
    else:
        out[prefix] = x
    return out


def test_resume_restores_parameters_optimizers_obs_stats_and_counters_exactly(tmp_path):
    from mtrl.checkpoint import load
    from mtrl.onpolicy import OnPolicyTrainer

    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "120", "--eval-every", "0",
                       "--run-dir", str(run), *TINY_PPO]) == 0
    payload = load(run / "checkpoint.pt")
    saved = _flat_state(payload["agent"])
    assert any("obs_norm.mean" in k for k in saved) and "actor_opt.state.0.exp_avg." in saved
    assert payload["counters"]["env_steps"] == 120 and payload["agent"]["num_rounds"] == 2
    cfg, _ = train.resume_config(train.build_parser().parse_args(["--resume", str(run)]))
    tr = OnPolicyTrainer(cfg, run, resume=payload)
    now = _flat_state(tr.agent.state_dict())
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(now[k].cpu(), v.cpu()), k
        else:
            assert now[k] == v, k
    assert (tr.env_steps, tr.updates, tr.episodes) == (120, 16, payload["counters"]["episodes"])
    assert tr.resumes == 1
    # ... and the resumed run continues from there.
    assert train.main(["--resume", str(run), "--total-steps", "240", "--no-progress"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["env_steps"] == 240 and res["final"]["updates"] == 32 and len(res["history"]) == 2


def test_failed_worker_is_replaced_and_its_round_share_collected_again(tmp_path, monkeypatch):
    from mtrl import onpolicy

    calls = {"n": 0}
    orig = onpolicy.PPOWorker.collect_rollout

    def flaky(self, n):
        calls["n"] += 1
        if calls["n"] == 2:  # the second round's first attempt fails
            raise RuntimeError("injected collect failure")
        return orig(self, n)

    monkeypatch.setattr(onpolicy.PPOWorker, "collect_rollout", flaky)
    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "180", "--eval-every", "0",
                       "--run-dir", str(run), *TINY_PPO]) == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["worker_restarts"] == 1 and res["env_steps"] == 180
    assert res["task_steps"] == {t: 60 for t in WALKER}


def test_nan_reward_stops_before_the_optimizer_step_naming_the_task(tmp_path, capsys):
    run = tmp_path / "run"
    rc = train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "120", "--eval-every", "0",
                     "--run-dir", str(run), "--set", "fault_inject=nan_reward:walker-walk", *TINY_PPO])
    assert rc == 1
    assert "non-finite actor loss for task 'walker-walk'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end
def test_mt10_ppo_end_to_end_writes_ppo_tags_and_results(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--suite", "mt10", "--algo", "ppo", "--total-steps", "400", "--eval-every", "200",
                       "--run-dir", str(run), *TINY_PPO]) == 0
    sc = _scalars(run)
    for tag in ("eval/success_rate", "train/approx_kl", "train/clip_fraction", "train/policy_loss",
                "train/value_loss", "train/entropy", "time/fps", "time/updates_per_s", "train/n_updates"):
        assert tag in sc, tag
    for task in MT10:
        assert f"train/{task}/explained_variance" in sc and len(sc[f"eval/{task}/success_rate"]) == 2
    res = json.loads((run / "results.json").read_text())
    assert sorted(res["final"]["per_task"]) == sorted(MT10) and res["final"]["env_steps"] == 400
    assert res["config"]["algo"] == "ppo" and res["protocol"]["reward_version"] == "v2"


def test_interrupted_and_resumed_ppo_run_is_bit_identical_with_in_process_worker(tmp_path):
    """Checkpoints fall between rounds; the in-process worker's envs (mid-episode), RNGs and policy are saved, so
    a run stopped at 120 steps and resumed to 240 ends with the same parameters as one run straight to 240."""
    from mtrl import checkpoint

    common = ["--suite", "dmc-walker", "--algo", "ppo", "--eval-every", "0", "--checkpoint-every", "120",
              *TINY_PPO]
    assert train.main(common + ["--total-steps", "240", "--run-dir", str(tmp_path / "a")]) == 0
    assert train.main(common + ["--total-steps", "120", "--run-dir", str(tmp_path / "b")]) == 0
    assert "worker_state" in checkpoint.load(tmp_path / "b")
    assert train.main(["--resume", str(tmp_path / "b"), "--total-steps", "240", "--no-progress"]) == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["counters"]["env_steps"] == b["counters"]["env_steps"] == 240
    assert a["counters"]["episodes"] == b["counters"]["episodes"]
    for net in ("actor", "critic"):
        for k, v in a["agent"][net].items():
            assert torch.equal(v, b["agent"][net][k]), (net, k)


def test_anneal_lr_decays_linearly_over_the_budget(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "180", "--eval-every", "0",
                       "--run-dir", str(run), "--set", "ppo.anneal_lr=true", "--set", "ppo.lr=0.001",
                       *TINY_PPO]) == 0
    lr = _scalars(run)["train/lr"]  # one per round of 60 env steps: lr * (1 - 0/180), (1 - 60/180), (1 - 120/180)
    assert lr == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3], rel=1e-5)
    run2 = tmp_path / "const"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "120", "--eval-every", "0",
                       "--run-dir", str(run2), *TINY_PPO]) == 0
    assert _scalars(run2)["train/lr"] == pytest.approx([3e-4, 3e-4])


def test_dmc_walker_ppo_end_to_end(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--method", "mtppo_dmc", "--total-steps", "120",
                       "--eval-every", "0", "--run-dir", str(run), *TINY_PPO]) == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert sorted(res["per_task"]) == sorted(WALKER) and res["updates"] == 16
    assert all(np.isfinite(v["return"]) for v in res["per_task"].values())
    # scripts/evaluate.py rebuilds the PPO policy (obs statistics included) and reproduces the final evaluation.
    import evaluate

    out = tmp_path / "ev.json"
    assert evaluate.main([str(run), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert {t: v["return"] for t, v in got["per_task"].items()} == {t: v["return"] for t, v in res["per_task"].items()}


@pytest.mark.parametrize("extra", [["--method", "pcgrad"], ["--backbone", "moe"]], ids=["pcgrad", "moe"])
def test_ppo_with_a_gradient_method_and_a_backbone(tmp_path, extra):
    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", *extra, "--total-steps", "120",
                       "--eval-every", "0", "--run-dir", str(run), "--set", "log_grad_every=1", *TINY_PPO]) == 0
    sc = _scalars(run)
    if extra[1] == "pcgrad":
        assert "grad/actor/conflict_fraction" in sc and "grad/critic/conflict_fraction" in sc
    else:
        assert any(t.startswith("backbone/actor") for t in sc)
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["updates"] == 16 and sorted(res["per_task"]) == sorted(WALKER)


def test_state_log_std_value_clip_and_kl_early_stop(tmp_path):
    """ppo.log_std=state, vf_clip and a tiny target_kl: the round's epochs stop early (fewer than 2 x 4 steps)."""
    run = tmp_path / "run"
    assert train.main(["--suite", "dmc-walker", "--algo", "ppo", "--total-steps", "120", "--eval-every", "0",
                       "--run-dir", str(run), "--set", "ppo.log_std=state", "--set", "ppo.vf_clip=0.2",
                       "--set", "ppo.target_kl=0.000001", "--set", "ppo.lr=0.01", *TINY_PPO]) == 0
    sc = _scalars(run)
    assert sc["train/kl_stop"][-1] == 1.0 and sc["train/epochs_done"][-1] < 2
    res = json.loads((run / "results.json").read_text())["final"]
    assert 0 < res["updates"] < 16


@pytest.mark.slow
def test_mt10_ppo_with_two_ray_workers(tmp_path, ray_local):
    run = tmp_path / "run"
    args = ["--suite", "mt10", "--algo", "ppo", "--total-steps", "400", "--eval-every", "0", "--run-dir", str(run),
            *[a for a in TINY_PPO if a != "0" and a != "--workers"], "--workers", "2"]
    assert train.main(args) == 0
    assert json.loads((run / "results.json").read_text())["final"]["env_steps"] == 400
