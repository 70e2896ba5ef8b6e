import math

import numpy as np
import pytest
import torch
from torch import nn

from agents.sac import MTSAC, squash
from mtrl.config import SACConfig

LOG2PI_HALF = 0.5 * math.log(2 * math.pi)


def _agent(T=2, obs=3, act=2, mask=None, **kw):
    torch.manual_seed(0)
    mask = np.ones((T, act), bool) if mask is None else mask
    return MTSAC(obs, act, T, mask, SACConfig(**kw), backbone_kwargs={"width": 8, "depth": 1}, seed=0)


def _constant(module, value):
    """Zero every weight and set the last layer's bias: the network outputs `value` everywhere."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        list(module.parameters())[-1].fill_(value)


def test_squash_logprob_hand_values_and_torch_distributions():
    mean = torch.zeros(1, 2)
    log_std = torch.zeros(1, 2)
    a, logp = squash(mean, log_std, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert a.tolist() == [[0.0, 0.0]]
    assert logp.item() == pytest.approx(-LOG2PI_HALF, abs=1e-6)  # one real dim, u=0: log N(0;0,1) - log(1-0)
    # Against torch.distributions: Normal pushed through tanh.
    g = torch.Generator().manual_seed(0)
    mean, log_std, eps = (torch.randn(5, 3, generator=g) for _ in range(3))
    a, logp = squash(mean, log_std * 0.3, eps, torch.ones(5, 3))
    u = mean + (log_std * 0.3).exp() * eps
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, (log_std * 0.3).exp()),
        [torch.distributions.transforms.TanhTransform()]).log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(logp, ref, atol=1e-3, rtol=1e-4)


def test_critic_loss_hand_values():
    ag = _agent()
    _constant(ag.critic.q1, 1.0)
    _constant(ag.critic.q2, 3.0)
    b = {"obs": torch.zeros(2, 3), "action": torch.zeros(2, 2), "target": torch.tensor([0.0, 2.0])}
    loss = ag.critic_loss_one(dict(ag.critic.named_parameters()), b, torch.tensor(0))
    # 0.5 * (mean((1-0)^2, (1-2)^2) + mean((3-0)^2, (3-2)^2)) = 0.5 * (1 + 5)
    assert loss.item() == pytest.approx(3.0)


def _actor_unit_std(ag):
    """Actor with mean 0 and log_std exactly 0 everywhere (bias through the tanh rescaling)."""
    _constant(ag.actor.net, 0.0)
    lo, hi = ag.cfg.log_std_min, ag.cfg.log_std_max
    z = math.atanh((0.0 - lo) / (0.5 * (hi - lo)) - 1.0)
    with torch.no_grad():
        list(ag.actor.net.parameters())[-1][ag.act_dim:] = z


def test_actor_loss_hand_values_with_padding_mask():
    mask = np.array([[True, True], [True, False]])
    ag = _agent(mask=mask)
    _actor_unit_std(ag)
    _constant(ag.critic.q1, 1.0)
    _constant(ag.critic.q2, 2.0)
    cp = {k: v.detach() for k, v in ag.critic.named_parameters()}
    for task, n_real in ((0, 2), (1, 1)):
        b = {"obs": torch.zeros(4, 3), "eps": torch.zeros(4, 2), "mask": torch.tensor(mask[task], dtype=torch.float32),
             "alpha": torch.tensor(0.5)}
        loss = ag.actor_loss_one(dict(ag.actor.named_parameters()), b, torch.tensor(task), critic_params=cp)
        # a = 0, log pi = -n_real * log(sqrt(2 pi)), min Q = 1
        assert loss.item() == pytest.approx(0.5 * (-n_real * LOG2PI_HALF) - 1.0, abs=1e-5)
    assert ag.target_entropy.tolist() == [-2.0, -1.0]


def test_targets_bootstrap_unless_terminated():
    ag = _agent(gamma=0.9)
    _actor_unit_std(ag)
    _constant(ag.critic_target.q1, 5.0)
    _constant(ag.critic_target.q2, 4.0)
    batch = {"reward": torch.tensor([[1.0, 1.0], [2.0, 2.0]]), "terminated": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
             "next_obs": torch.zeros(2, 2, 3)}
    alpha = torch.tensor([0.0, 0.0])  # no entropy term: y = r + gamma * (1 - d) * min(Q1', Q2')
    y = ag.compute_targets(batch, alpha, torch.randn(4, 2))
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.9 * 4.0, 1.0], [2.0, 2.0 + 0.9 * 4.0]]))


def _batch(T, B, obs=3, act=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(T, B, obs, generator=g), "action": torch.rand(T, B, act, generator=g) * 2 - 1,
            "reward": torch.randn(T, B, generator=g), "next_obs": torch.randn(T, B, obs, generator=g),
            "terminated": torch.zeros(T, B)}


def test_per_task_losses_shape_and_independence():
    ag = _agent(T=3)
    b = _batch(3, 5)
    ag.generator.manual_seed(1)
    l1 = ag.losses(b)
    assert all(v.shape == (3,) for v in l1.values())
    b2 = {k: v.clone() for k, v in b.items()}
    b2["reward"][2] += 10.0
    b2["obs"][2] += 1.0
    ag.generator.manual_seed(1)
    l2 = ag.losses(b2)
    for k in l1:  # another task's data never leaks into a task's loss
        torch.testing.assert_close(l1[k][:2], l2[k][:2])
    assert not torch.allclose(l1["critic"][2], l2["critic"][2])


def test_vmapped_losses_equal_a_loop_over_tasks():
    ag = _agent(T=3)
    b = _batch(3, 5)
    cb = {"obs": b["obs"], "action": b["action"], "target": b["reward"]}
    params = dict(ag.critic.named_parameters())
    from mtrl.gradients import task_losses

    vm = task_losses(ag.critic_loss_one, params, cb, ag.task_ids)
    loop = torch.stack([ag.critic_loss_one(params, {k: v[t] for k, v in cb.items()}, torch.tensor(t))
                        for t in range(3)])
    torch.testing.assert_close(vm, loop)


def test_update_moves_networks_alpha_and_targets():
    ag = _agent(T=2)
    before = {k: v.clone() for k, v in ag.critic.state_dict().items()}
    tgt_before = {k: v.clone() for k, v in ag.critic_target.state_dict().items()}
    alpha_before = ag.log_alpha.detach().clone()
    info = ag.update(_batch(2, 8))
    assert info["critic_losses"].shape == (2,) and info["actor_losses"].shape == (2,)
    assert any(not torch.equal(before[k], v) for k, v in ag.critic.state_dict().items())
    assert any(not torch.equal(tgt_before[k], v) for k, v in ag.critic_target.state_dict().items())
    assert (ag.log_alpha.detach() != alpha_before).all()  # each task's temperature moved
    assert ag.num_updates == 1


def test_nan_reward_skips_the_step_on_the_device_and_the_check_names_the_task():
    from agents.sac import NonFiniteLoss

    ag = _agent(T=3)
    b = _batch(3, 4)
    b["reward"][1, 2] = float("nan")
    ag.update(_batch(3, 4))  # one good step first, so the optimizer has moments to keep
    before = {k: v.clone() for k, v in ag.critic.state_dict().items()}
    opt_before = {k: v.clone() for k, v in ag.critic_opt.state_dict()["state"][0].items()}
    ag.update(b)  # no host sync inside the step: it does not raise
    for k, v in ag.critic.state_dict().items():  # the optimizer did not step
        assert torch.equal(before[k], v)
    for k, v in ag.critic_opt.state_dict()["state"][0].items():  # nor did its moments or step count
        assert torch.equal(opt_before[k], v), k
    assert all(torch.isfinite(p).all() for p in ag.actor.parameters())
    with pytest.raises(NonFiniteLoss, match="non-finite critic loss for task index 1") as e:
        ag.nonfinite()  # the loop's periodic host check
    assert e.value.count == 1
    ag.nonfinite()  # read once: the record is cleared
    ag.update(_batch(3, 4))  # a good batch steps again
    assert any(not torch.equal(before[k], v) for k, v in ag.critic.state_dict().items())


def test_non_finite_gradient_with_finite_losses_skips_the_step():
    from agents.sac import NonFiniteLoss

    ag = _agent(T=2)
    b = _batch(2, 4)
    with torch.no_grad():  # tiny first layer, huge last layer: Q ~ 1e17 (loss ~ 1e34, finite), dL/dW1 overflows
        w = list(ag.critic.q1.parameters())
        w[0].mul_(1e-4)
        w[1].zero_()
        w[-2].fill_(1e21)
    before = {k: v.clone() for k, v in ag.critic.state_dict().items()}
    ag.update(b)
    with pytest.raises(NonFiniteLoss) as e:
        ag.nonfinite()
    assert (e.value.loss, e.value.kind, e.value.task) == ("critic", "gradient", None)
    for k, v in ag.critic.state_dict().items():
        assert torch.equal(before[k], v)


def test_fused_adam_step_equals_torch_adam_step_and_skips_on_found_inf():
    from agents.optim import fused_adam_step

    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.Adam(a.parameters(), lr=1e-2, eps=1e-5, fused=True)
    ob = torch.optim.Adam(b.parameters(), lr=1e-2, eps=1e-5, fused=True)
    for i in range(4):
        x = torch.randn(8, 4)
        for m in (a, b):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        skip = torch.tensor(float(i == 2))
        oa.found_inf = skip
        oa.step()
        fused_adam_step(ob, skip)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
        for sa, sb in zip(oa.state.values(), ob.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(next(iter(ob.state.values()))["step"]) == 3.0  # the skipped step did not count
