#!/usr/bin/env bash
# The GPU path in one command (tools/bench/device_check.py says what it checks):
#
#   bash tools/bench/device_check.sh           # a fresh machine with a CUDA GPU and this repo
#   bash tools/bench/device_check.sh --cpu     # CPU only, small sizes (uses .venv)
#
# On a GPU machine it first finds a Python whose torch sees CUDA (.venv-device, .venv, then
# python3); failing that it creates .venv-device and installs torch==2.13.0 from PyPI there
# (PyPI's default Linux wheel is the CUDA build), then this package and pytest. The check
# itself then runs in at most 8 minutes of wall time, each step time-boxed; the table is
# printed and written to $OUT/device_check.txt when OUT is set. Extra arguments go to
# device_check.py (e.g. --budget 300, --steps agree time).
set -uo pipefail
cd "$(dirname "$0")/../.."
TORCH_VERSION=2.13.0
REF_VERSION=0.1.1

cuda_python() {  # a python whose torch sees a CUDA device, with this package importable
    for py in .venv-device/bin/python .venv/bin/python python3; do
        if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

quiet_pip() {  # pip with its output shown only on failure; a time box for each install
    local py=$1 limit=$2
    shift 2
    local log
    log=$(mktemp)
    if ! timeout "$limit" "$py" -m pip install --quiet --disable-pip-version-check "$@" \
        >"$log" 2>&1; then
        tail -20 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

setup=""
if [[ " $* " == *" --cpu "* ]]; then
    py=.venv/bin/python
    [ -x "$py" ] || { echo "no .venv: run bash tools/test.sh once (it creates .venv)" >&2; exit 1; }
    setup="CPU form: existing .venv"
else
    started=$SECONDS
    if py=$(cuda_python); then
        setup="torch with CUDA found in $py"
        if [ "$py" = python3 ]; then  # a system torch: a venv over it takes the package
            python3 -m venv --system-site-packages .venv-device || exit 1
            py=.venv-device/bin/python
            setup+=", used through .venv-device (--system-site-packages)"
        fi
    else
        echo "[device-check] no torch with CUDA here: installing torch==$TORCH_VERSION (PyPI," \
            "CUDA build) into .venv-device"
        [ -x .venv-device/bin/python ] || python3 -m venv .venv-device || exit 1
        py=.venv-device/bin/python
        quiet_pip "$py" 600 "torch==$TORCH_VERSION" || { echo "torch install failed" >&2; exit 1; }
        "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || {
            "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
            echo "[device-check] torch installed but sees no CUDA device (driver?)" >&2
            exit 1
        }
        setup="installed torch==$TORCH_VERSION (CUDA) into .venv-device"
    fi
    # The package and pytest only: the dev extras (pyright's node, transformers, datasets)
    # would cost minutes the device check does not use.
    if ! "$py" -c 'import sdi_pipeline, pytest, h5py, hydra' 2>/dev/null; then
        quiet_pip "$py" 300 -e . pytest "torch==$TORCH_VERSION" || exit 1
        setup+="; installed sdi-pipeline (editable) and pytest"
    fi
    # The reference package, for the side-by-side timing; optional.
    if ! "$py" -c 'import sdi' 2>/dev/null; then
        if quiet_pip "$py" 120 "step-decomposed-influence==$REF_VERSION" \
            "torch==$TORCH_VERSION"; then
            setup+="; installed step-decomposed-influence==$REF_VERSION"
        else
            setup+="; step-decomposed-influence did not install (its rows are left out)"
        fi
    fi
    setup+=" ($((SECONDS - started)) s)"
fi
echo "[device-check] $setup"
export SDI_DEVICE_SETUP="$setup"
# device_check.py keeps itself within its --budget (450 s); this outer limit is a last resort.
exec timeout 480 "$py" tools/bench/device_check.py "$@"
