"""The Python API (mtrl/api.py): the README snippet runs as written and acts with the loaded policy; the API takes
the CLI's checks; registered suites (envs/custom.py) train."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import scalars

ROOT = Path(__file__).resolve().parent.parent


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-snippet[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its api-snippet block"
    return m.group(1)


def test_readme_snippet_trains_loads_acts_and_evaluates(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_snippet(), "README.md (api-snippet)", "exec"), scope)
    results, policy = scope["results"], scope["policy"]
    run = Path(results["run_dir"])
    assert (tmp_path / run / "results.json").is_file() and (tmp_path / run / "checkpoint.pt").is_file()
    final = results["final"]
    assert sorted(final["per_task"]) == ["MountainCarContinuous-v0", "Pendulum-v1"]
    assert math.isnan(final["success_rate"]) and math.isfinite(final["return"])  # return only: no success there
    # The snippet's act(): the task's own sizes (Pendulum: 3 -> 1), within the policy's range.
    assert scope["action"].shape == (1,) and np.all(np.abs(scope["action"]) <= 1.0)
    # The same observation padded to the suite's size gives the same action; a batch of mixed tasks pads actions.
    padded = np.zeros(policy.suite.obs_dim, np.float32)
    padded[:3] = scope["obs"]
    assert np.array_equal(policy.act(padded, 0), scope["action"])
    both = policy.act(np.stack([padded, padded]), ["Pendulum-v1", "MountainCarContinuous-v0"])
    # A batch of 2 goes through other BLAS kernels than a single row (MKL picks them by size and thread count), so
    # the same row agrees to float rounding, not bit for bit (it differed in the last bit on this machine).
    assert both.shape == (2, policy.suite.act_dim)
    np.testing.assert_allclose(both[0, 0], scope["action"][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown task 'nope'; valid: Pendulum-v1"):
        policy.act(scope["obs"], "nope")
    # mtrl.evaluate reproduces the run's final evaluation (same protocol, same seeds).
    again = __import__("mtrl").evaluate(tmp_path / run)
    assert again["return"] == pytest.approx(final["return"])
    sc = scalars(tmp_path / run)
    assert "eval/Pendulum-v1/return" in sc and not any(k.endswith("success_rate") for k in sc)


def test_api_bad_settings_raise_the_cli_line_and_write_nothing(tmp_path, monkeypatch):
    import mtrl
    from mtrl.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^seed=-1 must be >= 0$"):
        mtrl.train(suite="mt10", seed=-1, run_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="unknown config key 'sac.batchsize'"):
        mtrl.train(suite="mt10", sac={"batchsize": 3})
    with pytest.raises(ValueError, match="no such run directory"):
        mtrl.load(tmp_path / "none")
    assert list(tmp_path.iterdir()) == []


def test_registered_suite_trains_with_its_builders(tmp_path, one_thread):
    import gymnasium as gym

    import mtrl
    from envs.custom import _REGISTERED

    try:
        suite = mtrl.envs.register_suite("test-pendulums", {
            "light": lambda: gym.make("Pendulum-v1", g=5.0, max_episode_steps=50),
            "heavy": lambda: gym.make("Pendulum-v1", g=15.0, max_episode_steps=50)})
        assert suite.task_names == ["light", "heavy"] and [t.horizon for t in suite.tasks] == [50, 50]
        with pytest.raises(ValueError, match="already registered"):
            mtrl.envs.register_suite("test-pendulums", [lambda: gym.make("Pendulum-v1")])
        with pytest.raises(ValueError, match="Discrete"):
            mtrl.envs.register_suite("test-cartpole", [lambda: gym.make("CartPole-v1")])
        with pytest.raises(ValueError, match="taken or invalid"):
            mtrl.envs.register_suite("mt10", [lambda: gym.make("Pendulum-v1")])
        res = mtrl.train(suite="test-pendulums", workers=0, total_steps=200, eval_episodes=1, compile="off",
                         progress=False, run_dir=str(tmp_path / "run"),
                         sac={"learning_starts": 20, "batch_size": 16}, backbone_kwargs={"width": 16, "depth": 1})
        assert sorted(res["final"]["per_task"]) == ["heavy", "light"]
        assert res["final"]["task_steps"] == {"light": 100, "heavy": 100}
        assert res["protocol"]["horizon"] == {"light": 50, "heavy": 50}
        # Different gravity, same seeds: the builders really made different envs.
        p = mtrl.load(res["run_dir"])
        r = {t: mtrl.evaluate(res["run_dir"], tasks=[t])["return"] for t in ("light", "heavy")}
        assert r["light"] != r["heavy"] and p.act(np.zeros(3), "heavy").shape == (1,)
    finally:
        _REGISTERED.pop("test-pendulums", None)


@pytest.mark.slow
@pytest.mark.ray
def test_registered_suite_builders_travel_to_ray_workers(tmp_path, ray_local):
    """A registered suite exists only in the registering process: Ray workers get its builders pickled."""
    import gymnasium as gym

    import mtrl
    from envs.custom import _REGISTERED

    try:
        mtrl.envs.register_suite("test-ray-pendulums", {
            "light": lambda: gym.make("Pendulum-v1", g=5.0, max_episode_steps=50),
            "heavy": lambda: gym.make("Pendulum-v1", g=15.0, max_episode_steps=50)})
        res = mtrl.train(suite="test-ray-pendulums", workers=2, total_steps=200, eval_episodes=1, compile="off",
                         progress=False, run_dir=str(tmp_path / "run"), chunk_steps=20,
                         sac={"learning_starts": 20, "batch_size": 16}, backbone_kwargs={"width": 16, "depth": 1})
        assert res["final"]["task_steps"] == {"light": 100, "heavy": 100}
        assert res["final"]["per_task"]["light"]["return"] != res["final"]["per_task"]["heavy"]["return"]
    finally:
        _REGISTERED.pop("test-ray-pendulums", None)
