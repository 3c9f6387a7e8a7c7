#!/usr/bin/env bash
# Set up (if needed), then run the main job on the embedded default model.
# Extra arguments go to `kowalski-node demo` (see `kowalski-node demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kowalski-node demo "$@"
