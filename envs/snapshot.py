"""Snapshot and restore a live environment mid-episode, for bit-identical resume of in-process workers.

A snapshot holds plain values only (tensors, numbers, strings), so it can live in a ``weights_only`` checkpoint:
- MuJoCo's full integration state (``mj_getState(..., mjSTATE_INTEGRATION)``: time, qpos, qvel, act, mocap, warm
  start, ...) of the simulation under the env (dm_control: then ``mj_step1``, as its own step leaves the data);
- the plain attributes (arrays, numbers, bools, strings) of the env and of every wrapper around it — Meta-World
  keeps its goal, object positions, previous frame and step count there; ``TimeLimit`` its elapsed steps;
- every numpy ``Generator`` / ``RandomState`` found among those attributes (the env's RNG, dm_control's task RNG).
Objects (models, renderers, task lists) are left alone: they are rebuilt identically from the run's seeds.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import gymnasium as gym
import numpy as np
import torch

_PLAIN = (bool, int, float, str, type(None), np.integer, np.floating, np.bool_)


def _layers(env: Any) -> List[Any]:
    """The wrapper chain down to the base env, then dm_control's Environment and task where present."""
    out = []
    e = env
    while isinstance(e, gym.Wrapper):
        out.append(e)
        e = e.env
    out.append(e)
    inner = getattr(e, "_env", None)  # envs.dmc.DMCEnv wraps a dm_control Environment
    if inner is not None:
        out += [inner, inner.task]
    return out


def _physics(layer: Any):
    """(model, data) of a MuJoCo-backed layer, if it has one."""
    if hasattr(layer, "model") and hasattr(layer, "data") and type(layer.data).__name__ == "MjData":
        return layer.model, layer.data
    phys = getattr(layer, "_physics", None)
    if phys is not None:  # dm_control
        return phys.model.ptr, phys.data.ptr
    return None


def _rng_state(v: Any) -> str:
    if isinstance(v, np.random.Generator):
        return json.dumps({"kind": "generator", "state": v.bit_generator.state})
    st = v.get_state()
    return json.dumps({"kind": "randomstate", "state": [st[0], st[1].tolist(), st[2], st[3], st[4]]})


def _set_rng(v: Any, s: str) -> None:
    d = json.loads(s)
    if d["kind"] == "generator":
        v.bit_generator.state = d["state"]
    else:
        a = d["state"]
        v.set_state((a[0], np.asarray(a[1], dtype=np.uint32), a[2], a[3], a[4]))


def get_env_state(env: gym.Env) -> List[Dict[str, Any]]:
    import mujoco

    layers = []
    for layer in _layers(env):
        attrs: Dict[str, Any] = {}
        rngs: Dict[str, str] = {}
        for k, v in vars(layer).items():
            if isinstance(v, np.ndarray) and v.dtype != object:
                attrs[k] = torch.from_numpy(v.copy())
            elif isinstance(v, _PLAIN):
                attrs[k] = v.item() if isinstance(v, np.generic) else v
            elif isinstance(v, (np.random.Generator, np.random.RandomState)):
                rngs[k] = _rng_state(v)
        entry: Dict[str, Any] = {"attrs": attrs, "rngs": rngs}
        phys = _physics(layer)
        if phys is not None:
            model, data = phys
            spec = mujoco.mjtState.mjSTATE_INTEGRATION
            buf = np.empty(mujoco.mj_stateSize(model, spec))
            mujoco.mj_getState(model, data, buf, spec)
            entry["mj_state"] = torch.from_numpy(buf)
        layers.append(entry)
    return layers


def set_env_state(env: gym.Env, state: List[Dict[str, Any]]) -> None:
    import mujoco

    layers = _layers(env)
    if len(layers) != len(state):
        raise ValueError(f"env snapshot has {len(state)} layers, the env has {len(layers)}")
    for layer, entry in zip(layers, state):
        for k, v in entry["attrs"].items():
            cur = getattr(layer, k, None)
            if isinstance(v, torch.Tensor):
                arr = v.numpy()
                if isinstance(cur, np.ndarray) and cur.shape == arr.shape:
                    cur[...] = arr  # in place: other objects may hold a view of this array
                else:
                    setattr(layer, k, arr.copy())
            else:
                setattr(layer, k, v)
        for k, s in entry["rngs"].items():
            _set_rng(getattr(layer, k), s)
        if "mj_state" in entry:
            model, data = _physics(layer)
            mujoco.mj_setState(model, data, entry["mj_state"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
            if getattr(layer, "_physics", None) is not None:
                # dm_control keeps position/velocity-derived quantities current after each step (mj_step2 then
                # mj_step1); recompute them the same way. mj_forward would also overwrite the restored warm start.
                mujoco.mj_step1(model, data)

