#!/usr/bin/env python
"""Train one multi-task agent: ``python scripts/train.py --suite mt10 --method mtsac``.

The logic (and every option's description) is in ``mtrl/train_cli.py``.
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
