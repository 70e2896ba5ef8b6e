"""Faults: workers that die or whose envs raise, NaN losses, a killed trainer — all with real envs and real Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402


def test_env_raising_on_every_reset_stops_cleanly_naming_the_task(tmp_path, capsys):
    run = tmp_path / "run"
    rc = train.main(["--suite", "mt10", "--total-steps", "2000", "--workers", "0", "--run-dir", str(run),
                     "--set", "fault_inject=reset:push-v3", "--set", "max_worker_restarts=2", *TINY])
    assert rc == 1
    err = capsys.readouterr().err
    assert "push-v3" in err and "failed 3 times in a row" in err and "injected fault" in err
    assert (run / "checkpoint.pt").is_file()  # stopped cleanly, with a checkpoint


def test_nan_reward_stops_naming_the_task_and_skip_policy_continues(tmp_path, capsys):
    args = ["--suite", "mt10", "--total-steps", "600", "--workers", "0", "--eval-every", "0",
            "--set", "fault_inject=nan_reward:drawer-open-v3", *TINY]
    rc = train.main(args + ["--run-dir", str(tmp_path / "stop")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite critic loss for task 'drawer-open-v3'" in err
    assert not (tmp_path / "stop" / "checkpoint.pt").exists()  # nothing written from the bad state

    rc = train.main(args + ["--run-dir", str(tmp_path / "skip"), "--set", "nan_policy=skip"])
    assert rc == 0
    res = json.loads((tmp_path / "skip" / "results.json").read_text())["final"]
    assert res["nan_skipped"] > 0 and res["env_steps"] >= 600


def _spawn_train(args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts/train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path: Path, proc, timeout=120.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.ray
def test_kill_9_a_ray_worker_mid_run_is_replaced_and_every_task_delivers(tmp_path):
    run = tmp_path / "run"
    proc = _spawn_train(["--suite", "mt10", "--total-steps", "3000", "--workers", "2", "--eval-every", "0",
                         "--run-dir", str(run), *TINY], tmp_path)
    try:
        pid_file = run / "workers" / "worker1.pid"
        _wait_for(pid_file, proc)
        time.sleep(3.0)  # let it deliver some chunks first
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "rollout worker 1" in out and "restarting" in out
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["worker_restarts"] >= 1
    steps = res["task_steps"]
    assert len(steps) == 10 and min(steps.values()) >= 0.5 * 3000 / 10, steps  # the replaced worker's tasks too


@pytest.mark.ray
def test_kill_9_the_trainer_after_a_checkpoint_then_resume_completes(tmp_path):
    run = tmp_path / "run"
    proc = _spawn_train(["--suite", "mt10", "--total-steps", "100000", "--workers", "1", "--eval-every", "0",
                         "--checkpoint-every", "600", "--run-dir", str(run), *TINY], tmp_path)
    try:
        _wait_for(run / "checkpoint.pt", proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and everything it started, no chance to save
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert train.main(["--resume", str(run), "--total-steps", "1800", "--workers", "0", "--no-progress"]) == 0
    res = json.loads((run / "results.json").read_text())["final"]
    assert res["env_steps"] >= 1800


def test_interrupted_and_resumed_run_is_bit_identical_with_in_process_worker(tmp_path):
    import torch

    from mtrl import checkpoint

    common = ["--tasks", "reach-v3,push-v3", "--workers", "0", "--eval-every", "0", "--checkpoint-every", "1200",
              "--set", "save_replay=true", *TINY]
    assert train.main(common + ["--total-steps", "2400", "--run-dir", str(tmp_path / "a")]) == 0
    assert train.main(common + ["--total-steps", "1200", "--run-dir", str(tmp_path / "b")]) == 0
    assert train.main(["--resume", str(tmp_path / "b"), "--total-steps", "2400", "--no-progress"]) == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["counters"]["env_steps"] == b["counters"]["env_steps"] == 2400
    assert a["counters"]["updates"] == b["counters"]["updates"] > 0
    for net in ("actor", "critic", "critic_target"):
        for k, v in a["agent"][net].items():
            assert torch.equal(v, b["agent"][net][k]), (net, k)
    assert torch.equal(a["agent"]["log_alpha"], b["agent"]["log_alpha"])
    assert torch.equal(a["replay"]["obs"], b["replay"]["obs"])  # the same data was collected after the resume


@pytest.mark.parametrize("every", ["0", pytest.param("900", marks=pytest.mark.slow)])
def test_taking_a_checkpoint_changes_nothing_in_the_run(tmp_path, every):
    """The same command ends in the same parameters whatever --checkpoint-every is, and a run stopped at 1200 and
    resumed to 2400 ends where an uninterrupted 2400-step run that never checkpointed ends (issue 11)."""
    import torch

    from mtrl import checkpoint

    common = ["--tasks", "reach-v3,push-v3", "--workers", "0", "--eval-every", "0", "--set", "save_replay=true",
              *TINY]
    assert train.main(common + ["--total-steps", "2400", "--checkpoint-every", every,
                                "--run-dir", str(tmp_path / "a")]) == 0
    assert train.main(common + ["--total-steps", "1200", "--run-dir", str(tmp_path / "b")]) == 0
    assert train.main(["--resume", str(tmp_path / "b"), "--total-steps", "2400", "--no-progress"]) == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a["counters"]["updates"] == b["counters"]["updates"] > 0
    for net in ("actor", "critic", "critic_target"):
        for k, v in a["agent"][net].items():
            assert torch.equal(v, b["agent"][net][k]), (net, k)


@pytest.mark.ray
def test_two_node_loopback_cluster_run_completes(tmp_path):
    """Two `ray start` processes on 127.0.0.1 (head + worker node, 1 CPU each); `--address` joins them and the two
    1-CPU rollout workers can only be placed one per node."""
    import shutil
    import socket
    import tempfile

    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0", "PYTHONPATH": str(ROOT)}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}", *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        run = tmp_path / "run"
        p = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "--suite", "mt10", "--total-steps", "800",
                            "--workers", "2", "--worker-cpus", "1", "--address", f"127.0.0.1:{port}",
                            "--eval-every", "0", "--run-dir", str(run), *TINY],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        res = json.loads((run / "results.json").read_text())["final"]
        assert res["env_steps"] >= 800 and sorted(res["per_task"]) == sorted(res["task_steps"])
        assert (run / "workers" / "worker0.pid").is_file() and (run / "workers" / "worker1.pid").is_file()
    finally:
        # Only this cluster's processes: they all carry temp_dir (or its session dir) in their command lines.
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{port}"], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_sigterm_saves_a_checkpoint_with_ray_workers(tmp_path):
    """ray.init installs Ray's own SIGTERM handler (stack dump, death, no checkpoint); the trainer's must win."""
    run = tmp_path / "run"
    proc = _spawn_train(["--suite", "mt10", "--total-steps", "100000", "--workers", "1", "--eval-every", "0",
                         "--run-dir", str(run), *TINY], tmp_path)
    try:
        _wait_for(run / "workers" / "worker0.pid", proc)
        time.sleep(3.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "checkpoint saved" in out and (run / "checkpoint.pt").is_file()
    assert train.main(["--resume", str(run), "--total-steps", "1500", "--workers", "0", "--no-progress"]) == 0
