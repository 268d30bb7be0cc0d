"""cachemedicpp: KV-cache robustness harness for frozen Hugging Face causal LMs."""

from pathlib import Path

__version__ = "0.1.0"

# The package is installed editable from the repository; shipped configs, schemas and offline
# data live beside it at the repository root.
ROOT = Path(__file__).resolve().parents[1]


def protect(model, run_dir=None, defense: str = "cachemedic"):
    """A defense inside `model`'s attention for the span of a `with` block (`cachemedicpp.protect`)."""
    from cachemedicpp.protection import protect as _protect  # torch and transformers only when used

    return _protect(model, run_dir=run_dir, defense=defense)


def model_path(name: str) -> str:
    """Where `model.name` (a hub id, folder, GGUF file or embedded:<name>) loads from with `from_pretrained`."""
    from cachemedicpp.hf import model_source

    return model_source({"name": name})[0]
