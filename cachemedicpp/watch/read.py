"""Reading a run or sweep dir: heartbeat records (snapshot or timeline), staleness, the run and sweep
views, the lock holder, and what changes when a heartbeat does."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cachemedicpp.pipeline import PHASES
from cachemedicpp.rundir import RunDir, SweepDir
from cachemedicpp.watch.fmt import fmt_duration

SWEEP = "sweep"  # the phase name of a sweep's own heartbeat
PHASE_ORDER = (*PHASES, SWEEP)
LIVE = ("running", "resumed")


class HeartbeatError(Exception):
    """A heartbeat file that exists but holds no readable record (bad input: exit 2)."""


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

    @property
    def said(self) -> str:
        """The status the record itself says (stale or not)."""
        return str(self.record.get("status") or "unknown")


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


def _is_record(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("status"), str) and bool(data["status"])


def _read_snapshot(path: Path) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why it cannot be used); a missing file says nothing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:  # truncated, not UTF-8, a folder, being replaced
        return None, f"{type(e).__name__}: {e}"
    return (data, None) if _is_record(data) else (None, "not a heartbeat record (no status)")


def _last_timeline_record(path: Path) -> tuple[dict | None, str | None]:
    """The last valid record of a timeline; a torn last line (kill mid-append) is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    for raw in reversed(lines):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if _is_record(rec):
            return rec, None
    return None, "no valid heartbeat line" if lines else "empty"


def read_phase(folder: RunDir | SweepDir, phase: str) -> PhaseState | None:
    """Newest readable state of one phase: its snapshot, or the timeline when that is newer or the
    snapshot cannot be read. HeartbeatError when the phase has heartbeat files but neither can be read."""
    snap_path, line_path = folder.heartbeat(phase), folder.timeline(phase)
    cands, problems = [], []
    for source, path, (rec, why) in (("snapshot", snap_path, _read_snapshot(snap_path)),
                                     ("timeline", line_path, _last_timeline_record(line_path))):
        if rec is None:
            if why:
                problems.append(f"{path} ({why})")
            continue
        ts = parse_ts(rec.get("timestamp_utc"))
        if ts is None:
            try:
                ts = path.stat().st_mtime
            except OSError:
                continue
        cands.append(PhaseState(phase, rec, source, path, ts, folder))
    if not cands:
        if problems:
            raise HeartbeatError(f"heartbeat of {phase} cannot be read: {'; '.join(problems)}")
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


def lock_holder(folder: RunDir | SweepDir) -> int | None:
    """The pid holding the folder's lock (a phase or a sweep at work, even before its first heartbeat),
    read from /proc/locks. Never by taking the lock: even briefly, that could make a starting phase fail.
    None when the lock is free or this cannot be known (no /proc)."""
    try:
        st = folder.lock_file.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2146363 0 EOF" ("->" marks a waiter)
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            if (int(ino) == st.st_ino and int(major, 16) == os.major(st.st_dev)
                    and int(minor, 16) == os.minor(st.st_dev)):
                return int(parts[4])
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------------------------------
# run and sweep views


@dataclass
class RunView:
    path: Path
    phases: list[PhaseState] = field(default_factory=list)

    @property
    def current(self) -> PhaseState | None:
        # the newest heartbeat; on a tie (same millisecond) the later phase of the pipeline
        order = {p: i for i, p in enumerate(PHASE_ORDER)}
        return max(self.phases, key=lambda s: (s.ts, order.get(s.phase, -1))) if self.phases else None


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


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def plan_doc(path: Path) -> dict:
    """The sweep's resolved plan (sweep_resolved.yaml), or {} when it is missing or unreadable."""
    try:
        doc = yaml.safe_load(SweepDir(path).plan.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def planned_runs(path: Path) -> list[str]:
    """Run names in the order the sweep runs them (its plan), so runs not started yet show."""
    names = plan_doc(path).get("execution_order")
    return [n for n in names if isinstance(n, str) and n and "/" not in n and not n.startswith(".")] \
        if isinstance(names, list) else []


def sweep_runs(path: Path) -> list[Path]:
    """The sweep's planned runs, then any other sub-folder that is a run dir (a resolved config or a logs
    folder). A planned run may not have a folder yet."""
    if not path.is_dir():
        return []
    out = [path / n for n in planned_runs(path)]
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
