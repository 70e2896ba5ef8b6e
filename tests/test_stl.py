"""--method stl: the single-task reference (one SB3 SAC per task) on real MT10 with a tiny budget."""

import json
import sys
from pathlib import Path

import pytest

from conftest import MT10, TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate  # noqa: E402
import train  # noqa: E402


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def stl_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("stl") / "run"
    rc = train.main(["--suite", "mt10", "--method", "stl", "--total-steps", "400", "--eval-every", "0",
                     "--workers", "0", "--run-dir", str(run), *TINY])
    assert rc == 0
    return run


def test_stl_mt10_per_task_results_tensorboard_and_checkpoint(stl_run):
    res = json.loads((stl_run / "results.json").read_text())
    final = res["final"]
    assert sorted(final["per_task"]) == sorted(MT10)
    assert all(0.0 <= v["success_rate"] <= 1.0 for v in final["per_task"].values())
    assert final["env_steps"] == 400 and final["updates"] == 10 * (40 - 20)  # 40 steps/task, 20 random
    assert final["success_rate"] == pytest.approx(sum(v["success_rate"] for v in final["per_task"].values()) / 10)
    assert res["config"]["method"] == "stl" and res["protocol"]["reward_version"] == "v2"
    sb3 = res["protocol"]["single_task_reference"]["sb3_kwargs"]
    assert sb3["policy_kwargs"]["net_arch"] == [32, 32] and sb3["batch_size"] == 16 and sb3["learning_starts"] == 20
    sc = _scalars(stl_run)
    for task in MT10:
        assert sc[f"eval/{task}/success_rate"] == [(400, final["per_task"][task]["success_rate"])]
        assert f"eval/{task}/return" in sc
    assert sc["eval/success_rate"][0][0] == 400
    from mtrl.checkpoint import load

    payload = load(stl_run / "checkpoint.pt")  # weights_only
    assert sorted(payload["stl_actors"]) == sorted(MT10)


def test_evaluate_py_reproduces_stl_numbers(stl_run, tmp_path):
    out = tmp_path / "e.json"
    assert evaluate.main([str(stl_run), "--tasks", "reach-v3,window-close-v3", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["per_task"]
    final = json.loads((stl_run / "results.json").read_text())["final"]["per_task"]
    assert got == {t: final[t] for t in ("reach-v3", "window-close-v3")}


def test_stl_resume_refused_and_defaults_3x400(stl_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(stl_run)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be resumed" in err
    from mtrl.config import Config
    from mtrl.stl import sb3_kwargs

    kw = sb3_kwargs(Config(method="stl", suite="mt10"), 10)
    assert kw["policy_kwargs"]["net_arch"] == [400, 400, 400] and kw["batch_size"] == 128
    assert kw["buffer_size"] == 100_000 and kw["ent_coef"] == "auto_1.0" and kw["learning_rate"] == 3e-4


@pytest.mark.slow
@pytest.mark.ray
def test_stl_ray_tasks_in_parallel(tmp_path):
    # run_stl starts (and stops) its own local Ray with address="local"; the session fixture would join any
    # cluster already running on the machine.
    run = tmp_path / "run"
    rc = train.main(["--tasks", "reach-v3,push-v3", "--method", "stl", "--total-steps", "120", "--eval-every", "60",
                     "--workers", "2", "--run-dir", str(run), *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert len(res["history"]) == 2 and sorted(res["final"]["per_task"]) == ["push-v3", "reach-v3"]
    sc = _scalars(run)
    assert [s for s, _ in sc["eval/reach-v3/success_rate"]] == [60, 120]
