"""Ray for the trainers: the embedded local cluster or a joined one, where the learner runs, and SIGTERM.

One ``start_ray`` serves the off-policy and on-policy trainers, the learner actor and the single-task reference
(``mtrl/stl.py``), so every embedded cluster is started the same way.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any, Dict, Optional

from .config import Config


def check_address(address: Optional[str], timeout: float = 5.0) -> None:
    """ConfigError unless something listens at ``--address`` (``host:port`` or ``ray://host:port``; ``auto`` is
    left to Ray, which fails fast when no cluster runs here). ``ray.init`` would retry a dead address for minutes."""
    import socket

    from .config import ConfigError

    if not address or address in ("auto", "local"):
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"--address {address!r}: no Ray cluster answers at {host}:{port} ({why}); start one there "
                          "with `ray start --head`, or drop --address for a local run") from None


def start_ray(cfg: Config, extra_cpus: int = 0) -> bool:
    """Connect to ``cfg.address``, or start an embedded local Ray sized to the machine; False if Ray was already
    initialised here (nothing started). ``extra_cpus``: room for actors beside the workers (the learner actor)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.address:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True)
        return True
    # Never fewer CPUs than the workers ask for, or the actors would wait forever for resources.
    cpus = max(os.cpu_count() or 1, math.ceil(cfg.workers * cfg.worker_cpus)) + extra_cpus
    # Workers import this project: point them at the checkout even when it is not pip-installed.
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    # Ray starts workers at niceness 15; on one machine the learner then starves its own data source whenever
    # anything else is busy. Rollout workers are the learner's supply, not background work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # The dashboard is off unless asked for, and then serves on loopback only. address="local": always a fresh
    # embedded cluster, never a leftover one that happens to run here.
    ray.init(address="local", num_cpus=cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True, object_store_memory=256 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


class _LearnerActor:
    """Runs a whole trainer inside a Ray actor, so the learner can sit on a cluster node that has the GPU."""

    def train(self, trainer_cls: type, cfg: Config, run_dir: Path, resume: Optional[Dict[str, Any]]):
        return trainer_cls(cfg, run_dir, resume=resume).train()


def learner_in_actor(cfg: Config) -> bool:
    """Where the learner runs: "driver" (this process), "actor" (a Ray actor), or "auto" (an actor holding a GPU
    when joining a cluster that has one and the device is not "cpu"; otherwise this process)."""
    if cfg.learner_placement != "auto":
        return cfg.learner_placement == "actor"
    if not cfg.address or cfg.device == "cpu":
        return False
    import ray

    start_ray(cfg)
    return ray.cluster_resources().get("GPU", 0) > 0


def train_placed(trainer_cls: type, cfg: Config, run_dir: Path, resume: Optional[Dict[str, Any]] = None):
    """``trainer_cls(cfg, run_dir, resume).train()`` here, or in a Ray actor asking for ``num_gpus=1`` when the
    learner wants CUDA (``--device cuda``, or ``auto`` with a GPU in the cluster). The actor's exceptions reach the
    caller as their own types (Ray re-raises them as subclasses of the cause)."""
    if not learner_in_actor(cfg):
        return trainer_cls(cfg, run_dir, resume=resume).train()
    import ray

    start_ray(cfg, extra_cpus=1)  # a local cluster gets room for the learner actor beside the workers
    gpus = 1 if cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0) else 0
    actor = ray.remote(num_cpus=1, num_gpus=gpus)(_LearnerActor).remote()
    ref = actor.train.remote(trainer_cls, cfg, Path(run_dir), resume)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref)  # the actor's SIGINT path saves a checkpoint where Ray can deliver it
        raise


def install_sigterm() -> Any:
    """SIGTERM -> KeyboardInterrupt (so the run saves a checkpoint). Returns the previous handler, or None when not
    in the main thread (e.g. inside a threaded Ray actor), where no handler can be installed."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        return None


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
