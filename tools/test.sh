#!/usr/bin/env bash
# Set up .venv with the dev tools, then run every check: lint, format, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh dev
echo "[test] ruff check";          .venv/bin/ruff check .
echo "[test] ruff format --check"; .venv/bin/ruff format --check .
echo "[test] pyright sdi_pipeline"; .venv/bin/pyright sdi_pipeline
echo "[test] pytest";              .venv/bin/python -m pytest "$@"
