#!/usr/bin/env bash
# The device check of issue 23 in one call on a fresh GPU machine, at most 9 minutes of wall time with
# cold compilation: (1) the float64 check (every fast path's gradients against the full graph, S1 and S2
# CUDA graphs against eager) and System 2's rows, captured last (a failed capture can spoil the CUDA
# context); (2) the speed table at the paper's xxs config (S1 captured, thinking, generation, "small",
# the compiled Transformer++). Each part runs under its own time limit and time budget, so a hang or a
# failure in one leaves the other's figures. Results: $OUT/check.json, $OUT/table.json, logs beside them.
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

# 1: the check and System 2 (compiled, straightforward, captured): 240 s, its budget 190 s
run_part check 240 --budget-s 190 --match check "ebt s2 xxs compiled" "ebt s2 xxs official" \
  "ebt s2 xxs graph_compiled"
# 2: the table's other rows: 270 s, its budget 220 s (the budget skips what would not fit)
run_part table 270 --budget-s 220 --match "ebt s1 xxs graph_compiled" "8 steps graph_compiled" \
  "8 steps official" "batch 1 graph_compiled" "batch 8 graph_compiled" "ebt s1 small graph_compiled" \
  "transformer xxs compiled"
ls -l "$OUT"
