#!/usr/bin/env bash
# Set up .venv, then run sdi-attribute with its defaults: train the toy looped transformer on
# parity (first time only), compute SDI with two local workers, merge, print the most
# influential training examples per query and loop step, and write plots.
# Extra arguments are sdi-attribute overrides, e.g. `bash tools/demo.sh sketch.m=4096`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh
.venv/bin/sdi-attribute "$@"
echo
echo "Next: 'source .venv/bin/activate' puts sdi-attribute and the job commands on PATH in this"
echo "shell (the README's commands are written so), or run them as .venv/bin/sdi-attribute ..."
