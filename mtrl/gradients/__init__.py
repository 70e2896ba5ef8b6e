"""How per-task losses become ONE update of the shared parameters (see design.md §4).

``get_method(name, num_tasks, **kw)`` builds a method; ``available_methods()`` lists the names.
"""

from .base import Method, task_losses
from .registry import available_methods, get_method, register

# Importing a method module registers it.
from . import mean  # noqa: F401,E402

__all__ = ["Method", "task_losses", "available_methods", "get_method", "register"]
