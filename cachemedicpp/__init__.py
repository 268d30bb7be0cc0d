"""cachemedicpp: KV-cache robustness harness for frozen Hugging Face causal LMs."""

from pathlib import Path

__version__ = "0.1.0"

# The package is installed editable from the repository; shipped configs, schemas and offline
# data live beside it at the repository root.
ROOT = Path(__file__).resolve().parents[1]
