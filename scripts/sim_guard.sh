#!/usr/bin/env bash
# Print the simulator's history_sha256 for the three guard runs of issue 10 (a refactor that
# changes none of what is simulated must leave all three unchanged). About 70 s of CPU.
# Usage: scripts/sim_guard.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
for run in "baseline 100 120" "churn-25pct 100 120" "baseline 1000 5"; do
  set -- $run
  dir="$out/$1-n$2-d$3"
  # the exit status says whether the scenario's checkers passed; the guard is the hash
  nice -n 10 "$py" -m simulations run "$1" --nodes "$2" --duration "$3" --seed 1 \
    --out "$dir" --no-plot >"$dir.log" 2>&1 || true
  "$py" - "$dir" "$1 n=$2 d=$3" <<'PY'
import json, pathlib, sys
reports = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
if not reports:
    sys.exit(f"{sys.argv[2]}: no report written (see {sys.argv[1]}.log)")
print(f"{sys.argv[2]}: {json.loads(reports[0].read_text())['history_sha256']}")
PY
done
