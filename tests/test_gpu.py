"""CUDA checks (``pytest -m gpu``; skipped where torch sees no GPU). ``scripts/gpu_check.sh`` runs them with the
learner benchmark and a real run on a GPU machine in under 8 minutes. The CPU-only CI proves the same step
sync-free and device-clean on ``meta`` (tests/test_device.py); these run it for real.

First (issue 21, the most important, so a cut-off run has them): every compilable baseline preset at its real
MT10 size, compiled with ``compile=auto`` and captured as one CUDA graph, with no fallback, replaying, and equal to
the eager update."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.sac import MTSAC
from mtrl.config import SACConfig
from mtrl.gradients import available_methods
from mtrl.nets import available_backbones

from conftest import TINY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # train.py, bench_learner.py

import bench_learner  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
T, B, OBS, ACT = 4, 16, 6, 3
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def _agent(device, method="mtsac", backbone="mlp", **kw):
    torch.manual_seed(0)
    named = backbone in ("care", "cotasp")  # they read the task names' description embeddings
    bk = {"width": 32, "depth": 2, **({"suite": "mt10"} if named else {})}
    n = 10 if named else T
    return MTSAC(OBS, ACT, n, np.ones((n, ACT), np.float32), SACConfig(max_grad_norm=1.0), backbone=backbone,
                 backbone_kwargs=bk, method=method, device=device, seed=0, **kw)


def _batch(device, n=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {"obs": torch.randn(n, B, OBS, generator=g), "action": torch.rand(n, B, ACT, generator=g) * 2 - 1,
         "reward": torch.randn(n, B, generator=g), "next_obs": torch.randn(n, B, OBS, generator=g),
         "terminated": torch.zeros(n, B)}
    return {k: v.to(device) for k, v in b.items()}


# The baseline presets (issue 12) that train MT-SAC; bench_learner.case_spec("preset:<name>") builds each at its
# MT10 size (T=10, batch 10x128, obs 39, action 4) with the preset's networks and SAC settings.
# The three of the benchmark first; the others at the end of the file, after the cheap tests (a cut-off run of
# scripts/gpu_check.sh then still has those).
BASELINE_PRESETS = ["mtsac", "pcgrad", "mtmhsac"]
MORE_BASELINE_PRESETS = ["sm", "moore", "paco", "care"]
FALLBACK = re.compile(r"torch\.compile of .* failed|runs eagerly|not captured as one graph|capture of the update failed")


@pytest.fixture
def fp32_exact():
    """Full float32 matmuls while compiled and eager are compared (the runs' TF32 would blur rtol 1e-3)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("preset", BASELINE_PRESETS)
def test_preset_compiles_captures_and_matches_eager_on_cuda(preset, capfd, monkeypatch, fp32_exact):
    _check_preset(preset, capfd, monkeypatch)


def _check_preset(preset, capfd, monkeypatch):
    """(a) compile=auto builds the whole update as one compiled graph with no fallback, (b) the CUDA graph is
    captured and replayed, (c) the captured compiled update equals the eager one (rtol 1e-3) over 6 updates."""
    from agents import compiled

    monkeypatch.setenv("MTRL_COMPILE_STRICT", "1")  # a fallback raises instead of running eagerly
    eager, _ = bench_learner.sac_agent(f"preset:{preset}", None, CUDA, "off")
    if compiled.resolve("auto", CUDA, [eager.critic_method, eager.actor_method], [eager.actor, eager.critic],
                        capture=True) == "off":
        pytest.skip(f"preset {preset}: compile=auto runs it eagerly by design (not a compilable preset)")
    comp, used = bench_learner.sac_agent(f"preset:{preset}", None, CUDA, "auto", capture=True)
    assert used == "default"  # auto with the capture: Inductor's plain kernels inside our own graph
    for i in range(6):  # 1 eager (optimizer state), warm-up calls on a side stream, the capture, replays
        b = bench_learner.sac_batch(CUDA, seed=i)
        ie, ic = eager.update(b), comp.update(b)
        for k in ("critic_losses", "actor_losses", "alpha"):
            torch.testing.assert_close(ic[k], ie[k], rtol=1e-3, atol=1e-4, msg=f"{preset} update {i}: {k}")
    torch.cuda.synchronize()
    err = capfd.readouterr().err
    assert not FALLBACK.search(err), err
    assert comp._full is not None and comp._full.compiled is not None, "the one-graph update did not compile"
    g = comp.graph
    assert g is not None and g.captured and g.replays > 0, (getattr(g, "captured", None), getattr(g, "replays", None), getattr(g, "why_not", None))
    for mod_e, mod_c in ((eager.critic, comp.critic), (eager.actor, comp.actor)):
        for (name, a), c in zip(mod_e.named_parameters(), mod_c.parameters()):
            torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-4, msg=f"{preset}: {name}")
    eager.nonfinite()
    comp.nonfinite()


def test_weight_copy_for_the_broadcast_equals_policy_state_on_cuda():
    """The runner's non-blocking weight copy (mtrl/runner.py WeightCopy) ships what policy_state() does."""
    from mtrl.runner import WeightCopy

    ag = _agent(CUDA)
    copy = WeightCopy(ag.actor)
    ag.update(_batch(CUDA))
    copy.start()
    got = copy.take(wait=True)
    want = ag.policy_state()
    assert got is not None and set(got) == set(want) and not copy.pending
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    ag.update(_batch(CUDA, seed=1))  # a later update does not change the copy already taken
    np.testing.assert_array_equal(got[k], want[k])


METHODS = sorted(set(available_methods()) - {"mean", "samgs", "stl"})


@pytest.mark.parametrize("method", METHODS)
def test_50_updates_of_every_method_on_cuda(method):
    # FAMO, IGB and UW need positive losses: critic only, as their presets do (actor_method: mtsac).
    ag = _agent(CUDA, method=method, **({"actor_method": "mtsac"} if method in ("famo", "igb", "uw") else {}))
    for i in range(50):
        info = ag.update(_batch(CUDA, seed=i))
    ag.nonfinite()
    assert info["critic_losses"].is_cuda and torch.isfinite(info["critic_losses"]).all()


@pytest.mark.parametrize("backbone", sorted(available_backbones()))
def test_50_updates_and_diagnostics_of_every_backbone_on_cuda(backbone):
    ag = _agent(CUDA, method="pcgrad", backbone=backbone)
    n = ag.num_tasks
    for i in range(50):
        ag.update(_batch(CUDA, n=n, seed=i))
    ag.nonfinite()
    for mod in (ag.actor, ag.critic):
        for m in mod.modules():
            if m is not mod and callable(getattr(m, "diagnostics", None)):
                m.diagnostics()


def test_resume_cpu_to_cuda_to_cpu():
    cpu = _agent("cpu")
    cpu.update(_batch("cpu"))
    gpu = _agent(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.restore_note and "re-derived" in gpu.restore_note
    for k, v in cpu.critic.state_dict().items():
        assert torch.equal(v, gpu.critic.state_dict()[k].cpu())
    gpu.update(_batch(CUDA))
    back = _agent("cpu")
    back.load_state_dict(gpu.state_dict())
    for k, v in gpu.actor.state_dict().items():
        assert torch.equal(v.cpu(), back.actor.state_dict()[k])
    back.update(_batch("cpu"))


def test_mt10_pcgrad_300_updates_with_ray_workers_on_cuda(tmp_path):
    import train

    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--method", "pcgrad", "--device", "cuda", "--workers", "2",
                     "--total-steps", "3400", "--eval-every", "0", "--run-dir", str(run), *TINY,
                     "--set", "compile=auto"])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["updates"] >= 300
    assert json.loads((run / "run_info.json").read_text())["device"] == "cuda"


@pytest.mark.parametrize("preset", MORE_BASELINE_PRESETS)
def test_more_presets_compile_capture_and_match_eager_on_cuda(preset, capfd, monkeypatch, fp32_exact):
    _check_preset(preset, capfd, monkeypatch)
