"""Plugins (mtrl/plugins.py): a method and a backbone from files outside the package train MT10 end to end through
`--method file:Class` / `--backbone file:Class` (on real Ray workers, which import them by path); module references
and entry points resolve through the same registries; your own tasks via `--suite gym:...`."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from conftest import MT10, TINY, scalars

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402

METHOD = str(ROOT / "examples" / "my_method.py") + ":RLW"
BACKBONE = str(ROOT / "examples" / "my_backbone.py") + ":FiLM"


@pytest.mark.ray
def test_mt10_trains_with_file_method_and_backbone_on_ray_workers(tmp_path, ray_local, monkeypatch):
    """Relative references, as a user types them; the workers (other processes, other working directory) build
    the policy from the stored absolute reference alone."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--method", "examples/my_method.py:RLW", "--backbone",
                     "examples/my_backbone.py:FiLM", "--total-steps", "400", "--workers", "2", "--eval-every", "0",
                     "--run-dir", str(run), "--set", "log_grad_every=5", "--set", "log_every=5", *TINY])
    assert rc == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == METHOD and cfg["backbone"] == BACKBONE  # absolute: workers and --resume find them
    res = json.loads((run / "results.json").read_text())["final"]
    assert sorted(res["per_task"]) == sorted(MT10) and res["updates"] > 0
    sc = scalars(run)
    # The plugin backbone's diagnostics() reached TensorBoard per task, and its per-task FiLM parameters (zero at
    # init) were trained by the plugin method's updates.
    assert all(f"backbone/actor.net/film_norm/{t}" in sc for t in MT10)
    assert max(sc[f"backbone/actor.net/film_norm/{MT10[0]}"]) > 0
    assert "train/critic_loss" in sc and "train/actor_loss" in sc


def test_module_reference_and_entry_points_resolve_through_the_registries(tmp_path, monkeypatch):
    from mtrl.config import Config, ConfigError, validate
    from mtrl.gradients import available_methods

    cfg = Config(suite="mt1-reach-v3", method="mtrl.gradients.pcgrad:PCGrad", workers=0,
                 backbone="mtrl.nets.multihead:MultiHeadBackbone", method_kwargs={"reduction": "sum"})
    with pytest.raises(ConfigError, match="method 'mtrl.gradients.pcgrad:PCGrad': .*reduction"):
        validate(cfg)  # options are checked by building the plugin, as for the built-in name
    cfg.method_kwargs = {}
    validate(cfg)
    assert cfg.method == "mtrl.gradients.pcgrad:PCGrad"  # a module reference stays as given
    # An installed package's entry points (a dist-info on sys.path is what pip leaves behind).
    (tmp_path / "tp_plugin.py").write_text(
        "from mtrl.gradients.mean import MeanMethod\n\n\nclass Mean2(MeanMethod):\n    name = 'tp-mean'\n\n\n"
        "class NotAMethod:\n    pass\n")
    dist = tmp_path / "tp_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mtrl.methods]\ntp-mean = tp_plugin:Mean2\ntp-bad = tp_plugin:NotAMethod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"tp-mean", "tp-bad"} <= set(available_methods())
    validate(Config(suite="mt1-reach-v3", method="tp-mean", workers=0))
    with pytest.raises(ConfigError, match=r"method 'tp-bad' \(entry point mtrl.methods = tp_plugin:NotAMethod\): "
                                          r"NotAMethod is not a subclass of mtrl.gradients.base.Method"):
        validate(Config(suite="mt1-reach-v3", method="tp-bad", workers=0))


def test_gym_suite_with_pcgrad_runs_evaluates_and_writes_per_task_tags(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    tasks = ["Pendulum-v1", "MountainCarContinuous-v0"]
    rc = train.main(["--suite", "gym:" + ",".join(tasks), "--method", "pcgrad", "--total-steps", "600", "--workers",
                     "0", "--eval-every", "0", "--run-dir", str(run), "--set", "log_every=5", *TINY])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("final: return=") and "success_rate" not in last and "nan" not in last
    sc = scalars(run)
    for t in tasks:
        assert len(sc[f"eval/{t}/return"]) == 1 and f"train/{t}/critic_loss" in sc and f"train/{t}/alpha" in sc
    assert not any("success_rate" in k for k in sc)  # success is undefined for these tasks: return alone
    res = json.loads((run / "results.json").read_text())
    assert res["protocol"]["horizon"] == {"Pendulum-v1": 200, "MountainCarContinuous-v0": 999}
    assert all(math.isfinite(v["return"]) for v in res["final"]["per_task"].values())
    assert res["final"]["task_steps"] == {"Pendulum-v1": 300, "MountainCarContinuous-v0": 300}
