"""Every setting of a run, in typed dataclasses; YAML presets; ``--set a.b=c`` overrides; validation.

Precedence (last wins): dataclass defaults < ``configs/default.yaml`` < the suite's budget (:func:`suite_budget`:
``total_steps`` and ``sac.buffer_size``) < ``configs/methods/<method>.yaml`` (a preset; its ``suites: {<suite>:
{...}}`` section, deep-merged over the rest of the preset for that suite) < ``--config FILE.yaml`` < explicit
command-line flags < ``--set key=value``. Unknown keys and bad values raise ``ConfigError`` with one line naming the
value and what is valid; ``scripts/train.py`` turns that into exit code 2.

A preset is named by ``--method``: either a gradient method's own file (``pcgrad``: ``method: pcgrad``) or a
baseline whose ``method:`` is another name (``sm``, ``moore``, ``mtmhsac``...: ``method: mtsac``); ``preset``
records which file was applied (config.yaml, run_info.json, TensorBoard TEXT).

A preset's ``backbone_kwargs`` describe ITS backbone (:func:`fit_preset_options`, README *Backbones*): when
``--backbone`` (``--config``, ``--set backbone=``) picks another one, only the preset's ``width`` and ``depth``
follow, and only where the new backbone takes them and its structure does not fix them (HoME's two levels fix
``depth`` = 2: the preset's depth yields, with a one-line note at start-up); the preset's other options (moore's
``n_experts``, sm's ``num_modules``...) are not used. A ``--critic-backbone`` gets the preset's options by the same
rule, under its own ``critic_backbone_kwargs``. Options the user sets (``--config``, ``--set``) always go to the
chosen backbone, and a bad one is an error naming where it was set (:func:`sources`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the bad value and the valid choices."""


@dataclass
class SACConfig:
    """MT-SAC (published defaults: Yu et al. 2019; CARE/mtrl; Meta-World+ baselines)."""

    batch_size: int = 128  # per task: the update batch is (T, batch_size)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    tau: float = 0.005
    gamma: float = 0.99
    init_alpha: float = 1.0
    buffer_size: int = 1_000_000  # transitions in total, split evenly over tasks
    learning_starts: int = 1500  # env steps PER TASK with uniform random actions before updates begin
    updates_per_step: float = 1.0  # gradient updates per vector step (one env step of every task)
    actor_update_every: int = 1
    target_update_every: int = 1
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    max_grad_norm: float = 0.0  # 0 = no clipping (mtrl/CARE); Meta-World+ uses 1.0
    adam_eps: float = 1e-8  # Adam epsilon of actor, critic and temperature (PyTorch's; Meta-World+ 1e-5)
    # Network init: "torch" (PyTorch's defaults, each backbone's own) or "he_uniform" (Meta-World+: He-uniform
    # weights, zero biases, output layers uniform +-1e-3 actor / +-3e-3 critic; mtrl/nets/init.py)
    init: str = "torch"
    # Soft Modularization's task reweighting (official temp_reweight; Meta-World+ use_task_weights): task t's
    # critic and actor losses times w_t = T * softmax(-log alpha)_t, detached (agents/sac.py)
    task_weights: bool = False


@dataclass
class PPOConfig:
    """Multi-task PPO (issue 5; Schulman et al. 2017). Defaults: Meta-World+ PPO baseline (McLean et al. 2025,
    rainx0r/metaworld-algorithms) where it states them -- 10,000 env steps per task per round, 16 epochs,
    GAE lambda 0.97 -- and SB3/CleanRL continuous-control values otherwise."""

    rollout_steps: int = 10_000  # env steps PER TASK collected with the current policy each round
    epochs: int = 16  # passes over each round's data
    minibatches: int = 32  # per epoch; each minibatch holds rollout_steps / minibatches samples OF EVERY task
    gamma: float = 0.99
    gae_lambda: float = 0.97
    clip: float = 0.2  # surrogate ratio clip epsilon
    vf_clip: float = 0.0  # value clip around the old value (0 = off)
    ent_coef: float = 0.0
    vf_coef: float = 0.5  # scales the critic's per-task loss (separate network and optimizer; see agents/ppo.py)
    lr: float = 3e-4  # actor and critic (Adam)
    # Linear decay of lr to 0 over the run (CleanRL's anneal_lr): round r starts at lr * (1 - env_steps / total).
    # The schedule spans --total-steps; resuming with a larger budget stretches the rest of it.
    anneal_lr: bool = False
    max_grad_norm: float = 0.5  # per network, after the method combined the task gradients; 0 = off
    target_kl: float = 0.0  # stop the round's epochs once approx KL > 1.5 * target_kl (0 = off)
    norm_obs: bool = True  # per-task running mean/std of observations, shipped to workers with the weights
    norm_adv: bool = True  # per-task advantage normalisation over each round
    log_std: str = "param"  # "param": state-independent per-task log-std; "state": a second output of the net
    init_log_std: float = 0.0
    obs_clip: float = 10.0  # normalised observations are clipped to +-obs_clip
    adam_eps: float = 1e-5  # both networks (SBX/Meta-World+ PPO)
    init: str = "torch"  # as sac.init ("torch" | "he_uniform")


@dataclass
class Config:
    suite: Optional[str] = None
    tasks: List[str] = field(default_factory=list)
    method: str = "mtsac"
    preset: str = ""  # the configs/methods/<name>.yaml applied (set by scripts/train.py; "" = none)
    method_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Method for the actor loss when it must differ ("" = same as `method`): loss-weighting methods that need
    # positive losses (famo, igb, uw) weight the critic and average the actor, whose SAC loss can be negative.
    actor_method: str = ""
    algo: str = "sac"
    backbone: str = "mlp"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    # The critic's (SAC twin Q / PPO value) network when it must differ ("" = `backbone` with `backbone_kwargs`),
    # e.g. MENTOR: moe in the actor, a plain MLP critic. Its options are then `critic_backbone_kwargs`, over a
    # preset's backbone options by the rule of fit_preset_options (none from a preset without any).
    critic_backbone: str = ""
    critic_backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    total_steps: int = 20_000_000  # env steps summed over all tasks (MT10: 2M per task); per suite: suite_budget
    workers: int = 2
    # Environments per task (issue 13), spread with the tasks' over the workers (mtrl/rollout.py split_envs);
    # --workers may then go up to tasks x envs_per_task. 1 = the published protocols.
    envs_per_task: int = 1
    worker_cpus: float = 1.0
    device: str = "auto"
    # Where the SAC replay lives (mtrl.replay.make_replay): "auto" = on the learner's device when it fits in free
    # memory with headroom, else host numpy; "cpu" = host numpy (bit-identical sampling to earlier runs); "cuda" =
    # preallocated on the GPU (an error without one). MT10 at 1M transitions is about 340 MB.
    replay_device: str = "auto"
    # torch.compile of the learner's update step: "auto" (the trainer picks), "off" (eager), or a torch.compile
    # mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune".
    compile: str = "auto"
    # On CUDA, the compiled update is captured as ONE CUDA graph and replayed each update (agents/graphed.py);
    # false = compiled without that capture. No effect on CPU or with compile=off.
    cuda_graph: bool = True
    # torch.set_float32_matmul_precision for the learner's process (mtrl/base_trainer.py): "auto" = "high" (TF32
    # GEMMs) on CUDA, as the JAX reference's default GPU precision does for float32, and "highest" elsewhere (CPU
    # numerics unchanged); or "highest" | "high" | "medium".
    matmul_precision: str = "auto"
    run_dir: Optional[str] = None
    eval_every: int = 200_000  # env steps (all tasks); 0 = only at the end
    eval_episodes: int = 50  # per task; Meta-World protocol: 50 = one per goal
    checkpoint_every: int = 200_000  # env steps; 0 = only at the end
    resume: Optional[str] = None
    address: Optional[str] = None
    log_every: int = 100  # updates between train/* scalars
    log_grad_every: int = 1000  # updates between grad/* diagnostics (Jacobian methods)
    weight_sync_every: int = 25  # updates between weight broadcasts to workers
    chunk_steps: int = 50  # env steps per environment per worker call
    max_lag_steps: int = 0  # env steps collected ahead of the update-to-data ratio; 0 = auto (2 rounds)
    progress: bool = True
    save_replay: bool = False  # store the replay buffer in checkpoints (exact resume; large)
    # Where the learner runs: "driver" (this process), "actor" (a Ray actor; with num_gpus=1 when it wants CUDA),
    # "auto" (an actor when --address joins a cluster with a GPU and the device is not cpu).
    learner_placement: str = "auto"
    dashboard: bool = False  # start the Ray dashboard (bound to 127.0.0.1) with the embedded local Ray
    max_worker_restarts: int = 3  # consecutive failures of one worker before the run stops (with a checkpoint)
    fault_inject: str = ""  # testing knob: "reset:<task>" (env raises on every reset) or "nan_reward:<task>"
    nan_policy: str = "stop"  # a non-finite loss: "stop" the run (exit 1, last good checkpoint kept) or "skip" it
    sac: SACConfig = field(default_factory=SACConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)  # used when algo == "ppo" (issue 5)


ALGOS = ("sac", "ppo")
DEVICES = ("auto", "cpu", "cuda")
REPLAY_DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")
INITS = ("torch", "he_uniform")


def _fields(cls: type) -> Dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type = Config, prefix: str = "") -> List[str]:
    keys = []
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = getattr(tp, "__origin__", None)
    args = getattr(tp, "__args__", ())
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or value == "null":
            return None
        tp = next(a for a in args if a is not type(None))
        origin = getattr(tp, "__origin__", None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not a boolean; valid: true, false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is not a number")
        return float(value)
    if tp is str:
        if key == "compile" and isinstance(value, bool):  # YAML 1.1 reads `off`/`on` as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a string")
        return str(value)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not a list")
        return [str(v) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is not a mapping")
        return dict(value)
    return value


def apply_mapping(cfg: Any, mapping: Dict[str, Any], source: str, prefix: str = "") -> None:
    """Set nested fields from a (possibly nested) mapping; unknown keys raise ConfigError."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(mapping).__name__}")
    types = _fields(type(cfg))
    for key, value in mapping.items():
        full = prefix + str(key)
        if key not in types:
            raise ConfigError(f"unknown config key {full!r} in {source}; valid: {', '.join(valid_keys())}")
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            apply_mapping(getattr(cfg, key), value, source, prefix=full + ".")
        else:
            setattr(cfg, key, _coerce(full, value, tp))


def set_key(cfg: Config, assignment: str) -> None:
    """Apply one ``a.b=c`` override; the value is parsed as YAML (so 3e-4, true, [a, b], {k: v} work).

    ``method_kwargs.x=1``, ``backbone_kwargs.x=1`` and ``critic_backbone_kwargs.x=1`` set one entry of those
    free-form mappings; the method or backbone itself validates its options when it is built.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} is not key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    head, _, rest = key.partition(".")
    if head in ("method_kwargs", "backbone_kwargs", "critic_backbone_kwargs") and rest:
        getattr(cfg, head)[rest] = value
        return
    mapping: Dict[str, Any] = {}
    node = mapping
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    apply_mapping(cfg, mapping, f"--set {assignment}")


KWARG_MAPPINGS = ("method_kwargs", "backbone_kwargs", "critic_backbone_kwargs")
# What a preset's backbone options carry to another backbone: the sizes every backbone takes.
CARRIED_OPTIONS = ("width", "depth")


def sources(cfg: Config) -> Dict[str, str]:
    """Where the names and options of the method and backbones came from, for error messages: ``{"backbone":
    "--backbone", "backbone_kwargs.depth": "configs/methods/pcgrad.yaml", ...}``. Filled by
    ``mtrl.train_cli.make_config`` (:func:`record_sources`); empty for a Config built another way. Not a setting:
    not saved in config.yaml."""
    return cfg.__dict__.setdefault("_sources", {})


def notes(cfg: Config) -> List[str]:
    """One-line notes about how the settings were combined (:func:`fit_preset_options`), printed at start-up."""
    return cfg.__dict__.setdefault("_notes", [])


def record_sources(cfg: Config, mapping: Dict[str, Any], source: str) -> None:
    """Note ``source`` for the names and options a settings layer sets (a mapping replaces a mapping whole, as
    :func:`apply_mapping` does)."""
    src = sources(cfg)
    for key in ("method", "backbone", "critic_backbone"):
        if key in mapping:
            src[key] = source
    for head in KWARG_MAPPINGS:
        if isinstance(mapping.get(head), dict):
            for k in [k for k in src if k.startswith(head + ".")]:
                del src[k]
            src.update({f"{head}.{k}": source for k in mapping[head]})


def record_set(cfg: Config, assignment: str) -> None:
    """:func:`record_sources` for one ``--set key=value`` (call after :func:`set_key` accepted it)."""
    key = assignment.split("=", 1)[0].strip()
    head, _, rest = key.partition(".")
    if head in KWARG_MAPPINGS and rest:
        sources(cfg)[key] = f"--set {assignment}"
    elif head in KWARG_MAPPINGS or key in ("method", "backbone", "critic_backbone"):
        record_sources(cfg, {key: getattr(cfg, key)}, f"--set {assignment}")


def _fmt(options: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _carry(options: Dict[str, Any], backbone: str) -> tuple:
    """(kept, not used, yielded {option: fixed value}) of a preset's options for another backbone."""
    from mtrl.nets.registry import backbone_options, fixed_options

    takes, fixed = backbone_options(backbone), fixed_options(backbone)
    kept, dropped, yielded = {}, {}, {}
    for k, v in options.items():
        if k not in CARRIED_OPTIONS or (takes is not None and k not in takes):
            dropped[k] = v
        elif k in fixed and fixed[k][0] != v:
            yielded[k] = v
        else:
            kept[k] = v
    return kept, dropped, yielded


def fit_preset_options(cfg: Config, preset_backbone: str, preset_options: Dict[str, Any], source: str) -> None:
    """THE RULE for a preset's ``backbone_kwargs`` (``preset_options``, from ``source`` =
    ``configs/methods/<preset>.yaml``) once the run's backbone is not the preset's (``preset_backbone``):

    * they describe the preset's backbone: a network built on that backbone gets them all;
    * a network on another backbone gets only ``width`` and ``depth`` (:data:`CARRIED_OPTIONS`), where it takes
      them (:func:`mtrl.nets.registry.backbone_options`) with the same meaning (hidden size, layers); the
      preset's other options (moore's ``n_experts``...) belong to its backbone and are not used;
    * where the backbone's structure fixes one of them (:func:`mtrl.nets.registry.fixed_options`: HoME's
      ``depth`` = 2, a meta level and a task level) the preset's value yields to it;
    * the critic: with ``critic_backbone`` set, it gets the preset's options by the same rule, under the user's
      ``critic_backbone_kwargs`` (those win key by key);
    * options the user set (``--config``, ``--set``; :func:`sources` says which) are never touched here: they go
      to the chosen backbone, and :func:`validate` names their source when they are invalid there.

    Anything dropped or yielded gives one line in :func:`notes` (printed at start-up)."""
    src = sources(cfg)

    def fit(role: str, backbone: str, options: Dict[str, Any]) -> Dict[str, Any]:
        kept, dropped, yielded = _carry(options, backbone)
        if dropped or yielded:
            from mtrl.nets.registry import fixed_options

            fixed = fixed_options(backbone)
            said = [f"{_fmt(kept)} used"] if kept else []
            if dropped:
                said.append(f"{_fmt(dropped)} not used (options of {preset_backbone})")
            said += [f"{k}={v!r} yields to {backbone}'s fixed {k}={fixed[k][0]!r} ({fixed[k][1]})"
                     for k, v in yielded.items()]
            notes(cfg).append(f"note: {role} {backbone!r} is not the preset's {preset_backbone!r}; of its options "
                              f"in {source}: {'; '.join(said)}")
        return kept

    if cfg.backbone != preset_backbone:
        own = {k: v for k, v in cfg.backbone_kwargs.items() if src.get(f"backbone_kwargs.{k}") == source}
        kept = fit("backbone", cfg.backbone, own)
        for k in set(own) - set(kept):
            del cfg.backbone_kwargs[k]
            del src[f"backbone_kwargs.{k}"]
    if cfg.critic_backbone and preset_options:
        kept = (dict(preset_options) if cfg.critic_backbone == preset_backbone
                else fit("critic_backbone", cfg.critic_backbone, preset_options))
        for k, v in kept.items():
            if k not in cfg.critic_backbone_kwargs:
                cfg.critic_backbone_kwargs[k] = v
                src[f"critic_backbone_kwargs.{k}"] = source


def _strip_own_prefix(message: str, kind: str, name: str) -> str:
    """A backbone's or method's message without its own ``backbone 'x':`` prefix (the caller adds the role's)."""
    for pre in (f"{kind} {name!r}: ", f"{kind} {name!r} "):
        if message.startswith(pre):
            return message[len(pre):]
    return message


ROLE_OPTIONS = {"method": "method_kwargs", "actor_method": "method_kwargs", "backbone": "backbone_kwargs",
                "critic_backbone": "critic_backbone_kwargs"}


def said_with_sources(cfg: Config, role: str, options: Dict[str, Any], keys: List[str]) -> str:
    """``--set backbone_kwargs.a=1, b=2, c=3 in configs/methods/x.yaml``: where the options ``keys`` of ``role``
    were set (:func:`sources`), grouped by file; an option filled in by validation has no source."""
    src, head = sources(cfg), ROLE_OPTIONS[role]
    groups: Dict[str, List[str]] = {}  # source -> the options set there
    for k in keys:
        groups.setdefault(src.get(f"{head}.{k}", ""), []).append(f"{k}={options[k]!r}")
    said = []
    for where, kv in groups.items():
        if where.startswith("--set "):  # one option each, and it shows the value
            said.append(where)
        else:
            said.append(", ".join(kv) + (f" in {where}" if where else ""))
    return ", ".join(said)


def option_error(cfg: Config, role: str, name: str, options: Dict[str, Any], message: str) -> ConfigError:
    """One line: ``<role> '<name>': <message> (<option>=<value> from <source>...)`` naming where the options the
    message mentions were set (flag, --set, --config file, configs/methods/<preset>.yaml)."""
    kind = "method" if role in ("method", "actor_method") else "backbone"
    msg = _strip_own_prefix(message.splitlines()[0] if message else "", kind, name)
    msg = msg[len("got "):] if msg.startswith("got ") else msg  # "got unknown option(s)" after the prefix
    src, head = sources(cfg), ROLE_OPTIONS[role]
    named = [k for k in options if f"{head}.{k}" in src and re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", msg)]
    return ConfigError(f"{role} {name!r}: {msg}" + (f" ({said_with_sources(cfg, role, options, named)})"
                                                    if named else ""))


def load_yaml(path: os.PathLike | str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data


def method_preset(name: str) -> Optional[Path]:
    p = CONFIG_DIR / "methods" / f"{name}.yaml"
    return p if p.is_file() else None


def available_presets() -> List[str]:
    """Names ``--method`` accepts as presets (configs/methods/*.yaml)."""
    return sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_preset(name: str, suite: Optional[str]) -> Optional[Dict[str, Any]]:
    """A preset's settings for ``suite``: the file without its ``suites:`` section, with ``suites[suite]`` (if any)
    deep-merged over it, so an MT50 entry can change one backbone option and keep the others. None: no preset."""
    path = method_preset(name)
    if path is None:
        return None
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"configs/methods/{path.name}: expected a mapping of settings")
    per_suite = data.pop("suites", None) or {}
    if not isinstance(per_suite, dict) or not all(isinstance(v, dict) for v in per_suite.values()):
        raise ConfigError(f"configs/methods/{path.name}: 'suites' must map suite names to settings")
    return _deep_merge(data, per_suite.get(suite, {})) if suite else data


# Budgets per suite (2M env steps and 100k replay transitions per task: Meta-World+, McLean et al. 2025,
# rainx0r/metaworld-algorithms examples/multi_task/pcgrad_mt10.py and paco_mt10.py (MT50), the same for MT1/MT25 and a
# custom --tasks list). DMC suites: 1M env steps per task (the usual DMC state-based budget, e.g. SAC and BRC
# curves to 1M) and a replay that keeps all of them (1M per task, as single-task SAC at that budget).
BUDGET_PER_TASK = {"metaworld": (2_000_000, 100_000), "dmc": (1_000_000, 1_000_000)}


def suite_budget(suite: Optional[str], tasks: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """``{"total_steps": ..., "sac": {"buffer_size": ...}}`` for a suite (per-task budget × tasks), or None when the
    suite does not resolve (validation reports it later). A mixed suite takes the Meta-World numbers."""
    from envs import get_suite

    try:
        s = get_suite(suite, tasks or None)
    except ValueError:
        return None
    steps, buffer = BUDGET_PER_TASK.get(s.kind, BUDGET_PER_TASK["metaworld"])
    return {"total_steps": steps * s.num_tasks, "sac": {"buffer_size": buffer * s.num_tasks}}


def default_workers(slots: int, cpus: Optional[int] = None) -> int:
    """The machine's default worker count: ``min(env slots, max(1, cpus - 2))``, two cores left to the learner's
    host side (the driver's loop, dispatch, replay copies); ``cpus`` defaults to ``os.cpu_count()``. A 2-core
    machine gets 1 worker, 16 cores MT10 10 (one per task)."""
    cpus = os.cpu_count() if cpus is None else cpus
    return max(1, min(slots, max(1, (cpus or 1) - 2)))


def fit_default_workers(cfg: Config) -> None:
    """Called when no flag, ``--config``, preset or ``--set`` named ``workers``: the default then fits the machine
    and the suite, :func:`default_workers` over the env slots (tasks x envs_per_task). Joining a cluster
    (``--address``), where this machine's cores say nothing about the cluster's, it stays ``cfg.workers`` (2)
    capped at the slots. An explicit ``--workers`` above the slots is refused by ``validate`` instead."""
    from envs import get_suite

    try:
        slots = get_suite(cfg.suite, cfg.tasks or None).num_tasks * max(1, cfg.envs_per_task)
    except ValueError:
        return  # validate() names the bad suite
    cfg.workers = min(cfg.workers, slots) if cfg.address else default_workers(slots)


def validate(cfg: Config) -> None:
    """Check every setting (names against their registries, options by building the method and backbone once).

    Fills in derived settings: ``backbone_kwargs.tasks`` for backbones that embed task names (care).
    """
    from envs import get_suite
    from mtrl.plugins import normalize as _plugin_normalize

    from mtrl.gradients.registry import METHODS
    from mtrl.nets.registry import BACKBONES

    if cfg.algo not in ALGOS:
        raise ConfigError(f"unknown algo {cfg.algo!r}; valid: {', '.join(ALGOS)}")
    # Names, plugin references (module:Class, file.py:Class) and entry points resolve through the registries
    # (mtrl/plugins.py); a file reference is stored with its absolute path so workers and --resume find it.
    # "stl" (issue 7): the single-task reference, one SB3 SAC per task (mtrl/stl.py); not a gradient method.
    for role, registry in (("method", METHODS), ("actor_method", METHODS), ("backbone", BACKBONES),
                           ("critic_backbone", BACKBONES)):
        name = getattr(cfg, role)
        if not name or (role == "method" and name == "stl"):
            continue
        setattr(cfg, role, _plugin_normalize(name))
        try:
            registry.get(getattr(cfg, role))
        except ValueError as e:
            msg = str(e).splitlines()[0]
            if role == "method":  # --method also takes the baseline presets (sm, moore, mtmhsac...)
                msg += f"; presets: {', '.join(available_presets())}"
            where = sources(cfg).get(role, "")
            if where and not where.startswith("--" + role.replace("_", "-")):  # a flag names itself
                msg += f" ({role} from {where})"
            raise ConfigError(msg if role in ("method", "backbone") or not msg.startswith("unknown")
                              else msg.replace(f"unknown {registry.kind}", f"unknown {role}", 1)) from None
    if cfg.preset and method_preset(cfg.preset) is None:
        raise ConfigError(f"unknown preset {cfg.preset!r}; valid: {', '.join(available_presets())}")
    for sec in ("sac", "ppo"):
        if getattr(cfg, sec).init not in INITS:
            raise ConfigError(f"{sec}.init={getattr(cfg, sec).init!r}; valid: {', '.join(INITS)}")
        if not getattr(cfg, sec).adam_eps > 0:
            raise ConfigError(f"{sec}.adam_eps={getattr(cfg, sec).adam_eps} must be > 0")
    if cfg.learner_placement not in ("auto", "driver", "actor"):
        raise ConfigError(f"learner_placement={cfg.learner_placement!r}; valid: auto, driver, actor")
    if cfg.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"nan_policy={cfg.nan_policy!r}; valid: stop, skip")
    if cfg.fault_inject and cfg.fault_inject.partition(":")[0] not in ("reset", "nan_reward"):
        raise ConfigError(f"fault_inject={cfg.fault_inject!r}; valid: reset:<task>, nan_reward:<task>")
    if cfg.device not in DEVICES:
        raise ConfigError(f"unknown device {cfg.device!r}; valid: {', '.join(DEVICES)}")
    if cfg.replay_device not in REPLAY_DEVICES:
        raise ConfigError(f"replay_device={cfg.replay_device!r}; valid: {', '.join(REPLAY_DEVICES)}")
    if cfg.compile not in COMPILE_MODES:
        raise ConfigError(f"compile={cfg.compile!r}; valid: {', '.join(COMPILE_MODES)}")
    if not isinstance(cfg.cuda_graph, bool):
        raise ConfigError(f"cuda_graph={cfg.cuda_graph!r} is not a boolean; valid: true, false")
    if cfg.matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={cfg.matmul_precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    positive = {"total_steps": cfg.total_steps, "eval_episodes": cfg.eval_episodes, "chunk_steps": cfg.chunk_steps,
                "log_every": cfg.log_every, "log_grad_every": cfg.log_grad_every,
                "weight_sync_every": cfg.weight_sync_every, "sac.batch_size": cfg.sac.batch_size,
                "sac.buffer_size": cfg.sac.buffer_size, "sac.actor_update_every": cfg.sac.actor_update_every,
                "sac.target_update_every": cfg.sac.target_update_every}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k.replace('_', '-') if '.' not in k else k}={v} must be > 0")
    non_negative = {"seed": cfg.seed, "workers": cfg.workers, "eval_every": cfg.eval_every,
                    "checkpoint_every": cfg.checkpoint_every,
                    "max_lag_steps": cfg.max_lag_steps,
                    "max_worker_restarts": cfg.max_worker_restarts, "sac.learning_starts": cfg.sac.learning_starts,
                    "sac.max_grad_norm": cfg.sac.max_grad_norm}
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{k.replace('_', '-') if '.' not in k else k}={v} must be >= 0")
    if cfg.worker_cpus <= 0:
        raise ConfigError(f"worker_cpus={cfg.worker_cpus} must be > 0")
    if not 0.0 < cfg.sac.tau <= 1.0:
        raise ConfigError(f"sac.tau={cfg.sac.tau} must be in (0, 1]")
    if not 0.0 <= cfg.sac.gamma <= 1.0:
        raise ConfigError(f"sac.gamma={cfg.sac.gamma} must be in [0, 1]")
    if cfg.sac.updates_per_step <= 0:
        raise ConfigError(f"sac.updates_per_step={cfg.sac.updates_per_step} must be > 0")
    for k in ("actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
        if getattr(cfg.sac, k) <= 0:
            raise ConfigError(f"sac.{k}={getattr(cfg.sac, k)} must be > 0")
    _validate_ppo(cfg)
    try:
        suite = get_suite(cfg.suite, cfg.tasks or None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_together(cfg, suite)
    # Build the method and backbone once to validate their options (cheap; raises ValueError on bad options).
    from mtrl.gradients import get_method
    from mtrl.nets import build_backbone

    try:
        if cfg.method != "stl":  # stl has no gradient method to build (issue 7)
            get_method(cfg.method, suite.num_tasks, **cfg.method_kwargs)
    except (TypeError, ValueError) as e:
        raise option_error(cfg, "method", cfg.method, cfg.method_kwargs, str(e)) from None
    from mtrl.nets.context import with_transition_dim
    from mtrl.nets.registry import backbone_options

    roles = [("backbone", cfg.backbone, cfg.backbone_kwargs)]
    if cfg.critic_backbone:
        roles.append(("critic_backbone", cfg.critic_backbone, cfg.critic_backbone_kwargs))
    elif cfg.critic_backbone_kwargs:
        raise ConfigError("critic_backbone_kwargs is set but critic_backbone is not (the critic then uses "
                          "backbone and backbone_kwargs)")
    context_lens = set()
    for role, name, kwargs in roles:
        if getattr(BACKBONES.get(name), "needs_task_names", False) and not {"tasks", "suite"} & set(kwargs):
            # Derived setting, stored in config.yaml: a custom 10-task list must not be mistaken for MT10's order.
            kwargs["tasks"] = suite.task_names
        takes = backbone_options(name)
        unknown = sorted(set(kwargs) - takes) if takes is not None else []
        if unknown:
            raise ConfigError(f"{role} {name!r}: unknown option(s) {', '.join(unknown)} "
                              f"({said_with_sources(cfg, role, kwargs, unknown)}); valid: {', '.join(sorted(takes))}")
        try:
            bb = build_backbone(name, 4, 2, suite.num_tasks,
                                **with_transition_dim(name, kwargs, suite.obs_dim, suite.act_dim))
        except (TypeError, ValueError) as e:
            raise option_error(cfg, role, name, kwargs, str(e)) from None
        if getattr(bb, "context_len", 0):
            context_lens.add(bb.context_len)
            if cfg.algo != "sac":
                # PPO's rollouts and minibatches do not carry per-step contexts (see mtrl/nets/context.py).
                raise ConfigError(f"{role} {name!r} with task ids hidden (use_task_id=false) runs with algo 'sac' "
                                  f"only; got algo {cfg.algo!r}")
    if len(context_lens) > 1:
        raise ConfigError(f"backbone and critic_backbone read contexts of different lengths {sorted(context_lens)}; "
                          "set the same context_len")
    _validate_collection(cfg, suite.num_tasks, bool(context_lens))


def _validate_collection(cfg: Config, num_tasks: int, reads_context: bool) -> None:
    """issue 13: environments per task and the workers that share them (no silent cap on --workers)."""
    n = cfg.envs_per_task
    if n < 1:
        raise ConfigError(f"envs-per-task={n} must be >= 1")
    slots = num_tasks * n
    if cfg.workers > slots:
        raise ConfigError(f"--workers {cfg.workers} is more than the {slots} environment slots ({num_tasks} task(s) "
                          f"x envs-per-task {n}); valid: --workers 0 to {slots}, or raise --envs-per-task")
    if cfg.algo == "ppo" and cfg.ppo.rollout_steps % n:
        raise ConfigError(f"ppo.rollout_steps={cfg.ppo.rollout_steps} is not a multiple of envs-per-task={n} "
                          "(each of a task's envs collects rollout_steps / envs-per-task steps a round)")
    if n > 1 and cfg.method == "stl":
        raise ConfigError(f"envs-per-task={n} cannot run with method 'stl' (one SB3 SAC per task, one env each); "
                          "valid: envs-per-task 1")
    if n > 1 and reads_context:
        # The replay's context windows are a task's ring in order (mtrl/nets/context.py): one env per task.
        raise ConfigError(f"envs-per-task={n} cannot run with a backbone that reads contexts (use_task_id=false); "
                          "valid: envs-per-task 1")


def _validate_ppo(cfg: Config) -> None:
    """issue 5: the ppo section (checked whatever the algo, so a bad preset fails early)."""
    p = cfg.ppo
    for k in ("rollout_steps", "epochs", "minibatches"):
        if getattr(p, k) <= 0:
            raise ConfigError(f"ppo.{k}={getattr(p, k)} must be > 0")
    if p.minibatches > p.rollout_steps:
        raise ConfigError(f"ppo.minibatches={p.minibatches} must be <= ppo.rollout_steps={p.rollout_steps} "
                          "(every minibatch holds at least one sample of every task)")
    for k in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(p, k) <= 1.0:
            raise ConfigError(f"ppo.{k}={getattr(p, k)} must be in [0, 1]")
    if not 0.0 < p.clip < 1.0:
        raise ConfigError(f"ppo.clip={p.clip} must be in (0, 1)")
    if p.lr <= 0:
        raise ConfigError(f"ppo.lr={p.lr} must be > 0")
    for k in ("vf_clip", "ent_coef", "vf_coef", "max_grad_norm", "target_kl", "obs_clip"):
        if getattr(p, k) < 0:
            raise ConfigError(f"ppo.{k}={getattr(p, k)} must be >= 0")
    if p.log_std not in ("param", "state"):
        raise ConfigError(f"ppo.log_std={p.log_std!r}; valid: param, state")
    if cfg.algo == "ppo" and cfg.method == "stl":
        raise ConfigError("method 'stl' (single-task SB3 SAC reference) cannot run with algo 'ppo'; valid with "
                          "ppo: any gradient method (mtsac, pcgrad, ...)")


def _validate_together(cfg: Config, suite: Any) -> None:
    """Settings whose values cannot work together (issue 13): the SAC replay against one batch and the random
    warm-up, and evaluation episodes against the 50 goals of a Meta-World task."""
    T, sac = suite.num_tasks, cfg.sac
    if cfg.algo == "sac" and cfg.method != "stl":  # stl trains SB3 SACs with their own buffers (mtrl/stl.py)
        per_task = sac.buffer_size // T  # the replay splits buffer_size evenly over the tasks (mtrl/learner.py)
        if per_task < sac.batch_size:
            raise ConfigError(f"sac.buffer_size={sac.buffer_size} holds {per_task} transition(s) per task over {T} "
                              f"task(s), fewer than one batch (sac.batch_size={sac.batch_size}); valid: "
                              f"sac.buffer_size >= {T * sac.batch_size}")
        if sac.learning_starts > per_task:
            raise ConfigError(f"sac.learning_starts={sac.learning_starts} random steps per task overflow the replay's "
                              f"{per_task} per task (sac.buffer_size={sac.buffer_size} over {T} task(s)); valid: "
                              f"sac.learning_starts <= {per_task}, or a larger sac.buffer_size")
    mw_goals = 50  # metaworld.MT1 gives each task 50 goals; the protocol evaluates each once (mtrl/evaluation.py)
    if suite.has_success and cfg.eval_episodes > mw_goals:
        raise ConfigError(f"eval_episodes={cfg.eval_episodes} exceeds the {mw_goals} goals of a Meta-World task (one "
                          f"episode per goal); valid: 1..{mw_goals}")


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: Dict[str, Any]) -> Config:
    cfg = Config()
    apply_mapping(cfg, data, "saved config")
    return cfg
