"""issue 21 on CPU: the settings of the GPU learner (``cuda_graph``, ``matmul_precision``), the default worker count,
and ``scripts/gpu_check.sh`` (its syntax and every python command's flags), without a GPU and without Ray."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrl.config import Config, ConfigError, default_workers, fit_default_workers, set_key, validate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # train.py, bench_learner.py

import bench_learner  # noqa: E402
import train  # noqa: E402



def _cfg(*sets: str) -> Config:
    cfg = Config(suite="mt10")
    for s in sets:
        set_key(cfg, s)
    return cfg


def test_cuda_graph_and_matmul_precision_keys_validate():
    cfg = _cfg("cuda_graph=false", "matmul_precision=medium")
    validate(cfg)
    assert cfg.cuda_graph is False and cfg.matmul_precision == "medium"
    assert Config().cuda_graph is True and Config().matmul_precision == "auto"
    with pytest.raises(ConfigError, match=r"^cuda_graph='maybe' is not a boolean; valid: true, false$"):
        _cfg("cuda_graph=maybe")
    with pytest.raises(ConfigError, match=r"^matmul_precision='tf32'; valid: auto, highest, high, medium$"):
        validate(_cfg("matmul_precision=tf32"))


def test_matmul_precision_is_applied_where_the_device_is_set_up_and_put_back(tmp_path):
    from mtrl.base_trainer import matmul_precision_for
    from mtrl.runner import Trainer

    assert matmul_precision_for("auto", torch.device("cuda")) == "high"  # TF32, as the JAX reference on GPU
    assert matmul_precision_for("auto", torch.device("cpu")) == "highest"  # torch's default: CPU runs unchanged
    assert matmul_precision_for("medium", torch.device("cpu")) == "medium"
    before = torch.get_float32_matmul_precision()
    try:
        for setting, expect in (("auto", "highest"), ("medium", "medium")):
            cfg = _cfg("device=cpu", "workers=0", "backbone_kwargs.width=8", "backbone_kwargs.depth=1",
                       "sac.buffer_size=1000", "sac.batch_size=16", "sac.learning_starts=10", f"matmul_precision={setting}")
            validate(cfg)
            trainer = Trainer(cfg, tmp_path / setting)
            assert torch.get_float32_matmul_precision() == expect == trainer.matmul_precision
            trainer.close()
            assert torch.get_float32_matmul_precision() == before
    finally:
        torch.set_float32_matmul_precision(before)


def test_default_workers_fit_the_machine_and_the_suite(monkeypatch):
    assert default_workers(10, cpus=16) == 10  # MT10 on 16 cores: one worker per task
    assert default_workers(50, cpus=16) == 14  # two cores for the learner's host side
    assert default_workers(10, cpus=2) == default_workers(10, cpus=1) == 1  # this CI machine: 1
    assert default_workers(1, cpus=64) == 1
    parse = train.build_parser().parse_args
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert train.make_config(parse(["--suite", "mt10"])).workers == 10
    assert train.make_config(parse(["--suite", "mt10", "--envs-per-task", "2"])).workers == 14
    assert train.make_config(parse(["--suite", "mt10", "--workers", "3"])).workers == 3  # explicit: as given
    assert train.make_config(parse(["--suite", "mt10", "--set", "workers=0"])).workers == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert train.make_config(parse(["--suite", "mt10"])).workers == 1
    cfg = Config(suite="mt10", address="auto")  # a cluster: this machine's cores say nothing; 2, capped at slots
    fit_default_workers(cfg)
    assert cfg.workers == 2


def _commands():
    """The command arrays of scripts/gpu_check.sh: {name: argv after the interpreter}."""
    out = {}
    for line in (ROOT / "scripts" / "gpu_check.sh").read_text().splitlines():
        name, eq, rest = line.partition("=(")
        if eq and name.isidentifier() and name.isupper() and rest.endswith(")"):
            out[name] = shlex.split(rest[:-1])
    return out


def test_gpu_check_script_parses_and_its_commands_take_their_flags():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    cmds = _commands()
    assert set(cmds) == {"PYTEST_A", "BENCH_B", "BENCH_C", "RUN_D"}
    pytest_args = cmds["PYTEST_A"]
    assert pytest_args[:2] == ["-m", "pytest"] and "gpu" in pytest_args and (ROOT / pytest_args[-1]).is_file()
    for key in ("BENCH_B", "BENCH_C"):
        script, *flags = cmds[key]
        assert script == "scripts/bench_learner.py"
        args = bench_learner.build_parser().parse_args(flags)
        for name in args.methods.split(","):
            bench_learner.case_spec(name)  # every name resolves (method, backbone or preset)
    script, *flags = cmds["RUN_D"]
    assert script == "scripts/train.py"
    cfg = train.make_config(train.build_parser().parse_args(flags))
    validate(cfg)
    assert (cfg.suite, cfg.method, cfg.device, cfg.compile, cfg.cuda_graph) == ("mt10", "pcgrad", "cuda", "auto", True)


def test_bench_learner_cheap_path_and_presets(capsys):
    spec = bench_learner.case_spec("mtmhsac", 8)  # a preset: its method, backbone and sac settings, the bench's width
    assert (spec["method"], spec["backbone"], spec["backbone_kwargs"]) == ("mtsac", "multihead", {"width": 8,
                                                                                                   "depth": 3})
    assert spec["sac"].max_grad_norm == 1.0
    assert bench_learner.case_spec("pcgrad", 8)["backbone"] == "mlp"  # a method stays a method on an mlp
    assert bench_learner.case_spec("preset:pcgrad", 8)["backbone"] == "multihead"
    assert bench_learner.case_spec("moe", 8)["method"] == "mtsac"
    with pytest.raises(SystemExit):
        bench_learner.case_spec("nonesuch")
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        rc = bench_learner.main(["--compile", "off", "--widths", "8", "--methods", "mtmhsac", "--repeats", "1",
                                 "--seconds", "0.01"])
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    out = capsys.readouterr().out
    assert rc == 0 and "| graph upd/s | graph/eager |" in out
    row = [line for line in out.splitlines() if line.startswith("| sac | mtmhsac | 8 |")]
    assert len(row) == 1 and row[0].split(" | ")[6:8] == ["n/a", "n/a"]  # no CUDA graph on CPU

