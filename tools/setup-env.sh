#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package.
#   tools/setup-env.sh          runtime dependencies
#   tools/setup-env.sh dev      plus the test tools (pytest, ruff, pyright, hypothesis)
# PYTHON picks the interpreter (default python3; must be >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "sdi-pipeline needs Python >= 3.10; '$python' is $("$python" --version 2>&1)." >&2
    echo "Set PYTHON=/path/to/python3.10+ and run again." >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$python" --version)"
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
echo "[setup] installing sdi-pipeline${extra} into .venv (first time: a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
