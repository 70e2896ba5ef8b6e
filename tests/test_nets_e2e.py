"""scripts/train.py end to end on real Meta-World MT10 with every issue-4 backbone (tiny budget, in process).

One representative runs by default; the full backbone x method grid is marked slow (~30 s each on 2 cores)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402

BACKBONES = ["care", "harmony", "moe", "moore", "paco", "softmod", "t2mir"]


def _run(tmp_path, backbone, method):
    run = tmp_path / f"{backbone}_{method}"
    rc = train.main(["--suite", "mt10", "--backbone", backbone, "--method", method, "--total-steps", "400",
                     "--workers", "0", "--eval-every", "0", "--run-dir", str(run), *TINY])
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["env_steps"] >= 400 and res["final"]["updates"] > 0
    assert len(res["final"]["per_task"]) == 10


def test_train_mt10_moe_mtsac(tmp_path):
    _run(tmp_path, "moe", "mtsac")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtsac", "pcgrad"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_mt10_every_backbone(tmp_path, backbone, method):
    _run(tmp_path, backbone, method)
