"""Every backbone is device-correct and sync-free (issue 11): built small, moved to ``meta`` and run inside
``DeviceCheck`` — forward with (B,) task ids, the aux loss, the task-batched ``vmap`` (``randomness="different"``),
``grad`` through it, ``diagnostics()`` and the ``after_step`` hooks with SAC's ctx at update counts that trigger
their periodic work. ``meta`` raises on any host read (``.item()``, ``.tolist()``, ``bool(t)``, numpy) and
``DeviceCheck`` on any op that mixes devices (a ``torch.arange(n)`` without ``device=``), so a CPU-only CI proves
what the CUDA learner needs. Plus the CPU checks of the pieces that replaced host reads."""

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mtrl.devices import DeviceCheck, DeviceMixError
from mtrl.nets import available_backbones, build_backbone
from mtrl.nets._common import Backbone

T, B, D, O = 3, 4, 5, 2
K, DT = 3, 6  # context mode of t2mir: window length, transition dim
META = torch.device("meta")
# Small sizes; the periodic hook work (moe snapshots/perturbation, harmony scores/flip) happens within 4 updates.
OPTS = {
    "mlp": dict(width=8, depth=2),
    "multihead": dict(width=8, depth=2),
    "moe": dict(width=8, num_experts=4, top_k=2, snapshot_interval=1, perturb_interval=2, tp_set_size=2),
    "t2mir": dict(width=8, task_dim=4, expert_hidden=8),
    "t2mir-context": dict(width=8, task_dim=4, expert_hidden=8, use_task_id=False, context_len=K,
                          transition_dim=DT, context_hidden=8),
    "harmony": dict(width=8, depth=3, score_interval=1, mask_interval=2, eta_max=10, total_updates=4),
    "softmod": dict(width=8, module_width=4, gating_hidden=4, num_layers=3, num_modules=2),
    "care": dict(width=8, depth=2, encoder_dim=4, context_dim=4, tasks="reach-v3,push-v3,pick-place-v3"),
    "moore": dict(width=8, depth=2, n_experts=2),
    "paco": dict(width=8, depth=2, num_param_sets=2),
    # issue 14
    "mmoe": dict(width=8, num_experts=3, exclusivity=0.4),
    "dselect": dict(width=8, num_experts=3, top_k=2),  # not a power of two: the extra penalty term runs too
    "home": dict(width=8, lora_rank=2, num_groups=2),
    "cotasp": dict(width=8, depth=2, embedding="random"),
}
UPDATES = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run faster on one thread


def build(key: str) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(key.split("-")[0], D, O, T, **OPTS[key])


def meta_batch(context: bool):
    b = {"obs": torch.randn(T, B, D, device=META), "y": torch.randn(T, B, O, device=META)}
    if context:
        b["context"] = torch.randn(T, B, K, DT, device=META)
    return b


def run_harness(bb: nn.Module) -> dict:
    """Everything an update step does with a backbone, on ``meta`` inside ``DeviceCheck``. Returns what the hooks
    returned and the diagnostics."""
    bb = bb.to(META).train()
    context = getattr(bb, "context_len", 0) > 0
    is_backbone = isinstance(bb, Backbone)
    aux = getattr(bb, "has_aux_loss", False)
    batch = meta_batch(context)
    ids = torch.arange(T, device=META)
    contrast = batch["context"][:, :2] if context else None
    params = dict(bb.named_parameters())

    def loss_one(p, b, t, *, contrast=None):  # one task's loss, as agents/sac.py writes them
        kw = {"context": b["context"]} if "context" in b else {}
        if aux:
            out, a = functional_call(bb, p, (b["obs"], t), {"return_aux": True, "contrast": contrast, **kw}
                                     if context else {"return_aux": True})
        else:
            out, a = functional_call(bb, p, (b["obs"], t), kw), 0.0
        return (out - b["y"]).pow(2).mean() + a

    loss_fn = functools.partial(loss_one, contrast=contrast)
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    out = {"returns": []}
    with DeviceCheck() as dc:
        flat = {"context": batch["context"].reshape(T * B, K, DT)} if context else {}
        y = bb(batch["obs"].reshape(T * B, D), ids.repeat_interleave(B), **flat)  # mixed (B,) task ids
        assert y.shape == (T * B, O) and y.device == META
        if is_backbone:
            kw = {"contrast": contrast, **flat} if context else {}
            y2, a = bb(batch["obs"].reshape(T * B, D), ids.repeat_interleave(B), return_aux=True, **kw)
            assert y2.shape == (T * B, O) and a.dim() == 0 and a.device == META
        losses = vmap(loss_fn, in_dims=(None, 0, 0), randomness="different")(params, batch, ids)
        assert losses.shape == (T,) and losses.device == META
        g = grad(lambda p: vmap(loss_fn, in_dims=(None, 0, 0), randomness="different")(p, batch, ids).sum())(params)
        assert set(g) == set(params) and all(v.device == META for v in g.values())
        per_task = vmap(grad(loss_fn), in_dims=(None, 0, 0), randomness="different")(params, batch, ids)
        assert all(v.shape == (T, *params[n].shape) for n, v in per_task.items())
        if callable(getattr(bb, "after_step", None)):
            for n in range(UPDATES):
                if n == UPDATES - 2:  # Adam moments of this backbone (moe's perturbation drops them)
                    for p in bb.parameters():
                        opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p)}
                ctx = {"role": "critic", "num_updates": n, "loss_fn": loss_fn, "batch": batch,
                       "params": dict(bb.named_parameters()), "task_ids": ids, "info": {"losses": losses.detach()},
                       "optimizer": opt, "ok": torch.ones((), dtype=torch.bool, device=META)}
                r = bb.after_step(ctx)
                assert isinstance(r, bool)  # from host-side schedule information only
                out["returns"].append(r)
        if callable(getattr(bb, "diagnostics", None)):
            out["diag"] = bb.diagnostics()
    assert dc.ops > 0
    out["opt"] = opt
    return out


def test_every_registered_backbone_has_small_options():
    assert set(available_backbones()) <= {k.split("-")[0] for k in OPTS}


@pytest.mark.parametrize("key", sorted(OPTS))
def test_backbone_is_device_correct_and_sync_free_on_meta(key):
    bb = build(key)
    res = run_harness(bb)
    if isinstance(bb, Backbone):
        d = res["diag"]
        assert d, f"{key}: no diagnostics after an update"
        for k, v in d.items():
            assert isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.device == META
                                                   and not v.requires_grad), (k, v)
    if key == "harmony":  # scores every update, a flip at update 2 (eta(2) > 0), none at 4 (eta(4) = 0)
        assert res["returns"] == [False, True, False, False] and bb.flips > 0
    if key == "moe":  # snapshots at every update, perturbations at 2 and 4; this backbone's moments dropped
        assert bb.n_perturbations == 2 and bb.last_alpha.device == META
        assert not any(p in res["opt"].state for p in bb.parameters())
    if key == "paco":
        assert bb.resets.device == META
    if key == "t2mir":
        assert bb.target_w1.device == META


class _HostReadingDiagnostics(Backbone):
    """A backbone whose diagnostics break the rules: the suite must fail if such a call comes back."""

    def __init__(self, bad: str) -> None:
        super().__init__(D, O, T)
        self.bad = bad
        self.lin = nn.Linear(D, O)

    def forward(self, x, task_id, return_aux=False):
        out = self.lin(x)
        return (out, out.new_zeros(())) if return_aux else out

    def _diagnostics(self, x, task_id):
        m = self.per_task_mean(x.sum(1), task_id)
        if self.bad == "arange":
            return {"weighted": m * torch.arange(self.num_tasks)}  # no device=: a CPU tensor beside meta
        return {"any_nan": bool(torch.isnan(m).any())}                # a host read (.item())


def test_the_harness_catches_device_mixing_and_host_reads():
    with pytest.raises(DeviceMixError):
        run_harness(_HostReadingDiagnostics("arange"))
    with pytest.raises(RuntimeError, match="meta tensors"):
        run_harness(_HostReadingDiagnostics("item"))


# --- CPU checks of the sync-free replacements ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["harmony", "paco"])
def test_dense_mixed_task_forward_equals_per_task_groups(key):
    """Off the host CPU, mixed (B,) ids run the dense form (every row its own task's weights, no host read); on the
    CPU each task's rows run separately. Both give the same outputs."""
    bb = build(key)
    x = torch.randn(4 * T, D)
    ids = torch.randperm(4 * T) % T
    grouped = bb(x, ids)                 # CPU: per-task groups
    dense = bb._forward_tasks(x, ids)    # what CUDA/meta run
    torch.testing.assert_close(dense, grouped, atol=1e-5, rtol=1e-5)


def test_moe_snapshot_set_keeps_the_best_in_slot_order():
    bb = build_backbone("moe", D, O, T, width=8, num_experts=4, top_k=2, tp_set_size=2)
    kept = []
    for score in (1.0, 3.0, 2.0, 0.5, math.nan, 4.0):
        bb.add_snapshot(torch.tensor(score))
        kept.append([s for s, _ in bb.snapshots()])
    # fill in order; then replace the worst when better; a non-finite score is never kept
    assert kept == [[1.0], [1.0, 3.0], [2.0, 3.0], [2.0, 3.0], [2.0, 3.0], [4.0, 3.0]]
    with torch.no_grad():
        w0 = bb.head.weight.clone()
        bb.head.weight.add_(1.0)
    bb.add_snapshot(torch.tensor(5.0))  # replaces 3.0 (the worst); the bank holds the live weights then
    snaps = bb.snapshots()
    assert [s for s, _ in snaps] == [4.0, 5.0]
    torch.testing.assert_close(snaps[1][1]["head.weight"], w0 + 1.0)
    torch.testing.assert_close(snaps[0][1]["head.weight"], w0)


def test_hook_state_outside_buffers_follows_to():
    """moe's snapshot bank and harmony's score EMAs move with the module, as its buffers do."""
    moe, har = build("moe"), build("harmony")
    batch = {"obs": torch.randn(T, B, D), "y": torch.randn(T, B, O)}

    def loss_fn(p, b, t):
        return (functional_call(har, p, (b["obs"], t)) - b["y"]).pow(2).mean()

    for bb in (moe, har):
        bb.after_step({"batch": batch, "task_ids": torch.arange(T), "info": {"losses": torch.ones(T)},
                       "loss_fn": loss_fn, "params": dict(bb.named_parameters())})
    assert moe._bank and har._ema_g
    moe.to(META), har.to(META)
    assert all(v.device == META for d in (moe._bank, har._ema_g, har._ema_g2) for v in d.values())
    assert moe._loss_ema.device == META


def test_harmony_scores_skip_non_finite_gradients_and_skipped_steps():
    bb = build("harmony")
    g = {i: torch.randn(T, *bb.mask(i).shape[1:]) for i in bb.masked}
    bb.update_scores(g, torch.tensor(True))
    before = {i: (bb._ema_g[i].clone(), bb._ema_g2[i].clone()) for i in bb.masked}
    bb.update_scores(g, torch.tensor(False))                                  # a skipped step
    bb.update_scores({i: x.clone().fill_(math.nan) for i, x in g.items()})   # non-finite gradients
    for i in bb.masked:
        assert torch.equal(bb._ema_g[i], before[i][0]) and torch.equal(bb._ema_g2[i], before[i][1])
    bb.update_scores(g)  # a valid step again: the EMA of a constant stays put
    torch.testing.assert_close(bb._ema_g[bb.masked[0]], g[bb.masked[0]])
    torch.testing.assert_close(bb._ema_g2[bb.masked[0]], g[bb.masked[0]].pow(2))


def test_moe_loss_ema_skips_non_finite_means():
    bb = build_backbone("moe", D, O, T, width=8, num_experts=4, top_k=2, loss_ema=0.5)
    for losses in (torch.full((T,), 2.0), torch.tensor([1.0, math.inf, 0.0]), torch.zeros(T)):
        bb._update_loss_ema(losses)
    assert float(bb._loss_ema) == 1.0 and bb._loss_ema.dtype == torch.float64  # 2 -> (skip) -> 0.5·2 + 0.5·0


def test_paco_reset_on_device_matches_rules():
    torch.manual_seed(0)
    bb = build("paco")
    w = bb.task_w.detach().clone()
    bb.after_step({"info": {"losses": torch.tensor([1.0, math.nan, 5e3])}})
    new = bb.task_w.detach()
    assert int(bb.resets) == 2 and torch.equal(new[0], w[0])
    for t in (1, 2):  # a convex combination of the one healthy task's vector: that vector itself
        torch.testing.assert_close(new[t], w[0])
    bb.after_step({"info": {"losses": torch.full((T,), math.inf)}})  # all extreme: every other task's vectors
    assert int(bb.resets) == 5 and torch.allclose(bb.task_w.sum(1), torch.ones(T), atol=1e-5)
