"""Training mixtures: weights over the registered corruption types, from a shipped name, a file or a map."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from cachemedicpp.corruption.registry import corruption_types
from cachemedicpp.schema import CONFIG_DIR, ConfigError, read_yaml, resolve_path


def load_mixture(spec: str | Mapping, base: Path | None = None) -> tuple[dict[str, float], dict]:
    """A mixture name (`configs/corruption/<name>.yaml`), a path, or an inline {type: weight} map."""
    if isinstance(spec, Mapping):
        weights, params = dict(spec.get("weights", spec)), dict(spec.get("params", {}) or {})
    else:
        path = Path(spec)
        if not path.suffix:
            path = CONFIG_DIR / "corruption" / f"{spec}.yaml"
        path = resolve_path(path, base)
        doc = read_yaml(path, "corruption mixture")
        if not isinstance(doc, dict) or not isinstance(doc.get("weights"), dict):
            raise ConfigError(f"corruption mixture {path}: expected a mapping with a 'weights' section")
        weights, params = dict(doc["weights"]), dict(doc.get("params", {}) or {})
    check_types(weights)
    for t, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"corruption.mixture.{t}: weight must be a non-negative number, got {w!r}")
    return {t: float(w) for t, w in weights.items()}, params


def check_types(weights: Iterable[str]) -> None:
    """Every type a mixture names is registered (a wrapper is not: it is no type of its own)."""
    known = corruption_types()
    bad = [t for t in weights if t not in known]
    if bad:
        raise ConfigError(f"corruption.mixture: unknown corruption type(s) {bad}; known: {list(known)}")


def normalise_weights(weights: Mapping[str, float], keep: Iterable[str] | None = None) -> dict[str, float]:
    kept = {t: w for t, w in weights.items() if keep is None or t in set(keep)}
    total = sum(kept.values())
    if total <= 0:
        raise ConfigError(f"corruption.mixture: no positive weight left after filtering to {list(keep or [])}")
    if abs(total - 1.0) <= 1e-12:  # already normalised: dividing again would move the last bits (and the hash)
        return {t: w for t, w in kept.items() if w > 0}
    return {t: w / total for t, w in kept.items() if w > 0}
