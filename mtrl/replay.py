"""Per-task replay: one preallocated ring buffer per task, sampled as (T, B, ...) tensors in one call.

Capacity is split evenly over tasks (the published MT-SAC setting: 1M transitions in total). Every update samples
B transitions from EVERY task, so a task's loss is always computed from its own data (``agents.sac`` relies on it).

Two storages with one interface (``add``, ``can_sample``, ``sample``, ``contexts``, ``state_dict``, ``len``):

* :class:`MultiTaskReplay`: numpy on the host, sampled with its own numpy RNG (``seed``); a resumed run draws
  exactly the indices the uninterrupted one would. ``sample(..., generator=)`` is accepted and ignored. A batch
  for a CUDA learner goes over from pinned memory (an asynchronous copy).
* :class:`DeviceReplay`: preallocated torch tensors on a device (the learner's GPU); ``sample`` draws indices on
  the device with a ``torch.Generator`` and gathers there, with no host synchronisation.

Both keep the ring positions and sizes on the host (numpy ``pos``/``size``), so ``can_sample``/``len`` never read
a device, and write the same ``state_dict`` (CPU tensors), so a checkpoint moves between them.
:func:`make_replay` picks the storage for the ``replay_device`` setting.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from mtrl.devices import derived_seed, generator_state, restore_generator

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class _Rings:
    """Per-task ring positions and sizes, kept on the host whatever the storage."""

    def __init__(self, num_tasks: int, capacity_per_task: int) -> None:
        if capacity_per_task < 1:
            raise ValueError(f"replay capacity per task must be >= 1, got {capacity_per_task}")
        self.num_tasks = num_tasks
        self.capacity = capacity_per_task
        self.pos = np.zeros(num_tasks, np.int64)
        self.size = np.zeros(num_tasks, np.int64)

    def add(self, task: int, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """Append n transitions of one task (arrays with leading axis n), overwriting the oldest when full."""
        n = len(reward)
        if n == 0:
            return
        keep = min(n, self.capacity)  # only the newest `capacity` survive anyway
        start = int(self.pos[task])
        self.pos[task] = (start + keep) % self.capacity
        self.size[task] = min(self.capacity, self.size[task] + keep)
        self._store(task, start, [x[n - keep:] for x in (obs, action, reward, next_obs, terminated)])

    def _store(self, task: int, start: int, rows: List[np.ndarray]) -> None:
        """Write the FIELDS of k transitions into task's ring from slot ``start`` on (wrapping at the end)."""
        raise NotImplementedError

    def _require_data(self) -> None:
        if np.any(self.size == 0):
            empty = [int(t) for t in np.flatnonzero(self.size == 0)]
            raise RuntimeError(f"cannot sample: no transitions yet for task index(es) {empty}")

    def can_sample(self, batch_per_task: int) -> bool:
        return bool(np.all(self.size >= min(batch_per_task, self.capacity)))

    def __len__(self) -> int:
        return int(self.size.sum())

    def state_dict(self) -> Dict[str, object]:
        """CPU tensors of the filled part only (a checkpoint of a young buffer stays small), ``pos`` and ``size``:
        the same format from either storage."""
        n = int(self.size.max())
        state: Dict[str, object] = {name: self._read(name, n) for name in FIELDS}
        state["pos"] = torch.from_numpy(self.pos.copy())
        state["size"] = torch.from_numpy(self.size.copy())
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        n = state["obs"].shape[1]  # type: ignore[union-attr]
        for name in FIELDS:
            self._write(name, n, state[name])  # type: ignore[arg-type]
        self.pos[:] = state["pos"].numpy()  # type: ignore[union-attr]
        self.size[:] = state["size"].numpy()  # type: ignore[union-attr]
        self._rings_changed()

    def _read(self, name: str, n: int) -> torch.Tensor:  # a CPU copy of field[:, :n]
        raise NotImplementedError

    def _write(self, name: str, n: int, value: torch.Tensor) -> None:  # field[:, :n] = value
        raise NotImplementedError

    def _rings_changed(self) -> None:
        """Called after pos/size changed wholesale (a storage that mirrors them elsewhere refreshes its copy)."""


class MultiTaskReplay(_Rings):
    device = torch.device("cpu")

    def __init__(self, num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int, seed: int = 0) -> None:
        super().__init__(num_tasks, capacity_per_task)
        T, C = num_tasks, capacity_per_task
        # np.zeros is lazily backed by the OS: the 1M-transition MT10 buffer costs memory only as it fills.
        self.obs = np.zeros((T, C, obs_dim), np.float32)
        self.next_obs = np.zeros((T, C, obs_dim), np.float32)
        self.action = np.zeros((T, C, act_dim), np.float32)
        self.reward = np.zeros((T, C), np.float32)
        self.terminated = np.zeros((T, C), np.float32)
        self.rng = np.random.default_rng(seed)

    def _store(self, task: int, start: int, rows: List[np.ndarray]) -> None:
        idx = (start + np.arange(len(rows[0]))) % self.capacity
        for name, value in zip(FIELDS, rows):
            getattr(self, name)[task, idx] = value

    def sample(self, batch_per_task: int, device: Optional[torch.device] = None, context_len: int = 0,
               generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """A dict of (T, B, ...) float32 tensors: obs, action, reward, next_obs, terminated; with ``context_len``
        K > 0 also ``context`` (T, B, K, D): the K transitions stored before each sampled one in its task's ring
        (see ``mtrl.nets.context``), and ``next_context``: the window at s′, i.e. ``context`` shifted by one with
        the sampled transition itself appended (what the worker held when it acted in s′).

        Indices come from this replay's numpy RNG (``generator`` is ignored: it is there for the interface of
        :class:`DeviceReplay`)."""
        out = self.gather(self.draw(batch_per_task), context_len)
        if device is not None and device.type == "cuda":
            # Through pinned memory, so the copy is asynchronous (from pageable memory it would wait for the host).
            out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
        elif device is not None and device.type != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def rng_state(self) -> str:
        """The sampling RNG's state for a checkpoint (JSON of the numpy bit generator)."""
        return json.dumps(self.rng.bit_generator.state)

    def load_rng_state(self, state: Any) -> Optional[str]:
        """Inverse of :meth:`rng_state`; a device replay's generator state re-seeds this RNG (returns a note)."""
        if isinstance(state, str):
            self.rng.bit_generator.state = json.loads(state)
            return None
        self.rng = np.random.default_rng(int(state["seed"]))
        return "note: the replay's sampling stream came from a device replay; the numpy one is re-seeded"

    def draw(self, batch_per_task: int) -> np.ndarray:
        """(T, B) ring indices, uniform over each task's filled slots."""
        self._require_data()
        return (self.rng.random((self.num_tasks, batch_per_task)) * self.size[:, None]).astype(np.int64)

    def gather(self, idx: np.ndarray, context_len: int = 0) -> Dict[str, torch.Tensor]:
        """The batch of :meth:`sample` for given (T, B) ring indices."""
        rows = np.arange(self.num_tasks)[:, None]
        out = {name: torch.from_numpy(getattr(self, name)[rows, idx]) for name in FIELDS}
        if context_len > 0:
            from mtrl.nets.context import pack

            ctx = self.contexts(idx, context_len)
            now = pack(*(out[f].numpy() for f in ("obs", "action", "reward", "next_obs")))
            out["context"] = torch.from_numpy(ctx)
            out["next_context"] = torch.from_numpy(np.concatenate([ctx[:, :, 1:], now[:, :, None]], axis=2))
        return out

    def contexts(self, idx: np.ndarray, K: int) -> np.ndarray:
        """(T, B, K, D) windows: for stored index i of task t, entries i-K .. i-1 of that task in insertion order,
        oldest first; positions before the oldest stored entry are zero (validity flag 0)."""
        from mtrl.nets.context import pack

        C = self.capacity
        oldest = np.where(self.size == C, self.pos, 0)[:, None]             # (T, 1) ring index of the oldest
        age = (idx - oldest) % C                                              # (T, B) insertion rank of i
        back = np.arange(K, 0, -1)                                            # K .. 1 steps back, oldest first
        src = (idx[..., None] - back) % C                                     # (T, B, K)
        valid = (age[..., None] >= back).astype(np.float32)
        rows = np.arange(self.num_tasks)[:, None, None]
        ctx = pack(self.obs[rows, src], self.action[rows, src], self.reward[rows, src], self.next_obs[rows, src])
        return ctx * valid[..., None]

    def _read(self, name: str, n: int) -> torch.Tensor:
        return torch.from_numpy(getattr(self, name)[:, :n].copy())

    def _write(self, name: str, n: int, value: torch.Tensor) -> None:
        getattr(self, name)[:, :n] = value.numpy()


class DeviceReplay(_Rings):
    """The replay as preallocated torch tensors on ``device`` (same interface as :class:`MultiTaskReplay`).

    All fields of a transition sit in one row of ``data`` (T, C, D), laid out as a context entry
    (``mtrl.nets.context.pack``): obs, action, reward, next_obs, then ``terminated`` where a context has its
    validity flag; ``obs``, ``action``, ... are views of it. ``add`` sends a chunk as one host->device copy (from
    pinned memory, asynchronous, on CUDA). ``sample`` never synchronises with the host: the indices are drawn on the
    device from per-task sizes that ``add`` keeps in a device tensor, and gathered there. ``generator``: a
    ``torch.Generator`` on ``device`` (default: this replay's own, seeded with ``seed``; the device's default
    generator on ``meta``, which has none); a checkpoint of the sampling stream is that generator's state.
    """

    def __init__(self, num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int,
                 device: Union[str, torch.device], seed: int = 0) -> None:
        super().__init__(num_tasks, capacity_per_task)
        self.device = dev = torch.device(device)
        o, a = obs_dim, act_dim
        self.data = torch.zeros((num_tasks, capacity_per_task, 2 * o + a + 2), dtype=torch.float32, device=dev)
        self.obs = self.data[..., :o]
        self.action = self.data[..., o:o + a]
        self.reward = self.data[..., o + a]
        self.next_obs = self.data[..., o + a + 1:2 * o + a + 1]
        self.terminated = self.data[..., -1]
        self._rows = torch.arange(num_tasks, device=dev)[:, None]
        self._size_dev = torch.zeros(num_tasks, dtype=torch.int64, device=dev)    # = size, on the device
        self._oldest_dev = torch.zeros(num_tasks, dtype=torch.int64, device=dev)  # ring slot of the oldest entry
        self.generator = None if dev.type == "meta" else torch.Generator(dev).manual_seed(seed)

    def _store(self, task: int, start: int, rows: List[np.ndarray]) -> None:
        keep = len(rows[0])
        chunk = torch.from_numpy(np.concatenate([np.asarray(x, np.float32).reshape(keep, -1) for x in rows], axis=1))
        if self.device.type == "cuda":
            chunk = chunk.pin_memory()
        chunk = chunk.to(self.device, non_blocking=True)  # one host->device copy per chunk
        first = min(keep, self.capacity - start)  # the ring wraps at most once per chunk
        self.data[task, start:start + first] = chunk[:first]
        if keep > first:
            self.data[task, :keep - first] = chunk[first:]
        self._mirror(task)

    def _mirror(self, task: int) -> None:
        # Python scalars into device memory: a fill, never a read back.
        self._size_dev[task] = int(self.size[task])
        self._oldest_dev[task] = int(self.pos[task]) if self.size[task] == self.capacity else 0

    def _rings_changed(self) -> None:
        for t in range(self.num_tasks):
            self._mirror(t)

    def sample(self, batch_per_task: int, device: Optional[torch.device] = None, context_len: int = 0,
               generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The batch of :meth:`MultiTaskReplay.sample`, on this replay's device (moved to ``device`` if that
        differs)."""
        out = self.gather(self.draw(batch_per_task, generator), context_len)
        if device is not None and torch.device(device) != self.device:
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def rng_state(self) -> Any:
        """The sampling generator's state for a checkpoint (``mtrl.devices.generator_state``)."""
        return None if self.generator is None else generator_state(self.generator)

    def load_rng_state(self, state: Any) -> Optional[str]:
        """Inverse of :meth:`rng_state`; a numpy replay's state or another device's is re-derived from a seed
        (returns a one-line note then)."""
        if self.generator is None or state is None:
            return None
        if isinstance(state, str):  # the numpy replay's JSON: no torch state to load
            self.generator.manual_seed(derived_seed(int(json.loads(state)["state"]["state"]) % (2**63), 1))
            return "note: the replay's sampling stream came from the numpy replay; the device one is re-seeded"
        return restore_generator(self.generator, state)

    def draw(self, batch_per_task: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(T, B) ring indices on the device, uniform over each task's filled slots: floor(U * size), U in [0, 1)
        drawn in float64 as the numpy storage does."""
        self._require_data()
        u = torch.rand((self.num_tasks, batch_per_task), dtype=torch.float64, device=self.device,
                       generator=generator if generator is not None else self.generator)
        return (u * self._size_dev[:, None]).long()

    def gather(self, idx: torch.Tensor, context_len: int = 0) -> Dict[str, torch.Tensor]:
        """The batch of :meth:`sample` for given (T, B) ring indices on the device."""
        out = {name: getattr(self, name)[self._rows, idx] for name in FIELDS}
        if context_len > 0:
            w = self.windows(idx, context_len)
            out["context"] = w[:, :, :-1]
            out["next_context"] = w[:, :, 1:]
        return out

    def windows(self, idx: torch.Tensor, K: int) -> torch.Tensor:
        """(T, B, K + 1, D): for stored index i of task t, the packed entries i-K .. i of that task in insertion
        order; ``[:, :, :K]`` is :meth:`contexts`, ``[:, :, 1:]`` the window at s′ (it ends with i itself). Entries
        before the oldest stored one are zero (validity flag 0)."""
        C = self.capacity
        back = torch.arange(K, -1, -1, device=self.device)                  # K .. 0 steps back, oldest first
        src = (idx[..., None] - back) % C                                     # (T, B, K + 1)
        age = (idx - self._oldest_dev[:, None]) % C                           # (T, B) insertion rank of i
        valid = (age[..., None] >= back).to(torch.float32)[..., None]         # (T, B, K + 1, 1)
        rows = self.data[self._rows[..., None], src]
        return torch.cat([rows[..., :-1] * valid, valid], dim=-1)

    def contexts(self, idx: torch.Tensor, K: int) -> torch.Tensor:
        """(T, B, K, D): :meth:`MultiTaskReplay.contexts` on the device."""
        return self.windows(idx, K)[:, :, :-1]

    def _read(self, name: str, n: int) -> torch.Tensor:
        return getattr(self, name)[:, :n].to("cpu", copy=True).contiguous()

    def _write(self, name: str, n: int, value: torch.Tensor) -> None:
        getattr(self, name)[:, :n] = value.to(self.device)


def replay_bytes(num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int) -> int:
    """Bytes of a full replay in either storage: obs, next_obs, action, reward and terminated as float32. MT10 at
    1M transitions (obs 39, action 4): 84 floats a transition, about 340 MB."""
    return num_tasks * capacity_per_task * (2 * obs_dim + act_dim + 1 + 1) * 4


REPLAY_HEADROOM = 0.25  # of the GPU's total memory, kept free beside the replay (networks, Jacobians, compile)


def make_replay(replay_device: str, learner_device: Union[str, torch.device], num_tasks: int,
                capacity_per_task: int, obs_dim: int, act_dim: int,
                seed: int = 0) -> Union[MultiTaskReplay, DeviceReplay]:
    """The storage for the ``replay_device`` setting.

    ``cpu``: :class:`MultiTaskReplay` (numpy, sampled with its numpy RNG seeded by ``seed``). ``cuda``:
    :class:`DeviceReplay` on the learner's CUDA device (or the current one when the learner is elsewhere); a
    one-line ValueError when torch sees no CUDA device. ``auto``: on the learner's device when that is CUDA and
    the full buffer (:func:`replay_bytes`) plus ``REPLAY_HEADROOM`` of the GPU's memory fits in its free memory
    (``torch.cuda.mem_get_info``) -- MT10 at 1M transitions is ~340 MB -- else the numpy storage.
    """
    learner = torch.device(learner_device)
    if replay_device == "cpu":
        return MultiTaskReplay(num_tasks, capacity_per_task, obs_dim, act_dim, seed=seed)
    if replay_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("replay_device=cuda: no CUDA device is visible to torch; valid here: auto, cpu")
        dev = learner if learner.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return DeviceReplay(num_tasks, capacity_per_task, obs_dim, act_dim, dev, seed=seed)
    if replay_device != "auto":
        raise ValueError(f"replay_device={replay_device!r}; valid: auto, cpu, cuda")
    if learner.type == "cuda":
        free, total = torch.cuda.mem_get_info(learner)
        if replay_bytes(num_tasks, capacity_per_task, obs_dim, act_dim) + REPLAY_HEADROOM * total <= free:
            return DeviceReplay(num_tasks, capacity_per_task, obs_dim, act_dim, learner, seed=seed)
    return MultiTaskReplay(num_tasks, capacity_per_task, obs_dim, act_dim, seed=seed)
