"""Task suites (Meta-World v3, DeepMind Control) and their environment builders."""

from .suites import DMC_SUITES, DMC_TASKS, Suite, TaskSpec, available_suites, get_suite, metaworld_task_names
from .make import PadWrapper, make_env
from .custom import register_suite, registered_suites

__all__ = ["DMC_SUITES", "DMC_TASKS", "Suite", "TaskSpec", "available_suites", "get_suite",
           "metaworld_task_names", "PadWrapper", "make_env", "register_suite", "registered_suites"]
