"""The method objects: the backward contract, options, state, loss-weighting rules and the wrapper methods."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtrl.gradients import available_methods, engine, get_method, task_losses

T = 3


def one_hot(task_id, t):
    return (torch.arange(t) == task_id).to(torch.float32)


class Net(nn.Module):
    def __init__(self, t=T, d=4, h=12):
        super().__init__()
        self.t = t
        self.trunk = nn.Sequential(nn.Linear(d + t, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.heads = nn.Parameter(torch.randn(t, h) * 0.3)

    def forward(self, x, task_id):
        z = self.trunk(torch.cat([x, one_hot(task_id, self.t).expand(x.shape[0], self.t)], dim=-1))
        return z @ torch.index_select(self.heads, 0, task_id.reshape(1))[0]


def problem(seed=0, t=T, b=6):
    torch.manual_seed(seed)
    net = Net(t)

    def loss_fn(p, bt, tid):
        return ((functional_call(net, p, (bt["x"], tid)) - bt["y"]) ** 2).mean() + 0.05

    batch = {"x": torch.randn(t, b, 4), "y": torch.randn(t, b) * torch.arange(1, t + 1)[:, None]}
    return net, loss_fn, batch, torch.arange(t)


def run(method, net, loss_fn, batch, ids, task_specific=frozenset({"heads"})):
    net.zero_grad(set_to_none=True)
    out = method.backward(loss_fn, dict(net.named_parameters()), batch, ids, task_specific=set(task_specific))
    method.post_step()
    return out, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


KINDS = {"mtsac": "mean", "mean": "mean", "dwa": "loss", "famo": "loss", "gradnorm": "loss", "igb": "loss",
         "uw": "loss", "fsmtl": "perturbation", "samo": "perturbation", "sparse": "wrapper", "gcond": "jacobian",
         "graddrop": "jacobian", "gss": "jacobian", "samgs": "jacobian"}


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", available_methods())
def test_backward_contract(name):
    net, loss_fn, batch, ids = problem()
    m = get_method(name, T)
    assert m.kind == KINDS.get(name, "gramian")
    assert m.accepts_task_specific  # agents/sac.py passes task_specific only to methods that say so
    out, grads = run(m, net, loss_fn, batch, ids)
    assert out["losses"].shape == (T,) and not out["losses"].requires_grad
    assert set(grads) == {n for n, _ in net.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    if m.kind in ("gramian", "jacobian", "perturbation"):
        assert out["gramian"].shape == (T, T)
    if m.kind == "gramian" or name in ("dwa", "famo", "gradnorm", "igb", "uw"):
        assert out["weights"].shape == (T,)


@pytest.mark.parametrize("name", ["pcgrad", "upgrad", "famo", "sparse"])
def test_backward_accumulates_into_existing_grad(name):
    net, loss_fn, batch, ids = problem()
    torch.manual_seed(1)
    _, once = run(get_method(name, T), net, loss_fn, batch, ids)
    params = dict(net.named_parameters())
    net.zero_grad(set_to_none=True)
    for p in params.values():
        p.grad = torch.ones_like(p)
    torch.manual_seed(1)
    get_method(name, T).backward(loss_fn, params, batch, ids, task_specific={"heads"})
    for n, p in params.items():
        torch.testing.assert_close(p.grad, once[n] + 1, atol=1e-6, rtol=1e-5)


def test_wrong_number_of_tasks_raises():
    net, loss_fn, batch, ids = problem()
    with pytest.raises(ValueError, match="num_tasks=5 but got a batch with 3 tasks"):
        get_method("upgrad", 5).backward(loss_fn, dict(net.named_parameters()), batch, ids)
    with pytest.raises(ValueError, match="expects a"):
        get_method("upgrad", 3)(torch.zeros(3))


# ---------------------------------------------------------------------------------------------- options
BAD = [
    ("nope", {}, "unknown method 'nope'"),
    ("pcgrad", {"foo": 1}, "unknown option"),
    ("mtsac", {"foo": 1}, "unknown option"),
    ("cagrad", {"c": -1}, "c=-1"),
    ("cagrad", {"rescale": 3}, "rescale=3"),
    ("cagrad", {"solver": "cvxpy"}, "solver='cvxpy'"),
    ("nashmtl", {"update_weights_every": 0}, "update_weights_every=0"),
    ("nashmtl", {"max_norm": "big"}, "max_norm='big'"),
    ("gradvac", {"beta": 2.0}, "beta=2.0"),
    ("alignedmtl", {"scale_mode": "max"}, "scale_mode='max'"),
    ("graddrop", {"leak": [0.1]}, "leak=[0.1]"),
    ("gcond", {"conflict_thresholds": [0, -0.5, -0.8]}, "conflict_thresholds"),
    ("gss", {"condition": "all"}, "condition='all'"),
    ("sparse", {"fraction": 0.0}, "fraction=0.0"),
    ("sparse", {"base": "nope"}, "base='nope'"),
    ("sparse", {"base": "sparse"}, "base='sparse'"),
    ("fsmtl", {"base": "famo"}, "base='famo'"),
    ("samo", {"zo_eps": 0}, "zo_eps=0"),
    ("samo", {"base": "pcgrad", "base_kwargs": {"x": 1}}, "unknown option"),
    ("famo", {"min_losses": "a"}, "min_losses='a'"),
    ("uw", {"lr": -1}, "lr=-1"),
    ("dwa", {"iteration_window": 0}, "iteration_window=0"),
    ("igb", {"log_losses": "yes"}, "log_losses='yes'"),
    ("gradnorm", {"layer": 3}, "layer=3"),
    ("upgrad", {"chunk_size": 0}, "chunk_size=0"),
]


@pytest.mark.parametrize("name,kw,msg", BAD, ids=[f"{b[0]}-{list(b[1])}" for b in BAD])
def test_bad_options_raise_one_line(name, kw, msg):
    with pytest.raises(ValueError) as err:
        get_method(name, T, **kw)
    text = str(err.value)
    assert msg in text and "\n" not in text
    assert "valid" in text or "expected" in text


def test_bad_num_tasks():
    with pytest.raises(ValueError, match="num_tasks=0"):
        get_method("pcgrad", 0)


# ---------------------------------------------------------------------------------------------- state
STATEFUL = [("gradvac", {}), ("nashmtl", {"update_weights_every": 2}), ("gcond", {}), ("gss", {}), ("famo", {}),
            ("uw", {}), ("dwa", {"iteration_window": 1}), ("gradnorm", {}), ("igb", {"base_steps": 1}),
            ("sparse", {"base": "gradvac", "selection": "random"}), ("fsmtl", {"base": "gradvac"}),
            ("samo", {"base": "gss"})]


@pytest.mark.parametrize("name,kw", STATEFUL, ids=[s[0] for s in STATEFUL])
def test_state_dict_roundtrip_and_reset(name, kw):
    net, loss_fn, batch, ids = problem()
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    m = get_method(name, T, **kw)
    torch.manual_seed(0)
    _, first = run(m, net, loss_fn, batch, ids)
    for _ in range(3):
        run(m, net, loss_fn, batch, ids)
    state = roundtrip(m.state_dict())  # loadable with weights_only=True
    m2 = get_method(name, T, **kw)
    m2.load_state_dict(state)
    torch.manual_seed(7)
    _, a = run(m, net, loss_fn, batch, ids)
    torch.manual_seed(7)
    _, b = run(m2, net, loss_fn, batch, ids)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=f"{name}: {n} differs after load")
    # reset: behaves like a fresh instance again
    m.reset()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(init[n])
    torch.manual_seed(0)
    _, again = run(m, net, loss_fn, batch, ids)
    for n in first:
        torch.testing.assert_close(again[n], first[n], atol=1e-6, rtol=1e-5, msg=f"{name}: reset")


def test_nash_reuses_weights_between_updates():
    net, loss_fn, batch, ids = problem()
    m = get_method("nashmtl", T, update_weights_every=3, max_norm=0.0)
    out1, _ = run(m, net, loss_fn, batch, ids)
    out2, g2 = run(m, net, loss_fn, batch, ids)  # weighted backward with the same alpha, no Jacobian
    assert "gramian" in out1 and "gramian" not in out2
    torch.testing.assert_close(out1["weights"], out2["weights"])
    params = dict(net.named_parameters())
    res = engine.compute_jacobian(loss_fn, params, batch, ids, task_specific={"heads"})
    expect = engine.unflatten(engine.combine(out1["weights"], res.jacobian), params, res.shared_names)
    for n in res.shared_names:
        torch.testing.assert_close(g2[n], expect[n], atol=1e-6, rtol=1e-5)
    # heads: the gradient of sum_i alpha_i L_i (the loss the official code back-propagates), on reuse steps too
    torch.testing.assert_close(g2["heads"], res.task_specific_combined(out1["weights"])["heads"], atol=1e-6,
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------- loss weighting
def test_uw_log_variances_learn_the_loss_scale():
    m = get_method("uw", 2, lr=0.05)
    losses = torch.tensor([0.5, 8.0], requires_grad=True)
    for _ in range(400):
        total, info = m.combine(losses)
        total.backward()
        m.after_backward(losses.detach())
    # the optimum of L / (2 e^s) + s / 2 is s = log L
    torch.testing.assert_close(m.log_vars.detach(), torch.log(losses.detach()), atol=0.05, rtol=0)
    torch.testing.assert_close(info["weights"], 0.5 / losses.detach(), atol=0.05, rtol=0.1)
    # gradient reaching the network: dL/dL_i = 1 / (2 e^s_i)
    losses.grad = None
    total, _ = m.combine(losses)
    total.backward()
    torch.testing.assert_close(losses.grad, 0.5 * torch.exp(-m.log_vars.detach()))


def test_famo_weights_and_update_direction():
    m = get_method("famo", 2, w_lr=0.1, gamma=0.0)
    net, loss_fn, batch, ids = problem(t=2)
    out, _ = run(m, net, loss_fn, batch, ids)
    assert float(out["weights"].sum()) == pytest.approx(1.0, abs=1e-5)  # c z_i / D_i sums to 1
    m.reset()
    # task 0 improved 4x (in log), task 1 did not move: task 0 loses weight
    m.update(torch.tensor([1.0, 1.0]), torch.tensor([0.25, 1.0]))
    z = m.task_weights
    assert z[0] < 0.5 < z[1]
    # the logit gradient is (dz/dxi)^T delta: with z = (1/2, 1/2) it is (delta_0 - delta_1)/4 * (1, -1)
    m.reset()
    d = torch.tensor([4.0, 1.0]).log()
    g = torch.autograd.grad(torch.softmax(m.logits, 0), m.logits, grad_outputs=d)[0]
    torch.testing.assert_close(g, (d[0] - d[1]) / 4 * torch.tensor([1.0, -1.0]))


def test_famo_post_step_equals_deferred_update():
    net, loss_fn, batch, ids = problem()
    params = dict(net.named_parameters())
    init = {n: p.detach().clone() for n, p in params.items()}

    def step():  # stands for optimizer.step()
        with torch.no_grad():
            params["trunk.0.weight"].mul_(0.9)

    a, b = get_method("famo", T), get_method("famo", T)
    a.backward(loss_fn, params, batch, ids)
    step()
    a.post_step()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    b.backward(loss_fn, params, batch, ids)
    step()
    b.backward(loss_fn, params, batch, ids)  # post_step() never called: the update runs here, before the new one
    assert not torch.equal(a.logits.detach(), torch.zeros(T))
    torch.testing.assert_close(a.logits.detach(), b.logits.detach())


def test_famo_rejects_non_positive_gaps():
    m = get_method("famo", 2)
    net, _, batch, ids = problem(t=2)

    def negative(p, bt, tid):
        return -((functional_call(net, p, (bt["x"], tid)) - bt["y"]) ** 2).mean()

    params = dict(net.named_parameters())
    m.backward(negative, params, batch, ids)  # no host read in the step: a device flag is set instead
    assert bool(m.health())
    assert all(torch.isfinite(p.grad).all() for p in params.values())  # the gap is floored: finite update
    with pytest.raises(ValueError, match="needs losses > min_losses"):
        m.check()  # the periodic check reads the flag
    assert m.health() is None  # cleared by check()


def test_dwa_weights():
    m = get_method("dwa", 2, iteration_window=2, temp=2.0)
    hist = [torch.tensor([1.0, 1.0])] * 2 + [torch.tensor([0.5, 1.0])] * 2  # task 0 halves, task 1 flat
    ws = []
    for l in hist:
        _, info = m.combine(l.clone().requires_grad_(True))
        ws.append(info["weights"])
    for w in ws[:3]:  # weights stay 1 until more than one window of updates has been seen
        torch.testing.assert_close(w, torch.ones(2))
    r = torch.tensor([0.5, 1.0])  # mean(last window) / mean(previous window)
    torch.testing.assert_close(ws[-1], 2 * torch.softmax(r / 2.0, 0))
    assert ws[-1][1] > ws[-1][0]  # the task that stopped improving gets more weight
    total, info = m.combine(torch.tensor([2.0, 3.0]))
    assert float(total) == pytest.approx(float((info["weights"] * torch.tensor([2.0, 3.0])).sum()), rel=1e-5)


def test_gradnorm_grad_norms_and_weight_update():
    net, loss_fn, batch, ids = problem()
    params = dict(net.named_parameters())
    m = get_method("gradnorm", T, lr=0.05)
    out, _ = run(m, net, loss_fn, batch, ids)
    # the per-task gradient norms of the last shared matrix, against a loop of autograd
    layer = "trunk.2.weight"
    for t in range(T):
        lt = loss_fn(params, {k: v[t] for k, v in batch.items()}, ids[t])
        g = torch.autograd.grad(lt, params[layer])[0]
        assert float(out["grad_norms"][t]) == pytest.approx(float(g.norm()), rel=1e-4)
    w = m.task_weights.detach()
    assert float(w.sum()) == pytest.approx(T, rel=1e-5)
    # first update: r = 1 for every task, so the task with the largest gradient norm loses weight
    big = int(out["grad_norms"].argmax())
    assert float(w[big]) < 1.0


def test_igb_weights():
    m = get_method("igb", 2, base_steps=2)
    for l in ([1.0, 4.0], [3.0, 4.0]):
        _, info = m.combine(torch.tensor(l, requires_grad=True))
        torch.testing.assert_close(info["weights"], torch.ones(2))
    losses = torch.tensor([2.0, 2.0], requires_grad=True)  # base = (2, 4): task 0 is further from done
    total, info = m.combine(losses)
    torch.testing.assert_close(info["weights"], 2 * torch.softmax(torch.tensor([1.0, 0.5]), 0))
    total.backward()
    torch.testing.assert_close(losses.grad, info["weights"] / losses.detach())  # d/dL of w log L
    with pytest.raises(ValueError, match="log_losses"):
        m.combine(torch.tensor([-1.0, 2.0]))
    m2 = get_method("igb", 2, base_steps=1, log_losses=False)
    total, _ = m2.combine(torch.tensor([-1.0, 2.0]))
    assert float(total) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- wrappers
def test_sparse_masks_gradients_and_keeps_fraction():
    net, loss_fn, batch, ids = problem()
    m = get_method("sparse", T, fraction=0.25, base="pcgrad")
    _, g = run(m, net, loss_fn, batch, ids)
    for n, mask in m.masks.items():
        rows = mask.reshape(mask.shape[0], -1) if mask.dim() >= 2 else mask.reshape(1, -1)
        assert (rows.sum(1) == -(-rows.shape[1] // 4)).all()  # ceil(0.25 * row size) per output neuron
        assert (g[n][~mask] == 0).all()
    assert "heads" not in m.masks and g["heads"].abs().sum() > 0  # task-specific: not masked
    # with the full mask, sparse(pcgrad) == pcgrad
    full = get_method("sparse", T, fraction=1.0, base="pcgrad")
    torch.manual_seed(3)
    _, a = run(full, net, loss_fn, batch, ids)
    torch.manual_seed(3)
    _, b = run(get_method("pcgrad", T), net, loss_fn, batch, ids)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    # a loss-weighting base: masked after its backward
    _, g = run(get_method("sparse", T, fraction=0.5, base="uw"), net, loss_fn, batch, ids)
    assert any((g[n] == 0).any() for n in g if n != "heads")


def test_fsmtl_with_zero_rho_is_base_of_g():
    net, loss_fn, batch, ids = problem()
    torch.manual_seed(0)
    _, a = run(get_method("fsmtl", T, rho=0.0, base="upgrad"), net, loss_fn, batch, ids)
    _, b = run(get_method("upgrad", T), net, loss_fn, batch, ids)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_fsmtl_matches_explicit_per_task_sam():
    net, loss_fn, batch, ids = problem()
    rho = 0.05
    _, got = run(get_method("fsmtl", T, rho=rho, base="mtsac"), net, loss_fn, batch, ids, task_specific=())
    # mean over tasks of (g_i + (g_i^SAM - g_i)) = mean of per-task SAM gradients, each computed by hand
    params = dict(net.named_parameters())
    names = list(params)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(T):
        bt = {k: v[t] for k, v in batch.items()}
        g = torch.autograd.grad(loss_fn(params, bt, ids[t]), [params[n] for n in names])
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        pert = {n: (params[n].detach() + rho * x / norm).requires_grad_(True) for n, x in zip(names, g)}
        gs = torch.autograd.grad(loss_fn(pert, bt, ids[t]), [pert[n] for n in names])
        for n, x in zip(names, gs):
            acc[n] += x / T
    for n in names:
        torch.testing.assert_close(got[n], acc[n], atol=1e-5, rtol=1e-4)


def test_samo_with_zero_rho_is_base_of_g():
    net, loss_fn, batch, ids = problem()
    _, a = run(get_method("samo", T, rho=0.0, base="upgrad"), net, loss_fn, batch, ids)
    _, b = run(get_method("upgrad", T), net, loss_fn, batch, ids)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_samo_with_beta_zero_perturbs_along_the_global_gradient():
    net, loss_fn, batch, ids = problem()
    rho = 0.05
    _, got = run(get_method("samo", T, rho=rho, beta=0.0), net, loss_fn, batch, ids, task_specific=())
    params = dict(net.named_parameters())
    names = list(params)
    g0 = torch.autograd.grad(task_losses(loss_fn, params, batch, ids).mean(), [params[n] for n in names])
    norm = torch.sqrt(sum((x**2).sum() for x in g0))
    pert = {n: (params[n].detach() + rho * x / norm).requires_grad_(True) for n, x in zip(names, g0)}
    expect = torch.autograd.grad(task_losses(loss_fn, pert, batch, ids).mean(), [pert[n] for n in names])
    for n, e in zip(names, expect):
        torch.testing.assert_close(got[n], e, atol=1e-5, rtol=1e-4)
    # with the zeroth-order term the update is still finite and different
    _, got2 = run(get_method("samo", T, rho=rho, beta=0.5), net, loss_fn, batch, ids, task_specific=())
    assert all(torch.isfinite(g).all() for g in got2.values())
    assert any(not torch.allclose(got2[n], got[n]) for n in names)


def test_method_presets_build():
    import glob
    import os

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "methods")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(files) >= len(set(available_methods()) - {"mean", "samgs"})
    for f in files:
        with open(f) as fh:
            cfg = yaml.safe_load(fh)
        assert {"method", "algo", "backbone", "method_kwargs"} <= set(cfg), f
        name = os.path.basename(f)[: -len(".yaml")]
        # A preset named after a gradient method runs that method; baseline presets (issue 12: mtmhsac, sm, moore,
        # care, paco) and algorithm presets (issue 5: mtppo*) are named after the published baseline instead.
        if name in available_methods():
            assert cfg["method"] == name, f
        get_method(cfg["method"], 10, **(cfg["method_kwargs"] or {}))
