"""CUDA checks (``pytest -m gpu``; skipped where torch sees no GPU). ``scripts/gpu_check.sh`` runs them with the
learner benchmark on a GPU machine in under 8 minutes. The CPU-only CI proves the same step sync-free and
device-clean on ``meta`` (tests/test_device.py); these run it for real."""

from __future__ import annotations

import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # train.py

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


@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
def test_compiled_agrees_with_eager_on_cuda(method):
    eager, comp = _agent(CUDA, method=method), _agent(CUDA, method=method)
    assert comp.compile("auto") == "reduce-overhead"
    for i in range(3):
        b = _batch(CUDA, seed=i)
        ie, ic = eager.update(b), comp.update(b)
        torch.testing.assert_close(ic["critic_losses"], ie["critic_losses"], rtol=1e-3, atol=1e-4)
    for a, c in zip(eager.critic.parameters(), comp.critic.parameters()):
        torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-4)


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
