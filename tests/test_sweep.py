"""scripts/sweep.py: a 2 (methods) x 2 (seeds) grid with tiny budgets -> run dirs, hparams, plots."""

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402

SETS = [a for i, a in enumerate(TINY) if TINY[i] == "--set" or (i > 0 and TINY[i - 1] == "--set")]
GRID = ["--suite", "mt1-reach-v3", "--methods", "mtsac,mean", "--seeds", "2", "--total-steps", "60",
        "--eval-every", "0", "--eval-episodes", "1", "--reps", "100", *SETS]


def _check_grid(out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = [f"mt1-reach-v3_{m}_mlp_s{s}" for m in ("mtsac", "mean") for s in (0, 1)]
    for name in names:
        run = out / name
        res = json.loads((run / "results.json").read_text())
        assert res["final"]["env_steps"] >= 60 and res["config"]["seed"] == int(name[-1])
        assert res["config"]["sac"]["batch_size"] == 16  # --set reached the trial
        acc = EventAccumulator(str(run))
        acc.Reload()
        assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")  # in the run's own folder
        assert "hparam/return" in acc.Tags()["scalars"]
        assert not any(p.is_dir() and p.name[:1].isdigit() for p in run.iterdir())  # no add_hparams sub-folder
    summary = json.loads((out / "sweep.json").read_text())
    assert sorted(t["name"] for t in summary["trials"]) == sorted(names)
    assert all(t["rc"] == 0 for t in summary["trials"])
    for png in ("curves.png", "task_bars.png"):
        assert (out / "plots" / png).stat().st_size > 5000
    table = (out / "plots" / "results.md").read_text()
    assert "| mtsac | mlp | 2 |" in table and "| mean | mlp | 2 |" in table


def test_sweep_2x2_in_process(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main([*GRID, "--workers", "0", "--out", str(out)]) == 0
    _check_grid(out)
    # Re-running skips the finished trials.
    assert sweep.main([*GRID, "--workers", "0", "--out", str(out), "--no-plot"]) == 0


def test_sweep_bad_method_exits_2_before_running(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(["--suite", "mt1-reach-v3", "--methods", "mtsac,nosuch", "--seeds", "1", "--workers", "0",
                       "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nosuch'" in err  # train.py's own validation, one line
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_2x2_as_ray_tasks(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main([*GRID, "--workers", "2", "--out", str(out)]) == 0
    _check_grid(out)
    assert all((out / "logs" / f"{p.name}.log").is_file() for p in out.iterdir() if p.name.startswith("mt1-"))


def test_backbone_name_among_methods_is_mtsac_on_that_backbone():
    """The issue's own example: --methods mtsac,pcgrad,moe (moe is a backbone)."""
    assert sweep.grid_pairs(["mtsac", "pcgrad", "moe"], ["mlp"]) == [("mtsac", "mlp"), ("pcgrad", "mlp"),
                                                                      ("mtsac", "moe")]
    assert sweep.grid_pairs(["pcgrad", "moe"], ["mlp", "moe"]) == [("pcgrad", "mlp"), ("pcgrad", "moe"),
                                                                   ("mtsac", "moe")]
