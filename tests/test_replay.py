import numpy as np
import pytest
import torch

from mtrl.replay import MultiTaskReplay


def _fill(r, task, n, start=0):
    o = np.arange(start, start + n, dtype=np.float32)[:, None].repeat(3, 1) + 1000 * task
    r.add(task, o, np.full((n, 2), task, np.float32), np.full(n, task, np.float32), o + 0.5, np.zeros(n))


def test_sample_shapes_and_per_task_separation():
    r = MultiTaskReplay(3, 50, obs_dim=3, act_dim=2, seed=0)
    for t in range(3):
        _fill(r, t, 20 + 5 * t)
    b = r.sample(8)
    assert b["obs"].shape == (3, 8, 3) and b["action"].shape == (3, 8, 2)
    assert b["reward"].shape == (3, 8) and b["terminated"].shape == (3, 8) and b["next_obs"].shape == (3, 8, 3)
    assert all(v.dtype == torch.float32 for v in b.values())
    for t in range(3):  # every row holds only its own task's transitions
        assert torch.all(b["reward"][t] == t)
        assert torch.all((b["obs"][t, :, 0] // 1000) == t)
        assert torch.all(b["obs"][t, :, 0] - 1000 * t < 20 + 5 * t)
        torch.testing.assert_close(b["next_obs"][t], b["obs"][t] + 0.5)


def test_ring_buffer_overwrites_oldest():
    r = MultiTaskReplay(1, 10, obs_dim=3, act_dim=2, seed=0)
    _fill(r, 0, 8)
    _fill(r, 0, 8, start=8)
    assert r.size[0] == 10 and len(r) == 10
    seen = set(r.sample(200)["obs"][0, :, 0].tolist())
    assert seen <= set(float(x) for x in range(6, 16)) and len(seen) > 5


def test_cannot_sample_an_empty_task_and_state_roundtrip():
    r = MultiTaskReplay(2, 10, obs_dim=3, act_dim=2)
    _fill(r, 0, 5)
    assert not r.can_sample(1)
    with pytest.raises(RuntimeError, match=r"task index\(es\) \[1\]"):
        r.sample(4)
    _fill(r, 1, 3)
    r2 = MultiTaskReplay(2, 10, obs_dim=3, act_dim=2)
    r2.load_state_dict(r.state_dict())
    np.testing.assert_array_equal(r2.obs, r.obs)
    np.testing.assert_array_equal(r2.size, r.size)
