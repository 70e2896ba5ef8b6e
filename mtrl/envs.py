"""``mtrl.envs``: the task suites of the top-level ``envs`` package, under the name the Python API uses
(``mtrl.envs.register_suite(name, task_builders)``; see ``envs/custom.py``)."""

from envs import (DMC_SUITES, DMC_TASKS, PadWrapper, Suite, TaskSpec, available_suites, get_suite, make_env,
                  metaworld_task_names, register_suite, registered_suites)

__all__ = ["DMC_SUITES", "DMC_TASKS", "PadWrapper", "Suite", "TaskSpec", "available_suites", "get_suite", "make_env",
           "metaworld_task_names", "register_suite", "registered_suites"]
