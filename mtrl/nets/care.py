"""``care``: Contextual Attention-based REpresentations (Sodhani, Zhang, Pineau, ICML 2021; code
facebookresearch/mtrl @ e282c3f, ``MixtureofExpertsEncoder``, ``AttentionBasedExperts``, ``task_encoder.py``).

* Context: a frozen sentence embedding of the task's description, read from ``mtrl/nets/data/task_embeddings.json``
  (made once by ``scripts/make_task_embeddings.py`` with all-MiniLM-L6-v2, 384-d; CARE used RoBERTa, 768-d).
  Task encoder: ReLU -> Linear(384 -> 2·context_dim) -> ReLU -> Linear(-> context_dim) -> ReLU, then
  Linear(context_dim -> context_dim) -> ReLU -> Linear(context_dim -> context_dim): z_context (50-d).
* Encoders: k = ``n_encoders`` (default 6 for T ≤ 10, 10 above: the paper's MT10 / MT50 values) experts on the
  state, each Linear(in -> encoder_dim) -> ReLU -> Linear(encoder_dim -> encoder_dim) (50).
* Attention (the code's form, not the paper's dot product): α = softmax(MLP(stopgrad(z_context)) / temperature),
  MLP = Linear(50 -> 50) -> ReLU -> Linear(50 -> k); z_enc = Σ_j α_j E_j(s).
* Policy / Q input: z_enc ⊕ z_context (the context stays trainable through this path), then an MLP
  width × depth (3 × 400) -> out.
* Deviations: the reference ties the encoders between actor and critic and trains them with the critic loss
  only; here each backbone owns its encoders and context encoder and trains them with its own loss.

Which tasks: ``tasks`` (list of names, or a comma-separated string) or ``suite`` (a suite name, e.g. ``dmc-walker``)
gives the order of task indices. When neither is given, T = 10 / 25 / 50 means the Meta-World MT10 / MT25 / MT50
order; any other T raises ValueError (set ``backbone_kwargs.tasks`` or ``backbone_kwargs.suite``). The JSON holds
every Meta-World v3 task (descriptions from CARE's config) and every DMC task of ``envs.DMC_TASKS``
(a one-sentence description written for this suite); a name missing from it raises ValueError.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ._common import Backbone, check_float, check_int, entropy, parse_options, task_one_hot
from .mlp import mlp
from .moe import ExpertBank, mix
from .registry import register

EMBEDDINGS = Path(__file__).resolve().parent / "data" / "task_embeddings.json"


@lru_cache(maxsize=2)
def load_task_embeddings(path: str = str(EMBEDDINGS)) -> Dict[str, List[float]]:
    data = json.loads(Path(path).read_text())
    return {name: entry["embedding"] for name, entry in data["tasks"].items()}


def resolve_tasks(num_tasks: int, tasks: Any, suite: Optional[str]) -> List[str]:
    if tasks is not None:
        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    elif suite is not None:
        from envs import get_suite

        try:
            names = get_suite(str(suite)).task_names
        except ValueError as e:
            raise ValueError(f"backbone 'care': {str(e).splitlines()[0]}") from None
    elif num_tasks in (10, 25, 50):
        from envs.suites import _metaworld_lists

        names = _metaworld_lists()[f"mt{num_tasks}"]
    else:
        raise ValueError(f"backbone 'care' needs the task names for {num_tasks} tasks: set backbone_kwargs.tasks "
                         "(a,b,c) or backbone_kwargs.suite (e.g. dmc-walker)")
    if len(names) != num_tasks:
        raise ValueError(f"backbone 'care': {len(names)} task names given for {num_tasks} tasks")
    return names


@register("care")
class CARE(Backbone):
    needs_task_names = True  # config.validate fills backbone_kwargs.tasks with the suite's task names
    DEFAULTS: Dict[str, Any] = dict(width=400, depth=3, n_encoders=None, encoder_dim=50, context_dim=50,
                                    temperature=1.0, tasks=None, suite=None, embeddings=None)

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, num_tasks)
        o = parse_options("care", options, self.DEFAULTS)
        width, depth = check_int("care", "width", o["width"]), check_int("care", "depth", o["depth"])
        k = check_int("care", "n_encoders", o["n_encoders"] if o["n_encoders"] is not None else
                      (6 if num_tasks <= 10 else 10))
        de = check_int("care", "encoder_dim", o["encoder_dim"])
        dc = check_int("care", "context_dim", o["context_dim"])
        self.temperature = check_float("care", "temperature", o["temperature"], 1e-6)
        self.task_names = resolve_tasks(num_tasks, o["tasks"], o["suite"])
        table = load_task_embeddings(str(o["embeddings"] or EMBEDDINGS))
        missing = [n for n in self.task_names if n not in table]
        if missing:
            raise ValueError(f"backbone 'care': no description embedding for {missing[0]!r} in "
                             f"{o['embeddings'] or EMBEDDINGS.name}; rerun scripts/make_task_embeddings.py")
        emb = torch.tensor([table[n] for n in self.task_names], dtype=torch.float32)
        self.register_buffer("task_embedding", emb)  # (T, 384), frozen
        self.k = k
        self.context = nn.Sequential(nn.ReLU(), nn.Linear(emb.shape[1], 2 * dc), nn.ReLU(), nn.Linear(2 * dc, dc),
                                     nn.ReLU(), nn.Linear(dc, dc), nn.ReLU(), nn.Linear(dc, dc))
        self.encoders = ExpertBank(k, in_dim, de, de, init="default")
        self.attention = nn.Sequential(nn.Linear(dc, dc), nn.ReLU(), nn.Linear(dc, k))
        self.policy = mlp(de + dc, out_dim, width, depth)

    def _context(self, task_id: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        e = task_one_hot(task_id, self.num_tasks, batch, dtype) @ self.task_embedding.to(dtype)  # (B, 384)
        return self.context(e)

    def attention_weights(self, z: Tensor) -> Tensor:
        return torch.softmax(self.attention(z.detach()) / self.temperature, dim=-1)

    def forward(self, x: Tensor, task_id: Tensor, return_aux: bool = False):
        z = self._context(task_id, x.shape[0], x.dtype)
        z_enc = mix(self.attention_weights(z), self.encoders(x))
        out = self.policy(torch.cat([z_enc, z], dim=-1))
        return (out, out.new_zeros(())) if return_aux else out

    def _diagnostics(self, x: Tensor, task_id: Tensor) -> Dict[str, Any]:
        ids = torch.arange(self.num_tasks, device=x.device)
        a = self.attention_weights(self._context(ids, self.num_tasks, x.dtype))  # (T, k): one context per task
        return {"encoder_attention": a, "attention_entropy": entropy(a)}
