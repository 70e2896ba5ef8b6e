#!/usr/bin/env bash
# One prepared check for a GPU machine (issue 21), under 8 minutes on one GPU with 16 cores and no network:
#   source .gpu/env.sh && bash scripts/gpu_check.sh          (.gpu/ from ../shared/gpu/bundle.sh; or after setup.sh)
# Steps, each with a header and its own time limit; a failing step does not stop the next ones:
#   a. the CUDA tests (pytest -m gpu tests/test_gpu.py)
#   b. bench_learner.py: eager / compiled / graph (one captured CUDA graph) for mtsac, pcgrad, mtmhsac at 3x8, 3x400
#   c. bench_learner.py: the same for the backbones moe, t2mir, harmony, mmoe at 3x400
#   d. a real MT10 pcgrad run with the default flags (Ray workers, compile, CUDA graph, device replay) for RUN_S
#      seconds, stopped by SIGTERM (it checkpoints and exits; evaluation off so it does not pause the learner):
#      its updates/s and env steps/s after the warm-up (TensorBoard time/*), the GPU busy share (nvidia-smi every
#      500 ms); a compile or capture fallback in its stderr ("torch.compile of ... failed", "runs eagerly", "not
#      captured as one graph") is a failure.
# Everything is teed into ${OUT:-/tmp}/gpu_check.log; the exit status is nonzero if any step failed (listed at the
# end). The limits below add up to 7.25 minutes, plus ~30 s of start-up and shutdown; GPU_CHECK_<STEP>_S overrides
# one (seconds).
# tests/test_gpu_check.py parses the command arrays below on CPU (their flags must stay valid).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

PYTEST_A=(-m pytest -m gpu -q -rfEs tests/test_gpu.py)
BENCH_B=(scripts/bench_learner.py --device cuda --threads 4 --repeats 3 --widths 8,400 --methods mtsac,pcgrad,mtmhsac --algos sac)
BENCH_C=(scripts/bench_learner.py --device cuda --threads 4 --repeats 3 --widths 400 --methods moe,t2mir,harmony,mmoe --algos sac)
RUN_D=(scripts/train.py --suite mt10 --method pcgrad --device cuda --no-progress --eval-every 0)
A_S=${GPU_CHECK_A_S:-150}   # pytest (MTRL_COMPILE_STRICT=1: a compile fallback fails the test)
B_S=${GPU_CHECK_B_S:-70}    # benchmark b (rows print as they finish: a cut-off run still shows the first ones)
C_S=${GPU_CHECK_C_S:-35}    # benchmark c
RUN_S=${GPU_CHECK_RUN_S:-180}  # the real run (d), wall clock; plus up to 20 s for its checkpoint and shutdown

T0=$(date +%s)
failed=()
header() { echo; echo "================ $* ($(( $(date +%s) - T0 )) s into the check) ================"; }
# step NAME SECONDS CMD...: run CMD with a time limit (SIGINT first, so pytest still prints its summary).
step() {
  local name=$1 secs=$2; shift 2
  header "$name (limit ${secs} s)"
  echo "+ $*"
  timeout -s INT -k 15 "$secs" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "!! $name: cut off at its ${secs} s limit"; failed+=("$name (timed out after ${secs} s)")
  elif [ "$rc" -ne 0 ]; then
    echo "!! $name: exit status $rc"; failed+=("$name (exit $rc)")
  fi
}

header "machine"
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || { echo "!! no CUDA device: nothing to check"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "cores: $(nproc)"

step "a. pytest -m gpu" "$A_S" env MTRL_COMPILE_STRICT=1 $PY "${PYTEST_A[@]}"
step "b. bench_learner (mtsac, pcgrad, mtmhsac)" "$B_S" $PY "${BENCH_B[@]}"
step "c. bench_learner (moe, t2mir, harmony, mmoe)" "$C_S" $PY "${BENCH_C[@]}"

header "d. real run: MT10 pcgrad, default flags, ${RUN_S} s"
RUN_DIR=$(mktemp -d /tmp/gpu_check_run.XXXXXX)/run
UTIL=$OUT_DIR/gpu_check_util.txt
ERR=$OUT_DIR/gpu_check_run.stderr
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$UTIL" 2>/dev/null &
SMI=$!
echo "+ $PY ${RUN_D[*]} --run-dir $RUN_DIR   (SIGTERM after ${RUN_S} s)"
timeout -s TERM -k 20 "$RUN_S" $PY "${RUN_D[@]}" --run-dir "$RUN_DIR" 2> >(tee "$ERR" >&2)
rc=$?
kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null
sleep 1  # the stderr tee finishes writing
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
  echo "!! d: the run exited with status $rc before its ${RUN_S} s"; failed+=("d. real run (exit $rc)")
fi
if grep -E "torch\.compile of .* failed|runs eagerly|not captured as one graph|capture of the update failed" "$ERR"; then
  echo "!! d: the learner fell back (lines above)"; failed+=("d. real run (compile or capture fallback)")
fi
grep -E "^compiled |captured|matmul" "$ERR" | head -20 || true
$PY - "$RUN_DIR" "$UTIL" <<'PY' || failed+=("d. real run (no TensorBoard rates)")
import json, statistics, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run, util = Path(sys.argv[1]), Path(sys.argv[2])
info = run / "run_info.json"
if info.is_file():
    learner = json.loads(info.read_text()).get("learner", {})
    print("learner:", {k: learner.get(k) for k in ("device", "compile", "replay", "matmul_precision")})
acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
ok = "train/n_updates" in tags and len(acc.Scalars("train/n_updates")) >= 2
if ok:  # cumulative counters: updates (the value) and env steps (the step) against wall time, every log_every
    ev = acc.Scalars("train/n_updates")
    t0, t1 = ev[0].wall_time, ev[-1].wall_time
    late = [e for e in ev if e.wall_time >= t0 + (t1 - t0) / 3]  # after the warm-up: the last two thirds
    a, b = (late[0], late[-1]) if len(late) >= 2 else (ev[0], ev[-1])
    dt = max(b.wall_time - a.wall_time, 1e-9)
    print(f"after the warm-up ({dt:.0f} s of the {t1 - t0:.0f} s logged): {(b.value - a.value) / dt:.1f} updates/s, "
          f"{(b.step - a.step) / dt:.0f} env steps/s; {int(ev[-1].value)} updates by env step {ev[-1].step}")
else:
    print("train/n_updates: fewer than 2 points (did the learner start?)")
for tag in ("time/updates_per_s", "time/fps"):
    ev = acc.Scalars(tag) if tag in tags else []
    if ev:
        t0, t1 = ev[0].wall_time, ev[-1].wall_time
        late = [e.value for e in ev if e.wall_time >= t0 + (t1 - t0) / 3]
        print(f"{tag} (per log interval): median {statistics.median(late):.1f} over the last two thirds "
              f"({len(late)} of {len(ev)} points), max {max(e.value for e in ev):.1f}")
vals = [float(x) for x in util.read_text().split() if x.strip().replace(".", "", 1).isdigit()] if util.is_file() else []
if vals:
    half = vals[len(vals) // 3:]
    print(f"GPU busy share (nvidia-smi utilization.gpu, {len(vals)} samples at 500 ms): mean {statistics.mean(vals):.0f}%"
          f" over the run, {statistics.mean(half):.0f}% over its last two thirds")
else:
    print("GPU busy share: no nvidia-smi samples")
sys.exit(0 if ok else 1)
PY
mkdir -p "$OUT_DIR/gpu_check_run"
cp "$RUN_DIR"/events.* "$RUN_DIR"/run_info.json "$RUN_DIR"/config.yaml "$OUT_DIR/gpu_check_run/" 2>/dev/null || true

header "summary"
echo "total $(( $(date +%s) - T0 )) s; log: $LOG"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED steps (${#failed[@]}):"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
