#!/usr/bin/env bash
# The paradigm benchmark (docs/benchmarks.md section 1) on one CUDA GPU in under 10 minutes:
# `small` models at 64^3, synthetic 4-dataset cohort with 10 test cases per dataset, equal
# total compute (4 per-dataset ResUNets of S steps vs Hermes-R and the shared ResUNet of 4 S),
# 3 seeds run as 3 concurrent processes (a small model leaves most of an H200 idle).
#
#   bash bench/gpu_wheels.sh              # once, where PyPI is reachable: wheels into .whl/
#   OUT=/some/dir bash bench/gpu_paradigm.sh
#
# Knobs (environment): STEPS (S, default 400), PRESET_SIZE (small), PATCH (64), SEEDS ("0 1 2"),
# RECIPE (a YAML of overrides, default none), TEST_CASES (10), OUT (results; default runs/gpu_paradigm).
# On a CPU the same script runs (slowly); the CI-style check is `STEPS=2 PRESET_SIZE=tiny PATCH=32`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_paradigm}
STEPS=${STEPS:-400}
PRESET_SIZE=${PRESET_SIZE:-small}
PATCH=${PATCH:-64}
SEEDS=${SEEDS:-0 1 2}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && ! "$PY" -c "import monai, pydantic, nibabel, SimpleITK, pydicom" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PYEOF
WORK="$OUT/work"
COMMON=(--synthetic --work "$WORK" --synthetic-datasets AbdomenCT LiverCT KidneyCT AbdomenT2 --test-cases "${TEST_CASES:-10}"
        --steps "$STEPS" --preset-size "$PRESET_SIZE" --patch "$PATCH" --threads 4 --loader-workers 2
        --data-name "synthetic-gpu-$PRESET_SIZE")
if [ -n "${RECIPE:-}" ]; then COMMON+=(--recipe "$RECIPE"); fi
START=$(date +%s)
# Prepare the cohort once, up front (a deadline in the past starts no run), so that the
# concurrent seeds below do not wait on each other's preparation lock.
"$PY" -m hermes.cli benchmark "${COMMON[@]}" --models resunet --seeds 0 --deadline 00:00 >"$OUT/prepare.log" 2>&1 || true
pids=()
for seed in $SEEDS; do
  "$PY" -m hermes.cli benchmark "${COMMON[@]}" --models resunet shared_resunet hermes_r --seeds "$seed" \
    >"$OUT/seed$seed.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
"$PY" -m hermes.cli benchmark "${COMMON[@]}" --models resunet shared_resunet hermes_r --seeds $SEEDS \
  >"$OUT/tables.log" 2>&1 || status=1
cp "$WORK/paradigm.md" "$WORK/summary.json" "$OUT/" 2>/dev/null || status=1
# Training speed per run (the GPU check of issue 19): median steps/s and wall time.
"$PY" - "$WORK" <<'PYEOF' | tee "$OUT/speed.txt"
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("runs/*/*/seed*/result.json")):
    r = json.loads(path.read_text())
    print(f"{r['model']:16s} {str(r.get('dataset') or 'all'):12s} seed {r['seed']}: {r['steps']} steps, "
          f"{r.get('median_steps_per_s') or 0:.2f} steps/s, train {r['train_wall_s']:.0f} s, eval {r['eval_wall_s']:.0f} s")
PYEOF
echo "wall $(( $(date +%s) - START )) s, status $status" | tee -a "$OUT/device.txt"
exit $status
