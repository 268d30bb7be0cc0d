#!/usr/bin/env bash
# Install everything (idempotent) and run the main job on the embedded SmolLM2-135M model:
# train -> eval -> stability -> plots, writing to runs/quickstart (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m cachemedicpp.pipeline --config configs/quickstart.yaml --run_dir "${1:-runs/quickstart}"
