"""scripts/evaluate.py (reproduces the training-time evaluation), scripts/plot.py (PNGs, table), IQM/CI vs rliable,
and evaluation videos. Two tiny real runs on a 3-task Meta-World suite are shared by the module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402

TASKS = ["reach-v3", "push-v3", "drawer-close-v3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of different methods (two groups), two evaluations each, plus conflict scalars in B."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, method, seed in (("a", "mtsac", 0), ("b", "mean", 1)):
        run = base / name
        rc = train.main(["--tasks", ",".join(TASKS), "--method", method, "--seed", str(seed), "--total-steps", "240",
                         "--eval-every", "120", "--workers", "0", "--run-dir", str(run), *TINY])
        assert rc == 0
        out[name] = run
    # Gradient-conflict scalars as a Jacobian method logs them (mean/mtsac form no Jacobian).
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out["b"]))
    for i, step in enumerate(range(0, 241, 20)):
        w.add_scalar("grad/critic/conflict_fraction", (i % 4) / 3, step)
        w.add_scalar("grad/actor/conflict_fraction", 1 - (i % 3) / 2, step)
    w.close()
    return out


def test_evaluate_reproduces_training_final_evaluation(runs, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main([str(runs["a"]), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    final = json.loads((runs["a"] / "results.json").read_text())["final"]
    assert sorted(got["per_task"]) == sorted(TASKS)
    assert got["per_task"] == final["per_task"]  # bit-identical: same checkpoint, seed, envs and batches
    assert got["success_rate"] == final["success_rate"] and got["return"] == final["return"]
    assert got["env_steps"] == final["env_steps"] and got["eval_seed"] == 10_000
    table = capsys.readouterr().out
    assert all(t in table for t in TASKS) and "mean" in table
    # The checkpoint file itself works too, and a subset of the tasks.
    out2 = tmp_path / "sub.json"
    assert evaluate.main([str(runs["a"] / "checkpoint.pt"), "--tasks", "push-v3", "--out", str(out2)]) == 0
    assert list(json.loads(out2.read_text())["per_task"]) == ["push-v3"]


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "no such run directory or checkpoint"),
    (["{a}", "--suite", "nosuch"], "nosuch"),
    (["{a}", "--suite", "mt10"], "not in this run; valid: reach-v3, push-v3, drawer-close-v3"),
    (["{a}", "--episodes", "0"], "--episodes=0"),
])
def test_evaluate_bad_input_one_line_exit_2(runs, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nope", a=runs["a"]) for a in argv]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error:") and message in err


def test_plot_makes_varied_pngs_and_table(runs, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "plots"
    assert plot.main([str(runs["a"]), str(runs["b"]), "--out", str(out), "--reps", "200"]) == 0
    for name in ("curves.png", "curves_return.png", "task_bars.png", "conflict_heatmap.png"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 5000, name
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and float(img[..., :3].std()) > 0.01, name
    table = (out / "results.md").read_text()
    assert "| mtsac | mlp | 1 |" in table and "| mean | mlp | 1 |" in table
    assert all(t in table for t in TASKS)


def test_plot_bad_input_exit_2(runs, tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "needs config.yaml and results.json" in capsys.readouterr().err


def test_iqm_and_ci_agree_with_rliable_on_fixed_arrays():
    from rliable import library as rly
    from rliable import metrics
    from scipy.stats import trim_mean

    from mtrl.plotting import iqm, iqm_ci

    scores = (np.arange(5 * 8).reshape(5, 8) % 7) / 6.0  # 5 seeds x 8 tasks, fixed
    scores[2, 3] = 1.0
    assert iqm(scores) == pytest.approx(trim_mean(scores.ravel(), 0.25))
    assert iqm(scores) == pytest.approx(metrics.aggregate_iqm(scores))
    before = np.random.get_state()[1].copy()
    point, lo, hi = iqm_ci(scores, reps=500, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global RNG is left alone
    np.random.seed(3)
    p_ref, ci_ref = rly.get_interval_estimates({"x": scores}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=500)
    assert point == pytest.approx(p_ref["x"][0])
    assert (lo, hi) == pytest.approx((ci_ref["x"][0, 0], ci_ref["x"][1, 0]))
    assert lo <= point <= hi and lo < hi
    assert iqm_ci(scores, reps=500, seed=3) == (point, lo, hi)  # reproducible
    # All seeds equal -> a zero-width interval at that value.
    same = np.tile(scores[:1], (4, 1))
    p, l, h = iqm_ci(same, reps=200)
    assert l == pytest.approx(p) and h == pytest.approx(p)


def test_video_gif_and_tensorboard(runs, tmp_path):
    gl = evaluate.probe_gl()
    if gl is None:
        pytest.skip("no offscreen OpenGL here (MUJOCO_GL=egl and osmesa both fail; apt-get install libosmesa6)")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    env.update(MUJOCO_GL=gl, PYOPENGL_PLATFORM=gl, PYTHONPATH=str(ROOT))
    vdir = tmp_path / "videos"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(runs["a"]), "--tasks", "reach-v3",
                        "--video", "--video-dir", str(vdir), "--video-size", "48x64", "--video-every", "1",
                        "--video-max-steps", "6", "--out", str(tmp_path / "e.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import imageio.v3 as iio

    frames = iio.imread(vdir / "reach-v3.gif", index=None)
    assert frames.shape[0] == 7 and frames.shape[1:3] == (48, 64)  # reset frame + 6 steps
    assert float(frames.std()) > 1.0  # a picture, not a blank
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["a"]), size_guidance={"images": 0})
    acc.Reload()
    assert "video/reach-v3" in acc.Tags()["images"]
    assert acc.Images("video/reach-v3")[0].encoded_image_string[:6] == b"GIF89a"
    # MP4 file (H.264 via imageio-ffmpeg): same frames, decodable; odd sizes are refused in one line.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(runs["a"]), "--tasks", "reach-v3",
                        "--video", "--video-format", "mp4", "--video-dir", str(vdir), "--video-size", "48x64",
                        "--video-every", "1", "--video-max-steps", "6", "--out", str(tmp_path / "e2.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mp4 = iio.imread(vdir / "reach-v3.mp4", index=None)
    assert mp4.shape == frames.shape[:3] + (3,)
    assert np.abs(mp4.astype(float) - frames[..., :3].astype(float)).mean() < 12  # lossy, but the same pictures
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(runs["a"]), "--video",
                        "--video-format", "mp4", "--video-size", "47x64"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "even height and width" in r.stderr and len(r.stderr.strip().splitlines()) == 1
