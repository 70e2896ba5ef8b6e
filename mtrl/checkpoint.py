"""Checkpoints: atomic save (temp file + fsync + rename) and ``weights_only=True`` load.

A checkpoint holds plain containers of tensors, numbers and strings only, so loading never unpickles code. It
stores the agent (networks, optimizers, per-task α, method state, noise RNG), the counters, the RNG states of the
driver, the config, and the replay buffer when asked (``save_replay``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

FORMAT_VERSION = 1
CKPT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def save(path: Path, payload: Dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a format-{FORMAT_VERSION} mtrl checkpoint")
    return payload
