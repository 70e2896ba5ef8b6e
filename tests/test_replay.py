import numpy as np
import pytest
import torch

import mtrl.replay as replay_mod
from mtrl.devices import DeviceCheck
from mtrl.replay import DeviceReplay, MultiTaskReplay, make_replay, replay_bytes

STORAGES = {"numpy": lambda T, C, seed=0: MultiTaskReplay(T, C, obs_dim=3, act_dim=2, seed=seed),
            "device-cpu": lambda T, C, seed=0: DeviceReplay(T, C, obs_dim=3, act_dim=2, device="cpu", seed=seed)}


@pytest.fixture(params=list(STORAGES))
def make(request):
    return STORAGES[request.param]


def _fill(r, task, n, start=0):
    o = np.arange(start, start + n, dtype=np.float32)[:, None].repeat(3, 1) + 1000 * task
    r.add(task, o, np.full((n, 2), task, np.float32), np.full(n, task, np.float32), o + 0.5, np.zeros(n))


def _stream(r, seed=0):
    """The same irregular history in any storage: chunks of several sizes, one task wrapped, one chunk > C."""
    g = np.random.default_rng(seed)
    for task, n in [(0, 3), (1, 7), (0, 9), (2, 1), (1, 4), (0, 2), (2, 25), (1, 0)]:
        r.add(task, g.normal(size=(n, 3)).astype(np.float32), g.normal(size=(n, 2)).astype(np.float32),
              g.normal(size=n).astype(np.float32), g.normal(size=(n, 3)).astype(np.float32),
              (g.random(n) < 0.3).astype(np.float32))
    return r


def test_sample_shapes_and_per_task_separation(make):
    r = make(3, 50)
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


def test_ring_buffer_overwrites_oldest(make):
    r = make(1, 10)
    _fill(r, 0, 8)
    _fill(r, 0, 8, start=8)
    assert r.size[0] == 10 and len(r) == 10
    seen = set(r.sample(200)["obs"][0, :, 0].tolist())
    assert seen <= set(float(x) for x in range(6, 16)) and len(seen) > 5
    _fill(r, 0, 23, start=100)  # a chunk larger than the ring: only its newest 10 survive
    assert set(r.sample(200)["obs"][0, :, 0].tolist()) == set(float(x) for x in range(113, 123))


def test_cannot_sample_an_empty_task_and_state_roundtrip(make):
    r = make(2, 10)
    _fill(r, 0, 5)
    assert not r.can_sample(1)
    with pytest.raises(RuntimeError, match=r"task index\(es\) \[1\]"):
        r.sample(4)
    _fill(r, 1, 3)
    assert r.can_sample(3) and not r.can_sample(4) and len(r) == 8
    r2 = make(2, 10)
    r2.load_state_dict(r.state_dict())
    np.testing.assert_array_equal(r2.obs, r.obs)
    np.testing.assert_array_equal(r2.size, r.size)


def test_device_storage_holds_what_numpy_holds_and_gathers_the_same_batch_and_contexts():
    a, d = _stream(MultiTaskReplay(3, 8, 3, 2, seed=1)), _stream(DeviceReplay(3, 8, 3, 2, "cpu"))
    np.testing.assert_array_equal(d.pos, a.pos)
    np.testing.assert_array_equal(d.size, a.size)
    assert list(a.size) == [8, 8, 8] and list(a.pos) == [5, 3, 1]  # all wrapped; 0 and 2 got chunks > C
    for name in ("obs", "action", "reward", "next_obs", "terminated"):
        np.testing.assert_array_equal(d.__dict__[name].numpy(), getattr(a, name))
    idx = a.draw(64)
    for K in (0, 1, 3, 10):  # K > C: the window reaches round the ring; entries before the oldest stay zero
        want, got = a.gather(idx, context_len=K), d.gather(torch.from_numpy(idx), context_len=K)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (K, k)
        if K:
            np.testing.assert_array_equal(d.contexts(torch.from_numpy(idx), K).numpy(), a.contexts(idx, K))
    # a young ring (nothing overwritten yet) pads the front of early windows
    a, d = MultiTaskReplay(1, 8, 3, 2), DeviceReplay(1, 8, 3, 2, "cpu")
    for r in (a, d):
        _fill(r, 0, 5)
    idx = np.arange(5)[None]
    np.testing.assert_array_equal(d.contexts(torch.from_numpy(idx), 4).numpy(), a.contexts(idx, 4))


def test_device_sampling_is_uniform_per_task_and_seeded_by_the_generator():
    d = DeviceReplay(2, 50, 3, 2, "cpu", seed=3)
    _fill(d, 0, 5)
    _fill(d, 1, 70)  # wrapped: 50 filled
    idx = d.draw(20_000)
    for t, n in ((0, 5), (1, 50)):
        counts = torch.bincount(idx[t], minlength=n)
        assert len(counts) == n and counts.min() > 0
        assert (counts.float() / 20_000 - 1 / n).abs().max() < 0.25 / n  # ~uniform over the filled slots
    b1 = d.sample(16, context_len=2, generator=torch.Generator().manual_seed(7))
    b2 = d.sample(16, context_len=2, generator=torch.Generator().manual_seed(7))
    b3 = d.sample(16, context_len=2, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(b1[k], b2[k]) for k in b1) and not torch.equal(b1["obs"], b3["obs"])
    # without a generator: the replay's own, seeded by `seed`
    e, f, g = (DeviceReplay(2, 50, 3, 2, "cpu", seed=s) for s in (4, 4, 5))
    for r in (e, f, g):
        r.load_state_dict(d.state_dict())
    assert torch.equal(e.draw(32), f.draw(32)) and not torch.equal(e.draw(32), g.draw(32))


def test_state_dict_moves_between_the_two_storages():
    a = _stream(MultiTaskReplay(3, 8, 3, 2))
    d = DeviceReplay(3, 8, 3, 2, "cpu")
    d.load_state_dict(a.state_dict())
    sa, sd = a.state_dict(), d.state_dict()
    assert list(sa) == list(sd)
    for k in sa:
        assert sd[k].device.type == "cpu" and sd[k].dtype == sa[k].dtype and torch.equal(sd[k], sa[k]), k
    idx = a.draw(32)
    want, got = a.gather(idx, context_len=3), d.gather(torch.from_numpy(idx), context_len=3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and back, into a numpy replay that has never seen data
    b = MultiTaskReplay(3, 8, 3, 2)
    b.load_state_dict(d.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(v, sa[k]), k
    # a young buffer's checkpoint holds only the filled part
    y = DeviceReplay(2, 100, 3, 2, "cpu")
    _fill(y, 0, 4)
    assert y.state_dict()["obs"].shape == (2, 4, 3)


def test_meta_device_sample_has_no_host_sync_and_no_device_mixing():
    d = DeviceReplay(3, 16, 3, 2, "meta")
    for t in range(3):
        _fill(d, t, 5 + 7 * t)  # task 2 wraps
    assert d.can_sample(5) and len(d) == 5 + 12 + 16  # host mirrors, no device read
    with DeviceCheck() as check:  # meta raises on any host sync; the mode raises on any op mixing devices
        b = d.sample(4, context_len=3)
        b2 = d.sample(4, generator=None)
    assert check.ops > 0
    assert {v.device.type for v in (*b.values(), *b2.values())} == {"meta"}
    assert b["obs"].shape == (3, 4, 3) and b["reward"].shape == (3, 4)
    assert b["context"].shape == b["next_context"].shape == (3, 4, 3, 2 * 3 + 2 + 2)


def test_make_replay_picks_the_storage(monkeypatch):
    assert type(make_replay("cpu", "cpu", 2, 10, 3, 2)) is MultiTaskReplay
    assert type(make_replay("auto", "cpu", 2, 10, 3, 2)) is MultiTaskReplay
    with pytest.raises(ValueError, match="replay_device='gpu'; valid: auto, cpu, cuda"):
        make_replay("gpu", "cpu", 2, 10, 3, 2)
    assert round(replay_bytes(10, 100_000, 39, 4) / 1e6) == 336  # MT10 at 1M transitions
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^replay_device=cuda: no CUDA device is visible to torch; valid here"):
            make_replay("cuda", "cpu", 2, 10, 3, 2)
    # auto on a CUDA learner: on the device when buffer + headroom fit in free memory, else numpy
    built = []
    monkeypatch.setattr(replay_mod, "DeviceReplay", lambda *a, **k: built.append(a[4]) or "device")
    need = replay_bytes(10, 100_000, 39, 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (need + 2 * 10**9, 8 * 10**9))
    assert make_replay("auto", "cuda:0", 10, 100_000, 39, 4) == "device" and built == [torch.device("cuda:0")]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (need + 10**9, 8 * 10**9))
    assert type(make_replay("auto", "cuda:0", 10, 100_000, 39, 4)) is MultiTaskReplay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_storage_gathers_what_numpy_does_without_syncing():
    a, d = _stream(MultiTaskReplay(3, 8, 3, 2)), _stream(DeviceReplay(3, 8, 3, 2, "cuda"))
    idx = a.draw(64)
    want, got = a.gather(idx, context_len=3), d.gather(torch.from_numpy(idx).cuda(), context_len=3)
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
    d.sample(4, context_len=3)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = d.sample(16, context_len=3, generator=torch.Generator("cuda").manual_seed(0))
        d.add(0, *(np.ones((5, k), np.float32) for k in (3, 2)), np.ones(5, np.float32), np.ones((5, 3), np.float32),
              np.zeros(5, np.float32))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert b["obs"].device.type == "cuda"
    c = MultiTaskReplay(3, 8, 3, 2)
    c.load_state_dict(d.state_dict())
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in c.state_dict().items())
