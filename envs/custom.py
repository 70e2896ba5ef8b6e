"""Suites of the user's own tasks, padded and masked like ``dmc-mixed``.

* ``gym:Id1,Id2,...`` -- any registered Gymnasium environment ids (``gymnasium.make(id)``; its ``TimeLimit`` is the
  task's horizon);
* ``dmc:domain-task,...`` -- any dm_control suite tasks (``dmc:ball_in_cup-catch,cartpole-two_poles``);
* ``register_suite(name, task_builders)`` -- a named suite of env builders from Python (also ``mtrl.envs``).

Observations may be any Box (flattened, zero-padded to the largest task); actions must be 1-D Boxes: the agent
acts in [-1, 1] on the largest action size, padded dimensions are dropped before stepping (``PadWrapper``) and
finite bounds are rescaled to the task's own (``gymnasium.wrappers.RescaleAction``). A discrete, multi-discrete or
dict space cannot be padded together with the others and is refused with one line naming the task. Success is not
defined for these tasks: evaluation reports the mean return (as for DMC).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .suites import DMC_TASKS, Suite, TaskSpec

_REGISTERED: Dict[str, List[TaskSpec]] = {}
_RESERVED_PREFIXES = ("mt1-", "gym:", "dmc:")
_RESERVED = ("mt10", "mt25", "mt50", "custom", "dmc-walker", "dmc-cheetah-walker", "dmc-mixed")


def registered_suites() -> List[str]:
    return sorted(_REGISTERED)


def _space_dims(name: str, env: Any) -> "tuple[int, int]":
    """(flat obs size, action size), or ValueError saying why this env cannot join a padded suite."""
    import gymnasium as gym

    obs, act = env.observation_space, env.action_space
    if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
        raise ValueError(f"task {name!r} has a {act} action space; a suite "
                         "pads continuous actions only: valid tasks have a 1-D Box action space")
    if not isinstance(obs, gym.spaces.Box):
        raise ValueError(f"task {name!r} has a {obs} observation space; a suite pads Box "
                         "observations only: valid tasks have a Box observation space")
    return int(np.prod(obs.shape)), int(act.shape[0])


def _horizon(env: Any, default: int) -> int:
    spec = getattr(env, "spec", None)
    steps = getattr(spec, "max_episode_steps", None)
    return int(steps) if steps else default


@functools.lru_cache(maxsize=None)
def gym_spec(env_id: str) -> TaskSpec:
    """A Gymnasium id's spec (builds the env once, to read its spaces and time limit)."""
    import gymnasium as gym

    try:
        env = gym.make(env_id)
    except Exception as e:  # noqa: BLE001 -- unknown id, missing extra (box2d, atari...)
        raise ValueError(f"gym task {env_id!r}: gymnasium.make raised {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}") from None
    try:
        obs, act = _space_dims(env_id, env)
        steps = _horizon(env, 0)
    finally:
        env.close()
    if not steps:
        raise ValueError(f"gym task {env_id!r} has no time limit (max_episode_steps); register it with one")
    return TaskSpec(env_id, "gym", obs, act, max_steps=steps)


@functools.lru_cache(maxsize=None)
def dmc_spec(name: str) -> TaskSpec:
    """Any dm_control suite task ``domain-task``; sizes from the table in suites.py, else from the env itself."""
    if name in DMC_TASKS:
        obs, act = DMC_TASKS[name]
        return TaskSpec(name, "dmc", obs, act)
    from dm_control import suite as dmc_suite

    domain, _, task = name.partition("-")
    if (domain, task) not in dmc_suite.ALL_TASKS:
        valid = ", ".join(f"{d}-{t}" for d, t in dmc_suite.ALL_TASKS)
        raise ValueError(f"unknown dm_control task {name!r}; valid: {valid}")
    from .dmc import DMCEnv

    env = DMCEnv(name, seed=0)
    obs, act = _space_dims(name, env)
    return TaskSpec(name, "dmc", obs, act)


def _task_list(name: str, prefix: str) -> List[str]:
    tasks = [t.strip() for t in name[len(prefix):].split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"suite {name!r} lists no tasks; valid: {prefix}A,B,... (e.g. "
                         f"{'gym:Pendulum-v1,MountainCarContinuous-v0' if prefix == 'gym:' else 'dmc:walker-walk'})")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise ValueError(f"suite {name!r} lists task {dup[0]!r} twice")
    return tasks


def custom_suite(name: str) -> Optional[Suite]:
    """The Suite for ``gym:...``, ``dmc:...`` or a registered name; None for any other name."""
    if name.startswith("gym:"):
        return Suite(name, [gym_spec(t) for t in _task_list(name, "gym:")])
    if name.startswith("dmc:"):
        return Suite(name, [dmc_spec(t) for t in _task_list(name, "dmc:")])
    if name in _REGISTERED:
        return Suite(name, list(_REGISTERED[name]))
    return None


Builders = Union[Mapping[str, Callable[[], Any]], Sequence[Callable[[], Any]]]


def register_suite(name: str, task_builders: Builders, *, max_episode_steps: int = 1000,
                   replace: bool = False) -> Suite:
    """Register suite ``name``: ``task_builders`` maps task names to zero-argument callables returning a Gymnasium
    env (a list names them by their env's ``spec.id``, else ``task<i>``). Each env is built once here to check its
    spaces. ``max_episode_steps`` bounds an env that has no time limit of its own. Seeds reach the envs through
    ``reset(seed=...)``. Returns the Suite; ``--suite name`` / ``mtrl.train(suite=name)`` then use it in this
    process (Ray workers receive the builders pickled: closures and lambdas defined in a notebook work)."""
    import gymnasium as gym

    if not isinstance(name, str) or not name or ":" in name or "," in name or name in _RESERVED \
            or name.startswith(_RESERVED_PREFIXES):
        raise ValueError(f"suite name {name!r} is taken or invalid; valid: a new name without ':' or ',' that is "
                         "not a built-in suite")
    if name in _REGISTERED and not replace:
        raise ValueError(f"suite {name!r} is already registered (pass replace=True to replace it)")
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps={max_episode_steps!r}; valid: an integer >= 1")
    items = list(task_builders.items()) if isinstance(task_builders, Mapping) else [(None, b) for b in task_builders]
    if not items:
        raise ValueError(f"suite {name!r}: task_builders is empty; valid: a mapping name -> callable or a list of "
                         "callables")
    specs: List[TaskSpec] = []
    for i, (task, builder) in enumerate(items):
        if not callable(builder):
            raise ValueError(f"suite {name!r}: builder {i} is a {type(builder).__name__}, not a callable returning "
                             "a gymnasium env")
        env = builder()
        if not isinstance(env, gym.Env):
            raise ValueError(f"suite {name!r}: builder {i} returned a {type(env).__name__}, not a gymnasium.Env")
        try:
            task = task or getattr(getattr(env, "spec", None), "id", None) or f"task{i}"
            obs, act = _space_dims(str(task), env)
            steps = _horizon(env, max_episode_steps)
        finally:
            env.close()
        specs.append(TaskSpec(str(task), "gym", obs, act, max_steps=steps, builder=builder))
    names = [t.name for t in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"suite {name!r} has two tasks named {dup[0]!r}; give task_builders as a mapping of names")
    _REGISTERED[name] = specs
    return Suite(name, list(specs))


def make_gym(spec: TaskSpec) -> Any:
    """The raw env of a gym task: its builder or ``gymnasium.make``, with a time limit and actions in [-1, 1]."""
    import gymnasium as gym

    env = spec.builder() if spec.builder is not None else gym.make(spec.name)
    if _horizon(env, 0) == 0 or getattr(env, "spec", None) is None:
        env = gym.wrappers.TimeLimit(env, spec.horizon)
    box = env.action_space
    lo, hi = np.asarray(box.low, np.float64), np.asarray(box.high, np.float64)
    # The policy's tanh range is [-1, 1]; unbounded dimensions are passed through as they are.
    if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and not (np.all(lo == -1.0) and np.all(hi == 1.0)):
        one = np.ones(box.shape, dtype=box.dtype)  # in the space's dtype: no precision-loss warning
        env = gym.wrappers.RescaleAction(env, -one, one)
    return env
