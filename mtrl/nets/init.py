"""Network initialisation schemes (``sac.init`` / ``ppo.init``), applied to a backbone after it is built.

* ``torch``: nothing is changed: PyTorch's ``nn.Linear`` default (Kaiming-uniform with a = √5, i.e. U(±1/√fan_in)
  for weights and biases) or the backbone's own documented init.
* ``he_uniform``: the Meta-World+ reference networks (McLean et al. 2025; rainx0r/metaworld-algorithms
  ``config/nn.py`` ``kernel_init=HE_UNIFORM, bias_init=ZEROS``; ``rl/networks.py`` heads ``uniform(1e-3)`` for the
  policy and ``uniform(3e-3)`` for Q and value functions): hidden weights U(±√(6/fan_in)) (JAX's ``he_uniform``
  = ``nn.init.kaiming_uniform_(nonlinearity="relu")``), biases 0, output layer weights and biases U(±head_bound).
  Small output heads start the policy near mean 0 / log-std 0 whatever the input scale, and Q near 0.

Which parameters are which, for every registered backbone: ``nn.Linear`` modules carry (out, in) weights; weight
banks of parallel layers (experts, modules, per-task heads) are raw 3-d parameters (n, in, out) named ``w…`` or
``…_w``, with biases ``b…`` or ``…_b``; other raw parameters (task embeddings, PaCo's and MOORE's task weights,
norms) keep their backbone's init. The output layer is what the backbone's ``output_parameters()`` names, else its
parameters whose name starts with ``head``, else the last ``nn.Linear``. Every slice of a bank is drawn on its own, as
Meta-World+ does (``nn.vmap(..., split_rngs={"params": True})``): PaCo's K parameter sets, identical at construction
under ``torch`` (the PaCo code's ``kernel_identical_init``), then start apart.
"""

from __future__ import annotations

import math
import re
from typing import Set

import torch
from torch import Tensor, nn

from mtrl.config import INITS  # the valid names (config validation checks them too)

ACTOR_HEAD_BOUND = 1e-3  # rl/networks.py ContinuousActionPolicyTorso: uniform(1e-3) for weights and biases
CRITIC_HEAD_BOUND = 3e-3  # rl/networks.py QValueFunction / ValueFunction: uniform(3e-3)

_BIAS = re.compile(r"^(b\d*|.*_b|bias)$")
_WEIGHT = re.compile(r"^(w\d*|.*_w|weight)$")


def output_parameter_names(net: nn.Module) -> Set[str]:
    fn = getattr(net, "output_parameters", None)
    if callable(fn):
        return set(fn())
    names = {n for n, _ in net.named_parameters() if n.startswith("head")}
    if names:
        return names
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__}: no output layer found for init 'he_uniform' (define "
                         "output_parameters())")
    prefix = f"{linears[-1]}." if linears[-1] else ""
    return {prefix + "weight", prefix + "bias"} & {n for n, _ in net.named_parameters()}


def _fill(p: Tensor, bound: float) -> None:
    with torch.no_grad():
        p.uniform_(-bound, bound)


def init_network(net: nn.Module, scheme: str, head_bound: float) -> nn.Module:
    """Apply ``scheme`` (one of :data:`INITS`) to ``net`` in place; ``head_bound`` for its output layer."""
    if scheme not in INITS:
        raise ValueError(f"init={scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "torch":
        return net
    out = output_parameter_names(net)
    linear_params = {}
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            prefix = f"{mod_name}." if mod_name else ""
            linear_params[prefix + "weight"] = m.in_features
            linear_params[prefix + "bias"] = 0

    for name, p in net.named_parameters():
        parts = name.split(".")
        last = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]  # "w.0" (ParameterList) -> "w"
        if name in out:
            _fill(p, head_bound)
        elif name in linear_params and last == "weight":
            _fill(p, math.sqrt(6.0 / linear_params[name]))
        elif name in linear_params or (_BIAS.match(last) and name not in linear_params):
            with torch.no_grad():
                p.zero_()
        elif _WEIGHT.match(last) and p.dim() == 3:  # a bank (n, in, out)
            _fill(p, math.sqrt(6.0 / p.shape[1]))
    return net
