"""Rollout workers: each owns a share of the environments and a CPU copy of the policy.

``RolloutWorker`` is a plain class. ``WorkerPool`` runs N of them as Ray actors (``--workers N``) or one in the
learner's process (``--workers 0``); the training loop talks only to the pool. Transitions travel in chunks of
``chunk_steps`` per environment (a Ray round-trip costs ~1 ms, so per-step calls would cap collection at ~1k
steps/s).

Environment slots (issue 13): each of the T tasks has ``envs_per_task`` = N environments, the T x N slots
(task t, env j). :func:`split_envs` deals them round-robin to the workers, so workers may outnumber the tasks (a
worker then owns some of a task's envs) and a task's envs may sit on several workers. A worker steps all its envs
as one vector step: ONE batched policy call for all of them, then each env in turn (what gymnasium's
``SyncVectorEnv`` does, but keeping the true final observation and the per-env episode bookkeeping). Each task is
evaluated by the one worker holding its env j = 0.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np
import torch

from mtrl.nets.context import context_kw, context_window


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its envs and policy (picklable, small)."""

    suite: Optional[str]
    tasks: List[str]  # custom Meta-World list, or [] for a named suite
    task_indices: List[int]  # per owned env: its task (a task repeats when the worker holds several of its envs)
    goal_seed: int
    env_seeds: List[int]  # one per owned env, from the run's SeedSequence
    policy_seed: int
    learning_starts: int  # per env: uniform random actions before this many of its steps
    start_steps: List[int]  # per owned env: env steps already taken (non-zero when resuming)
    backbone: str
    backbone_kwargs: Dict[str, Any]
    log_std_min: float
    log_std_max: float
    name: str = "worker"
    pid_dir: Optional[str] = None  # write <pid_dir>/<name>.pid (for operators and the fault tests)
    fault: str = ""  # fault injection for tests: "reset:<task>" (env raises on every reset), "nan_reward:<task>"
    env_indices: List[int] = field(default_factory=list)  # per owned env: j in 0..N-1 within its task ([] = all 0)


class EnvError(RuntimeError):
    """An environment raised; the message names the task."""


class _FailingReset(gym.Wrapper):
    """Fault injection (``fault="reset:<task>"``): every reset raises, as a broken simulator would."""

    def reset(self, **kwargs: Any):
        raise RuntimeError("injected fault: reset always fails")


class RolloutWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(1)  # a worker is one core; the learner owns the rest
        from envs import get_suite, make_env
        from agents.sac import Actor

        self.spec = spec
        if spec.pid_dir:
            os.makedirs(spec.pid_dir, exist_ok=True)
            with open(os.path.join(spec.pid_dir, f"{spec.name}.pid"), "w") as f:
                f.write(str(os.getpid()))
        self.suite = get_suite(spec.suite, spec.tasks or None)
        s = self.suite
        self.task_indices = list(spec.task_indices)
        self.env_indices = list(spec.env_indices) or [0] * len(self.task_indices)
        self.eval_tasks = [t for t, j in zip(self.task_indices, self.env_indices) if j == 0]
        self.names = [s.tasks[t].name for t in self.task_indices]
        self.envs = [make_env(s.tasks[t], s.obs_dim, s.act_dim, goal_seed=spec.goal_seed, seed=seed)
                     for t, seed in zip(self.task_indices, spec.env_seeds)]
        kind, _, bad = spec.fault.partition(":")
        if kind == "reset":
            self.envs = [_FailingReset(e) if n == bad else e for e, n in zip(self.envs, self.names)]
        self.nan_reward = [kind == "nan_reward" and n == bad for n in self.names]
        self.policy = Actor(s.obs_dim, s.act_dim, s.num_tasks, spec.backbone, dict(spec.backbone_kwargs),
                            spec.log_std_min, spec.log_std_max)
        self.policy.eval()
        # A policy that reads the task from recent transitions (t2mir, task ids hidden) gets each env's window.
        self.window = context_window(self.policy, len(self.envs), s.obs_dim, s.act_dim)
        self.mask = torch.as_tensor(s.action_mask[self.task_indices], dtype=torch.float32)
        self.tids = torch.as_tensor(self.task_indices, dtype=torch.long)
        self.rng = np.random.default_rng(spec.policy_seed)
        self.gen = torch.Generator().manual_seed(spec.policy_seed)
        self.steps = np.asarray(spec.start_steps, dtype=np.int64)
        self.obs = np.stack([self._env_call(i, "reset", seed=seed)[0] for i, seed in enumerate(spec.env_seeds)])
        self.ep_ret = np.zeros(len(self.envs))
        self.ep_len = np.zeros(len(self.envs), dtype=np.int64)
        self.ep_success = np.zeros(len(self.envs), dtype=bool)
        self.time_policy = 0.0  # seconds in policy calls since the last collect returned (the rest is the envs)

    def _env_call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.envs[i], method)(*args, **kwargs)
        except Exception as e:  # name the task: "the env of push-v3 raised ..." beats a bare MuJoCo trace
            raise EnvError(f"env of task {self.names[i]!r} raised {type(e).__name__} in {method}: {e}") from e

    def get_state(self) -> Dict[str, Any]:
        """Everything that decides this worker's future transitions (envs mid-episode, RNGs, policy, counters), as
        plain values for a ``weights_only`` checkpoint. Used for exact resume of the in-process worker."""
        import json

        from envs.snapshot import get_env_state

        return {"envs": [get_env_state(e) for e in self.envs], "obs": torch.from_numpy(self.obs.copy()),
                "steps": torch.from_numpy(self.steps.copy()), "ep_ret": torch.from_numpy(self.ep_ret.copy()),
                "ep_len": torch.from_numpy(self.ep_len.copy()),
                "ep_success": torch.from_numpy(self.ep_success.copy()),
                "rng": json.dumps(self.rng.bit_generator.state), "gen": self.gen.get_state(),
                "policy": self.policy.state_dict(),
                **({"window": self.window.get_state()} if self.window is not None else {})}

    def set_state(self, state: Dict[str, Any]) -> None:
        import json

        from envs.snapshot import set_env_state

        for env, st in zip(self.envs, state["envs"]):
            set_env_state(env, st)
        self.obs = state["obs"].numpy().copy()
        self.steps = state["steps"].numpy().copy()
        self.ep_ret = state["ep_ret"].numpy().copy()
        self.ep_len = state["ep_len"].numpy().copy()
        self.ep_success = state["ep_success"].numpy().copy()
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.gen.set_state(state["gen"])
        self.policy.load_state_dict(state["policy"])
        if self.window is not None and "window" in state:
            self.window.set_state(state["window"])

    def ping(self) -> int:
        return os.getpid()

    def set_weights(self, state: Dict[str, np.ndarray]) -> None:
        self.policy.load_state_dict({k: torch.tensor(v) for k, v in state.items()})  # copy: Ray hands read-only arrays

    def _actions(self, deterministic: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        random = self.steps < self.spec.learning_starts
        uni = None
        if random.any():
            uni = self.rng.uniform(-1.0, 1.0, size=(len(self.envs), self.suite.act_dim)).astype(np.float32)
            uni *= self.mask.numpy()
        if uni is not None and random.all():
            act = uni  # warm-up: the policy's actions would all be discarded, so it is not run
        else:
            obs = torch.as_tensor(self.obs, dtype=torch.float32)
            with torch.inference_mode():  # acting needs no autograd bookkeeping at all (not even version counters)
                act = self.policy.act(obs, self.tids, self.mask, deterministic, generator=self.gen,
                                      **context_kw(self.window)).numpy()
            if uni is not None:
                act = np.where(random[:, None], uni, act)
        self.time_policy += time.perf_counter() - t0
        return act

    def _step_env(self, i: int, action: np.ndarray, episodes: List[Tuple[int, float, float, int]]):
        """One step of env ``i``: episode bookkeeping, reset at an episode's end (finished episodes are appended to
        ``episodes``). Returns (true next obs, reward as stored, terminated, truncated)."""
        o2, r, te, tr, info = self._env_call(i, "step", action)
        nxt = o2
        self.ep_ret[i] += r
        self.ep_len[i] += 1
        self.ep_success[i] |= bool(info.get("success", 0.0))
        if te or tr:
            episodes.append((self.task_indices[i], float(self.ep_ret[i]), float(self.ep_success[i]),
                             int(self.ep_len[i])))
            self.ep_ret[i], self.ep_len[i], self.ep_success[i] = 0.0, 0, False
            o2, _ = self._env_call(i, "reset")
        stored = float("nan") if self.nan_reward[i] else r
        if self.window is not None:  # the same transition the replay stores, so contexts match the learner's
            self.window.push(i, self.obs[i], action, stored, nxt)
        self.obs[i] = o2
        return nxt, stored, te, tr

    def collect(self, n_steps: int) -> Dict[str, Any]:
        """Step every owned env ``n_steps`` times. Returns per-task transition arrays and finished episodes."""
        k, d_o, d_a = len(self.envs), self.obs.shape[1], self.suite.act_dim
        obs = np.empty((k, n_steps, d_o), np.float32)
        nxt = np.empty((k, n_steps, d_o), np.float32)
        act = np.empty((k, n_steps, d_a), np.float32)
        rew = np.empty((k, n_steps), np.float32)
        term = np.empty((k, n_steps), np.float32)
        episodes: List[Tuple[int, float, float, int]] = []
        t0, self.time_policy = time.perf_counter(), 0.0
        for s in range(n_steps):
            a = self._actions()
            obs[:, s] = self.obs
            act[:, s] = a
            for i in range(k):
                # next_obs is the true final observation on truncation: the learner bootstraps from it.
                nxt[i, s], rew[i, s], te, _ = self._step_env(i, a[i], episodes)
                term[i, s] = float(te)
            self.steps += 1
        return {"task_indices": self.task_indices, "env_indices": self.env_indices, "obs": obs, "action": act,
                "reward": rew, "next_obs": nxt, "terminated": term, "episodes": episodes, "steps": k * n_steps,
                **self._times(t0)}

    def _times(self, t0: float) -> Dict[str, float]:
        """Seconds this chunk spent in policy calls and in everything else (stepping the envs, bookkeeping)."""
        busy = time.perf_counter() - t0
        return {"time_policy": self.time_policy, "time_env": busy - self.time_policy}

    def evaluate(self, num_episodes: int, eval_seed: int,
                 weights: Optional[Dict[str, np.ndarray]] = None) -> Dict[int, Dict[str, float]]:
        """Deterministic policy on fresh evaluation envs. Meta-World: metaworld's own protocol helper (success if
        ``info["success"]`` is ever 1; with 50 episodes each of the task's 50 goals exactly once). DMC: mean return.
        ``weights``: evaluate these instead of the collection policy, which stays as it is (a copy holds them).
        Only the tasks whose env j = 0 this worker holds (``eval_tasks``): each task is evaluated once per run.
        """
        from .evaluation import evaluate_tasks

        policy = self.policy
        if weights is not None:
            if getattr(self, "_eval_policy", None) is None:
                self._eval_policy = copy.deepcopy(self.policy)
            policy = self._eval_policy
            policy.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
        if not self.eval_tasks:
            return {}
        mask = torch.as_tensor(self.suite.action_mask[self.eval_tasks], dtype=torch.float32)
        return evaluate_tasks(self.suite, self.eval_tasks, policy, mask, num_episodes,
                              goal_seed=self.spec.goal_seed, eval_seed=eval_seed)


def split_envs(num_tasks: int, num_workers: int, envs_per_task: int = 1) -> List[List[Tuple[int, int]]]:
    """The T x N env slots (task, env index) dealt round-robin to ``num_workers`` workers (>= 1), env-major
    (slot s = j * T + t), so slow and fast tasks mix across workers and a task's envs spread over them. With N = 1
    and W <= T, worker i holds tasks i, i + W, ... as before issue 13. More workers than slots is an error."""
    slots = [(s % num_tasks, s // num_tasks) for s in range(num_tasks * envs_per_task)]
    if not 1 <= num_workers <= len(slots):
        raise ValueError(f"{num_workers} workers for {len(slots)} env slots ({num_tasks} tasks x {envs_per_task} "
                         "envs per task); valid: 1 to the number of slots")
    return [slots[i::num_workers] for i in range(num_workers)]


class _Ready:
    """A finished in-process call, shaped like a Ray future for the pool."""

    def __init__(self, value: Any) -> None:
        self.value = value


class WorkerError:
    """What a failed call returns instead of its result: the worker died or raised."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"WorkerError({self.message!r})"


class _Broken:
    """An in-process worker whose construction raised: every call raises the same error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str):
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise self.exc

        return fail


def _describe(exc: BaseException) -> str:
    try:
        import ray.exceptions as rex
    except ImportError:  # pragma: no cover
        rex = None
    if rex is not None and isinstance(exc, rex.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    elif rex is not None and isinstance(exc, rex.RayActorError):
        return "worker process died (" + (str(exc).splitlines() or ["no details"])[0][:200] + ")"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class WorkerPool:
    """N Ray actors (or one in-process worker when ``use_ray`` is False) with a tiny async interface.

    A call whose worker died or raised yields a ``WorkerError`` instead of a result; ``replace`` starts a fresh
    worker for the same tasks. The pool never retries on its own: the runner decides (and bounds) restarts.
    """

    def __init__(self, specs: Sequence[WorkerSpec], use_ray: bool, worker_cpus: float = 1.0,
                 worker_cls: type = None) -> None:  # type: ignore[assignment]
        self.use_ray = use_ray
        self.specs = list(specs)
        self.worker_cls = worker_cls or RolloutWorker  # a subclass adds collection modes (e.g. on-policy rounds)
        if use_ray:
            import ray

            self._cls = ray.remote(num_cpus=worker_cpus)(self.worker_cls)
        self.workers = [self._spawn(s) for s in self.specs]
        self.pending: Dict[int, Any] = {}  # worker index -> in-flight collect
        self._weights: Any = None  # the last broadcast, for replacements

    def _spawn(self, spec: WorkerSpec) -> Any:
        if self.use_ray:
            return self._cls.remote(spec)  # a constructor error surfaces on the first call
        try:
            return self.worker_cls(spec)
        except Exception as e:
            return _Broken(e)

    def __len__(self) -> int:
        return len(self.workers)

    def _call(self, i: int, method: str, *args: Any) -> Any:
        w = self.workers[i]
        if self.use_ray:
            return getattr(w, method).remote(*args)
        try:
            return _Ready(getattr(w, method)(*args))
        except Exception as e:
            return _Ready(WorkerError(_describe(e)))

    def _get(self, ref: Any) -> Any:
        if not self.use_ray:
            return ref.value
        import ray

        try:
            return ray.get(ref)
        except Exception as e:  # RayActorError (died), RayTaskError (raised), ...
            return WorkerError(_describe(e))

    def pids(self) -> List[int]:
        return [self._get(self._call(i, "ping")) for i in range(len(self.workers))]

    def submit_collect(self, i: int, n_steps: int, method: str = "collect") -> None:
        self.pending[i] = self._call(i, method, n_steps)

    def idle(self) -> List[int]:
        return [i for i in range(len(self.workers)) if i not in self.pending]

    def ready(self, block: bool) -> List[Tuple[int, Any]]:
        """Finished collects as (worker index, result or WorkerError); waits for one when ``block``."""
        if not self.pending:
            return []
        if self.use_ray:
            import ray

            refs = list(self.pending.values())
            if block:
                ray.wait(refs, num_returns=1)
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        else:
            done = set(self.pending.values())
        out = []
        for i, ref in list(self.pending.items()):
            if ref in done:
                out.append((i, self._get(ref)))
                del self.pending[i]
        return out

    def replace(self, i: int, spec: WorkerSpec) -> None:
        """Kill worker ``i`` (if still alive) and start a fresh one for ``spec``, with the latest weights."""
        self.pending.pop(i, None)
        if self.use_ray:
            import ray

            try:
                ray.kill(self.workers[i], no_restart=True)
            except Exception:  # already dead
                pass
        self.specs[i] = spec
        self.workers[i] = self._spawn(spec)
        if self._weights is not None:
            self._call(i, "set_weights", self._weights)

    def broadcast(self, state: Dict[str, np.ndarray]) -> None:
        if self.use_ray:
            import ray

            self._weights = ray.put(state)  # one serialisation shared by every worker
        else:
            self._weights = state
        for i in range(len(self.workers)):
            self._call(i, "set_weights", self._weights)  # in-process: errors resurface on the next collect

    def evaluate(self, num_episodes: int, eval_seed: int, weights: Optional[Dict[str, np.ndarray]] = None
                 ) -> Tuple[Dict[int, Dict[str, float]], Dict[int, str]]:
        """Per-task results from every worker, plus {worker index: error} for workers that failed. ``weights``:
        the policy to evaluate (shipped once), leaving each worker's collection policy as it is."""
        if weights is not None and self.use_ray:
            import ray

            weights = ray.put(weights)
        futures = [self._call(i, "evaluate", num_episodes, eval_seed, weights) for i in range(len(self.workers))]
        merged: Dict[int, Dict[str, float]] = {}
        failed: Dict[int, str] = {}
        for i, f in enumerate(futures):
            r = self._get(f)
            if isinstance(r, WorkerError):
                failed[i] = r.message
            else:
                merged.update(r)
        return merged, failed

    def discard_pending(self) -> None:
        if self.use_ray:
            import ray

            for ref in self.pending.values():
                ray.cancel(ref, force=False)
        self.pending.clear()

    def shutdown(self) -> None:
        self.discard_pending()
        if self.use_ray:
            import ray

            for w in self.workers:
                try:
                    ray.kill(w)
                except Exception:
                    pass
        self.workers = []
