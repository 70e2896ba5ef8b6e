"""The learner as a part of its own (design.md §3): the agent, the replay on the learner's device, the (compiled)
update step, its RNG streams and its checkpoint state — used alike by the off-policy loop (``mtrl/runner.py``),
the on-policy loop (``mtrl/onpolicy.py``) and the Ray learner actor (``mtrl/cluster.py``), which runs either loop.

Inside one update nothing goes back to the host (``agents/optim.py``, ``tests/test_device.py``); the loops read
detached values every ``log_every`` updates and call :meth:`Learner.check` there, which raises
``agents.sac.NonFiniteLoss`` for steps the device skipped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from agents.ppo import MTPPO
from agents.sac import MTSAC
from envs import Suite

from .config import Config
from .devices import global_rng_states, restore_global_rng
from .replay import make_replay


def agent_kwargs(cfg: Config, device: torch.device, seed: int) -> Dict[str, Any]:
    """The keyword arguments MTSAC and MTPPO share: networks, methods, device and seed."""
    return dict(backbone=cfg.backbone, backbone_kwargs=cfg.backbone_kwargs, method=cfg.method,
                method_kwargs=cfg.method_kwargs, actor_method=cfg.actor_method or None, device=device, seed=seed,
                critic_backbone=cfg.critic_backbone or None, critic_backbone_kwargs=cfg.critic_backbone_kwargs)


class Learner:
    """MT-SAC with its per-task replay (``on_policy=False``) or MT-PPO without one (``on_policy=True``)."""

    def __init__(self, cfg: Config, suite: Suite, device: torch.device, agent_seed: int, replay_seed: int,
                 on_policy: bool = False) -> None:
        self.cfg, self.device = cfg, device
        T = suite.num_tasks
        kw = agent_kwargs(cfg, device, agent_seed)
        self.agent: Any
        if on_policy:
            self.agent = MTPPO(suite.obs_dim, suite.act_dim, T, suite.action_mask, cfg.ppo, **kw)
            self.replay = None
        else:
            self.agent = MTSAC(suite.obs_dim, suite.act_dim, T, suite.action_mask, cfg.sac, **kw)
            self.replay = make_replay(cfg.replay_device, device, T, cfg.sac.buffer_size // T, suite.obs_dim,
                                      suite.act_dim, seed=replay_seed)
        self.compile_mode = "off"

    def compile(self) -> str:
        """Apply ``cfg.compile`` (``agents/compiled.py``): the graphs are built at the first update. MT-SAC on CUDA
        also captures the compiled update as one CUDA graph unless ``cuda_graph`` is off (``agents/graphed.py``)."""
        if isinstance(self.agent, MTSAC):
            capture = self.device.type == "cuda" and bool(getattr(self.cfg, "cuda_graph", True))
            self.compile_mode = self.agent.compile(self.cfg.compile, capture=capture)
        else:
            self.compile_mode = self.agent.compile(self.cfg.compile)
        return self.compile_mode

    # --- off-policy -----------------------------------------------------------------------------------------
    def add(self, result: Dict[str, Any]) -> None:
        """A worker's chunk of task-tagged transitions into the replay."""
        assert self.replay is not None
        for k, t in enumerate(result["task_indices"]):
            self.replay.add(t, result["obs"][k], result["action"][k], result["reward"][k], result["next_obs"][k],
                            result["terminated"][k])

    def can_update(self) -> bool:
        return self.replay is not None and self.replay.can_sample(self.cfg.sac.batch_size)

    def update(self) -> Dict[str, Any]:
        """One MT-SAC update on a fresh (T, B) sample; returns detached device tensors."""
        assert self.replay is not None
        batch = self.replay.sample(self.cfg.sac.batch_size, self.device, context_len=self.agent.context_len)
        return self.agent.update(batch)

    # --- shared ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """The periodic host check: raise ``NonFiniteLoss`` (or a method's deferred ValueError) if needed."""
        self.agent.nonfinite()

    def policy_state(self) -> Dict[str, np.ndarray]:
        return self.agent.policy_state()

    def state_dict(self, save_replay: bool) -> Dict[str, Any]:
        """The checkpoint entries the learner owns (top-level keys of checkpoint.pt, as before this class)."""
        out: Dict[str, Any] = {"agent": self.agent.state_dict(), "torch_rng": global_rng_states()}
        if self.replay is not None:
            out["replay_rng"] = self.replay.rng_state()
            if save_replay:
                out["replay"] = self.replay.state_dict()
        return out

    def load_state_dict(self, payload: Dict[str, Any]) -> List[str]:
        """Restore from a checkpoint payload; returns the one-line notes to print (RNG streams re-derived because
        the checkpoint came from another device)."""
        self.agent.load_state_dict(payload["agent"])
        notes: List[Optional[str]] = [self.agent.restore_note]
        if self.replay is not None:
            if "replay" in payload:
                self.replay.load_state_dict(payload["replay"])
            if "replay_rng" in payload:
                notes.append(self.replay.load_rng_state(payload["replay_rng"]))
        restore_global_rng(payload["torch_rng"])
        return [n for n in notes if n]
