"""Sync-free, device-correct task-combination methods (issue 11).

``meta`` tensors raise on every host synchronisation (``.item()``, ``bool()``, ``.cpu()``, numpy) and ``DeviceCheck``
raises when an op mixes devices, so a method whose ``backward`` + ``post_step`` run on ``meta`` inside ``DeviceCheck``
needs no host round trip and no CPU tensor on a CUDA learner. Plus: the vectorised device PCGrad / GradVac equal
their sequential definitions given the same orders, and IMTL-G / Aligned-MTL equal torchjd 0.18's weightings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mtrl.devices import DeviceCheck, DeviceMixError
from mtrl.gradients import get_method
from mtrl.gradients._orders import random_orders
from mtrl.gradients.alignedmtl import aligned_weights
from mtrl.gradients.gradvac import gradvac_weights
from mtrl.gradients.imtl import imtl_weights
from mtrl.gradients.pcgrad import PCGrad, pcgrad_weights

SYNC_FREE = ["mtsac", "pcgrad", "imtl", "alignedmtl", "gradvac", "graddrop", "config", "dwa", "uw", "famo"]
# Exact float64 solvers: active-set / Newton iterations whose steps depend on the data (numpy, on the host). Each
# keeps ONE T x T copy of the Gramian to the host and the T weights back per update (GramianMethod.host_solver).
EXEMPT = {
    "mgda": "primal active-set QP on the simplex (solvers.mgda_weights)",
    "upgrad": "T active-set NNQPs in cosine coordinates (solvers.upgrad_weights)",
    "dualproj": "active-set NNQP in cosine coordinates (solvers.dualproj_weights)",
    "cagrad": "active-set projected Newton / SLSQP / SGD on the simplex (solvers.cagrad_weights)",
    "nashmtl": "Newton's method on the Nash potential to convergence (solvers.nash_weights)",
}


def _one_hot(task_id: torch.Tensor, t: int) -> torch.Tensor:
    return (torch.arange(t, device=task_id.device) == task_id).to(torch.float32)


class MLP(nn.Module):
    def __init__(self, t: int, d: int = 5, h: int = 8):
        super().__init__()
        self.t = t
        self.net = nn.Sequential(nn.Linear(d + t, h), nn.Tanh(), nn.Linear(h, 1))

    def forward(self, x, task_id):
        return self.net(torch.cat([x, _one_hot(task_id, self.t).expand(x.shape[0], self.t)], -1)).squeeze(-1)


def meta_problem(t: int = 3, b: int = 4):
    net = MLP(t).to("meta")

    def loss_fn(p, bt, tid):  # one task's loss (positive: FAMO and UW assume it)
        return ((functional_call(net, p, (bt["x"], tid)) - bt["y"]) ** 2).mean() + 1e-3

    batch = {"x": torch.randn(t, b, 5, device="meta"), "y": torch.randn(t, b, device="meta")}
    return net, loss_fn, batch, torch.arange(t, device="meta")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ------------------------------------------------------------------------------------------------ sync-free on meta
@pytest.mark.parametrize("persistent_grads", [False, True], ids=["grad-None", "grad-persistent"])
@pytest.mark.parametrize("name", SYNC_FREE)
def test_backward_and_post_step_are_sync_free_on_meta(name, persistent_grads):
    t = 3
    net, loss_fn, batch, ids = meta_problem(t)
    params = dict(net.named_parameters())
    if persistent_grads:  # the agent's layout: one flat buffer per network, .grad tensors are views of it
        flat = torch.zeros(sum(p.numel() for p in params.values()), device="meta")
        i = 0
        for p in params.values():
            p.grad = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
    m = get_method(name, t)
    m.set_generator(torch.Generator().manual_seed(0))  # a CPU generator serves the meta device
    with DeviceCheck() as mode:
        for _ in range(2):  # the second call runs with the state of the first (FAMO's pending update, DWA, UW)
            out = m.backward(loss_fn, params, batch, ids)
            m.post_step()
    assert mode.ops > 0
    for p in params.values():
        assert p.grad is not None and p.grad.device.type == "meta"
    if persistent_grads:
        for p in params.values():
            assert p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # written in place
    assert out["losses"].shape == (t,)
    for v in _tensors(out):  # everything the step reports stays on the device
        assert v.device.type == "meta", name
    health = m.health()
    assert health is None or health.device.type == "meta"


def test_harness_catches_a_host_sync():
    class SyncingPCGrad(PCGrad):
        def weights(self, gramian):
            if float(gramian[0, 0].item()) > 0:  # a data-dependent Python branch: a host sync
                return super().weights(gramian)
            return super().weights(gramian)

    net, loss_fn, batch, ids = meta_problem()
    with pytest.raises((RuntimeError, NotImplementedError)):
        with DeviceCheck():
            SyncingPCGrad(3).backward(loss_fn, dict(net.named_parameters()), batch, ids)


def test_harness_catches_a_cpu_tensor_on_the_device():
    class MixingPCGrad(PCGrad):
        def weights(self, gramian):
            return super().weights(gramian) * torch.ones(gramian.shape[0], dtype=gramian.dtype)  # CPU (T,)

    net, loss_fn, batch, ids = meta_problem()
    with pytest.raises(DeviceMixError):
        with DeviceCheck():
            MixingPCGrad(3).backward(loss_fn, dict(net.named_parameters()), batch, ids)


@pytest.mark.parametrize("name", sorted(EXEMPT))
def test_exempt_methods_keep_one_host_copy(name):
    m = get_method(name, 3)
    assert m.host_solver, f"{name} is listed as exempt but does not declare its host copy"
    net, loss_fn, batch, ids = meta_problem()
    with pytest.raises((RuntimeError, NotImplementedError)):  # the T x T host copy cannot read meta data
        m.backward(loss_fn, dict(net.named_parameters()), batch, ids)


def test_every_gramian_method_is_classified():
    from mtrl.gradients import GramianMethod, available_methods

    for n in available_methods():
        m = get_method(n, 3)
        if isinstance(m, GramianMethod):
            assert (n in EXEMPT) == m.host_solver, n
            assert n in EXEMPT or n in SYNC_FREE, n


# ------------------------------------------------------------------------------------------------ PCGrad / GradVac
def pcgrad_loop(j: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the PCGrad paper, task by task, on the gradients themselves."""
    d = torch.zeros_like(j[0])
    for i in range(j.shape[0]):
        g = j[i].clone()
        for k in orders[i].tolist():
            dot = g @ j[k]
            if dot < 0:
                g = g - dot / (j[k] @ j[k]) * j[k]
        d = d + g
    return d


@pytest.mark.parametrize("t,p", [(2, 5), (3, 4), (3, 2), (6, 9)])
def test_device_pcgrad_equals_the_loop_given_the_same_orders(t, p):
    gen = torch.Generator().manual_seed(t * 10 + p)
    for _ in range(20):
        j = torch.randn(t, p, generator=gen, dtype=torch.float64)
        j = j * 10 ** (torch.rand(t, 1, generator=gen, dtype=torch.float64) * 4 - 2)
        orders = random_orders(t, gen, torch.device("cpu"))
        d = j.T @ pcgrad_weights(j @ j.T, orders)
        torch.testing.assert_close(d, pcgrad_loop(j, orders), atol=1e-10, rtol=1e-10)


def test_random_orders_are_permutations_of_the_other_tasks():
    t = 7
    orders = random_orders(t, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert orders.shape == (t, t - 1)
    for i in range(t):
        assert sorted(orders[i].tolist()) == [k for k in range(t) if k != i]
    firsts = torch.stack([random_orders(3, None, torch.device("cpu"))[0, 0] for _ in range(400)])
    assert 0.35 < float((firsts == 1).double().mean()) < 0.65  # both orders of the other two tasks occur


def test_pcgrad_generator_makes_it_reproducible():
    j = torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(2):
        m = get_method("pcgrad", 6)
        m.set_generator(torch.Generator().manual_seed(42))
        torch.manual_seed(len(outs))  # the global RNG must not matter
        outs.append(m(j))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_set_generator_reaches_inner_methods():
    m = get_method("sparse", 3, base="pcgrad")
    g = torch.Generator()
    m.set_generator(g)
    assert m.base.generator is g


def _torchjd_orders(t: int, seed: int) -> torch.Tensor:
    """The orders torchjd 0.18's GradVacWeighting draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    rows = []
    for i in range(t):
        others = [k for k in range(t) if k != i]
        rows.append([others[x] for x in torch.randperm(t - 1).tolist()])
    return torch.tensor(rows)


def test_device_gradvac_equals_torchjd_given_the_same_orders():
    from torchjd.aggregation import GradVacWeighting

    gen = torch.Generator().manual_seed(1)
    for t in (2, 3, 5):
        ref = GradVacWeighting(beta=0.5, eps=1e-8)
        phi = torch.zeros(t, t, dtype=torch.float64)
        for call in range(4):  # the EMA targets carry over
            j = torch.randn(t, 7, generator=gen, dtype=torch.float64)
            g = j @ j.T
            orders = _torchjd_orders(t, 100 + call)
            w, phi = gradvac_weights(g, phi, orders, 0.5, 1e-8)
            torch.manual_seed(100 + call)
            expect = ref(g)
            torch.testing.assert_close(w, expect, atol=1e-10, rtol=1e-8)
            torch.testing.assert_close(phi, ref._phi_t, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ IMTL-G / Aligned-MTL
def gramians():
    gen = torch.Generator().manual_seed(7)
    out = []
    for t, p in [(1, 3), (2, 5), (3, 7), (5, 9), (8, 20), (10, 40), (6, 3), (10, 4)]:  # P < T: rank-deficient
        j = torch.randn(t, p, generator=gen, dtype=torch.float64)
        j = j * 10 ** (torch.rand(t, 1, generator=gen, dtype=torch.float64) * 4 - 2)
        out.append(j @ j.T)
    j = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    j[1] = 3.0 * j[0]  # duplicate direction
    j[2] = 0.0  # a zero gradient
    out.append(j @ j.T)
    out.append(torch.zeros(3, 3, dtype=torch.float64))
    return out


def test_device_imtl_equals_torchjd():
    from torchjd.aggregation import IMTLGWeighting

    ref = IMTLGWeighting()
    for g in gramians():
        torch.testing.assert_close(imtl_weights(g), ref(g), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_device_alignedmtl_equals_torchjd(scale_mode):
    from torchjd.aggregation import AlignedMTLWeighting

    ref = AlignedMTLWeighting(scale_mode=scale_mode)
    for g in gramians():
        t = g.shape[0]
        expect = ref(g) * t  # torchjd averages (B 1/T), the official code sums (B 1)
        # torchjd cuts the rank with the Gramian's dtype eps: our "float64" cutoff
        torch.testing.assert_close(aligned_weights(g, scale_mode, "float64"), expect, atol=1e-6, rtol=1e-6)
