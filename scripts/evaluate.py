#!/usr/bin/env python
"""Evaluate a trained checkpoint: ``python scripts/evaluate.py RUN_DIR_OR_CHECKPOINT [--episodes 50] [--video]``.

The logic (and every option's description) is in ``mtrl/evaluate_cli.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout even before `pip install -e .`
    sys.path.insert(0, str(ROOT))

from mtrl.evaluate_cli import main, probe_gl  # noqa: E402,F401 - also used by the tests

if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    sys.exit(main())
