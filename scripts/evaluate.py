#!/usr/bin/env python
"""Evaluate a trained checkpoint: ``python scripts/evaluate.py RUN_DIR_OR_CHECKPOINT [--episodes 50] [--video]``.

Loads ``checkpoint.pt`` with ``torch.load(weights_only=True)`` (mtrl.checkpoint.load) and the run's config
(``config.yaml`` beside the checkpoint, else the copy inside the checkpoint), rebuilds the actor with the same
backbone, and evaluates it with ``mtrl.evaluation.evaluate_tasks`` — the very function the training run's workers
call. Defaults reproduce the training-time evaluation: the run's ``eval_episodes``, goals from the run seed, and
evaluation envs seeded ``seed + 10_000`` (``--seed`` replaces the run seed in that formula only; the 50 goals are
always the run's training goals). So the final evaluation in ``results.json`` is reproduced exactly.

  --suite S / --tasks a,b   evaluate only these of the run's tasks (a suite must be a subset of the run's tasks)
  --out FILE.json           where the numbers go (default RUN_DIR/evaluation_s<seed>_e<episodes>.json)
  --video [--video-dir D]   also render episodes offscreen (MuJoCo EGL, else OSMesa) to one file per task
                            (default D = RUN_DIR/videos): ``--video-format gif`` (default) or ``mp4`` (H.264 through
                            the ffmpeg binary that imageio-ffmpeg installs from PyPI; HEIGHT and WIDTH must be even),
                            and into TensorBoard as animated images (tag ``video/<task>``, in RUN_DIR's events,
                            always a GIF: the Images tab plays those; encoded with imageio, so moviepy — which
                            SummaryWriter.add_video needs — is not required)

Single-task reference runs (``--method stl``) are evaluated the same way with their per-task SB3 policies.
Bad input (missing path, not a checkpoint, unknown suite or task) prints one line and exits 2.
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
