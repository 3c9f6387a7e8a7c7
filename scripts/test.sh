#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, type-check, then pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k sandbox`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "==> ruff" >&2
ruff check .
ruff format --check .
echo "==> mypy" >&2
mypy
echo "==> pytest" >&2
set +e
python -m pytest -q --durations=20 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
