"""Watch a run or a sweep through its heartbeat files.

    python -m cachemedicpp.watch --run_dir DIR [--follow] [--stop_on_terminal] [--interval S] [--stale_after S]

A phase writes a snapshot `logs/<phase>_heartbeat.json` (atomically) and appends the same record to the
timeline `logs/<phase>_heartbeat.jsonl`. The newest record across phases (by `timestamp_utc`) is the run's
current state; a missing, truncated or unreadable snapshot falls back to the last valid timeline line.
A sweep directory (`<out_root>/<sweep_name>`) shows its own `sweep_heartbeat` plus one line per run.

A record that says `running` is shown as `stale` when its process is gone (same host, pid not alive) or
when it has not been updated for `--stale_after` seconds: a killed job cannot write `failed` itself.

Exit codes: 0 printed (or completed), 2 no such directory / no heartbeat at all. With
`--stop_on_terminal` the status decides: completed 0, paused 3, failed 1 (with `--follow` it waits for
one of them; without it, a non-terminal status exits 0).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import yaml

from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.pipeline import PHASES
from cachemedicpp.rundir import RunDir, SweepDir

SWEEP = "sweep"  # the phase name of a sweep's own heartbeat
PHASE_ORDER = (*PHASES, SWEEP)
TERMINAL_EXIT = {"completed": EXIT_OK, "paused": EXIT_PAUSED, "failed": EXIT_FAILED}
LIVE = ("running", "resumed")


# --------------------------------------------------------------------------------------------------
# reading heartbeats


@dataclass
class PhaseState:
    phase: str
    record: dict
    source: str  # "snapshot" or "timeline"
    path: Path
    ts: float  # seconds since the epoch
    folder: RunDir | SweepDir  # paths in the record are relative to it
    stale: str | None = None  # why the record is stale, None when it is not

    @property
    def status(self) -> str:
        return "stale" if self.stale else str(self.record.get("status") or "unknown")


def parse_ts(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def _read_snapshot(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing, truncated or being replaced
    return data if isinstance(data, dict) and "status" in data else None


def _last_timeline_record(path: Path) -> dict | None:
    """The last valid record of a timeline; a torn last line (kill mid-append) is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "status" in rec:
            return rec
    return None


def read_phase(folder: RunDir | SweepDir, phase: str) -> PhaseState | None:
    """Newest readable state of one phase: its snapshot, or the timeline when that is newer or the
    snapshot cannot be read."""
    snap_path, line_path = folder.heartbeat(phase), folder.timeline(phase)
    cands = []
    for source, path, rec in (("snapshot", snap_path, _read_snapshot(snap_path)),
                              ("timeline", line_path, _last_timeline_record(line_path))):
        if rec is None:
            continue
        ts = parse_ts(rec.get("timestamp_utc"))
        if ts is None:
            try:
                ts = path.stat().st_mtime
            except OSError:
                continue
        cands.append(PhaseState(phase, rec, source, path, ts, folder))
    if not cands:
        return None
    # on equal timestamps the snapshot wins (same record, written first)
    return max(cands, key=lambda s: (s.ts, s.source == "snapshot"))


def heartbeat_phases(folder: RunDir | SweepDir) -> list[str]:
    """Phases that have any heartbeat file, in pipeline order."""
    names = {folder.heartbeat_phase(p.name) for p in folder.heartbeat_files()}
    order = {ph: i for i, ph in enumerate(PHASE_ORDER)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError, ValueError):
        return False
    try:  # a zombie has exited; it only waits to be reaped
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def stale_reason(rec: dict, ts: float, now: float, stale_after: float, host: str) -> str | None:
    if rec.get("status") not in LIVE:
        return None
    pid = rec.get("pid")
    if rec.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
        return f"process {pid} is gone"
    age = now - ts
    if age > stale_after:
        return f"no update for {fmt_duration(age)}"
    return None


# --------------------------------------------------------------------------------------------------
# run and sweep views


@dataclass
class RunView:
    path: Path
    phases: list[PhaseState] = field(default_factory=list)

    @property
    def current(self) -> PhaseState | None:
        return max(self.phases, key=lambda s: s.ts) if self.phases else None


@dataclass
class SweepView:
    path: Path
    sweep: PhaseState | None
    runs: list[RunView]

    @property
    def current(self) -> PhaseState | None:
        if self.sweep is not None:
            return self.sweep
        states = [r.current for r in self.runs if r.current is not None]
        return max(states, key=lambda s: s.ts) if states else None


def read_run(path: Path, now: float, stale_after: float, host: str) -> RunView:
    view, rd = RunView(path), RunDir(path)
    for phase in heartbeat_phases(rd):
        if phase == SWEEP:
            continue
        st = read_phase(rd, phase)
        if st is not None:
            st.stale = stale_reason(st.record, st.ts, now, stale_after, host)
            view.phases.append(st)
    return view


def _planned_runs(path: Path) -> list[str]:
    """Run names in the order the sweep runs them (its plan), so runs not started yet show."""
    try:
        doc = yaml.safe_load(SweepDir(path).plan.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    names = doc.get("execution_order") if isinstance(doc, dict) else None
    return [n for n in names if isinstance(n, str) and n and "/" not in n and not n.startswith(".")] \
        if isinstance(names, list) else []


def sweep_runs(path: Path) -> list[Path]:
    """The sweep's planned runs, then any other sub-folder that is a run dir (a resolved config or a logs
    folder). A planned run may not have a folder yet."""
    if not path.is_dir():
        return []
    out = [path / n for n in _planned_runs(path)]
    for p in sorted(path.iterdir()):
        if p.is_dir() and p.name not in RunDir.PARTS and not p.name.startswith(".") and p not in out:
            rd = RunDir(p)
            if rd.resolved_config_path.is_file() or rd.logs.is_dir():
                out.append(p)
    return out


def is_sweep_dir(path: Path) -> bool:
    sd = SweepDir(path)
    return sd.heartbeat(SWEEP).exists() or sd.timeline(SWEEP).exists() or sd.plan.is_file() or bool(sweep_runs(path))


def read_view(path: Path, stale_after: float, now: float | None = None) -> RunView | SweepView:
    now = time.time() if now is None else now
    host = socket.gethostname()
    if is_sweep_dir(path):
        sweep = read_phase(SweepDir(path), SWEEP)
        if sweep is not None:
            sweep.stale = stale_reason(sweep.record, sweep.ts, now, stale_after, host)
        return SweepView(path, sweep, [read_run(p, now, stale_after, host) for p in sweep_runs(path)])
    return read_run(path, now, stale_after, host)


def has_heartbeat(view: RunView | SweepView) -> bool:
    return view.current is not None


def heartbeat_files(path: Path) -> list[Path]:
    """Every heartbeat file of the dir and of its runs (a sweep's)."""
    return sorted(f for d in [SweepDir(path), *map(RunDir, sweep_runs(path))] for f in d.heartbeat_files())


def signature(path: Path) -> tuple:
    """What changes when any heartbeat file (or the set of runs) changes."""
    sig = []
    for f in heartbeat_files(path):
        try:
            st = f.stat()
        except OSError:
            continue
        sig.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(sig)


# --------------------------------------------------------------------------------------------------
# rendering


def _as_float(x) -> float | None:
    """A record's number, or None when it is missing or not a number (shown as '-')."""
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def fmt_duration(sec) -> str:
    sec = _as_float(sec)
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
    x = _as_float(x)
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


def _ago(ts: float, now: float) -> str:
    return f"{fmt_duration(now - ts)} ago"


def _run_path(st: PhaseState, p) -> str:
    """Checkpoint paths are recorded relative to the run dir; show where they are from anywhere."""
    return str(st.folder.resolve(str(p))) if p else "-"


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


def render(view: RunView | SweepView, now: float | None = None) -> str:
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
        return "\n".join(lines)
    cur = view.current
    if cur is None:
        return f"run {view.path}: no heartbeat"
    lines += render_state(cur, now, f"run {view.path}")
    if len(view.phases) > 1:
        lines.append("")
        lines += _table(PHASE_COLUMNS, [_phase_row(s, now, s.phase) for s in view.phases])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the command


def terminal_exit(view: RunView | SweepView) -> int | None:
    cur = view.current
    if cur is None or cur.stale:
        return None
    return TERMINAL_EXIT.get(cur.record.get("status"))


def _statuses(view: RunView | SweepView) -> tuple:
    runs = view.runs if isinstance(view, SweepView) else [view]
    sweep = [view.sweep] if isinstance(view, SweepView) and view.sweep else []
    return tuple(s.status for s in sweep + [st for r in runs for st in r.phases])


def watch(path: Path, follow: bool = False, stop_on_terminal: bool = False, interval: float = 2.0,
          stale_after: float = 300.0, out: TextIO | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    out = out or sys.stdout
    if not path.is_dir():
        print(f"error: run dir {path} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    view = read_view(path, stale_after)
    if not follow:
        if not has_heartbeat(view):
            where = f"{RunDir.LOGS}/{RunDir.heartbeat_name('<phase>')}[l]"
            print(f"error: no heartbeat in {path} (looked for {where} in the dir and in its run sub-folders)",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        print(render(view), file=out, flush=True)
        code = terminal_exit(view) if stop_on_terminal else None
        return EXIT_OK if code is None else code

    clear = out.isatty()
    last_key = None
    waiting_said = False
    while True:
        sig = signature(path)
        view = read_view(path, stale_after)
        if not has_heartbeat(view):
            if not waiting_said:
                print(f"waiting for a heartbeat in {path} ...", file=out, flush=True)
                waiting_said = True
        else:
            key = (sig, _statuses(view))  # a run turning stale redraws too
            if key != last_key:
                text = render(view)
                if clear:
                    out.write("\x1b[H\x1b[2J")
                elif last_key is not None:
                    out.write("\n" + "-" * 40 + f" {time.strftime('%H:%M:%S')}\n")
                out.write(text + "\n")
                out.flush()
                last_key = key
            code = terminal_exit(view)
            if stop_on_terminal and code is not None:
                return code
        sleep(interval)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.watch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a run directory or a sweep directory (<out_root>/<sweep_name>)")
    p.add_argument("--follow", action="store_true", help="keep watching; redraw when a heartbeat changes")
    p.add_argument("--stop_on_terminal", action="store_true",
                   help="exit on completed (0), paused (3) or failed (1)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks in --follow (default 2)")
    p.add_argument("--stale_after", type=float, default=300.0,
                   help="a running heartbeat older than this many seconds is shown as stale (default 300)")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.stale_after <= 0:
        print("error: --interval and --stale_after must be positive", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return watch(Path(args.run_dir), args.follow, args.stop_on_terminal, args.interval, args.stale_after)
    except KeyboardInterrupt:
        return EXIT_OK  # stopping a follow is the normal way to end it


if __name__ == "__main__":
    raise SystemExit(main())
