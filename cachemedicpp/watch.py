"""Watch a run or a sweep through its heartbeat files, and say what to do next.

    python -m cachemedicpp.watch --run_dir DIR [--follow] [--stop_on_terminal] [--json] [--interval S] [--stale_after S]

A phase writes a snapshot `logs/<phase>_heartbeat.json` (atomically) and appends the same record to the
timeline `logs/<phase>_heartbeat.jsonl`. The newest record across phases (by `timestamp_utc`) is the run's
current state; a missing, truncated or unreadable snapshot falls back to the last valid timeline line.
A sweep directory (`<out_root>/<sweep_name>`) shows its own `sweep_heartbeat` plus one line per run.
Paths in the records are relative to the run (or sweep) dir and are shown against the folder given, so a
moved or copied run dir reads right.

The output ends with a `next:` block for the state found, with the exact command to run: how to pause a
running phase, the command that resumes a paused or interrupted one, the failed phase's error and the
command that retries it, the next phase's command, or where the report, figures and tables are. Commands
use the run's own `config_resolved.yaml` when it loads to the run's config hash, else the config file the
run was started with (plus `--set` for what differs), checked the same way. A sweep's next command is the
one that resumes the sweep. `--json` prints the same status and next command as one JSON document
(`schemas/watch_status.schema.json`; one line per redraw with `--follow`).

A record that says `running` is shown as `stale` when its process is gone (same host, pid not alive) or
when it has not been updated for `--stale_after` seconds: a killed job cannot write `failed` itself.

Exit codes: 0 printed (or completed), 2 no such directory, no heartbeat at all, or a heartbeat that cannot
be read. With `--stop_on_terminal` the status decides: completed 0, paused 3, failed 1 (with `--follow` it
waits for one of them; without it, a non-terminal status exits 0).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.config import HASH_EXCLUDE, ConfigError, config_hash, flatten, load_config, resolve_path
from cachemedicpp.pipeline import PHASES
from cachemedicpp.rundir import RunDir, SweepDir

SWEEP = "sweep"  # the phase name of a sweep's own heartbeat
PHASE_ORDER = (*PHASES, SWEEP)
TERMINAL_EXIT = {"completed": EXIT_OK, "paused": EXIT_PAUSED, "failed": EXIT_FAILED}
LIVE = ("running", "resumed")
PYTHON = "python"  # commands are printed as the README writes them


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


def _plan_doc(path: Path) -> dict:
    """The sweep's resolved plan (sweep_resolved.yaml), or {} when it is missing or unreadable."""
    try:
        doc = yaml.safe_load(SweepDir(path).plan.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _planned_runs(path: Path) -> list[str]:
    """Run names in the order the sweep runs them (its plan), so runs not started yet show."""
    names = _plan_doc(path).get("execution_order")
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
# the command that goes on: which config, which phase


def command(*argv: str | Path) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def _yaml_value(value: Any) -> str:
    """A value as `--set` reads it back (YAML-typed)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


# resolved from other keys (the mixture, the OOD split): a --set of them is rewritten on load anyway
DERIVED = ("corruption.mixture", "corruption.train_types", "eval.ood_split", "eval.corruption_eval.types")


@dataclass
class ConfigArgs:
    """The `--config` (and `--set`) arguments that rebuild a run's config."""

    path: Path
    sets: list[str] = field(default_factory=list)  # KEY=VALUE, each after a --set
    verified: bool = False  # loading them gives the run's config hash (so the run dir accepts them)
    source: str = "run_dir"  # run_dir: its config_resolved.yaml; record: the config file it was started with
    note: str | None = None

    def before_run_dir(self) -> list[str]:
        return ["--config", str(self.path)]

    def after_run_dir(self) -> list[str]:
        return [a for kv in self.sets for a in ("--set", kv)]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "sets": list(self.sets), "verified": self.verified, "source": self.source,
                "note": self.note}


def _hash_of(path: Path, overrides: dict) -> tuple[str | None, str | None]:
    """(config hash, None) of a config file + overrides, or (None, why it does not load)."""
    try:
        return load_config(path, overrides).hash, None
    except ConfigError as e:
        return None, "; ".join(e.problems)[:300]
    except Exception as e:  # a probe: whatever goes wrong only makes the candidate unusable
        return None, f"{type(e).__name__}: {e}"[:300]


def _read_record(rd: RunDir) -> dict:
    try:
        rec = json.loads(rd.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _override_candidates(path: Path, stored: dict) -> list[dict]:
    """--set sets that may turn the config file into the stored config: where things live (outside the
    hash, but stability reads them), then also what differs but the keys resolved from others, then also
    those but the mixture (renormalised on every load)."""
    try:
        base = flatten(load_config(path).to_dict())
    except Exception:
        return []
    diff = {k: v for k, v in flatten(stored).items() if k not in base or base[k] != v}
    out = [{k: v for k, v in diff.items() if k in HASH_EXCLUDE}]
    for drop in (DERIVED, DERIVED[:1]):
        cand = {k: v for k, v in diff.items() if not any(k == d or k.startswith(d + ".") for d in drop)}
        if cand not in out:
            out.append(cand)
    return out


def config_args(rd: RunDir) -> ConfigArgs:
    """The run's own config_resolved.yaml when it loads to the run's config hash (a moved run dir keeps
    working); else the config file of run_record.json, with `--set` for what differs, checked the same way;
    else the run's own file, marked unverified with the reason."""
    own = rd.resolved_config_path
    try:
        stored = rd.stored_config()
    except ConfigError as e:
        return ConfigArgs(own, note=e.problems[0])
    if stored is None:
        return ConfigArgs(own, note=f"{own} is missing: the run's config is unknown")
    want = config_hash(stored)
    got, why = _hash_of(own, {})
    if got == want:
        return ConfigArgs(own, verified=True)
    own_note = (f"{own.name} loads to config {got}, not the run's {want}" if got else
                f"{own.name} does not load ({why})")
    src = _read_record(rd).get("config_path")
    if isinstance(src, str) and src:
        path = resolve_path(src)
        if path.is_file():
            for overrides in _override_candidates(path, stored):
                if _hash_of(path, overrides)[0] == want:
                    sets = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
                    return ConfigArgs(path, sets, True, "record", f"{own_note}; using the config the run was "
                                                                  "started with")
        own_note += f"; {src} (the config the run was started with) does not give it either"
    return ConfigArgs(own, note=f"{own_note}: the run dir may refuse this command")


def phase_command(rd: RunDir, phase: str, cfg: ConfigArgs | None) -> str:
    """The command that runs (or resumes) one phase of the run."""
    if phase == "plots" or cfg is None:
        return command(PYTHON, "-m", "cachemedicpp.plots", "--run_dir", rd.path)
    return command(PYTHON, "-m", f"cachemedicpp.{phase}", *cfg.before_run_dir(), "--run_dir", rd.path,
                   *cfg.after_run_dir())


def pipeline_command(rd: RunDir, phases: list[str], cfg: ConfigArgs) -> str:
    more = [] if list(phases) == list(PHASES) else ["--phases", ",".join(phases)]
    return command(PYTHON, "-m", "cachemedicpp.pipeline", *cfg.before_run_dir(), "--run_dir", rd.path,
                   *cfg.after_run_dir(), *more)


@dataclass
class SweepCommand:
    command: str | None
    note: str | None = None


def sweep_command(path: Path) -> SweepCommand:
    """The one command that resumes the sweep: its sweep file (as summary.json records it) with this
    folder's parent as out_root, checked by loading the plan (no model) and finding this very folder."""
    sd = SweepDir(path)
    summary = _read_json(sd.summary_json)
    sweep_file = summary.get("sweep_config") or _plan_doc(path).get("sweep_file")
    if not isinstance(sweep_file, str) or not sweep_file:
        return SweepCommand(None, f"{sd.summary_json} does not name the sweep file: rerun "
                                  f"python -m cachemedicpp.sweep --sweep_config <your sweep file> --out_root "
                                  f"{shlex.quote(str(sd.path.parent))}")
    out_root = sd.path.parent
    cmd = command(PYTHON, "-m", "cachemedicpp.sweep", "--sweep_config", sweep_file, "--out_root", out_root)
    from cachemedicpp.sweep.plan import load_plan  # only for sweeps: it loads every run's config

    try:
        plan = load_plan(sweep_file, str(out_root))
    except ConfigError as e:
        return SweepCommand(cmd, f"the sweep does not validate now: {'; '.join(e.problems)[:300]}")
    except Exception as e:
        return SweepCommand(cmd, f"the sweep does not load now: {type(e).__name__}: {e}"[:300])
    if plan.sweep_dir != sd.path:
        return SweepCommand(cmd, f"{sweep_file} now names sweep {plan.name!r} ({plan.sweep_dir}), not this folder")
    return SweepCommand(cmd)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------------------------------
# what to do next


@dataclass
class Next:
    state: str  # running | paused | failed | interrupted | phase_complete | complete | pending
    message: str
    phase: str | None = None
    commands: list[tuple[str, str]] = field(default_factory=list)  # (what it does, command); the first is next
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    logs: list[Path] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    config: ConfigArgs | None = None

    @property
    def command(self) -> str | None:
        return self.commands[0][1] if self.commands else None

    def to_dict(self) -> dict:
        return {"state": self.state, "phase": self.phase, "message": self.message, "command": self.command,
                "commands": [{"label": label, "command": cmd} for label, cmd in self.commands],
                "notes": list(self.notes), "error": self.error, "logs": [str(p) for p in self.logs],
                "outputs": {k: str(v) for k, v in self.outputs.items()},
                "config": self.config.to_dict() if self.config else None}


def _where(st: PhaseState) -> str:
    return f"step {fmt_progress(st.record)[0]}"


def _who(st: PhaseState) -> str:
    return f"pid {st.record.get('pid', '-')} on {st.record.get('host', '-')}"


def phase_done(rd: RunDir, states: dict[str, PhaseState], phase: str) -> bool:
    """plots by its report (it has no heartbeat), the others by a last heartbeat that says completed."""
    if phase == "plots":
        return rd.report.is_file()
    st = states.get(phase)
    return st is not None and st.said == "completed"


def _resume(rd: RunDir, phase: str, pending: list[str], label: str) -> tuple[ConfigArgs | None, list]:
    """The phase's command, and the pipeline command for it and every later phase when there are more."""
    cfg = None if phase == "plots" else config_args(rd)
    cmds = [(label, phase_command(rd, phase, cfg))]
    rest = pending[pending.index(phase):] if phase in pending else [phase]
    if cfg is not None and len(rest) > 1:
        cmds.append((f"or run it and every later phase ({', '.join(rest)}) with",
                     pipeline_command(rd, rest, cfg)))
    return cfg, cmds


def _sweep_of(rd: RunDir) -> Path | None:
    """The sweep dir a run dir belongs to (its parent plans a run of its name)."""
    parent = rd.path.parent
    return parent if SweepDir(parent).plan.is_file() and rd.path.name in _planned_runs(parent) else None


def run_next(view: RunView) -> Next:
    rd = RunDir(view.path)
    states = {s.phase: s for s in view.phases}
    pending = [p for p in PHASES if not phase_done(rd, states, p)]
    cur = view.current
    holder = lock_holder(rd)
    if cur is not None and cur.said in LIVE and not cur.stale:
        nxt = _running(rd, cur.phase, f"{cur.phase} is running ({_where(cur)}, {_who(cur)})")
    elif holder is not None:
        phase = pending[0] if pending else (cur.phase if cur else None)
        nxt = _running(rd, phase, f"pid {holder} is working on this run dir"
                                  + (f" (starting {phase})" if phase else ""))
    elif not pending:
        nxt = Next("complete", f"nothing to do: every phase is complete ({', '.join(PHASES)}); results:",
                   outputs={"report": rd.report, "figures": rd.figures, "tables": rd.tables})
    elif cur is not None and cur.phase in pending:
        nxt = _unfinished(rd, cur, pending)
    else:
        phase = pending[0]
        what = f"{cur.phase} is complete" if cur is not None else "nothing has run yet"
        cfg, cmds = _resume(rd, phase, pending, f"run {phase} with")
        nxt = Next("phase_complete", f"{what}; run {phase} next:", phase, cmds, config=cfg)
    if nxt.config is not None and nxt.config.note and nxt.state != "running":
        nxt.notes.append(f"config: {nxt.config.note}")
    sweep = _sweep_of(rd)
    if sweep is not None and nxt.state not in ("running", "complete"):
        sc = sweep_command(sweep)
        if sc.command:
            nxt.commands.append((f"this run belongs to sweep {sweep.name}; or resume the whole sweep with",
                                 sc.command))
    return nxt


def _running(folder: RunDir | SweepDir, phase: str | None, what: str) -> Next:
    return Next("running", f"nothing to do: {what}. To pause it (it saves, exits 3, and the command that "
                           "started it resumes it):", phase, [("pause", command("touch", folder.pause_request))])


def _unfinished(rd: RunDir, cur: PhaseState, pending: list[str]) -> Next:
    """The newest phase is paused, failed, or stopped without saying so."""
    phase, r = cur.phase, cur.record
    reason = str(r.get("reason") or "")
    if cur.said == "failed":
        cfg, cmds = _resume(rd, phase, pending, "retry it (it resumes from the last saved state) with")
        logs = [rd.timeline(phase)] + ([rd.log(phase)] if rd.log(phase).is_file() else [])
        notes = [f"the error is recorded in {rd.timeline(phase)}; the traceback went to the stderr of the "
                 f"command that failed"]
        if rd.log(phase).is_file():
            notes.append(f"{phase} log: {rd.log(phase)}")
        return Next("failed", f"{phase} failed at {_where(cur)}: {reason or 'no reason recorded'}", phase,
                    cmds, notes, error=reason or None, logs=logs, config=cfg)
    if cur.said == "paused":
        cfg, cmds = _resume(rd, phase, pending, "resume it with")
        return Next("paused", f"{phase} is paused at {_where(cur)}" + (f" ({reason})" if reason else "")
                    + "; resume it with:", phase, cmds, config=cfg)
    cfg, cmds = _resume(rd, phase, pending, "resume it with")
    if cur.stale and cur.stale.startswith("no update"):
        msg = (f"{phase} has sent no heartbeat lately ({cur.stale}; last said {cur.said} at {_where(cur)}, "
               f"{_who(cur)}); if that process is gone, resume it with:")
    else:
        msg = (f"{phase} stopped without saying so ({cur.stale or 'status ' + cur.said}; last said {cur.said} "
               f"at {_where(cur)}); resume it with:")
    return Next("interrupted", msg, phase, cmds, config=cfg)


# one sweep run's state: done, or what its newest heartbeat says
RUN_STATES = ("done", "running", "paused", "failed", "interrupted", "pending", "over_budget")


def sweep_phases(path: Path) -> list[str]:
    """The phases each run of the sweep runs (summary.json, else the plan, else all)."""
    phases = _read_json(SweepDir(path).summary_json).get("phases") or _plan_doc(path).get("phases")
    if isinstance(phases, list) and phases:
        return [p for p in PHASES if p in phases]
    return list(PHASES)


def sweep_run_states(view: SweepView) -> dict[str, tuple[str, str | None]]:
    """{run name: (state, error or None)}, in the sweep's order."""
    phases = sweep_phases(view.path)
    summary = {r.get("name"): r for r in _read_json(SweepDir(view.path).summary_json).get("runs") or []
               if isinstance(r, dict)}
    out = {}
    for run in view.runs:
        rd, name = RunDir(run.path), run.path.name
        states = {s.phase: s for s in run.phases}
        rec = summary.get(name) or {}
        cur = run.current
        if all(phase_done(rd, states, p) for p in phases):
            out[name] = ("done", None)
        elif cur is not None and cur.said in LIVE and not cur.stale:
            out[name] = ("running", None)
        elif cur is not None and cur.said in ("paused", "failed") and cur.phase in phases:
            out[name] = (cur.said, str(cur.record.get("reason") or "") or None)
        elif rec.get("status") in ("bad_input", "blocked", "failed"):
            out[name] = ("failed", rec.get("error"))
        elif rec.get("status") == "over_budget":
            out[name] = ("over_budget", None)
        elif cur is not None and cur.stale:
            out[name] = ("interrupted", cur.stale)
        else:
            out[name] = ("pending", None)
    return out


def sweep_next(view: SweepView) -> tuple[Next, dict[str, int], dict[str, tuple[str, str | None]]]:
    sd = SweepDir(view.path)
    runs = sweep_run_states(view)
    counts = {s: sum(1 for st, _ in runs.values() if st == s) for s in RUN_STATES}
    active = sum(counts.values()) - counts["over_budget"]
    tally = (f"{counts['done']} done, {counts['paused']} paused, {counts['failed']} failed, "
             f"{counts['pending']} pending" + "".join(f", {counts[s]} {s.replace('_', ' ')}"
                                                    for s in ("running", "interrupted", "over_budget") if counts[s])
             + f" of {sum(counts.values())} runs")
    sw, holder = view.sweep, lock_holder(sd)
    if sw is not None and sw.said in LIVE and not sw.stale:
        return _running(sd, None, f"the sweep is running ({tally}; {_who(sw)})"), counts, runs
    if holder is not None:
        return _running(sd, None, f"pid {holder} is running the sweep ({tally})"), counts, runs
    if active and counts["done"] == active:
        nxt = Next("complete", f"nothing to do: every run is complete ({tally}); summary:",
                   outputs={"summary": sd.summary_md, "summary_json": sd.summary_json})
        return nxt, counts, runs
    sc = sweep_command(view.path)
    said = sw.said if sw is not None else None
    if sw is not None and sw.stale:
        state, what = "interrupted", f"the sweep stopped without saying so ({sw.stale}; {tally})"
    elif said == "failed":
        state, what = "failed", f"the sweep failed ({tally})"
    elif said == "paused":
        reason = str(sw.record.get("reason") or "")
        state, what = "paused", f"the sweep is paused ({tally}{'; ' + reason if reason else ''})"
    elif said == "completed":  # runs undone since, or a larger plan: the same command resumes them
        state, what = "pending", f"the sweep said completed, but not every run is ({tally})"
    else:
        state, what = "pending", f"the sweep has not started or said nothing yet ({tally})"
    verb = "retry it (complete runs are skipped, the others resume)" if state == "failed" else "resume it"
    nxt = Next(state, f"{what}; {verb} with:" if sc.command else f"{what}.",
               commands=[("sweep", sc.command)] if sc.command else [])
    if sc.note:
        nxt.notes.append(sc.note)
    for name, (st, err) in runs.items():
        if st == "failed":
            nxt.notes.append(f"{name} failed: {err or 'no reason recorded'} "
                             f"(heartbeats in {RunDir(view.path / name).logs})")
    if said == "failed" and not sw.stale and sw.record.get("reason") and not counts["failed"]:
        nxt.error = str(sw.record["reason"])
        nxt.notes.append(f"sweep error: {nxt.error}")
    return nxt, counts, runs


# --------------------------------------------------------------------------------------------------
# rendering


def _as_float(x) -> float | None:
    """A record's number, or None when it is missing or not a number (shown as '-')."""
    if isinstance(x, bool):
        return None
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
        "progress": _as_float(r.get("progress")), "eta_sec": _as_float(r.get("eta_sec")) if st.said in LIVE else None,
        "elapsed_wall_sec": _as_float(r.get("elapsed_wall_sec")), "steps_per_sec": _as_float(r.get("steps_per_sec")),
        "tokens_per_sec": _as_float(r.get("tokens_per_sec")), "timestamp_utc": _str(r.get("timestamp_utc")),
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


def show(view: RunView | SweepView, as_json: bool, indent: int | None = 2) -> str:
    """The status text (or JSON document) of a view, with its next command."""
    now = time.time()
    if isinstance(view, SweepView):
        nxt, counts, runs = sweep_next(view)
        doc = status_doc(view, nxt, now, counts, runs) if as_json else None
    else:
        nxt = run_next(view)
        doc = status_doc(view, nxt, now) if as_json else None
    return json.dumps(doc, indent=indent) if as_json else render(view, now, nxt)


def _no_heartbeat(path: Path) -> str:
    where = f"{RunDir.LOGS}/{RunDir.heartbeat_name('<phase>')}[l]"
    return f"error: no heartbeat in {path} (looked for {where} in the dir and in its run sub-folders)"


def watch(path: Path, follow: bool = False, stop_on_terminal: bool = False, interval: float = 2.0,
          stale_after: float = 300.0, out: TextIO | None = None,
          sleep: Callable[[float], None] = time.sleep, as_json: bool = False) -> int:
    out = out or sys.stdout
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        print(f"error: run dir {path} {what}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        view = read_view(path, stale_after)
        if not follow:
            if not has_heartbeat(view):
                print(_no_heartbeat(path), file=sys.stderr)
                return EXIT_BAD_INPUT
            print(show(view, as_json), file=out, flush=True)
            code = terminal_exit(view) if stop_on_terminal else None
            return EXIT_OK if code is None else code
        return _follow(path, stop_on_terminal, interval, stale_after, out, sleep, as_json)
    except HeartbeatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _follow(path: Path, stop_on_terminal: bool, interval: float, stale_after: float, out: TextIO,
            sleep: Callable[[float], None], as_json: bool) -> int:
    clear = out.isatty() and not as_json
    last_key = None
    waiting_said = False
    while True:
        sig = signature(path)
        view = read_view(path, stale_after)
        if not has_heartbeat(view):
            if not waiting_said:
                print(f"waiting for a heartbeat in {path} ...", file=sys.stderr if as_json else out, flush=True)
                waiting_said = True
        else:
            key = (sig, _statuses(view))  # a run turning stale redraws too
            if key != last_key:
                text = show(view, as_json, indent=None)
                if clear:
                    out.write("\x1b[H\x1b[2J")
                elif last_key is not None and not as_json:
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
    p.add_argument("--json", action="store_true",
                   help="print the status and next command as JSON (schemas/watch_status.schema.json); "
                        "one line per redraw with --follow")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks in --follow (default 2)")
    p.add_argument("--stale_after", type=float, default=300.0,
                   help="a running heartbeat older than this many seconds is shown as stale (default 300)")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.stale_after <= 0:
        print("error: --interval and --stale_after must be positive", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return watch(Path(args.run_dir), args.follow, args.stop_on_terminal, args.interval, args.stale_after,
                     as_json=args.json)
    except KeyboardInterrupt:
        return EXIT_OK  # stopping a follow is the normal way to end it


if __name__ == "__main__":
    raise SystemExit(main())
