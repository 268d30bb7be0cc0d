"""How record values are shown: durations, numbers, progress; '-' for what is missing or not a number."""

from __future__ import annotations


def as_float(x) -> float | None:
    """A record's number, or None when it is missing or not a number (shown as '-')."""
    if isinstance(x, bool):
        return None
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def fmt_duration(sec) -> str:
    sec = as_float(sec)
    if sec is None:
        return "-"
    sec = max(sec, 0.0)
    if sec < 60:
        return f"{sec:.0f}s"
    m, s = divmod(int(round(sec)), 60)
    h, m = divmod(m, 60)
    if h:
        d, h = divmod(h, 24)
        return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


def fmt_num(x, digits: int = 3) -> str:
    x = as_float(x)
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_progress(rec: dict) -> tuple[str, str]:
    step, total = rec.get("step"), rec.get("total_steps")
    steps = f"{step if step is not None else '-'}/{total if total is not None else '-'}"
    prog = rec.get("progress")
    if prog is None and isinstance(step, (int, float)) and isinstance(total, (int, float)) and total:
        prog = step / total
    pct = f"{100 * float(prog):.1f}%" if isinstance(prog, (int, float)) else "-"
    return steps, pct
