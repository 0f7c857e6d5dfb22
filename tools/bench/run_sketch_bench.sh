#!/usr/bin/env bash
# Benchmark our per-step gradient sketch engine against a plain forward+backward and against
# the public reference package `step-decomposed-influence` (import name `sdi`).
#
#   bash tools/bench/run_sketch_bench.sh [bench_sketch.py arguments, e.g. --threads 2]
#
# The reference is installed only into a separate venv, .bench-venv (git-ignored), never into
# .venv, so the dev/test environment cannot import it by accident. PYTHON picks the
# interpreter for creating .bench-venv (default python3; must be >= 3.10). Run it alone on the
# machine for final numbers: other processes distort the timings.
set -euo pipefail
# The command as typed, for the benchmark's header.
SDI_BENCH_COMMAND="bash $(printf '%q' "$0")"
for arg in "$@"; do SDI_BENCH_COMMAND+=" $(printf '%q' "$arg")"; done
export SDI_BENCH_COMMAND
cd "$(dirname "$0")/../.."

TORCH_VERSION=2.13.0
REF_VERSION=0.1.1
venv=.bench-venv
py="$venv/bin/python"
python="${PYTHON:-python3}"

if [ ! -x "$py" ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "the benchmark needs Python >= 3.10; '$python' is $("$python" --version 2>&1)." >&2
        exit 1
    fi
    echo "[bench-setup] creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi

# pip's output goes to a log (shown only on failure) so the benchmark's tables stay readable.
pip_log="$venv/pip-install.log"
pip_install() {
    if ! "$py" -m pip install --quiet --disable-pip-version-check "$@" >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        echo "[bench-setup] pip install $* failed (log: $pip_log)" >&2
        exit 1
    fi
}

# torch first, on its own and only from the wheel on disk (pip's configured find-links, no
# index), so a CUDA build from PyPI is never pulled in; then its dependencies. Every later
# install repeats the pin, so resolving other packages cannot swap the torch build either.
# A venv that already holds torch $TORCH_VERSION (any build, installed by hand) is kept.
if ! "$py" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
    2>/dev/null; then
    echo "[bench-setup] installing torch==$TORCH_VERSION (wheel on disk) into $venv"
    if ! "$py" -m pip install --quiet --no-index --no-deps "torch==$TORCH_VERSION" \
        >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        echo "[bench-setup] no torch==$TORCH_VERSION wheel on disk (pip find-links). Install the" \
            "CPU build into $venv yourself ($py -m pip install torch==$TORCH_VERSION" \
            "--index-url <PyTorch's CPU wheel index>) and run again." >&2
        exit 1
    fi
    pip_install "torch==$TORCH_VERSION"
fi
echo "[bench-setup] installing sdi-pipeline (editable) and step-decomposed-influence==$REF_VERSION"
pip_install -e . "torch==$TORCH_VERSION"
pip_install "step-decomposed-influence==$REF_VERSION" "torch==$TORCH_VERSION"

exec "$py" tools/bench/bench_sketch.py "$@"
