"""Number and value formatting shared by the figures, tables and report."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(x: float | None, digits: int = 4) -> str:
    """`digits` decimals below 1 (scores, AUCs), `digits` significant figures above (perplexity, drift)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.{max(digits - 1 - int(math.floor(math.log10(ax))), 0)}f}"
    if ax < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}g}"
    return f"{x:.{digits}f}"


def fmt_ci(x: float, ci: tuple[float, float] | None) -> str:
    return fmt(x) if ci is None else f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_diff(entry: dict) -> str:
    """A paired-bootstrap entry {diff, ci_low, ci_high} as `diff [low, high]`."""
    return fmt_ci(entry["diff"], (entry["ci_low"], entry["ci_high"]))


def layer_ranges(layers: Sequence[int], dash: str = "–") -> str:
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}{dash}{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def plain(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {plain(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v)
    return str(v)


MISSING = "—"  # a value the metrics file does not carry (an older file); LaTeX gets "---"


def fmt_rf(entry: dict | str | None) -> str:
    """A recovered fraction {value, ci_low, ci_high} as `value [low, high]`; "—" when absent, "n/a (no damage)"
    when null (the damage is 0); a string (a value by definition) as is."""
    if entry is None:
        return MISSING
    if isinstance(entry, str):
        return entry
    if not math.isfinite(entry["value"]):
        return "n/a (no damage)"
    lo, hi = entry["ci_low"], entry["ci_high"]
    return fmt_ci(entry["value"], (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None)


def fmt_damage(d: dict | None) -> str:
    """A damage entry as `diff [low, high]`, "—" when absent."""
    return MISSING if d is None else fmt_diff(d)
