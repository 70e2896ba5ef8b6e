"""scripts/train.py end to end on real Meta-World MT10 with every issue-4 backbone (tiny budget, in process).

One representative runs by default; the full backbone x method grid is marked slow (~30 s each on 2 cores)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402

BACKBONES = ["care", "harmony", "moe", "moore", "paco", "softmod", "t2mir"]


def _run(tmp_path, backbone, method, *extra, workers="0"):
    run = tmp_path / f"{backbone}_{method}"
    rc = train.main(["--suite", "mt10", "--backbone", backbone, "--method", method, "--total-steps", "400",
                     "--workers", workers, "--eval-every", "0", "--run-dir", str(run), *TINY, *extra])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["env_steps"] >= 400 and res["final"]["updates"] > 0
    assert len(res["final"]["per_task"]) == 10
    return run


def test_train_mt10_moe_mtsac(tmp_path):
    _run(tmp_path, "moe", "mtsac")


HIDDEN = ["--set", "backbone_kwargs.use_task_id=false", "--set", "backbone_kwargs.context_len=4",
          "--set", "log_grad_every=10"]


@pytest.mark.ray
def test_train_mt10_t2mir_task_ids_hidden_on_ray_workers(tmp_path, ray_local):
    """T2MIR's own setting: the task comes from the worker's context window; pcgrad on the per-task gradients."""
    from conftest import scalars

    run = _run(tmp_path, "t2mir", "pcgrad", *HIDDEN, workers="1")
    tags = scalars(run)
    assert "backbone/actor.net/router_contrastive_acc" in tags
    assert any(t.startswith("backbone/critic.q1/task_expert_load/") for t in tags)


def test_train_mt10_actor_reads_context_critic_gets_the_task_id(tmp_path):
    """--critic-backbone: a t2mir actor with task ids hidden beside a one-hot MLP critic (asymmetric: the critic
    is used only for learning, so it may see the task). The checkpoint holds exactly those two architectures."""
    import torch

    run = _run(tmp_path, "t2mir", "mtsac", *HIDDEN, "--critic-backbone", "mlp",
               "--set", "critic_backbone_kwargs.width=32")
    agent = torch.load(run / "checkpoint.pt", weights_only=True)["agent"]
    assert any(k.startswith("net.encoder.") for k in agent["actor"])
    assert not any("encoder" in k or "expert" in k for k in agent["critic"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
def test_train_mt10_t2mir_task_ids_hidden_in_process(tmp_path, method):
    _run(tmp_path, "t2mir", method, *HIDDEN)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_mt10_every_backbone(tmp_path, backbone, method):
    _run(tmp_path, backbone, method)
