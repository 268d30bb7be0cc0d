"""The status as text (a run's phases, a sweep's runs, the `next:` block) and as the --json document
(schemas/watch_status.schema.json)."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from cachemedicpp.watch.fmt import as_float, fmt_duration, fmt_num, fmt_progress
from cachemedicpp.watch.next import Next
from cachemedicpp.watch.read import LIVE, PhaseState, RunView, SweepView


def _ago(ts: float, now: float) -> str:
    return f"{fmt_duration(now - ts)} ago"


def _resolved(st: PhaseState, p) -> Path | None:
    """Paths are recorded relative to the run (or sweep) dir; read them against the folder given."""
    return st.folder.resolve(p) if isinstance(p, str) and p else None


def _run_path(st: PhaseState, p) -> str:
    q = _resolved(st, p)
    return str(q) if q else "-"


def render_state(st: PhaseState, now: float, title: str) -> list[str]:
    r = st.record
    steps, pct = fmt_progress(r)
    status = st.status + (f" ({st.stale}; last said {r.get('status')})" if st.stale else "")
    rows = [
        ("run_id", r.get("run_id") or "-"),
        ("phase", st.phase),
        ("status", status),
        ("progress", f"{steps} ({pct})"),
        ("eta", fmt_duration(r.get("eta_sec")) if r.get("status") in LIVE else "-"),
        ("elapsed", fmt_duration(r.get("elapsed_wall_sec"))),
        ("steps/s", fmt_num(r.get("steps_per_sec"))),
        ("tokens/s", fmt_num(r.get("tokens_per_sec"))),
        ("checkpoint", _run_path(st, r.get("latest_checkpoint"))),
        ("state", _run_path(st, r.get("latest_state"))),
        ("unit", r.get("current_unit") or "-"),
        ("updated", f"{r.get('timestamp_utc', '-')} ({_ago(st.ts, now)}), pid {r.get('pid', '-')} on "
                    f"{r.get('host', '-')}" + (" [from timeline]" if st.source == "timeline" else "")),
    ]
    if r.get("resumed_from"):
        rows.append(("resumed", f"from {_run_path(st, r.get('resumed_from'))}"
                                + (f" ({r['resume_fallback']})" if r.get("resume_fallback") else "")))
    if r.get("reason"):
        rows.append(("reason", str(r["reason"])))
    width = max(len(k) for k, _ in rows)
    return [title] + [f"  {k:<{width}}  {v}" for k, v in rows]


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    numeric = {"step/total", "%", "eta", "elapsed", "steps/s", "tokens/s", "updated"}

    def line(cells):
        return indent + "  ".join(c.rjust(w) if h in numeric else c.ljust(w)
                                  for c, w, h in zip(cells, widths, header)).rstrip()

    return [line(header)] + [line(r) for r in rows]


PHASE_COLUMNS = ["phase", "status", "step/total", "%", "eta", "elapsed", "steps/s", "tokens/s", "updated"]


def _phase_row(st: PhaseState, now: float, name: str) -> list[str]:
    r = st.record
    steps, pct = fmt_progress(r)
    return [name, st.status, steps, pct, fmt_duration(r.get("eta_sec")) if r.get("status") in LIVE else "-",
            fmt_duration(r.get("elapsed_wall_sec")), fmt_num(r.get("steps_per_sec")),
            fmt_num(r.get("tokens_per_sec")), _ago(st.ts, now)]


def render_next(nxt: Next) -> list[str]:
    lines = [f"next: {nxt.message}"]
    for i, (label, cmd) in enumerate(nxt.commands):
        if i:
            lines.append(f"  {label}:")
        lines.append(f"  $ {cmd}")
    if nxt.outputs:
        width = max(len(k) for k in nxt.outputs)
        lines += [f"  {k:<{width}}  {v}{'/' if v.suffix == '' else ''}" for k, v in nxt.outputs.items()]
    lines += [f"  {note}" for note in nxt.notes]
    return lines


def render(view: RunView | SweepView, now: float | None = None, nxt: Next | None = None) -> str:
    now = time.time() if now is None else now
    lines: list[str] = []
    if isinstance(view, SweepView):
        lines.append(f"sweep {view.path}")
        if view.sweep is not None:
            lines += render_state(view.sweep, now, "sweep heartbeat")
        else:
            lines.append("  (no sweep heartbeat yet)")
        rows = []
        for run in view.runs:
            cur = run.current
            if cur is None:
                label = "no heartbeat" if run.path.is_dir() else "pending"
                rows.append([run.path.name, "-", label] + [""] * (len(PHASE_COLUMNS) - 1))
                continue
            rows.append([run.path.name] + _phase_row(cur, now, cur.phase)
                        + [str(cur.record.get("current_unit") or "-")])
        lines.append("")
        lines.append(f"runs ({len(view.runs)})")
        if rows:
            lines += _table(["run"] + PHASE_COLUMNS + ["unit"], rows)
    else:
        cur = view.current
        if cur is None:
            return f"run {view.path}: no heartbeat"
        lines += render_state(cur, now, f"run {view.path}")
        if len(view.phases) > 1:
            lines.append("")
            lines += _table(PHASE_COLUMNS, [_phase_row(s, now, s.phase) for s in view.phases])
    if nxt is not None:
        lines.append("")
        lines += render_next(nxt)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# --json: the same status as one document (schemas/watch_status.schema.json)


def _int(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _str(x) -> str | None:
    return x if isinstance(x, str) else None


def phase_doc(st: PhaseState, now: float) -> dict:
    r = st.record
    resumed = _resolved(st, r.get("resumed_from"))
    return {
        "phase": st.phase, "status": st.status, "said": st.said, "stale": st.stale,
        "step": _int(r.get("step")), "total_steps": _int(r.get("total_steps")),
        "progress": as_float(r.get("progress")), "eta_sec": as_float(r.get("eta_sec")) if st.said in LIVE else None,
        "elapsed_wall_sec": as_float(r.get("elapsed_wall_sec")), "steps_per_sec": as_float(r.get("steps_per_sec")),
        "tokens_per_sec": as_float(r.get("tokens_per_sec")), "timestamp_utc": _str(r.get("timestamp_utc")),
        "age_sec": round(max(now - st.ts, 0.0), 3), "pid": _int(r.get("pid")), "host": _str(r.get("host")),
        "checkpoint": _opt(_resolved(st, r.get("latest_checkpoint"))),
        "state": _opt(_resolved(st, r.get("latest_state"))),
        "unit": _str(r.get("current_unit")), "reason": str(r.get("reason") or ""),
        "resumed_from": _opt(resumed), "resume_fallback": _str(r.get("resume_fallback")),
        "source": st.source, "heartbeat": str(st.path),
    }


def _opt(p: Path | None) -> str | None:
    return None if p is None else str(p)


def status_doc(view: RunView | SweepView, nxt: Next, now: float, counts: dict | None = None,
               runs: dict | None = None) -> dict:
    base = {"path": str(view.path), "generated_utc": _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    if isinstance(view, SweepView):
        return {"kind": "sweep", **base,
                "sweep": phase_doc(view.sweep, now) if view.sweep is not None else None,
                "runs": [{"name": r.path.name, "path": str(r.path), "state": runs[r.path.name][0],
                          "error": runs[r.path.name][1],
                          "current": phase_doc(r.current, now) if r.current is not None else None} for r in view.runs],
                "counts": counts, "next": nxt.to_dict()}
    cur = view.current
    return {"kind": "run", **base, "run_id": _str(cur.record.get("run_id")) if cur else None,
            "current": phase_doc(cur, now) if cur else None, "phases": [phase_doc(s, now) for s in view.phases],
            "next": nxt.to_dict()}
