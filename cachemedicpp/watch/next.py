"""What to do next: the config a command uses (checked to load to the run's config hash), the command
for each state of a run (running, paused, failed, interrupted, phase complete, complete), and the one
command that resumes a sweep."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cachemedicpp.config import HASH_EXCLUDE, ConfigError, config_hash, flatten, load_config, resolve_path
from cachemedicpp.pipeline import PHASES
from cachemedicpp.rundir import RunDir, SweepDir
from cachemedicpp.sweep.plan import load_plan
from cachemedicpp.watch.fmt import fmt_progress
from cachemedicpp.watch.read import (LIVE, PhaseState, RunView, SweepView, lock_holder, plan_doc, planned_runs,
                                     read_json)

PYTHON = "python"  # commands are printed as the README writes them


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
    src = read_json(rd.record).get("config_path")
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
    summary = read_json(sd.summary_json)
    sweep_file = summary.get("sweep_config") or plan_doc(path).get("sweep_file")
    if not isinstance(sweep_file, str) or not sweep_file:
        return SweepCommand(None, f"{sd.summary_json} does not name the sweep file: rerun "
                                  f"python -m cachemedicpp.sweep --sweep_config <your sweep file> --out_root "
                                  f"{shlex.quote(str(sd.path.parent))}")
    out_root = sd.path.parent
    cmd = command(PYTHON, "-m", "cachemedicpp.sweep", "--sweep_config", sweep_file, "--out_root", out_root)
    try:
        plan = load_plan(sweep_file, str(out_root))
    except ConfigError as e:
        return SweepCommand(cmd, f"the sweep does not validate now: {'; '.join(e.problems)[:300]}")
    except Exception as e:
        return SweepCommand(cmd, f"the sweep does not load now: {type(e).__name__}: {e}"[:300])
    if plan.sweep_dir != sd.path:
        return SweepCommand(cmd, f"{sweep_file} now names sweep {plan.name!r} ({plan.sweep_dir}), not this folder")
    return SweepCommand(cmd)




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
    return parent if SweepDir(parent).plan.is_file() and rd.path.name in planned_runs(parent) else None


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
    phases = read_json(SweepDir(path).summary_json).get("phases") or plan_doc(path).get("phases")
    if isinstance(phases, list) and phases:
        return [p for p in PHASES if p in phases]
    return list(PHASES)


def sweep_run_states(view: SweepView) -> dict[str, tuple[str, str | None]]:
    """{run name: (state, error or None)}, in the sweep's order."""
    phases = sweep_phases(view.path)
    summary = {r.get("name"): r for r in read_json(SweepDir(view.path).summary_json).get("runs") or []
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
