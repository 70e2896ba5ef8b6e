import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "disable")
os.environ.setdefault("RAY_worker_niceness", "0")  # as mtrl.runner: workers are the learner's supply

# Tiny but real budgets: real Meta-World/DMC envs, small networks, few updates.
TINY = ["--set", "sac.learning_starts=20", "--set", "sac.batch_size=16", "--set", "backbone_kwargs.width=32",
        "--set", "backbone_kwargs.depth=2", "--set", "chunk_steps=20", "--eval-episodes", "1", "--no-progress",
        # Compiling costs 30-90 s per run on 2 cores; tests/test_device.py checks compiled against eager once.
        "--set", "compile=off"]

MT10 = ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"]


def scalars(run_dir):
    """Every scalar tag of a run's TensorBoard events: {tag: [values]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one torch thread is several times faster than two contended ones (for a module's tests)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (starting one costs 5-10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()
