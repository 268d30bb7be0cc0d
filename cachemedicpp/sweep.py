"""sweep: many runs of the pipeline (train -> eval -> stability -> plots), resumable, on one machine or
on a Ray cluster, with a multi-seed and paired-ablation summary (SPEC §10).

    python -m cachemedicpp.sweep --sweep_config <YAML> --out_root <DIR> [--resume|--no-resume]
                                 [--launcher local|ray] [--dry_run]

Each run is the base config + the sweep's `overrides` + the run's `overrides` (dot keys, the same function
as `--set`), resolved like any config (so `eval.ood_protocol` restricts the training mixture to the
split's train types and evaluates on its held-out type). Run `r` lives in `<out_root>/<sweep_name>/<r>/`.

A run with `paired_with: <twin>` is the lambda_contr > 0 side of an ablation pair: its twin (same config
but train.lambda_contr = 0, checked) runs first and its run dir is handed to stability, so the sensitivity
curve carries the no-contraction operator beside the trained one. Pairs are named explicitly, never
guessed from run names.

Pause: `<sweep dir>/control/pause.request` (or SIGTERM/SIGINT, or budget.max_wall_hours running out)
makes the running phase save its progress and stop; the sweep then writes `control/pause_ack_sweep.json`,
removes the request and exits 3. Rerunning the same command continues where it stopped; runs whose
phases are all complete are skipped from their files alone, without loading a model.

Progress: `<sweep dir>/logs/sweep_heartbeat.json(l)` (step = runs completed, unit = run/phase) and
`<sweep dir>/summary.json` + `summary.md`, rewritten after every run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cachemedicpp import pipeline
from cachemedicpp.config import (HASH_EXCLUDE, Config, ConfigError, apply_overrides, config_hash, load_schema,
                                 read_yaml, resolve, resolve_path, validate)
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import atomic_write_json, atomic_write_text, read_json, utc_now
from cachemedicpp.phase import Heartbeat
from cachemedicpp.rundir import RunDir, SweepDir

PHASES = pipeline.PHASES
# names a run may not take: they are the sweep dir's own files and folders
RESERVED_NAMES = {"logs", "control", "summary.json", "summary.md", "sweep_resolved.yaml"}
# keys an ablation pair may differ in: where things live, and the ablated weight itself
PAIR_IGNORED = tuple(HASH_EXCLUDE) + ("train.lambda_contr",)
SENS_DELTAS = (1.0, 2.0)
BOOTSTRAP_SAMPLES = 2000
TICK_SEC = 15.0  # the sweep heartbeat keeps beating while a long phase runs


# --------------------------------------------------------------------------------------------------
# the plan: a validated sweep file with every run's resolved config


@dataclass
class RunSpec:
    name: str
    cfg: Config
    run_dir: Path
    paired_with: str | None = None
    group: str | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class Plan:
    name: str
    sweep_file: Path
    base_config: Path
    sweep_dir: Path
    phases: list[str]
    launcher: str
    resources: dict
    budget: dict
    description: str
    runs: list[RunSpec]  # execution order: every twin before its partner
    raw: dict

    @property
    def pause_file(self) -> Path:
        return self.sweep_dir / "control" / "pause.request"

    @property
    def run_id(self) -> str:
        blob = json.dumps(sorted((r.name, r.cfg.hash) for r in self.runs)).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:8]}"

    def by_name(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)

    def active(self) -> list[RunSpec]:
        """The runs this sweep may execute: all of them, or the first budget.max_runs in execution order."""
        cap = self.budget.get("max_runs")
        return self.runs[:cap] if cap else list(self.runs)


def load_plan(sweep_file: str | Path, out_root: str | None = None) -> Plan:
    """Validate the sweep file and resolve every run's config; raise ConfigError listing every problem."""
    path = Path(sweep_file)
    raw = read_yaml(path, "sweep")
    validate(raw, load_schema("sweep"), f"sweep {path}")
    problems: list[str] = []

    base = resolve_path(raw["base_config"], path.resolve().parent)
    if not base.is_file():
        problems.append(f"base_config {raw['base_config']!r} not found (looked next to the sweep file, in the "
                        "working directory and in the repository)")
    root = out_root if out_root is not None else raw.get("out_root")
    if not root:
        problems.append("no output folder; pass --out_root or set out_root in the sweep file")
    sweep_dir = Path(root or ".").expanduser().resolve() / raw["sweep_name"]

    names = [r["name"] for r in raw["runs"]]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"runs: duplicate run name {n!r}")
    for n in names:
        if n in RESERVED_NAMES or n in (".", "..") or "/" in n or "\\" in n:
            problems.append(f"runs: run name {n!r} is reserved or not a plain folder name")
    known = set(names)
    for r in raw["runs"]:
        pw = r.get("paired_with")
        if pw is not None and pw not in known:
            problems.append(f"runs.{r['name']}.paired_with: no run named {pw!r} in this sweep")
        elif pw == r["name"]:
            problems.append(f"runs.{r['name']}.paired_with: a run cannot be paired with itself")
    for where, ov in [("overrides", raw.get("overrides") or {})] + [
            (f"runs.{r['name']}.overrides", r.get("overrides") or {}) for r in raw["runs"]]:
        bad = [k for k in ov if not isinstance(k, str) or not k or k.startswith(".") or ".." in k]
        if bad:
            problems.append(f"{where}: bad override key(s) {bad}; use dot keys like train.steps")
    if problems:
        raise ConfigError([f"sweep {path}: {p}" for p in problems])

    # a split file named in the sweep is looked up next to the sweep file first (its path is not hashed)
    for ov in [raw.get("overrides") or {}] + [r.get("overrides") or {} for r in raw["runs"]]:
        p = ov.get("eval.ood_splits_path")
        if isinstance(p, str) and p and not Path(p).is_absolute():
            ov["eval.ood_splits_path"] = str(resolve_path(p, path.resolve().parent))

    base_raw = read_yaml(base, "base config")
    if base_raw is None:
        base_raw = {}
    if not isinstance(base_raw, dict):
        raise ConfigError(f"base config {base}: top level must be a mapping")
    runs: list[RunSpec] = []
    sweep_ov = raw.get("overrides") or {}
    for r in raw["runs"]:
        run_dir = sweep_dir / r["name"]
        run_ov = dict(r.get("overrides") or {})
        if r.get("paired_with"):
            if "stability.paired_run_dir" in run_ov or "stability.paired_run_dir" in sweep_ov:
                problems.append(f"runs.{r['name']}: paired_with and stability.paired_run_dir both set; keep one")
                continue
            # recorded in the run's resolved config (outside the hash) so plots find the twin too
            run_ov["stability.paired_run_dir"] = str(sweep_dir / r["paired_with"])
        try:
            data = apply_overrides(apply_overrides(base_raw, sweep_ov), run_ov)
            cfg = Config(resolve(data, base.parent), str(base))
        except ConfigError as e:
            problems += [f"run {r['name']}: {p}" for p in e.problems]
            continue
        runs.append(RunSpec(r["name"], cfg, run_dir, r.get("paired_with"), r.get("group"), run_ov))
    if problems:
        raise ConfigError(problems)

    problems += _check_pairs(runs)
    problems += _check_existing(runs)
    if problems:
        raise ConfigError(problems)
    phases = [p for p in PHASES if p in (raw.get("phases") or PHASES)]
    return Plan(raw["sweep_name"], path.resolve(), base, sweep_dir, phases, raw.get("launcher", "local"),
                {"cpus": 1, "gpus": 0, **(raw.get("resources") or {})}, dict(raw.get("budget") or {}),
                raw.get("description", ""), order_runs(runs), raw)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _check_pairs(runs: list[RunSpec]) -> list[str]:
    """An ablation pair is the same experiment (seed included) but for train.lambda_contr: 0 on the twin."""
    problems, by_name = [], {r.name: r for r in runs}
    for r in runs:
        if not r.paired_with:
            continue
        twin = by_name[r.paired_with]
        if twin.paired_with:
            problems.append(f"runs.{r.name}.paired_with: {twin.name} is itself paired with {twin.paired_with}; "
                            "a twin is the lambda_contr = 0 side and pairs with nothing")
        if twin.cfg.train.lambda_contr != 0:
            problems.append(f"runs.{r.name}.paired_with: twin {twin.name} has train.lambda_contr = "
                            f"{twin.cfg.train.lambda_contr}; it must be 0")
        if r.cfg.train.lambda_contr <= 0:
            problems.append(f"runs.{r.name}: train.lambda_contr = {r.cfg.train.lambda_contr}, but a run with "
                            "paired_with is the lambda_contr > 0 side of the pair")
        ours, theirs = _flat(r.cfg.to_dict()), _flat(twin.cfg.to_dict())
        diffs = [k for k in sorted(set(ours) | set(theirs))
                 if not any(k == i or k.startswith(i + ".") for i in PAIR_IGNORED) and ours.get(k) != theirs.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in diffs[:6])
            problems.append(f"runs.{r.name}.paired_with: {r.name} and {twin.name} differ in more than "
                            f"train.lambda_contr ({shown})")
    return problems


def _check_existing(runs: list[RunSpec]) -> list[str]:
    """A run dir belongs to one config: refuse before any work rather than fail in the middle."""
    problems = []
    for r in runs:
        try:
            stored = RunDir(r.run_dir).stored_config()
        except ConfigError as e:
            problems += [f"run {r.name}: {p}" for p in e.problems]
            continue
        if stored is not None and config_hash(stored) != r.cfg.hash:
            problems.append(f"run {r.name}: {r.run_dir} belongs to config {config_hash(stored)}, not {r.cfg.hash}; "
                            "use another --out_root or sweep_name, or restore the sweep file")
    return problems


def order_runs(runs: list[RunSpec]) -> list[RunSpec]:
    """File order, except that a paired twin always runs before its partner."""
    by_name, out, placed = {r.name: r for r in runs}, [], set()

    def place(r: RunSpec) -> None:
        if r.name in placed:
            return
        if r.paired_with:
            place(by_name[r.paired_with])
        placed.add(r.name)
        out.append(r)

    for r in runs:
        place(r)
    return out


# --------------------------------------------------------------------------------------------------
# one run (the same function in-process and in a Ray worker)


def run_job(job: dict) -> dict:
    """Run the remaining phases of one run. `job` is plain data so it can travel to a worker process."""
    cfg = Config(job["config"], job.get("config_path"))
    run_dir, pause = Path(job["run_dir"]), Path(job["sweep_pause"])
    extra = {"paired_run_dir": job["paired_run_dir"]} if job.get("paired_run_dir") else None
    on_phase: Callable[[str], None] = job.get("on_phase") or (lambda phase: None)
    ran = []
    for phase in job["phases"]:
        if job["resume"] and pipeline.phase_done(run_dir, phase):
            continue
        if pause.exists():
            return {"name": job["name"], "status": "paused", "rc": EXIT_PAUSED, "phase": phase, "ran": ran,
                    "reason": _pause_reason(pause)}
        on_phase(phase)
        t0 = time.perf_counter()
        if job.get("verbose", True):
            print(f"== {job['name']}: {phase} ==", file=sys.stderr, flush=True)
        try:
            rc = pipeline.run(cfg, run_dir, resume=job["resume"], config_path=job.get("config_path"), phases=(phase,),
                              sweep_pause=pause, stability_extra=extra, verbose=False)
        except ConfigError as e:
            msg = "; ".join(e.problems)
            print(f"sweep: run {job['name']}, {phase}: error: {msg}", file=sys.stderr)
            return {"name": job["name"], "status": "bad_input", "rc": EXIT_BAD_INPUT, "phase": phase, "ran": ran,
                    "error": msg}
        except Exception as e:  # one failing run must not take the rest of the sweep down
            traceback.print_exc()
            return {"name": job["name"], "status": "failed", "rc": EXIT_FAILED, "phase": phase, "ran": ran,
                    "error": f"{type(e).__name__}: {e}"}
        if job.get("verbose", True):
            print(f"== {job['name']}: {phase}: exit {rc} after {time.perf_counter() - t0:.1f}s ==", file=sys.stderr,
                  flush=True)
        if rc == EXIT_PAUSED:
            return {"name": job["name"], "status": "paused", "rc": rc, "phase": phase, "ran": ran,
                    "reason": _phase_ack_reason(run_dir, phase)}
        if rc != EXIT_OK:
            return {"name": job["name"], "status": "bad_input" if rc == EXIT_BAD_INPUT else "failed", "rc": rc,
                    "phase": phase, "ran": ran, "error": f"{phase} exited with {rc}"}
        ran.append(phase)
    return {"name": job["name"], "status": "completed", "rc": EXIT_OK, "phase": None, "ran": ran}


def _pause_reason(pause: Path) -> str:
    try:
        text = pause.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text.splitlines()[0][:200] if text else "pause.request"


def _phase_ack_reason(run_dir: Path, phase: str) -> str:
    if phase not in ("train", "eval", "stability"):
        return "paused"
    ack = RunDir(run_dir).pause_ack(phase)
    try:
        return str(json.loads(ack.read_text(encoding="utf-8")).get("reason") or "paused")
    except (OSError, ValueError):
        return "paused"


def _ray_task(job: dict, *twins: dict) -> dict:
    """A Ray task: skip when a twin it depends on did not complete, else the same per-run function."""
    for t in twins:
        if t.get("status") != "completed":
            return {"name": job["name"], "status": "blocked", "rc": None, "phase": None, "ran": [],
                    "error": f"paired twin {t.get('name')} {t.get('status')}"}
    import torch  # Ray sets OMP_NUM_THREADS from num_cpus; make torch agree even if it was imported already

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
    return run_job(job)


# --------------------------------------------------------------------------------------------------
# summary: per run, per group (seeds), per ablation pair


def run_metrics(run_dir: Path) -> dict:
    """Key metrics of a run from its metrics files (whatever exists so far)."""
    out: dict[str, Any] = {}
    task = _read_optional(run_dir / "metrics" / "task_metrics.json", out)
    if task:
        m = task.get("metrics") or {}
        best = m.get("best_heuristic_name")
        auc, clean = m.get("robustness_auc") or {}, m.get("clean_regression") or {}

        def three(d: Mapping) -> dict:
            return {"no_defense": _num(d.get("no_defense")),
                    "best_heuristic": _num(d.get("best_heuristic", d.get(best))),
                    "cachemedic": _num(d.get("cachemedic"))}

        out["best_heuristic_name"] = best
        out["auc"], out["clean"] = three(auc), three(clean)
        a = out["auc"]
        out["auc_diff"] = {"cachemedic_minus_no_defense": _sub(a["cachemedic"], a["no_defense"]),
                           "cachemedic_minus_best_heuristic": _sub(a["cachemedic"], a["best_heuristic"])}
        out["paired_bootstrap"] = {
            k: {f: _num(v.get(f)) for f in ("diff", "ci_low", "ci_high")} | {"n": v.get("n"), "metric": v.get("metric")}
            for k, v in (m.get("paired_bootstrap") or {}).items() if isinstance(v, dict)}
    stab = _read_optional(run_dir / "metrics" / "stability_metrics.json", out)
    if stab:
        sens = ((stab.get("metrics") or {}).get("stability.logit_sensitivity") or {})
        out["sensitivity"] = {}
        for p in sens.get("points") or []:
            if isinstance(p, dict) and _num(p.get("delta_norm")) in SENS_DELTAS:
                heur = p.get("heuristics") or {}
                out["sensitivity"][f"delta_{_num(p['delta_norm']):g}"] = {
                    "no_defense": _num(p.get("baseline")),
                    "best_heuristic": _num(next(iter(heur.values()))) if heur else None,
                    "cachemedic": _num(p.get("cachemedic")),
                    "cachemedic_no_contr": _num(p.get("cachemedic_no_contr"))}
    return out


def _read_optional(path: Path, out: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        doc = read_json(path, "metrics")
    except ConfigError as e:
        out.setdefault("errors", []).append(str(e))
        return None
    return doc if isinstance(doc, dict) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Flat {dotted key: value} of a run's numeric metrics (the per-run bootstrap CIs left out)."""
    flat = _flat({k: v for k, v in metrics.items() if k not in ("paired_bootstrap", "errors")})
    return {k: v for k, v in flat.items() if _num(v) is not None}


def bootstrap_ci(values: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float] | None:
    """Percentile 95% CI of the mean, resampling the units (runs or pairs) with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
    means = x[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def describe(values: Sequence[float], ci: bool) -> dict:
    x = np.asarray(values, dtype=np.float64)
    out = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}
    if ci:
        out["ci95"] = bootstrap_ci(x)
    return out


def group_summary(members: list[dict]) -> dict:
    """Mean ± std over the completed runs of a group (e.g. seeds); bootstrap CIs across runs for the AUC
    differences."""
    done = [m for m in members if m["status"] == "completed"]
    flats = [numeric_metrics(m["metrics"]) for m in done]
    keys = sorted(set().union(*flats)) if flats else []
    stats = {k: describe([f[k] for f in flats if k in f], ci=k.startswith("auc_diff."))
             for k in keys if all(k in f for f in flats)}
    return {"runs": [m["name"] for m in members], "completed": [m["name"] for m in done],
            "seeds": sorted({m["seed"] for m in done}), "metrics": stats}


def ablation_summary(records: dict[str, dict]) -> dict:
    """λ_contr > 0 minus its λ_contr = 0 twin, per metric, over the pairs where both sides completed."""
    pairs = []
    for name, rec in records.items():
        twin = rec.get("paired_with")
        if twin and rec["status"] == "completed" and records.get(twin, {}).get("status") == "completed":
            pairs.append((name, twin))
    diffs: dict[str, list[float]] = {}
    for name, twin in pairs:
        a, b = numeric_metrics(records[name]["metrics"]), numeric_metrics(records[twin]["metrics"])
        # only what the operator changes: the undefended and heuristic numbers are the same on both sides
        for k in (a.keys() & b.keys()) - {k for k in a if "cachemedic" not in k}:
            diffs.setdefault(k, []).append(a[k] - b[k])
    return {"pairs": [{"run": n, "twin": t, "seed": records[n]["seed"],
                       "lambda_contr": [records[n]["lambda_contr"], records[t]["lambda_contr"]]} for n, t in pairs],
            "contrast": "run (lambda_contr > 0) minus twin (lambda_contr = 0)",
            "metrics": {k: describe(v, ci=True) for k, v in sorted(diffs.items()) if len(v) == len(pairs)}}


class Summary:
    """`summary.json` + `summary.md` in the sweep dir, rebuilt from the run dirs after every run."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.live: dict[str, dict] = {}  # this invocation's outcome per run
        self.over_budget = {r.name for r in plan.runs} - {r.name for r in plan.active()}

    def record(self, r: RunSpec) -> dict:
        done = [p for p in self.plan.phases if pipeline.phase_done(r.run_dir, p)]
        live = self.live.get(r.name, {})
        if len(done) == len(self.plan.phases):
            status = "completed"
        elif live.get("status") not in (None, "completed"):
            status = live["status"]
        elif r.name in self.over_budget:
            status = "over_budget"
        else:
            status = "incomplete" if done else "pending"
        split = r.cfg.eval.ood_split
        return {
            "name": r.name, "status": status, "phases_done": done, "run_dir": r.name, "config_hash": r.cfg.hash,
            "group": r.group, "paired_with": r.paired_with, "seed": r.cfg.seed,
            "lambda_contr": r.cfg.train.lambda_contr, "ood_protocol": r.cfg.eval.ood_protocol,
            "ood_test_type": split["test_type"] if split else None, "overrides": r.overrides,
            "this_invocation": live.get("action"), "error": live.get("error"), "reason": live.get("reason"),
            "metrics": run_metrics(r.run_dir),
        }

    def write(self, status: str) -> dict:
        plan = self.plan
        records = {r.name: self.record(r) for r in plan.runs}
        groups: dict[str, list[dict]] = {}
        for r in plan.runs:
            if r.group:
                groups.setdefault(r.group, []).append(records[r.name])
        doc = {
            "sweep_name": plan.name, "run_id": plan.run_id, "status": status, "updated_utc": utc_now(),
            "sweep_config": str(plan.sweep_file), "base_config": str(plan.base_config),
            "description": plan.description, "phases": plan.phases,
            "runs_total": len(plan.runs),
            "runs_completed": sum(1 for x in records.values() if x["status"] == "completed"),
            "order": [r.name for r in plan.runs],
            "runs": list(records.values()),
            "groups": {g: group_summary(m) for g, m in groups.items()},
            "ablation": ablation_summary(records) if any(r.paired_with for r in plan.runs) else None,
            "notes": {"bootstrap": f"percentile 95% CI of the mean over runs (groups) or pairs (ablation), "
                                   f"{BOOTSTRAP_SAMPLES} resamples, numpy seed 0",
                      "std": "sample standard deviation (ddof = 1)",
                      "per_run_ci": "metrics.paired_bootstrap: eval's paired bootstrap over examples"},
        }
        atomic_write_json(plan.sweep_dir / "summary.json", doc)
        atomic_write_text(plan.sweep_dir / "summary.md", render_markdown(doc))
        return doc


def _f(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _stat(s: dict | None) -> str:
    if not s:
        return "–"
    txt = _f(s["mean"]) + (f" ± {_f(s['std'])}" if s.get("std") is not None else "")
    if s.get("ci95"):
        txt += f" [{_f(s['ci95'][0])}, {_f(s['ci95'][1])}]"
    return txt + f" (n={s['n']})"


def render_markdown(doc: dict) -> str:
    L = [f"# Sweep {doc['sweep_name']}", "",
         f"Status **{doc['status']}**, {doc['runs_completed']}/{doc['runs_total']} runs complete "
         f"(updated {doc['updated_utc']}).", ""]
    if doc["description"]:
        L += [doc["description"].strip(), ""]
    L += ["| run | status | group | paired with | seed | λ_contr | OOD held out | AUC none | AUC best heur. | "
          "AUC cachemedic | clean cachemedic | Δ AUC vs none | sens δ=1 none / cachemedic |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        m = r["metrics"]
        auc, clean = m.get("auc") or {}, m.get("clean") or {}
        s1 = (m.get("sensitivity") or {}).get("delta_1") or {}
        best = _f(auc.get("best_heuristic"))
        if m.get("best_heuristic_name"):
            best += f" ({m['best_heuristic_name']})"
        L.append(f"| {r['name']} | {r['status']} | {r['group'] or ''} | {r['paired_with'] or ''} | {r['seed']} | "
                 f"{r['lambda_contr']:g} | {r['ood_test_type'] or ''} | {_f(auc.get('no_defense'))} | {best} | "
                 f"{_f(auc.get('cachemedic'))} | {_f(clean.get('cachemedic'))} | "
                 f"{_f((m.get('auc_diff') or {}).get('cachemedic_minus_no_defense'))} | "
                 f"{_f(s1.get('no_defense'), 3)} / {_f(s1.get('cachemedic'), 3)} |")
    for g, gs in doc["groups"].items():
        L += ["", f"## Group {g}: mean ± std [bootstrap 95% CI across runs] over {len(gs['completed'])} completed "
                  f"of {len(gs['runs'])} runs (seeds {gs['seeds']})", "", "| metric | value |", "|---|---|"]
        L += [f"| {k} | {_stat(s)} |" for k, s in gs["metrics"].items()]
    ab = doc.get("ablation")
    if ab:
        L += ["", f"## Contraction ablation: {ab['contrast']}, over {len(ab['pairs'])} pairs", "",
              "Pairs: " + (", ".join(f"{p['run']} − {p['twin']} (seed {p['seed']})" for p in ab["pairs"])
                           or "none complete yet"),
              "", "| metric | mean ± std [bootstrap 95% CI across pairs] |", "|---|---|"]
        L += [f"| {k} | {_stat(s)} |" for k, s in ab["metrics"].items()]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------------
# the sweep


class Sweep:
    def __init__(self, plan: Plan, *, resume: bool, verbose: bool = True):
        self.plan, self.resume, self.verbose = plan, resume, verbose
        self.summary = Summary(plan)
        self.active = plan.active()
        self.hb: Heartbeat | None = None
        self.unit: str | None = None
        self.signal_name: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- helpers -------------------------------------------------------------------------------
    def completed(self) -> int:
        return sum(1 for r in self.active if self.complete(r))

    def complete(self, r: RunSpec) -> bool:
        return all(pipeline.phase_done(r.run_dir, p) for p in self.plan.phases)

    def skip(self, r: RunSpec) -> bool:
        return self.resume and self.complete(r)

    def beat(self, status: str, reason: str = "", force: bool = True) -> None:
        with self._lock:
            if self.hb is not None:
                self.hb.beat(status, self.completed(), reason=reason, unit=self.unit, force=force,
                             sweep_name=self.plan.name)

    def job(self, r: RunSpec) -> dict:
        return {"name": r.name, "config": r.cfg.to_dict(), "config_path": str(self.plan.base_config),
                "run_dir": str(r.run_dir), "phases": list(self.plan.phases), "resume": self.resume,
                "sweep_pause": str(self.plan.pause_file),
                "paired_run_dir": str(self.plan.by_name(r.paired_with).run_dir) if r.paired_with else None,
                "verbose": self.verbose}

    def log(self, msg: str) -> None:
        print(f"sweep {self.plan.name}: {msg}", file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame) -> None:
        # A phase that is running has its own handler (pause); between phases the request file makes
        # the next phase pause at its first unit, so no signal is lost in the gap.
        self.signal_name = signal.Signals(signum).name
        self._request_pause(self.signal_name)

    def _request_pause(self, reason: str) -> None:
        if not self.plan.pause_file.exists():
            atomic_write_text(self.plan.pause_file, reason + "\n")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SEC):
            self.beat("running", force=False)

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, launcher: str) -> int:
        plan, sd = self.plan, RunDir(self.plan.sweep_dir)
        sd.lock()
        old = {}
        timer = None
        try:
            (sd.path / "logs").mkdir(parents=True, exist_ok=True)
            (sd.path / "control").mkdir(parents=True, exist_ok=True)
            atomic_write_text(sd.path / "sweep_resolved.yaml", _resolved_yaml(plan))
            prev = _previous_elapsed(sd.path / "logs" / "sweep_heartbeat.json")
            self.hb = Heartbeat(sd.path / "logs", plan.run_id, "sweep", len(self.active))
            self.hb.elapsed_before = prev
            started = self.completed() > 0 or prev > 0
            self.beat("resumed" if started else "running", reason="resume" if started else "start")
            self.summary.write("running")
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    old[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
            hours = plan.budget.get("max_wall_hours")
            if hours:
                timer = threading.Timer(hours * 3600, self._request_pause, args=("budget.max_wall_hours",))
                timer.daemon = True
                timer.start()
            ticker = threading.Thread(target=self._tick, daemon=True)
            ticker.start()
            try:
                outcome = self._run_ray() if launcher == "ray" else self._run_local()
            except BaseException as e:  # the sweep itself broke (not a run): say so where watch looks
                self.beat("failed", reason=f"{type(e).__name__}: {e}")
                self.summary.write("failed")
                raise
            return self._finish(outcome)
        finally:
            self._stop.set()
            if timer is not None:
                timer.cancel()
            for sig, h in old.items():
                signal.signal(sig, h)
            sd.unlock()

    def _run_local(self) -> dict | None:
        """In-process, one run after another; returns the result that stopped the sweep (a pause) or None."""
        for r in self.active:
            if self.skip(r):
                self.summary.live[r.name] = {"action": "skipped (complete)"}
                continue
            twin = self.summary.live.get(r.paired_with or "", {})
            if r.paired_with and not self.complete(self.plan.by_name(r.paired_with)):
                self.summary.live[r.name] = {"status": "blocked", "action": "not run",
                                             "error": f"paired twin {r.paired_with} {twin.get('status', 'incomplete')}"}
                self.summary.write("running")
                continue
            if self.plan.pause_file.exists():
                return {"name": r.name, "status": "paused", "phase": None,
                        "reason": _pause_reason(self.plan.pause_file)}
            self.log(f"run {r.name} ({self.active.index(r) + 1}/{len(self.active)})")

            def on_phase(phase: str, name: str = r.name) -> None:
                self.unit = f"{name}/{phase}"
                self.beat("running")

            res = run_job({**self.job(r), "on_phase": on_phase})
            res["action"] = "ran " + (",".join(res["ran"]) or "nothing") if res["status"] != "paused" else "paused"
            self.summary.live[r.name] = res
            self.beat("running")
            self.summary.write("running")
            if res["status"] == "paused":
                return res
        return None

    def _run_ray(self) -> dict | None:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kw = {} if address else {"include_dashboard": False}  # a cluster's own settings win
            ray.init(address=address, log_to_driver=self.verbose, **kw)
            started = True
        try:
            res = self.plan.resources
            task = ray.remote(num_cpus=res["cpus"], num_gpus=res["gpus"], max_retries=0)(_ray_task)
            refs: dict[str, Any] = {}
            for r in self.active:
                if self.skip(r):
                    self.summary.live[r.name] = {"action": "skipped (complete)"}
                    continue
                deps = [refs[r.paired_with]] if r.paired_with in refs else []
                refs[r.name] = task.remote(self.job(r), *deps)  # Ray holds a partner until its twin is done
            pending = {ref: name for name, ref in refs.items()}
            self.unit = ",".join(refs) or None
            self.beat("running")
            stopper = None
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=TICK_SEC)
                for ref in ready:
                    name = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except Exception as e:  # a worker that died (OOM, node lost) fails its run only
                        out = {"name": name, "status": "failed", "rc": EXIT_FAILED, "ran": [],
                               "error": f"{type(e).__name__}: {e}"}
                    out["action"] = f"ray: {out['status']}"
                    self.summary.live[name] = out
                    if out["status"] == "paused" and stopper is None:
                        stopper = out
                    self.unit = ",".join(pending.values()) or None
                    self.beat("running")
                    self.summary.write("running")
            return stopper
        finally:
            if started:
                ray.shutdown()

    def _finish(self, stopper: dict | None) -> int:
        plan = self.plan
        if stopper is None and plan.pause_file.exists() and self.completed() == len(self.active):
            plan.pause_file.unlink(missing_ok=True)  # the request came after the last unit of work: nothing to pause
        if stopper is not None or plan.pause_file.exists():
            reason = (self.signal_name or (stopper or {}).get("reason")
                      or (_pause_reason(plan.pause_file) if plan.pause_file.exists() else "paused"))
            atomic_write_json(SweepDir(plan.sweep_dir).pause_ack("sweep"), {
                "run_id": plan.run_id, "phase": "sweep", "timestamp_utc": utc_now(), "step": self.completed(),
                "reason": reason, "run": (stopper or {}).get("name"), "run_phase": (stopper or {}).get("phase"),
                "pid": os.getpid()})
            plan.pause_file.unlink(missing_ok=True)
            self.beat("paused", reason=reason)
            self.summary.write("paused")
            self.log(f"paused ({reason}) with {self.completed()}/{len(self.active)} runs complete; "
                     "rerun the same command to continue")
            return EXIT_PAUSED
        bad = {n: x for n, x in self.summary.live.items() if x.get("status") in ("failed", "bad_input", "blocked")}
        if bad:
            self.unit = None
            why = "; ".join(f"{n}: {x['status']} ({x.get('error')})" for n, x in bad.items())
            self.beat("failed", reason=why)
            self.summary.write("failed")
            self.log(f"{len(bad)} run(s) did not complete: {why}")
            return EXIT_FAILED if any(x["status"] == "failed" for x in bad.values()) else EXIT_BAD_INPUT
        self.unit = None
        self.beat("completed", reason="done")
        doc = self.summary.write("completed")
        if self.summary.over_budget:
            self.log(f"budget.max_runs = {plan.budget['max_runs']}: not run: {sorted(self.summary.over_budget)}")
        self.log(f"{doc['runs_completed']}/{doc['runs_total']} runs complete; summary {plan.sweep_dir / 'summary.md'}")
        return EXIT_OK


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--launcher ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[default]')") from None
    return ray


def _previous_elapsed(snapshot: Path) -> float:
    try:
        return float(json.loads(snapshot.read_text(encoding="utf-8")).get("elapsed_wall_sec") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


def _resolved_yaml(plan: Plan) -> str:
    from cachemedicpp.config import dump_yaml

    doc = copy.deepcopy(plan.raw)
    doc["base_config_resolved"] = str(plan.base_config)
    doc["execution_order"] = [r.name for r in plan.runs]
    doc["config_hashes"] = {r.name: r.cfg.hash for r in plan.runs}
    return dump_yaml(doc)


def dry_run(plan: Plan, resume: bool) -> int:
    print(f"sweep {plan.name}: {len(plan.runs)} runs in {plan.sweep_dir} (phases {', '.join(plan.phases)})")
    active = {r.name for r in plan.active()}
    for i, r in enumerate(plan.runs, 1):
        done = [p for p in plan.phases if pipeline.phase_done(r.run_dir, p)]
        state = ("over budget" if r.name not in active else
                 "complete, skipped" if resume and len(done) == len(plan.phases) else
                 f"resume after {done[-1]}" if resume and done else "to run")
        split = r.cfg.eval.ood_split
        print(f"  {i:>3}. {r.name:<28} config {r.cfg.hash} seed {r.cfg.seed} lambda_contr {r.cfg.train.lambda_contr:g}"
              f"{' held-out ' + split['test_type'] if split else ''}"
              f"{' paired with ' + r.paired_with if r.paired_with else ''}{' group ' + r.group if r.group else ''}"
              f": {state}")
    return EXIT_OK


def run(sweep_config: str | Path, out_root: str | None = None, *, resume: bool = True, launcher: str | None = None,
        dry: bool = False, verbose: bool = True) -> int:
    """Validate, then run (or only list, with dry=True) the sweep. Bad input raises ConfigError."""
    plan = load_plan(sweep_config, out_root)
    if dry:
        return dry_run(plan, resume)
    launcher = launcher or plan.launcher
    if launcher == "ray":
        import_ray()  # fail before anything is written
    return Sweep(plan, resume=resume, verbose=verbose).run(launcher)


def main(argv: Sequence[str] | None = None) -> int:
    from cachemedicpp.cli import add_resume_flags, guarded, setup_logging

    p = argparse.ArgumentParser(prog="python -m cachemedicpp.sweep",
                                description="Run a sweep of train -> eval -> stability -> plots runs.")
    p.add_argument("--sweep_config", required=True, help="sweep YAML (schemas/sweep.schema.json)")
    p.add_argument("--out_root", default=None,
                   help="output folder; runs go to <out_root>/<sweep_name>/<run>/ (default: the file's out_root)")
    add_resume_flags(p)
    p.add_argument("--launcher", choices=("local", "ray"), default=None,
                   help="local: in this process (default); ray: one Ray task per run (RAY_ADDRESS for a cluster)")
    p.add_argument("--dry_run", action="store_true", help="validate and list the runs, run nothing")
    args = p.parse_args(argv)
    setup_logging()
    return guarded(lambda: run(args.sweep_config, args.out_root, resume=args.resume, launcher=args.launcher,
                               dry=args.dry_run))


if __name__ == "__main__":
    raise SystemExit(main())
