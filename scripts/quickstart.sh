#!/usr/bin/env bash
# Install everything (idempotent) and run the main job on the embedded SmolLM2-135M model:
# train -> eval -> stability -> plots, writing to runs/quickstart (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
# Idle OpenMP workers spin by default: fastest on a quiet machine, but on one whose cores are already
# busy a spinning 2-thread pool can make every forward many times slower. Sleep instead when the load
# average already exceeds the core count (or keep whatever the caller set).
if [ -z "${OMP_WAIT_POLICY:-}" ] && awk -v n="$(nproc)" '{exit !($1 > n)}' /proc/loadavg; then
    export OMP_WAIT_POLICY=PASSIVE
fi
exec .venv/bin/python -m cachemedicpp.pipeline --config configs/quickstart.yaml --run_dir "${1:-runs/quickstart}"
