"""End-to-end: scripts/train.py on real Meta-World MT10 with a tiny budget."""

import json
import sys
from pathlib import Path

import pytest

from conftest import MT10, TINY, scalars as _scalars

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402




def test_mt10_mtsac_in_process_writes_tensorboard_and_results(tmp_path):
    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--method", "mtsac", "--total-steps", "1200", "--workers", "0",
                     "--eval-every", "600", "--run-dir", str(run), "--set", "log_every=5", *TINY])
    assert rc == 0
    sc = _scalars(run)
    for task in MT10:
        assert len(sc[f"eval/{task}/success_rate"]) == 2  # the mid-run and the final evaluation
        assert f"eval/{task}/return" in sc and f"train/{task}/alpha" in sc
    for tag in ("eval/success_rate", "train/critic_loss", "train/actor_loss", "train/alpha_loss", "time/fps",
                "time/updates_per_s"):
        assert tag in sc, tag
    res = json.loads((run / "results.json").read_text())
    assert sorted(res["final"]["per_task"]) == sorted(MT10)
    assert all(0.0 <= v["success_rate"] <= 1.0 for v in res["final"]["per_task"].values())
    assert res["protocol"]["reward_version"] == "v2" and res["protocol"]["horizon"]["reach-v3"] == 500
    assert len(res["history"]) == 2 and res["final"]["env_steps"] >= 1200
    info = json.loads((run / "run_info.json").read_text())
    assert info["versions"]["metaworld"] == "3.1.1" and info["git_commit"]
    assert (run / "config.yaml").is_file() and (run / "checkpoint.pt").is_file()


@pytest.mark.ray
def test_mt10_with_two_ray_workers_and_resume(tmp_path, ray_local):
    run = tmp_path / "run"
    args = ["--suite", "mt10", "--total-steps", "800", "--workers", "2", "--eval-every", "0",
            "--run-dir", str(run), *TINY]
    assert train.main(args) == 0
    first = json.loads((run / "results.json").read_text())["final"]
    assert first["env_steps"] >= 800
    # Extend the same run: counters continue from the checkpoint.
    assert train.main(["--resume", str(run), "--total-steps", "1600", "--no-progress"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["env_steps"] >= 1600 and res["final"]["updates"] > first["updates"]
    assert len(res["history"]) == 2


# One method per code path of the learner in the default run (plain mean; device-side Gramian with the update's
# generator; host float64 solver with state; loss weighting with its own actor method and deferred check; a
# layer-specific method; a Jacobian method without Gramian weights; a wrapper). The others run in the slow set: each
# method's update itself is pinned by tests/test_gradients_*.py and, on `meta`, by tests/test_device_methods.py, so
# 17 more ~10 s runs of the same loop would buy little and cost the CI's time budget.
E2E_DEFAULT = {"mtsac", "pcgrad", "nashmtl", "famo", "gradnorm", "gss", "sparse"}


def _methods():
    from mtrl.gradients import available_methods

    return [m if m in E2E_DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in available_methods()]


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_end_to_end_on_mt10(method, tmp_path):
    """Issue 3: `scripts/train.py --suite mt10 --method NAME` with a tiny budget, grad diagnostics on (every method
    in the slow set, E2E_DEFAULT in the default run)."""
    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--method", method, "--total-steps", "400", "--workers", "0",
                     "--eval-every", "0", "--run-dir", str(run), "--set", "log_grad_every=3", *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert sorted(res["per_task"]) == sorted(MT10) and res["updates"] > 0


@pytest.mark.ray
def test_learner_runs_inside_a_ray_actor_when_placed_there(tmp_path, ray_local):
    """`learner_placement=actor` (what `auto` picks on a cluster with a GPU, then with num_gpus=1)."""
    import os

    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--total-steps", "400", "--workers", "1", "--eval-every", "0",
                     "--run-dir", str(run), "--set", "learner_placement=actor", *TINY])
    assert rc == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["learner"]["pid"] != os.getpid()  # the learner ran in another process: the actor
    assert json.loads((run / "results.json").read_text())["final"]["updates"] > 0
