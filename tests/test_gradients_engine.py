"""The task-batched Jacobian engine: equal to a loop of autograd, chunking, write-back, task-specific grads."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtrl.gradients import engine, get_method, grad_diagnostics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def one_hot(task_id: torch.Tensor, t: int) -> torch.Tensor:
    """vmap-safe one-hot of a 0-d task id."""
    return (torch.arange(t, device=task_id.device) == task_id).to(torch.float32)


class OneHotMLP(nn.Module):
    """Shared trunk on cat(x, one-hot) and a stacked per-task head (a task-specific parameter)."""

    def __init__(self, t: int, d: int = 5, h: int = 16):
        super().__init__()
        self.t = t
        self.trunk = nn.Sequential(nn.Linear(d + t, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.heads = nn.Parameter(torch.randn(t, h) * 0.3)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        z = self.trunk(torch.cat([x, one_hot(task_id, self.t).expand(x.shape[0], self.t)], dim=-1))
        return z @ torch.index_select(self.heads, 0, task_id.reshape(1))[0]


class TwinQ(nn.Module):
    """SAC-critic-like: two MLPs on cat(obs, act, one-hot)."""

    def __init__(self, t: int, obs: int = 7, act: int = 2, h: int = 32):
        super().__init__()
        self.t = t
        self.q1 = nn.Sequential(nn.Linear(obs + act + t, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.q2 = nn.Sequential(nn.Linear(obs + act + t, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, obs, act, task_id):
        x = torch.cat([obs, act, one_hot(task_id, self.t).expand(obs.shape[0], self.t)], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def mlp_problem(t=5, b=8, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = OneHotMLP(t).to(device)

    def loss_fn(p, bt, tid):
        return ((functional_call(net, p, (bt["x"], tid)) - bt["y"]) ** 2).mean()

    batch = {"x": torch.randn(t, b, 5, device=device), "y": torch.randn(t, b, device=device)}
    return net, loss_fn, batch, torch.arange(t, device=device)


def critic_problem(t=4, b=8, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = TwinQ(t).to(device)

    def loss_fn(p, bt, tid):
        q1, q2 = functional_call(net, p, (bt["obs"], bt["act"], tid))
        return ((q1 - bt["target"]) ** 2).mean() + ((q2 - bt["target"]) ** 2).mean()

    batch = {"obs": torch.randn(t, b, 7, device=device), "act": torch.rand(t, b, 2, device=device) * 2 - 1,
             "target": torch.randn(t, b, device=device)}
    return net, loss_fn, batch, torch.arange(t, device=device)


def loop_jacobian(net, loss_fn, batch, ids, names):
    params = dict(net.named_parameters())
    rows, losses = [], []
    for t in range(ids.shape[0]):
        bt = {k: v[t] for k, v in batch.items()}
        loss = loss_fn(params, bt, ids[t])
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, grads)]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem", [mlp_problem, critic_problem])
def test_jacobian_equals_loop_of_autograd(problem, device):
    net, loss_fn, batch, ids = problem(device=device)
    params = dict(net.named_parameters())
    res = engine.compute_jacobian(loss_fn, params, batch, ids)
    ref, ref_losses = loop_jacobian(net, loss_fn, batch, ids, res.shared_names)
    assert res.jacobian.shape == ref.shape
    assert res.jacobian.device.type == device
    torch.testing.assert_close(res.jacobian, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.losses, ref_losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res.gramian, ref @ ref.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"chunk_size": 1}, {"chunk_size": 2}, {"memory_budget": 4 * 500}])
def test_chunked_equals_unchunked(kw):
    net, loss_fn, batch, ids = critic_problem(t=5)
    params = dict(net.named_parameters())
    full = engine.compute_jacobian(loss_fn, params, batch, ids)
    chunked = engine.compute_jacobian(loss_fn, params, batch, ids, **kw)
    torch.testing.assert_close(chunked.jacobian, full.jacobian, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.losses, full.losses)


def test_task_specific_get_the_combined_loss_gradient():
    net, loss_fn, batch, ids = mlp_problem()
    params = dict(net.named_parameters())
    res = engine.compute_jacobian(loss_fn, params, batch, ids, task_specific={"heads"})
    assert "heads" not in res.shared_names and res.task_specific_names == ["heads"]
    # autograd of the averaged loss, for comparison
    from mtrl.gradients import task_losses

    ref = torch.autograd.grad(task_losses(loss_fn, params, batch, ids).mean(), params["heads"])[0]
    torch.testing.assert_close(res.task_specific_mean()["heads"], ref, atol=1e-6, rtol=1e-5)
    # a Jacobian method without loss weights (graddrop) writes exactly that into heads.grad
    net.zero_grad(set_to_none=True)
    get_method("graddrop", 5).backward(loss_fn, params, batch, ids, task_specific={"heads"})
    torch.testing.assert_close(params["heads"].grad, ref, atol=1e-6, rtol=1e-5)
    # a Gramian method: the gradient of sum_i w_i L_i with the weights of its shared update
    net.zero_grad(set_to_none=True)
    out = get_method("pcgrad", 5).backward(loss_fn, params, batch, ids, task_specific={"heads"})
    w = out["weights"]
    assert not torch.allclose(w, torch.full_like(w, 1 / 5))  # a case with conflicts, so the test can tell
    ref_w = torch.autograd.grad((w * task_losses(loss_fn, params, batch, ids)).sum(), params["heads"])[0]
    torch.testing.assert_close(params["heads"].grad, ref_w, atol=1e-6, rtol=1e-5)


def test_write_back_sets_then_accumulates():
    net, loss_fn, batch, ids = mlp_problem()
    params = dict(net.named_parameters())
    names = [n for n in params]
    vec = torch.randn(engine.numel(params, names))
    net.zero_grad(set_to_none=True)
    engine.write_back(params, names, vec)
    torch.testing.assert_close(engine.flatten({n: p.grad for n, p in params.items()}, names), vec)
    engine.write_back(params, names, vec)  # accumulates like autograd
    torch.testing.assert_close(engine.flatten({n: p.grad for n, p in params.items()}, names), 2 * vec)
    vec.zero_()  # the written grads own their memory
    assert all(p.grad.abs().sum() > 0 for p in params.values())
    with pytest.raises(ValueError, match="combined gradient has shape"):
        engine.write_back(params, names, torch.zeros(3))


def test_mean_aggregation_equals_mtsac_backward():
    net, loss_fn, batch, ids = critic_problem()
    params = dict(net.named_parameters())
    net.zero_grad(set_to_none=True)
    get_method("mtsac", 4).backward(loss_fn, params, batch, ids)
    ref = {n: p.grad.clone() for n, p in params.items()}
    net.zero_grad(set_to_none=True)
    res = engine.compute_jacobian(loss_fn, params, batch, ids)
    engine.write_back(params, res.shared_names, res.jacobian.mean(0))
    for n, p in params.items():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_frozen_parameters_are_left_alone():
    net, loss_fn, batch, ids = mlp_problem()
    net.trunk[0].weight.requires_grad_(False)
    params = dict(net.named_parameters())
    res = engine.compute_jacobian(loss_fn, params, batch, ids)
    assert "trunk.0.weight" not in res.shared_names
    net.zero_grad(set_to_none=True)
    get_method("upgrad", 5).backward(loss_fn, params, batch, ids)
    assert params["trunk.0.weight"].grad is None and params["trunk.2.weight"].grad is not None


def test_per_task_params_evaluate_each_task_at_its_own_point():
    net, loss_fn, batch, ids = mlp_problem(t=3)
    params = dict(net.named_parameters())
    shift = torch.randn(3, *params["trunk.0.weight"].shape) * 0.1
    res = engine.compute_jacobian(loss_fn, params, batch, ids,
                                  per_task_params={"trunk.0.weight": params["trunk.0.weight"].detach() + shift})
    for t in range(3):
        p_t = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        with torch.no_grad():
            p_t["trunk.0.weight"] += shift[t]
        loss = loss_fn(p_t, {k: v[t] for k, v in batch.items()}, ids[t])
        g = torch.autograd.grad(loss, [p_t[n] for n in res.shared_names])
        torch.testing.assert_close(res.jacobian[t], torch.cat([x.reshape(-1) for x in g]), atol=1e-5, rtol=1e-5)


def test_random_losses_are_allowed_under_vmap():
    net, _, batch, ids = mlp_problem()
    params = dict(net.named_parameters())

    def noisy(p, bt, tid):  # like the SAC actor: samples inside the loss
        x = bt["x"] + 0.01 * torch.randn_like(bt["x"])
        return ((functional_call(net, p, (x, tid)) - bt["y"]) ** 2).mean()

    res = engine.compute_jacobian(noisy, params, batch, ids)
    assert torch.isfinite(res.jacobian).all()


def test_unknown_task_specific_name_raises():
    net, loss_fn, batch, ids = mlp_problem()
    with pytest.raises(ValueError, match="not in params"):
        engine.compute_jacobian(loss_fn, dict(net.named_parameters()), batch, ids, task_specific={"nope"})


def test_grad_diagnostics():
    j = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 2.0], [0.0, 0.0]])
    d = grad_diagnostics(j @ j.T)
    assert d["cosine"].shape == (4, 4)
    torch.testing.assert_close(d["norms"], j.norm(dim=1))
    assert d["cosine"][0, 1] < 0 and d["cosine"][3, 0] == 0 and d["cosine"][0, 0] == 1
    # pairs (0,1) conflict; (1,2) cosine > 0; the zero row conflicts with nobody: 1 of 6 pairs
    assert float(d["conflict_fraction"]) == pytest.approx(1 / 6)
    assert float(grad_diagnostics(torch.ones(1, 1))["conflict_fraction"]) == 0.0


def test_non_vmappable_loss_gets_a_hint():
    net, _, batch, ids = mlp_problem()
    params = dict(net.named_parameters())

    def bad(p, bt, tid):  # F.one_hot on the task id is data-dependent under vmap(grad(...))
        oh = torch.nn.functional.one_hot(tid, 5).float()
        return (functional_call(net, p, (bt["x"], tid)).mean() + oh.sum()) ** 2

    with pytest.raises(RuntimeError, match="index_select"):
        engine.compute_jacobian(bad, params, batch, ids)
