"""mtrl: the core of the multi-task RL suite. The Python API (README *Python API*) is ``mtrl.train``,
``mtrl.load``, ``mtrl.evaluate`` (``mtrl/api.py``) and ``mtrl.envs.register_suite``; they are imported on first
use, so ``import mtrl.config`` and the rollout workers do not pay for them."""

_API = ("train", "load", "evaluate", "Policy")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "envs":
        import importlib

        return importlib.import_module("mtrl.envs")
    raise AttributeError(f"module 'mtrl' has no attribute {name!r}")


__all__ = list(_API) + ["envs"]
