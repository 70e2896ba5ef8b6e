"""Devices: where the learner runs, RNG states that move between devices, and the checks that prove an update
step is device-correct and sync-free without a GPU.

``DeviceCheck`` is the CI's stand-in for a CUDA machine (``shared/reference/fast_learner.md``): run a step on the
``meta`` device inside it. ``meta`` raises on every host synchronisation (``.item()``, ``bool()``, ``.cpu()``,
``.tolist()``, numpy), and the mode raises on any op whose tensor arguments live on more than one device (a 0-d
CPU scalar aside, as PyTorch itself allows) — which ``meta`` alone does not catch in ``mm``/``linear``/indexing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees one), ``cpu``, ``cuda``; ``cuda`` without a visible GPU is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; valid here: auto, cpu")
    return torch.device(name)


class DeviceMixError(RuntimeError):
    """An op received tensors on more than one device."""


class DeviceCheck(TorchDispatchMode):
    """Raise ``DeviceMixError`` naming the op when its tensor arguments sit on more than one device.

    0-d CPU tensors are allowed beside any device (PyTorch treats them as scalars). ``allow`` names ops to skip
    (``aten`` overload packet names, e.g. ``"_to_copy"``, which moves data on purpose)."""

    def __init__(self, allow: tuple = ("_to_copy", "copy_", "lift_fresh", "_local_scalar_dense")) -> None:
        super().__init__()
        self.allow = set(allow)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name not in self.allow:
            devices = set()
            for x in pytree.tree_leaves((args, kwargs)):
                if isinstance(x, torch.Tensor) and not (x.device.type == "cpu" and x.dim() == 0):
                    devices.add(x.device.type)
            if len(devices) > 1:
                raise DeviceMixError(f"{func}: tensors on {sorted(devices)} mixed in one op")
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ RNG states
def generator_state(gen: torch.Generator) -> Dict[str, Any]:
    """A generator's state with the device it belongs to (a CUDA state cannot be loaded into a CPU generator)."""
    return {"device": gen.device.type, "state": gen.get_state(), "seed": int(gen.initial_seed())}


def derived_seed(seed: int, salt: int) -> int:
    """A 63-bit seed derived deterministically from ``seed`` (``numpy.random.SeedSequence``)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(salt)]).generate_state(1, np.uint64)[0]) >> 1


def restore_generator(gen: torch.Generator, saved: Any, salt: int = 0) -> Optional[str]:
    """Load ``saved`` (``generator_state`` or, from older checkpoints, a bare state tensor) into ``gen``.

    Same device type: the exact state. Another device type (a CPU run resumed on CUDA or the reverse): the states
    are not interchangeable, so the stream is re-derived deterministically from the saved seed and ``salt`` (the
    update counter, say) and a one-line note is returned; the caller prints it. Returns None when exact."""
    if isinstance(saved, dict):
        dev, state, seed = saved["device"], saved["state"], int(saved["seed"])
    else:  # a bare tensor from a checkpoint written before the device was recorded: CPU states are 5056 bytes
        state = saved
        dev = "cpu" if state.numel() == 5056 else "cuda"
        seed = int(gen.initial_seed())
    if dev == gen.device.type:
        gen.set_state(state.cpu())
        return None
    gen.manual_seed(derived_seed(seed, salt))
    return (f"note: the learner's random stream was saved on {dev} and this run is on {gen.device.type}; "
            f"it continues from a deterministically re-derived seed (results differ from an uninterrupted run)")


def global_rng_states() -> Dict[str, Any]:
    """torch's global CPU RNG state and, where CUDA is initialised, every CUDA device's."""
    out: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_global_rng(saved: Any) -> None:
    """Inverse of :func:`global_rng_states` (a bare CPU state from older checkpoints is accepted); CUDA states
    are restored when this machine has as many CUDA devices, and skipped otherwise."""
    if isinstance(saved, torch.Tensor):
        torch.set_rng_state(saved)
        return
    torch.set_rng_state(saved["cpu"])
    cuda = saved.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
