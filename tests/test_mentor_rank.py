"""MENTOR snapshot ranking (issue 12): scale-free (TD loss relative to the variance of the TD targets, shared by
the actor and critic backbones) and the target critic perturbed with the critic."""

from __future__ import annotations

import numpy as np
import torch

from agents.sac import MTSAC
from mtrl.config import SACConfig
from mtrl.devices import DeviceCheck

KW = dict(width=8, snapshot_interval=1, perturb_interval=2, tp_set_size=2)


def agent(device="cpu", reward_scale=1.0):
    torch.manual_seed(0)
    return MTSAC(5, 2, 3, np.ones((3, 2), np.float32), SACConfig(), backbone="moe", backbone_kwargs=dict(KW),
                 seed=0, device=device)


def batch(seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(3, 4, 5, generator=g), "action": torch.rand(3, 4, 2, generator=g) * 2 - 1,
         "reward": torch.randn(3, 4, generator=g) * scale, "next_obs": torch.randn(3, 4, 5, generator=g),
         "terminated": torch.zeros(3, 4)}
    return {k: v.to(device) for k, v in b.items()}


def test_snapshot_score_is_the_relative_td_loss_for_actor_and_critic():
    ag = agent()
    info = ag.update(batch(0))
    actor_moe, critic_moe = ag.actor.net, ag.critic.q1
    assert torch.equal(actor_moe._loss_ema, critic_moe._loss_ema)  # one signal for both, as MENTOR's return
    raw = info["critic_losses"].mean().double()
    assert not torch.allclose(critic_moe._loss_ema, raw)  # not the raw TD loss


def test_relative_score_does_not_grow_with_the_reward_scale():
    """Rewards × 1000 make the raw TD loss ~1e6 × larger; the relative one does not grow (the ranking no longer
    prefers whichever snapshot saw the smallest Q scale)."""
    small, big = agent(), agent()
    raw_s = small.update(batch(0))["critic_losses"].mean()
    raw_b = big.update(batch(0, scale=1000.0))["critic_losses"].mean()
    s, b = float(small.critic.q1._loss_ema), float(big.critic.q1._loss_ema)
    assert raw_b / raw_s > 1e4
    assert b / s < 10


def test_target_critic_moves_with_the_perturbed_critic():
    ag = agent()
    ag.update(batch(0))
    q = ag.critic.q1
    target_before = {n: p.detach().clone() for n, p in ag.critic_target.q1.named_parameters()}
    ag.update(batch(1))  # the second update perturbs (perturb_interval=2)
    assert q.n_perturbations == 1 and not q._last_phi  # applied to the target, then forgotten
    # Polyak alone would move the target by tau (0.005) of the gap; the perturbation moves it by (1 - alpha) >= 5%.
    a = float(q.last_alpha)
    assert a < 1.0
    moved = sum((p - target_before[n]).abs().sum() for n, p in ag.critic_target.q1.named_parameters())
    gap = sum((p - target_before[n]).abs().sum() for n, p in q.named_parameters())
    assert moved > 0.02 * gap


def test_ranking_and_target_perturbation_are_sync_free_on_meta(one_thread):
    ag = agent(device="meta")
    with DeviceCheck():
        for n in range(2):
            ag.update(batch(n, device="meta"))
    assert ag.critic.q1.n_perturbations == 1
