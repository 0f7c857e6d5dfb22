#!/usr/bin/env bash
# Set up .venv, then run the demo: train the toy looped transformer on parity and show which
# training examples shaped which loop step. Extra arguments go to tools/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh
exec .venv/bin/python tools/demo.py "$@"
