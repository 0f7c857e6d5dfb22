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
# pip is run again only when pyproject.toml (or the extra asked for) changed since the last
# install: a rerun of the demo starts at once.
stamp=".venv/.sdi-installed${extra:+-dev}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$python" --version 2>&1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import sdi_pipeline' 2>/dev/null; then
    echo "[setup] .venv is up to date (sdi-pipeline${extra})"
    exit 0
fi
if [ -f .venv/.sdi-installed ] || [ -f .venv/.sdi-installed-dev ]; then
    echo "[setup] updating sdi-pipeline${extra} in .venv"
else
    echo "[setup] installing sdi-pipeline${extra} into .venv (first time: a few minutes)"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
echo "$want" > "$stamp"
