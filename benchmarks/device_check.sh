#!/usr/bin/env bash
# The device check of issue 23 in one call on a fresh GPU machine, at most 9 minutes of wall time with
# cold compilation (the parts' limits add up to 540 s), five parts, each under its own time limit (and
# speed.py's parts under a time budget), so a hang or a failure in one leaves the others' figures:
#   0 capture: where System 2's step fails under a CUDA graph (benchmarks/capture_probe.py: one process
#     per ingredient, all at once);
#   1 check: the float64 check (every fast path's gradients against the full graph, S1 and S2 CUDA graphs
#     against eager) and System 2's rows, captured last (a failed capture can spoil the CUDA context);
#   2 table: the speed table at the paper's xxs config (S1 captured, thinking, "small", the compiled
#     Transformer++);
#   3 decode: generation at batch 1 and 8, captured and compiled, the token function against the per-step
#     path in the same run, with kernels per token (benchmarks/decode_kernels.py);
#   4 update_loss: the training step's update and loss gradient as two compiled functions against one
#     (benchmarks/update_loss.py, the paper config's B, S, V).
# Results: $OUT/{capture,check,table,decode}.json, $OUT/update_loss.log, logs beside them.
#   usage: OUT=/some/dir bash benchmarks/device_check.sh      (default OUT: runs/device_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run_part() {  # name, wall limit (s), then speed.py's arguments
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): speed.py $*"
  timeout "$limit" $PY benchmarks/speed.py --device cuda --paper --methods compiled "$@" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? ($(tail -n 1 "$OUT/$name.log"))"
}

# 0: where System 2's capture fails: 55 s (the probes run side by side)
echo "== capture (limit 55s): capture_probe.py"
timeout 55 $PY benchmarks/capture_probe.py --timeout 45 --json "$OUT/capture.json" > "$OUT/capture.log" 2>&1
echo "== capture: exit $? ($(tail -n 1 "$OUT/capture.log"))"
# 1: the check and System 2 (compiled, straightforward, captured): 195 s, its budget 155 s
run_part check 195 --budget-s 155 --match check "ebt s2 xxs compiled" "ebt s2 xxs official" \
  "ebt s2 xxs graph_compiled"
# 2: the table's other rows: 160 s, its budget 120 s (the budget skips what would not fit)
run_part table 160 --budget-s 120 --match "ebt s1 xxs graph_compiled" "8 steps graph_compiled" \
  "8 steps official" "ebt s1 small graph_compiled" "transformer xxs compiled"
# 3: generation, the token function against the per-step path (captured, compiled): 90 s
echo "== decode (limit 90s): decode_kernels.py"
timeout 90 $PY benchmarks/decode_kernels.py --device cuda --vocab 50277 --prompt 32 --short 16 --long 48 \
  --batch 1 8 --modes compiled --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
echo "== decode: exit $? ($(tail -n 1 "$OUT/decode.log"))"
# 4: the training step's update and loss gradient, two compiled functions against one: 40 s
echo "== update_loss (limit 40s): update_loss.py"
timeout 40 $PY benchmarks/update_loss.py --device cuda --batch 32 --seq 256 --vocab 50277 \
  > "$OUT/update_loss.log" 2>&1
echo "== update_loss: exit $? ($(tail -n 1 "$OUT/update_loss.log"))"
ls -l "$OUT"
