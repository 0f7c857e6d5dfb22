#!/usr/bin/env bash
# Set up .venv with the dev tools, then run every check: lint, format, types, layers, tests.
# As root with apt-get (as in CI) it also brings up the one-node SLURM cluster of
# slurm/local-cluster.sh for the `slurm` tests and stops it again on exit; a cluster that is
# already up is used and left alone. SDI_LOCAL_CLUSTER=0 turns this off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh dev
if [ "${SDI_LOCAL_CLUSTER:-1}" != 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
    && ! bash slurm/local-cluster.sh status >/dev/null 2>&1; then
    echo "[test] starting the one-node SLURM cluster (slurm/local-cluster.sh)"
    trap 'bash slurm/local-cluster.sh down' EXIT
    bash slurm/local-cluster.sh up \
        || echo "[test] the SLURM cluster did not start: slurm tests skip (and fail under CI=true)"
fi
echo "[test] ruff check";          .venv/bin/ruff check .
echo "[test] ruff format --check"; .venv/bin/ruff format --check .
echo "[test] pyright sdi_pipeline"; .venv/bin/pyright sdi_pipeline
echo "[test] lint-imports";        .venv/bin/lint-imports
echo "[test] pytest";              .venv/bin/python -m pytest "$@"
