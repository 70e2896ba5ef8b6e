import numpy as np
import pytest

from envs import DMC_SUITES, DMC_TASKS, get_suite, make_env, metaworld_task_names


def test_mt10_task_list_and_shapes():
    s = get_suite("mt10")
    assert s.task_names == ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
                            "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3",
                            "window-close-v3"]
    assert (s.obs_dim, s.act_dim, s.kind) == (39, 4, "metaworld")
    assert s.action_mask.all()


def test_mt25_mt50_and_mt1():
    assert get_suite("mt25").num_tasks == 25
    s50 = get_suite("mt50")
    assert s50.num_tasks == 50 and sorted(s50.task_names) == sorted(metaworld_task_names())
    assert all(n.endswith("-v3") for n in s50.task_names)
    assert get_suite("mt1-reach-v3").task_names == ["reach-v3"]


def test_custom_tasks_and_errors():
    assert get_suite(None, ["push-v3", "reach-v3"]).task_names == ["push-v3", "reach-v3"]
    with pytest.raises(ValueError, match="unknown suite 'mt11'.*valid: mt10"):
        get_suite("mt11")
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach-v2'"):
        get_suite(None, ["reach-v2"])
    with pytest.raises(ValueError, match="unknown Meta-World task 'nope'"):
        get_suite("mt1-nope")


def test_dmc_suites_shapes_and_padding():
    assert get_suite("dmc-walker").task_names == ["walker-stand", "walker-walk", "walker-run"]
    assert get_suite("dmc-cheetah-walker").task_names == ["cheetah-run", "walker-walk", "walker-run"]
    mixed = get_suite("dmc-mixed")
    assert mixed.num_tasks >= 6 and len({n.split("-")[0] for n in mixed.task_names}) >= 4
    assert mixed.obs_dim == max(DMC_TASKS[n][0] for n in mixed.task_names)
    assert mixed.act_dim == max(DMC_TASKS[n][1] for n in mixed.task_names)
    assert mixed.action_mask.sum(1).tolist() == [DMC_TASKS[n][1] for n in mixed.task_names]


@pytest.mark.parametrize("name", sorted({t for ts in DMC_SUITES.values() for t in ts} | {"quadruped-run"}))
def test_dmc_declared_dims_match_real_env(name):
    # quadruped-run exercises dm_control's np.in1d call (removed in numpy 2.4; we pin numpy<2.4).
    from envs.dmc import DMCEnv

    env = DMCEnv(name, seed=0)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (DMC_TASKS[name][0],)
    assert env.action_space.shape == (DMC_TASKS[name][1],)
    obs, r, te, tr, _ = env.step(np.zeros(env.action_space.shape))
    assert np.isfinite(obs).all() and np.isfinite(r)


def test_padding_wrapper_pads_obs_and_drops_padded_actions():
    s = get_suite("dmc-mixed")
    cart = s.task_names.index("cartpole-swingup")
    env = make_env(s.tasks[cart], s.obs_dim, s.act_dim, goal_seed=0, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (s.obs_dim,) and obs.dtype == np.float32
    assert np.all(obs[5:] == 0)  # cartpole has 5 real observation dims
    a = np.zeros(s.act_dim, np.float32)
    a[1:] = 1.0  # padded dims are ignored: same result as all zeros
    o1, *_ = env.step(a)
    env2 = make_env(s.tasks[cart], s.obs_dim, s.act_dim, goal_seed=0, seed=0)
    env2.reset(seed=0)
    o2, *_ = env2.step(np.zeros(s.act_dim, np.float32))
    np.testing.assert_array_equal(o1, o2)


def test_metaworld_env_truncates_at_500_and_resamples_goals():
    s = get_suite("mt1-reach-v3")
    env = make_env(s.tasks[0], s.obs_dim, s.act_dim, goal_seed=0, seed=0)
    goals = set()
    for _ in range(2):
        obs, _ = env.reset()
        goals.add(tuple(np.round(obs[-3:], 5)))
        for t in range(500):
            obs, r, te, tr, info = env.step(env.action_space.sample())
            assert not te  # Meta-World never terminates during training (terminate_on_success off)
            assert tr == (t == 499)
        assert "success" in info
    assert len(goals) == 2  # a new goal on every reset


def test_dmc_time_limit_is_truncation_not_termination():
    s = get_suite("dmc-walker")
    env = make_env(s.tasks[0], s.obs_dim, s.act_dim, goal_seed=0, seed=0)
    env.reset(seed=0)
    for t in range(1000):
        _, _, te, tr, _ = env.step(np.zeros(s.act_dim, np.float32))
        assert not te
    assert tr
