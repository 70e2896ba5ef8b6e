import numpy as np
import pytest

from agents.sac import MTSAC
from envs import get_suite
from mtrl.config import SACConfig
from mtrl.rollout import RolloutWorker, WorkerPool, WorkerSpec, split_envs


def _spec(suite, tasks, indices, learning_starts=0, seed=0):
    return WorkerSpec(suite=suite, tasks=[], task_indices=indices, goal_seed=0,
                      env_seeds=[seed * 100 + i for i in indices], policy_seed=seed, learning_starts=learning_starts,
                      start_steps=[0] * len(indices), backbone="mlp", backbone_kwargs={"width": 16, "depth": 1},
                      log_std_min=-20.0, log_std_max=2.0)


def test_split_envs_round_robin_covers_every_env_slot_once():
    sl = split_envs(10, 3)
    assert [[t for t, _ in s] for s in sl] == [list(range(i, 10, 3)) for i in range(3)]  # as before issue 13
    sl = split_envs(2, 3, envs_per_task=4)  # more workers than tasks: a task's envs spread over them
    assert sorted(x for s in sl for x in s) == [(t, j) for t in range(2) for j in range(4)]
    assert [len(s) for s in sl] == [3, 3, 2] and all(len({t for t, _ in s}) == 2 for s in sl)
    assert split_envs(1, 2, 4) == [[(0, 0), (0, 2)], [(0, 1), (0, 3)]]
    with pytest.raises(ValueError, match="3 workers for 2 env slots"):
        split_envs(2, 3)


def test_worker_truncation_keeps_true_final_observation():
    w = RolloutWorker(_spec("mt1-reach-v3", [], [0], learning_starts=10**9))
    out = w.collect(501)
    obs, nxt, term = out["obs"][0], out["next_obs"][0], out["terminated"][0]
    np.testing.assert_array_equal(nxt[:499], obs[1:500])  # continuity inside the episode
    assert not np.array_equal(nxt[499], obs[500])  # step 500 truncates: next_obs is the final obs, not the reset
    assert term.sum() == 0  # truncation is not termination: the learner bootstraps
    assert len(out["episodes"]) == 1 and out["episodes"][0][0] == 0 and out["episodes"][0][3] == 500


def test_random_actions_then_policy_actions_respect_padding_mask():
    s = get_suite("dmc-mixed")
    cart = s.task_names.index("cartpole-swingup")
    w = RolloutWorker(_spec("dmc-mixed", [], [cart], learning_starts=5))
    out = w.collect(10)
    a = out["action"][0]
    assert np.all(a[:, 1:] == 0)  # cartpole has one real action dimension
    assert np.all(np.abs(a[:, 0]) <= 1)


def test_warm_up_runs_no_policy_forward_and_chunks_report_where_the_time_went():
    w = RolloutWorker(_spec("mt1-reach-v3", [], [0, 0], learning_starts=4))
    calls = []
    act = w.policy.act
    w.policy.act = lambda *a, **k: calls.append(1) or act(*a, **k)
    out = w.collect(6)  # 4 random steps per env (no forward: its actions would all be discarded), then 2 with it
    assert len(calls) == 2
    assert np.all(np.abs(out["action"]) <= 1)
    assert 0 < out["time_policy"] and 0 < out["time_env"]


@pytest.mark.ray
def test_two_ray_workers_deliver_transitions_from_every_task(ray_local):
    s = get_suite("mt10")
    specs = [_spec("mt10", [], [t for t, _ in sl], seed=i) for i, sl in enumerate(split_envs(10, 2))]
    pool = WorkerPool(specs, use_ray=True)
    try:
        agent = MTSAC(s.obs_dim, s.act_dim, 10, s.action_mask, SACConfig(), backbone_kwargs={"width": 16, "depth": 1})
        pool.broadcast(agent.policy_state())
        pids = set(ray_local.get([w.ping.remote() for w in pool.workers]))
        assert len(pids) == 2  # two separate actor processes
        for i in pool.idle():
            pool.submit_collect(i, 5)
        got = {}
        while pool.pending:
            for _, res in pool.ready(block=True):
                for k, t in enumerate(res["task_indices"]):
                    got[t] = res["obs"][k].shape
        assert sorted(got) == list(range(10))
        assert all(shape == (5, 39) for shape in got.values())
    finally:
        pool.shutdown()
