"""issue 13 (parts 4 and 6): several environments per task spread over the workers, more workers than tasks, and
every task's equal share of env steps — with real envs, the real policy and real local Ray."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, scalars

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402


def test_a_worker_steps_its_envs_with_one_policy_call_and_evaluates_only_tasks_whose_env_0_it_holds():
    from mtrl.rollout import RolloutWorker, WorkerSpec

    def spec(env_indices):
        return WorkerSpec(suite="mt1-reach-v3", tasks=[], task_indices=[0] * len(env_indices), goal_seed=0,
                          env_seeds=[11 + j for j in env_indices], policy_seed=3, learning_starts=0,
                          start_steps=[0] * len(env_indices), backbone="mlp",
                          backbone_kwargs={"width": 16, "depth": 1}, log_std_min=-20.0, log_std_max=2.0,
                          env_indices=env_indices)

    w = RolloutWorker(spec([1, 3]))
    calls = []
    act = w.policy.act
    w.policy.act = lambda obs, *a, **k: calls.append(obs.shape) or act(obs, *a, **k)
    out = w.collect(6)
    assert calls == [(2, 39)] * 6  # one batched policy call per vector step of both envs
    assert out["obs"].shape == (2, 6, 39) and out["task_indices"] == [0, 0] and out["env_indices"] == [1, 3]
    assert not np.array_equal(out["obs"][0], out["obs"][1])  # each env its own seed: different goals and starts
    assert w.evaluate(1, eval_seed=5) == {}  # env 0 of the task is elsewhere: that worker evaluates it


def _run(tmp_path, name, *args):
    run = tmp_path / name
    try:
        rc = train.main(["--eval-every", "0", "--run-dir", str(run), *TINY, *args])
    except SystemExit as e:  # bad input: one line, exit 2
        rc = e.code
    return rc, run


def test_workers_above_the_env_slots_are_refused_not_capped(tmp_path, capsys, monkeypatch):
    rc, run = _run(tmp_path, "bad", "--suite", "mt1-reach-v3", "--workers", "5", "--envs-per-task", "4")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not run.exists()
    assert err == ["train.py: error: --workers 5 is more than the 4 environment slots (1 task(s) x envs-per-task 4); "
                   "valid: --workers 0 to 4, or raise --envs-per-task"]
    rc, _ = _run(tmp_path, "ppo", "--suite", "dmc-walker", "--algo", "ppo", "--envs-per-task", "3",
                 "--set", "ppo.rollout_steps=20", "--set", "ppo.minibatches=4")
    assert rc == 2 and "not a multiple of envs-per-task=3" in capsys.readouterr().err
    rc, _ = _run(tmp_path, "ctx", "--suite", "mt10", "--envs-per-task", "2", "--backbone", "t2mir",
                 "--set", "backbone_kwargs.use_task_id=false")
    assert rc == 2 and "cannot run with a backbone that reads contexts" in capsys.readouterr().err
    # Only an explicit --workers is refused: the default (min(slots, cores - 2), issue 21) fits the slots.
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert train.make_config(train.build_parser().parse_args(["--suite", "mt1-reach-v3"])).workers == 1
    assert train.make_config(train.build_parser().parse_args(["--suite", "mt1-reach-v3", "--envs-per-task",
                                                              "4"])).workers == 2


def test_envs_per_task_4_resume_is_bit_identical_with_in_process_worker(tmp_path):
    """Four envs of a task in the in-process worker: a run stopped at 240 env steps and resumed to 480 ends
    exactly where an uninterrupted 480-step run ends (envs mid-episode, RNGs, replay, counters)."""
    import torch

    from mtrl import checkpoint

    common = ["--suite", "mt1-reach-v3", "--workers", "0", "--envs-per-task", "4", "--checkpoint-every", "240",
              "--set", "save_replay=true"]
    assert _run(tmp_path, "a", "--total-steps", "480", *common)[0] == 0
    assert _run(tmp_path, "b", "--total-steps", "240", *common)[0] == 0
    assert train.main(["--resume", str(tmp_path / "b"), "--total-steps", "480", "--no-progress"]) == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["counters"]["env_steps"] == b["counters"]["env_steps"] == 480
    # updates_per_step=1 per vector step of all 4 envs: (480 - 20 random steps) / 4
    assert a["counters"]["updates"] == b["counters"]["updates"] == (480 - 20) // 4
    for net in ("actor", "critic", "critic_target"):
        for k, v in a["agent"][net].items():
            assert torch.equal(v, b["agent"][net][k]), (net, k)
    assert torch.equal(a["replay"]["obs"], b["replay"]["obs"])
    assert a["task_steps"].tolist() == [480]


def test_ppo_round_is_split_by_environment(tmp_path):
    """rollout_steps per task, each of its 2 envs collecting half; evaluation and results as with one env."""
    rc, run = _run(tmp_path, "ppo", "--suite", "dmc-walker", "--algo", "ppo", "--workers", "0", "--envs-per-task",
                   "2", "--total-steps", "120", "--set", "ppo.rollout_steps=20", "--set", "ppo.epochs=1",
                   "--set", "ppo.minibatches=2")
    assert rc == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["task_steps"] == {"walker-stand": 40, "walker-walk": 40, "walker-run": 40}
    assert len(res["per_task"]) == 3 and res["worker_chunks"] == [2]


def _spread_ok(res, chunk, envs_per_task):
    steps = list(res["task_steps"].values())
    assert max(steps) - min(steps) == res["env_steps_spread"] <= chunk * envs_per_task, steps


@pytest.mark.ray
@pytest.mark.slow  # ~25 s on a quiet 2-core machine, ~50 s on a busy one
def test_mt1_with_two_workers_and_four_envs_collects_on_both(tmp_path, ray_local):
    rc, run = _run(tmp_path, "mt1", "--suite", "mt1-reach-v3", "--workers", "2", "--envs-per-task", "4",
                   "--total-steps", "800")
    assert rc == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert len(res["worker_chunks"]) == 2 and min(res["worker_chunks"]) >= 2, res["worker_chunks"]
    assert abs(res["worker_chunks"][0] - res["worker_chunks"][1]) <= 1
    assert res["task_steps"]["reach-v3"] == res["env_steps"] >= 800 and list(res["per_task"]) == ["reach-v3"]


@pytest.mark.ray
@pytest.mark.slow  # 45-90 s each on a busy 2-core machine
@pytest.mark.parametrize("suite,steps", [("mt10", "3000"), ("dmc-mixed", "4200")])
def test_every_task_gets_its_share_with_two_ray_workers(tmp_path, ray_local, suite, steps):
    """Per-task env steps in results.json within one chunk (chunk_steps x envs of the task) of each other, although
    the two workers' tasks step at different speeds (without the rule dmc-mixed at 4200 steps ended 40 apart)."""
    rc, run = _run(tmp_path, suite, "--suite", suite, "--workers", "2", "--total-steps", steps)
    assert rc == 0
    res = json.loads((run / "results.json").read_text())["final"]
    _spread_ok(res, 20, 1)
    assert {"rollout/env_steps_spread", "workers/policy_time_share"} <= set(scalars(run))
