#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite (tiny random models, plus a short
# slow tier on the embedded SmolLM2 model). Extra arguments go to pytest, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
