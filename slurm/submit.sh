#!/usr/bin/env bash
# Submit query job, worker array (after the query job: the workers score as they sketch) and
# dependent merge for an existing run directory.
#   RUN_DIR=runs/<name>/<id> TASKS=16 [PARALLEL=8] [JOB=score] bash slurm/submit.sh [sbatch options...]
# JOB=score submits sdi-score tasks instead of sdi-worker: they score stored train sketches
# (e.g. adopted by a run with a new query set) and never sketch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${RUN_DIR:?set RUN_DIR to the run directory (sdi-attribute launcher=prepare prints it)}"
: "${TASKS:?set TASKS to the number of worker array tasks}"
[ -f "$RUN_DIR/config.yaml" ] || { echo "error: $RUN_DIR has no config.yaml" >&2; exit 2; }
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
export RUN_DIR
array="0-$((TASKS - 1))${PARALLEL:+%$PARALLEL}"
export SDI_JOB="${JOB:-worker}"
case "$SDI_JOB" in worker|score) ;; *) echo "error: JOB must be worker or score" >&2; exit 2;; esac
logs="$RUN_DIR/logs"
mkdir -p "$logs"
submit() { sbatch --parsable --export=ALL --chdir="$PWD" "$@" | cut -d';' -f1; }
query=$(submit --output="$logs/sbatch-query-%j.out" "$@" "$here/query.sbatch")
workers=$(submit --array="$array" --dependency="afterok:$query" --kill-on-invalid-dep=yes \
    --job-name="sdi-$SDI_JOB" --output="$logs/sbatch-$SDI_JOB-%A_%a.out" "$@" "$here/worker.sbatch")
merge=$(submit --dependency="afterok:$query:$workers" --kill-on-invalid-dep=yes \
    --output="$logs/sbatch-merge-%j.out" "$@" "$here/merge.sbatch")
# Recorded where sdi-status looks for the run's jobs: the same file launcher=slurm writes
# (jobs_path in sdi_pipeline/launch/slurm.py).
python3 - "$RUN_DIR" "$query" "$workers" "$array" "$merge" <<'EOF'
import json, os, sys
run_dir, query, workers, array, merge = sys.argv[1:]
path = os.path.join(run_dir, "commands", "slurm.json")
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".tmp", "w") as f:
    json.dump({"run_dir": run_dir, "query": query, "merge": merge,
               "workers": {"array": workers, "spec": array}, "via": "slurm/submit.sh"}, f)
os.replace(path + ".tmp", path)
EOF
echo "query $query  workers $workers (array $array)  merge $merge"
echo "follow: squeue -j $query,$workers,$merge   |   sdi-status run_dir=$RUN_DIR"
