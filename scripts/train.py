#!/usr/bin/env python
"""Train one multi-task agent: ``python scripts/train.py --suite mt10 --method mtsac``.

Bad input (unknown flag, suite, task, method, backbone, config key, bad value, missing resume dir) prints ONE line
naming the value and the valid choices and exits with code 2, before any run directory is created.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout even before `pip install -e .`
    sys.path.insert(0, str(ROOT))

from mtrl.train_cli import budget_line, build_parser, main, make_config, resume_config  # noqa: E402,F401 - also used by the tests

if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    sys.exit(main())
