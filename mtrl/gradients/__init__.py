"""How per-task losses become ONE update of the shared parameters (see design.md §4 and README_METHODS.md).

``get_method(name, num_tasks, **kw)`` builds a method; ``available_methods()`` lists the names. Every method has
``backward(loss_fn, params, batch, task_ids, *, task_specific=None) -> dict`` (writes ``.grad``; the dict always holds
"losses", plus "gramian" / "weights" where the method forms them); Jacobian and Gramian methods also aggregate a
given Jacobian: ``method(J) -> Tensor[P]``. ``grad_diagnostics(gramian)`` gives what to log about task gradients.
"""

from .base import GramianMethod, JacobianMethod, LossWeightingMethod, Method, task_losses
from .diagnostics import grad_diagnostics
from .registry import available_methods, get_method, register

# Importing a method module registers it.
from . import mean  # noqa: F401,E402
from . import (  # noqa: F401,E402
    alignedmtl,
    cagrad,
    config,
    dualproj,
    dwa,
    famo,
    fsmtl,
    gcond,
    graddrop,
    gradnorm,
    gradvac,
    gss,
    igb,
    imtl,
    mgda,
    nashmtl,
    pcgrad,
    samo,
    sparse,
    upgrad,
    uw,
)

__all__ = [
    "Method",
    "JacobianMethod",
    "GramianMethod",
    "LossWeightingMethod",
    "task_losses",
    "available_methods",
    "get_method",
    "register",
    "grad_diagnostics",
]
