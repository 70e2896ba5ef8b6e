"""Every bad-input path of scripts/train.py: one line naming the value and the valid choices, exit 2, no run dir."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402


CASES = [
    (["--suite", "mt11"], "unknown suite 'mt11'; valid: mt10"),
    (["--tasks", "reach-v3,nope-v3"], "unknown Meta-World task 'nope-v3'"),
    (["--suite", "mt1-reach-v2"], "unknown Meta-World task 'reach-v2'"),
    (["--suite", "mt10", "--method", "pcgradd"], "unknown method 'pcgradd'; valid:"),
    (["--suite", "mt10", "--backbone", "transformer"], "unknown backbone 'transformer'; valid: "),
    (["--suite", "mt10", "--algo", "dqn"], "unknown algo 'dqn'; valid: sac"),
    (["--suite", "mt10", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda"),
    (["--suite", "mt10", "--set", "replay_device=gpu"], "replay_device='gpu'; valid: auto, cpu, cuda"),
    (["--suite", "mt10", "--set", "compile=fast"],
     "compile='fast'; valid: auto, off, default, reduce-overhead, max-autotune"),
    (["--suite", "mt10", "--total-steps", "-5"], "total-steps=-5 must be > 0"),
    (["--suite", "mt10", "--workers", "-1"], "workers=-1 must be >= 0"),
    (["--suite", "mt10", "--eval-episodes", "0"], "eval-episodes=0 must be > 0"),
    (["--suite", "mt10", "--set", "sac.batchsize=3"], "unknown config key 'sac.batchsize'"),
    (["--suite", "mt10", "--set", "learning_rate=3"], "unknown config key 'learning_rate'"),
    (["--suite", "mt10", "--set", "sac.tau=fast"], "sac.tau='fast' is not a number"),
    (["--suite", "mt10", "--set", "sac.tau=2"], "sac.tau=2.0 must be in (0, 1]"),
    (["--suite", "mt10", "--set", "noequals"], "is not key=value"),
    (["--suite", "mt10", "--set", "backbone_kwargs.widht=3"],
     "backbone 'mlp': unknown option(s) widht (--set backbone_kwargs.widht=3); valid: depth, width"),
    # issue 22: options the user sets go to the chosen backbone; errors name where a value came from, once prefixed
    (["--suite", "mt10", "--backbone", "multihead", "--set", "backbone_kwargs.width=0"],
     "backbone 'multihead': option width=0 must be an integer >= 1 (--set backbone_kwargs.width=0)"),
    (["--suite", "mt10", "--method", "pcgrad", "--backbone", "home", "--set", "backbone_kwargs.depth=3"],
     "backbone 'home': depth=3 must be 2 (HoME has a meta level and a task level) (--set backbone_kwargs.depth=3)"),
    (["--suite", "mt10", "--method", "moore", "--backbone", "moe", "--set", "backbone_kwargs.n_experts=4"],
     "backbone 'moe': unknown option(s) n_experts (--set backbone_kwargs.n_experts=4); valid: "),
    (["--suite", "mt10", "--method", "moore", "--set", "backbone_kwargs.width=3"],
     "backbone 'moore': n_experts=4 orthonormal vectors do not fit in width=3 (--set backbone_kwargs.width=3, "
     "n_experts=4 in configs/methods/moore.yaml)"),
    (["--suite", "mt10", "--method", "moore", "--backbone", "mlp", "--critic-backbone", "moore", "--set",
      "critic_backbone_kwargs.width=2"], "critic_backbone 'moore': n_experts=4 orthonormal vectors do not fit in "
                                         "width=2 (--set critic_backbone_kwargs.width=2, n_experts=4 in "
                                         "configs/methods/moore.yaml)"),
    (["--suite", "mt10", "--method", "cagrad", "--set", "method=pcgrad"],
     "method 'pcgrad': unknown option(s) ['c', 'rescale', 'solver']; valid options: chunk_size, memory_budget_mb "
     "(c=0.5, rescale=1, solver='exact' in configs/methods/cagrad.yaml)"),
    (["--suite", "mt10", "--set", "method_kwargs.c=3"], "method 'mtsac':"),
    (["--suite", "mt10", "--critic-backbone", "nope"], "unknown critic_backbone 'nope'; valid: "),
    (["--suite", "mt10", "--set", "critic_backbone_kwargs.width=3"], "critic_backbone is not"),
    (["--suite", "mt10", "--critic-backbone", "mlp", "--set", "critic_backbone_kwargs.widht=3"],
     "critic_backbone 'mlp':"),
    (["--suite", "mt10", "--backbone", "t2mir", "--critic-backbone", "t2mir", "--set", "backbone_kwargs.use_task_id=false",
      "--set", "critic_backbone_kwargs.use_task_id=false", "--set", "critic_backbone_kwargs.context_len=3"],
     "different lengths [3, 16]"),
    (["--suite", "mt10", "--algo", "ppo", "--backbone", "t2mir", "--set", "backbone_kwargs.use_task_id=false"],
     "runs with algo 'sac' only"),
    (["--suite", "mt10", "--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["--resume", "/nonexistent_run"], "--resume '/nonexistent_run': no such run directory"),
    ([], "give --suite"),
    # issue 13: settings that cannot work together, plugins, own tasks
    (["--suite", "mt10", "--seed", "-1"], "seed=-1 must be >= 0"),
    (["--suite", "mt10", "--set", "sac.buffer_size=10"],
     "sac.buffer_size=10 holds 1 transition(s) per task over 10 task(s), fewer than one batch (sac.batch_size="),
    (["--suite", "mt10", "--set", "sac.buffer_size=2000", "--set", "sac.batch_size=16", "--set",
      "sac.learning_starts=500"], "sac.learning_starts=500 random steps per task overflow the replay's 200 per task"),
    (["--suite", "mt10", "--eval-episodes", "51"], "eval_episodes=51 exceeds the 50 goals of a Meta-World task"),
    (["--suite", "mt10", "--method", str(ROOT / "examples/nope.py") + ":RLW"], "no such file"),
    (["--suite", "mt10", "--method", str(ROOT / "examples/my_method.py") + ":Nope"], "has no 'Nope'; classes there: RLW"),
    (["--suite", "mt10", "--method", str(ROOT / "examples/my_backbone.py") + ":FiLM"], "FiLM is not a subclass of mtrl.gradients"),
    (["--suite", "mt10", "--backbone", str(ROOT / "examples/my_method.py") + ":RLW"], "RLW is not a subclass of torch.nn"),
    (["--suite", "mt10", "--critic-backbone", "no_such_pkg.nets:Net"], "no module named 'no_such_pkg'"),
    (["--suite", "mt10", "--method", str(ROOT / "examples/my_method.py") + ":RLW", "--set", "method_kwargs.temperature=0"],
     "option temperature=0 is invalid"),
    (["--suite", "mt10", "--backbone", str(ROOT / "examples/my_backbone.py") + ":FiLM", "--set", "backbone_kwargs.widht=3"],
     "unknown option(s) widht (--set backbone_kwargs.widht=3); valid: depth, width"),
    (["--suite", "gym:Pendulum-v1,CartPole-v1"], "task 'CartPole-v1' has a Discrete(2) action space"),
    (["--suite", "gym:NoSuchEnv-v0"], "gym task 'NoSuchEnv-v0': gymnasium.make raised"),
    (["--suite", "dmc:walker-fly"], "unknown dm_control task 'walker-fly'; valid: "),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0]) or "no-args" for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--run-dir", str(run_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_bad_config_file_key_and_existing_run_dir(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("suite: mt10\nsac:\n  gamma_typo: 0.9\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "unknown config key 'sac.gamma_typo'" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(["--suite", "mt10", "--run-dir", str(used)])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_config_file_options_are_named_with_the_file(tmp_path, capsys):
    """issue 22: a --config file's backbone options go to the backbone it names (or the flag's), and an invalid one
    names the file; a --config backbone that does not exist names the file too."""
    f = tmp_path / "c.yaml"
    f.write_text("backbone: moe\nbackbone_kwargs: {n_experts: 3}\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--suite", "mt10", "--method", "moore", "--config", str(f), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"backbone 'moe': unknown option(s) n_experts (n_experts=3 in --config {f}); valid: " in err
    f.write_text("backbone: nope\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--suite", "mt10", "--config", str(f), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown backbone 'nope'; valid: " in err and f"(backbone from --config {f})" in err
    assert not (tmp_path / "r").exists()


def test_resume_dir_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path)])
    assert e.value.code == 2 and "no checkpoint.pt" in capsys.readouterr().err


def test_real_process_unknown_flag_and_help(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--suite", "mt10", "--bogus-flag", "1"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["train.py: error: unrecognized arguments: --bogus-flag 1"]
    assert not (tmp_path / "runs").exists()
    h = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert h.returncode == 0
    for word in ("mt10", "dmc-mixed", "mt1-<task>", "mtsac", "--total-steps", "--resume", "--set"):
        assert word in h.stdout


def test_replay_device_and_compile_values_accepted(tmp_path):
    """Every valid value passes validation; YAML's boolean `off` (in --set and in a config file) means "off"."""
    from mtrl.config import COMPILE_MODES, REPLAY_DEVICES, Config, apply_mapping, load_yaml, set_key, validate

    cfg = Config(suite="mt10")
    for v in REPLAY_DEVICES:
        set_key(cfg, f"replay_device={v}")
        validate(cfg)
    for v in COMPILE_MODES:
        set_key(cfg, f"compile={v}")
        validate(cfg)
        assert cfg.compile == v
    (tmp_path / "c.yaml").write_text("compile: off\n")
    apply_mapping(cfg, load_yaml(tmp_path / "c.yaml"), "c.yaml")
    assert cfg.compile == "off"


def test_dead_address_exits_2_within_30_s_naming_it(tmp_path):
    """issue 13: nothing listens at 127.0.0.1:1; Ray would retry for minutes, the probe answers at once."""
    import time

    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--suite", "mt1-reach-v3", "--workers",
                        "1", "--address", "127.0.0.1:1", "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and time.time() - t0 < 30
    assert len(p.stderr.strip().splitlines()) == 1 and "--address '127.0.0.1:1': no Ray cluster answers" in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
