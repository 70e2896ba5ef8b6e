"""Building the inner method of the wrapper methods (``sparse``, ``fsmtl``, ``samo``)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from .base import GramianMethod, JacobianMethod, Method, bad_option

WRAPPERS = ("sparse", "fsmtl", "samo")


class MeanJacobian(GramianMethod):
    """The plain mean of the task gradients, as a Jacobian aggregator (``base: mtsac`` / ``mean``)."""

    name = "mtsac"

    def weights(self, gramian: Tensor) -> Tensor:
        t = gramian.shape[0]
        return torch.full((t,), 1.0 / t, dtype=torch.float64, device=gramian.device)


def _kinds(num_tasks: int) -> Dict[str, bool]:
    """name -> is a Jacobian method (by building each registered method once; only on the error path)."""
    from .registry import available_methods, get_method

    out = {}
    for n in available_methods():
        if n in WRAPPERS:
            continue
        try:
            out[n] = isinstance(get_method(n, num_tasks), JacobianMethod)
        except Exception:  # noqa: BLE001 -- a method that cannot be built with defaults is no valid base
            out[n] = False
    return out


def build_base(owner: str, base: Any, base_kwargs: Any, num_tasks: int, jacobian_only: bool) -> Method:
    """The inner method ``base`` (a registered name) with ``base_kwargs``; ValueError naming valid choices."""
    from .registry import available_methods, get_method

    if not isinstance(base_kwargs, dict):
        raise bad_option(owner, "base_kwargs", base_kwargs, "a mapping of options of the base method")

    def valid() -> list:
        if not jacobian_only:
            return [n for n in available_methods() if n not in WRAPPERS]
        return ["mtsac", "mean"] + [n for n, ok in _kinds(num_tasks).items() if ok]

    if not isinstance(base, str) or base in WRAPPERS or base not in available_methods():
        raise bad_option(owner, "base", base, f"one of {valid()}")
    if jacobian_only and base in ("mtsac", "mean"):
        return MeanJacobian(num_tasks, **base_kwargs)
    method = get_method(base, num_tasks, **base_kwargs)
    if jacobian_only and not isinstance(method, JacobianMethod):
        raise bad_option(owner, "base", base, f"one of {valid()}")
    return method
