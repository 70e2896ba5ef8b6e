"""Baseline presets by name (issue 12): ``--method <preset>`` resolves to the reference example's settings, suites
set their budgets, and the options the presets switch on (He-uniform init, Adam eps, SM task weights) do what
they say.

The REFERENCE table is written out here by hand from rainx0r/metaworld-algorithms @ 30c9991 (the Meta-World+
baselines): ``examples/multi_task/{mtmhsac,pcgrad,softmodules,moore,paco,ppo}_mt*.py`` and the defaults they rely
on in ``config/{nn,optim,rl}.py``, ``rl/algorithms/{mtsac,ppo}.py`` and ``rl/networks.py``. It is not read from the
preset files: a preset that drifts from the reference fails here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402

from mtrl.config import ConfigError, to_dict, validate  # noqa: E402

# What every Meta-World+ SAC example shares (MTSACConfig, OptimizerConfig(max_grad_norm=1.0), OffPolicyTrainingConfig,
# TrainingConfig.evaluation_frequency = 200_000 // 500 episodes = 200k env steps, EnvConfig.evaluation_num_episodes).
SAC_REF = {"algo": "sac", "eval_every": 200_000, "eval_episodes": 50,
           "sac.batch_size": 128,  # 1280 on MT10, 6400 on MT50: 128 per task
           "sac.actor_lr": 3e-4, "sac.critic_lr": 3e-4, "sac.alpha_lr": 3e-4, "sac.tau": 0.005, "sac.gamma": 0.99,
           "sac.init_alpha": 1.0, "sac.learning_starts": 4000, "sac.updates_per_step": 1.0,
           "sac.actor_update_every": 1, "sac.target_update_every": 1, "sac.log_std_min": -20.0,
           "sac.log_std_max": 2.0, "sac.max_grad_norm": 1.0, "sac.adam_eps": 1e-5, "sac.init": "he_uniform",
           "sac.task_weights": False}
MH = {"backbone": "multihead", "backbone_kwargs.width": 400, "backbone_kwargs.depth": 3}
REFERENCE = {
    # (preset, suite): settings
    ("mtmhsac", "mt10"): {**SAC_REF, **MH, "method": "mtsac"},
    ("mtmhsac", "mt50"): {**SAC_REF, **MH, "method": "mtsac"},
    ("pcgrad", "mt10"): {**SAC_REF, **MH, "method": "pcgrad"},
    ("pcgrad", "mt50"): {**SAC_REF, **MH, "method": "pcgrad"},
    ("sm", "mt10"): {**SAC_REF, "method": "mtsac", "backbone": "softmod", "sac.task_weights": True,
                     "backbone_kwargs.width": 400, "backbone_kwargs.depth": 2, "backbone_kwargs.num_layers": 2,
                     "backbone_kwargs.num_modules": 2, "backbone_kwargs.module_width": 256,
                     "backbone_kwargs.gating_hidden": 256},
    ("sm", "mt50"): {**SAC_REF, "method": "mtsac", "backbone": "softmod", "sac.task_weights": True,
                     "backbone_kwargs.width": 400, "backbone_kwargs.num_layers": 4, "backbone_kwargs.num_modules": 4,
                     "backbone_kwargs.module_width": 128, "backbone_kwargs.gating_hidden": 256},
    ("moore", "mt10"): {**SAC_REF, "method": "mtsac", "backbone": "moore", "backbone_kwargs.n_experts": 4,
                        "backbone_kwargs.width": 400, "backbone_kwargs.depth": 3, "sac.alpha_lr": 1e-4,
                        "sac.log_std_min": -10.0},
    ("moore", "mt50"): {**SAC_REF, "method": "mtsac", "backbone": "moore", "backbone_kwargs.n_experts": 6,
                        "sac.alpha_lr": 1e-4, "sac.log_std_min": -10.0},
    ("paco", "mt10"): {**SAC_REF, "method": "mtsac", "backbone": "paco", "backbone_kwargs.num_param_sets": 5,
                       "backbone_kwargs.width": 400, "backbone_kwargs.depth": 3,
                       "backbone_kwargs.reset_extreme": False, "eval_every": 1_000_000},
    ("paco", "mt50"): {**SAC_REF, "method": "mtsac", "backbone": "paco", "backbone_kwargs.num_param_sets": 20,
                       "backbone_kwargs.reset_extreme": False, "eval_every": 1_000_000},
    ("care", "mt10"): {**SAC_REF, "method": "mtsac", "backbone": "care", "backbone_kwargs.n_encoders": 6,
                       "backbone_kwargs.encoder_dim": 50, "backbone_kwargs.context_dim": 50,
                       "backbone_kwargs.temperature": 1.0},
    ("care", "mt50"): {**SAC_REF, "method": "mtsac", "backbone": "care", "backbone_kwargs.n_encoders": 10},
    # ppo_mt10.py / ppo_mt50.py + PPOConfig defaults: 10,000 steps per task per round, 16 epochs x 32 gradient
    # steps, lambda 0.97, clip 0.2, entropy 5e-3, no value clip, no KL stop, clip 1.0, Adam eps 1e-5, He-uniform.
    ("mtppo", "mt10"): {"algo": "ppo", "method": "mtsac", "backbone": "mlp", "ppo.rollout_steps": 10_000,
                        "ppo.epochs": 16, "ppo.minibatches": 32, "ppo.gamma": 0.99, "ppo.gae_lambda": 0.97,
                        "ppo.clip": 0.2, "ppo.ent_coef": 5e-3, "ppo.vf_clip": 0.0, "ppo.target_kl": 0.0,
                        "ppo.max_grad_norm": 1.0, "ppo.adam_eps": 1e-5, "ppo.init": "he_uniform"},
}
# 2M env steps and 100k transitions per task (the examples: 2e7 / 1e6 on MT10, 1e8 / 5e6 on MT50).
PER_TASK = {"mt10": 10, "mt50": 50}


def resolve(argv):
    cfg = train.make_config(train.build_parser().parse_args(argv))
    validate(cfg)
    return cfg


def lookup(cfg, key):
    node = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("preset,suite", sorted(REFERENCE), ids=[f"{p}-{s}" for p, s in sorted(REFERENCE)])
def test_preset_resolves_to_the_reference_settings(preset, suite):
    cfg = resolve(["--suite", suite, "--method", preset])
    want = {**REFERENCE[(preset, suite)], "preset": preset,
            "total_steps": 2_000_000 * PER_TASK[suite]}
    if want["algo"] == "sac":
        want["sac.buffer_size"] = 100_000 * PER_TASK[suite]
    got = {k: lookup(cfg, k) for k in want}
    assert got == want


def test_mtsac_stays_the_single_head_mt_sac():
    cfg = resolve(["--suite", "mt10"])
    assert (cfg.preset, cfg.method, cfg.backbone, cfg.sac.init, cfg.sac.max_grad_norm) == \
        ("mtsac", "mtsac", "mlp", "torch", 0.0)
    assert "original Meta-World paper" in (ROOT / "configs/methods/mtsac.yaml").read_text()


@pytest.mark.parametrize("suite,tasks,steps,buffer", [
    ("mt1-reach-v3", 1, 2_000_000, 100_000), ("mt10", 10, 2_000_000, 100_000), ("mt25", 25, 2_000_000, 100_000),
    ("mt50", 50, 2_000_000, 100_000), ("dmc-walker", 3, 1_000_000, 1_000_000)])
def test_suite_budget_per_task(suite, tasks, steps, buffer):
    cfg = resolve(["--suite", suite, "--workers", "1"])
    assert (cfg.total_steps, cfg.sac.buffer_size) == (steps * tasks, buffer * tasks)
    assert f"({steps:,} per task; suite default)" in train.budget_line(cfg)


def test_explicit_budget_wins_over_the_suite(tmp_path):
    cfg = resolve(["--suite", "mt50", "--total-steps", "1000", "--set", "sac.buffer_size=100000"])
    assert (cfg.total_steps, cfg.sac.buffer_size) == (1000, 100000)
    assert "set explicitly" in train.budget_line(cfg)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"total_steps": 777, "sac": {"buffer_size": 300000}}))
    cfg = resolve(["--suite", "mt50", "--method", "sm", "--config", str(f)])
    assert (cfg.total_steps, cfg.sac.buffer_size, cfg.backbone_kwargs["num_modules"]) == (777, 300000, 4)
    # a flag and --set win over the preset's suite section too
    cfg = resolve(["--suite", "mt50", "--method", "sm", "--set", "backbone_kwargs.num_modules=3"])
    assert (cfg.backbone_kwargs["num_modules"], cfg.backbone_kwargs["num_layers"]) == (3, 4)


def test_preset_name_recorded_and_listed_on_bad_method(tmp_path, capsys, monkeypatch):
    cfg = resolve(["--suite", "mt10", "--method", "sm"])
    saved = to_dict(cfg)  # what config.yaml, run_info.json's config and the TEXT tab are written from
    assert (saved["preset"], saved["method"], saved["backbone"]) == ("sm", "mtsac", "softmod")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--suite", "mt10", "--method", "smm", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown method 'smm'" in err and "presets:" in err
    for p in ("mtmhsac", "sm", "moore", "care", "paco", "mtppo"):
        assert p in err.split("presets:")[1]
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="sac.init='xavier'; valid: torch, he_uniform"):
        resolve(["--suite", "mt10", "--set", "sac.init=xavier"])


# ------------------------------------------------------------------------------------- what the options do
def _sac(**kw):
    from agents.sac import MTSAC
    from mtrl.config import SACConfig

    torch.manual_seed(0)
    return MTSAC(6, 2, 3, np.ones((3, 2), np.float32), SACConfig(**kw), backbone="multihead",
                 backbone_kwargs={"width": 16, "depth": 2}, seed=0)


def _batch(T=3, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(T, B, 6, generator=g), "action": torch.rand(T, B, 2, generator=g) * 2 - 1,
            "reward": torch.randn(T, B, generator=g), "next_obs": torch.randn(T, B, 6, generator=g),
            "terminated": torch.zeros(T, B)}


def test_he_uniform_init_bounds_and_small_heads():
    ag = _sac(init="he_uniform")
    tw = ag.actor.net.trunk[0].weight  # (16, 6 + 3): fan_in 9
    assert tw.abs().max() <= math.sqrt(6 / 9) and tw.abs().max() > 0.8 * math.sqrt(6 / 9)
    assert float(ag.actor.net.trunk[0].bias.detach().abs().max()) == 0.0
    assert 0 < float(ag.actor.net.head_w.abs().max()) <= 1e-3 and float(ag.actor.net.head_b.abs().max()) <= 1e-3
    q = ag.critic.q1
    assert 1e-3 < float(q.head_w.abs().max()) <= 3e-3
    assert torch.equal(ag.critic_target.q1.head_w, q.head_w)  # the target starts as the initialised critic
    torch_init = _sac()
    assert float(torch_init.actor.net.head_w.abs().max()) > 1e-2  # "torch" leaves the backbone's own init


def test_adam_eps_reaches_the_fused_step():
    """The fused path (agents/optim.fused_adam_step) uses the group's eps: the same update as torch's Adam."""
    from agents.optim import FlatGrads, adam, guarded_step

    for eps in (1e-5, 1.0):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5) * 1e-4)
        ref = torch.nn.Parameter(p.detach().clone())
        opt, ref_opt = adam([p], 0.1, torch.device("cpu"), eps=eps), torch.optim.Adam([ref], lr=0.1, eps=eps)
        grads = FlatGrads([p])
        for step in range(3):  # steps 2-3 go through fused_adam_step's direct kernel call
            g = torch.randn(5) * 1e-3
            grads.buffer.copy_(g)
            ref.grad = g.clone()
            guarded_step(opt, torch.tensor(True), grads)
            ref_opt.step()
        assert torch.allclose(p, ref, atol=1e-7), eps
    assert _sac(adam_eps=1e-5).critic_opt.param_groups[0]["eps"] == 1e-5


def test_sm_task_weights_scale_each_task_loss():
    plain, weighted = _sac(), _sac(task_weights=True)
    with torch.no_grad():
        for ag in (plain, weighted):
            ag.log_alpha.copy_(torch.tensor([0.0, -1.0, -3.0]))
    plain.generator.manual_seed(1)
    weighted.generator.manual_seed(1)
    lp, lw = plain.losses(_batch()), weighted.losses(_batch())
    w = 3 * torch.softmax(torch.tensor([0.0, 1.0, 3.0]), 0)  # T * softmax(-log alpha)
    assert torch.allclose(lw["critic"], lp["critic"] * w, rtol=1e-5)
    assert torch.allclose(lw["actor"], lp["actor"] * w, rtol=1e-5)
    assert torch.allclose(lw["alpha"], lp["alpha"])  # the temperature loss is not reweighted
    info = weighted.update(_batch())
    assert weighted.log_alpha.grad is not None and torch.isfinite(info["critic_losses"]).all()
