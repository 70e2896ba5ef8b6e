"""Task suites: a registry from a suite name to an ordered list of tasks.

``mt1-<task>`` (each of the 50 Meta-World v3 tasks), ``mt10``, ``mt25``, ``mt50``, a custom Meta-World list
(``--tasks a,b,c``), and DeepMind Control state-based sets ``dmc-walker``, ``dmc-cheetah-walker``, ``dmc-mixed``;
user task lists ``gym:Id1,Id2`` / ``dmc:domain-task,...`` and suites registered from Python (``envs/custom.py``).

Task identity is never baked into the observation: a worker passes the task index beside it, and the backbone
decides how to use it (one-hot, heads, routing...). Observations and actions of a suite are zero-padded to the
largest task; ``Suite.action_mask`` says which action dimensions are real for each task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

# Meta-World v3: 39-d observation (hand, gripper, two objects, previous frame, goal), 4-d action in [-1, 1].
MW_OBS_DIM = 39
MW_ACT_DIM = 4
MW_HORIZON = 500  # metaworld's max_path_length; stepping past it raises, so workers reset on truncation.
DMC_HORIZON = 1000  # dm_control suite default time limit (1000 control steps).

# (domain, task) -> (flattened observation size, action size); checked against the real envs in tests.
DMC_TASKS: Dict[str, Tuple[int, int]] = {
    "walker-stand": (24, 6),
    "walker-walk": (24, 6),
    "walker-run": (24, 6),
    "cheetah-run": (17, 6),
    "hopper-stand": (15, 4),
    "hopper-hop": (15, 4),
    "finger-spin": (9, 2),
    "cartpole-swingup": (5, 1),
    "cartpole-balance": (5, 1),
    "reacher-easy": (6, 2),
    "quadruped-walk": (78, 12),
    "quadruped-run": (78, 12),
}

DMC_SUITES: Dict[str, List[str]] = {
    "dmc-walker": ["walker-stand", "walker-walk", "walker-run"],
    "dmc-cheetah-walker": ["cheetah-run", "walker-walk", "walker-run"],
    # 7 tasks over 6 domains, 5..78-d observations and 1..12-d actions: the padding case.
    "dmc-mixed": [
        "walker-walk",
        "cheetah-run",
        "hopper-stand",
        "finger-spin",
        "cartpole-swingup",
        "reacher-easy",
        "quadruped-walk",
    ],
}


def _metaworld_lists() -> Dict[str, List[str]]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3, MT25_V3, MT50_V3

    return {
        "all": list(ALL_V3_ENVIRONMENTS),
        "mt10": list(MT10_V3),
        "mt25": list(MT25_V3),
        "mt50": list(MT50_V3),
    }


@dataclass(frozen=True)
class TaskSpec:
    name: str  # "reach-v3", "walker-walk", "Pendulum-v1"
    kind: str  # "metaworld" | "dmc" | "gym" (a Gymnasium id, or a builder of envs/custom.py's register_suite)
    obs_dim: int
    act_dim: int
    max_steps: int = 0  # episode limit of a gym task (0: the kind's own horizon)
    # gym tasks of a suite registered from Python: a zero-argument callable returning the env (None: gym.make(name))
    builder: Optional[Callable[[], Any]] = field(default=None, compare=False, repr=False)

    @property
    def horizon(self) -> int:
        if self.max_steps:
            return self.max_steps
        return MW_HORIZON if self.kind == "metaworld" else DMC_HORIZON


@dataclass
class Suite:
    name: str
    tasks: List[TaskSpec]
    obs_dim: int = field(init=False)
    act_dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.obs_dim = max(t.obs_dim for t in self.tasks)
        self.act_dim = max(t.act_dim for t in self.tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def kind(self) -> str:
        kinds = {t.kind for t in self.tasks}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def has_success(self) -> bool:
        """Whether a success metric exists (Meta-World tasks); DMC and Gymnasium tasks report returns only."""
        return any(t.kind == "metaworld" for t in self.tasks)

    @property
    def action_mask(self) -> np.ndarray:
        """(T, act_dim) bool: True where the action dimension exists for that task."""
        mask = np.zeros((self.num_tasks, self.act_dim), dtype=bool)
        for i, t in enumerate(self.tasks):
            mask[i, : t.act_dim] = True
        return mask


def available_suites() -> List[str]:
    from .custom import registered_suites

    names = ["mt10", "mt25", "mt50"] + list(DMC_SUITES)
    return names + ["mt1-<task>", "gym:<Id>,<Id>...", "dmc:<domain-task>,..."] + registered_suites()


def metaworld_task_names() -> List[str]:
    return _metaworld_lists()["all"]


def _mw_spec(name: str) -> TaskSpec:
    return TaskSpec(name, "metaworld", MW_OBS_DIM, MW_ACT_DIM)


def _dmc_spec(name: str) -> TaskSpec:
    obs, act = DMC_TASKS[name]
    return TaskSpec(name, "dmc", obs, act)


def get_suite(name: Optional[str], tasks: Optional[List[str]] = None) -> Suite:
    """Resolve ``--suite`` / ``--tasks`` to a Suite; raise ValueError naming the bad value and the valid ones.
    A Suite given as ``name`` is returned as it is (a registered suite shipped to a Ray worker)."""
    if isinstance(name, Suite):
        return name
    mw = _metaworld_lists()
    if tasks:
        if name not in (None, "custom"):
            raise ValueError(f"--tasks builds a custom Meta-World suite; drop --suite {name!r} or use --suite custom")
        bad = [t for t in tasks if t not in mw["all"]]
        if bad:
            raise ValueError(f"unknown Meta-World task {bad[0]!r}; valid: {', '.join(mw['all'])}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"--tasks lists a task twice: {','.join(tasks)}")
        return Suite("custom", [_mw_spec(t) for t in tasks])
    if name is None or name == "custom":
        raise ValueError(f"give --suite (valid: {', '.join(available_suites())}) or --tasks a,b,c")
    if name in ("mt10", "mt25", "mt50"):
        return Suite(name, [_mw_spec(t) for t in mw[name]])
    if name in DMC_SUITES:
        return Suite(name, [_dmc_spec(t) for t in DMC_SUITES[name]])
    from .custom import custom_suite

    custom = custom_suite(name)  # gym:..., dmc:..., or a suite registered from Python (envs/custom.py)
    if custom is not None:
        return custom
    if name.startswith("mt1-"):
        task = name[len("mt1-"):]
        if task not in mw["all"]:
            raise ValueError(f"unknown Meta-World task {task!r} in suite {name!r}; valid: mt1-<task> with task in "
                             f"{', '.join(mw['all'])}")
        return Suite(name, [_mw_spec(task)])
    raise ValueError(f"unknown suite {name!r}; valid: {', '.join(available_suites())}")
