"""The plan of a sweep: the validated sweep file with every run's resolved config, in execution order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cachemedicpp import pipeline
from cachemedicpp.config import (Config, ConfigError, config_hash, load_config, load_schema, pairing_differences,
                                 read_yaml, resolve_path, validate)
from cachemedicpp.rundir import RunDir, SweepDir

PHASES = pipeline.PHASES
PAIRED_RUN_DIR = "stability.paired_run_dir"  # where a partner finds its twin (outside the config hash)
SPLITS_PATH = "eval.ood_splits_path"


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
    def dir(self) -> SweepDir:
        return SweepDir(self.sweep_dir)

    @property
    def pause_file(self) -> Path:
        return self.dir.pause_request

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
    base = resolve_path(raw["base_config"], path.resolve().parent)
    root = out_root if out_root is not None else raw.get("out_root")
    problems = _check_file(raw, base, root)
    if problems:
        raise ConfigError([f"sweep {path}: {p}" for p in problems])

    _locate_split_files(raw, path.resolve().parent)
    sweep_dir = Path(root).expanduser().resolve() / raw["sweep_name"]
    runs, problems = _resolve_runs(raw, base, sweep_dir)
    if problems:
        raise ConfigError(problems)
    problems = _check_pairs(runs) + _check_existing(runs)
    if problems:
        raise ConfigError(problems)
    phases = [p for p in PHASES if p in (raw.get("phases") or PHASES)]
    return Plan(raw["sweep_name"], path.resolve(), base, sweep_dir, phases, raw.get("launcher", "local"),
                {"cpus": 1, "gpus": 0, **(raw.get("resources") or {})}, dict(raw.get("budget") or {}),
                raw.get("description", ""), order_runs(runs), raw)


def _override_sets(raw: dict) -> list[tuple[str, dict]]:
    """(where, overrides) of the sweep and of each run, as written in the file."""
    return [("overrides", raw.get("overrides") or {})] + [
        (f"runs.{r['name']}.overrides", r.get("overrides") or {}) for r in raw["runs"]]


def _check_file(raw: dict, base: Path, root: str | None) -> list[str]:
    """What is wrong with the sweep file itself, before any config is resolved."""
    problems: list[str] = []
    if not base.is_file():
        problems.append(f"base_config {raw['base_config']!r} not found (looked next to the sweep file, in the "
                        "working directory and in the repository)")
    if not root:
        problems.append("no output folder; pass --out_root or set out_root in the sweep file")
    names = [r["name"] for r in raw["runs"]]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"runs: duplicate run name {n!r}")
    for n in names:
        if n in SweepDir.PARTS or n in (".", "..") or "/" in n or "\\" in n:
            problems.append(f"runs: run name {n!r} is reserved or not a plain folder name")
    for r in raw["runs"]:
        pw = r.get("paired_with")
        if pw is not None and pw not in names:
            problems.append(f"runs.{r['name']}.paired_with: no run named {pw!r} in this sweep")
        elif pw == r["name"]:
            problems.append(f"runs.{r['name']}.paired_with: a run cannot be paired with itself")
    for where, ov in _override_sets(raw):
        bad = [k for k in ov if not isinstance(k, str) or not k or k.startswith(".") or ".." in k]
        if bad:
            problems.append(f"{where}: bad override key(s) {bad}; use dot keys like train.steps")
    return problems


def _locate_split_files(raw: dict, folder: Path) -> None:
    """A split file named in the sweep is looked up next to the sweep file first (its path is not hashed)."""
    for _, ov in _override_sets(raw):
        p = ov.get(SPLITS_PATH)
        if isinstance(p, str) and p and not Path(p).is_absolute():
            ov[SPLITS_PATH] = str(resolve_path(p, folder))


def _resolve_runs(raw: dict, base: Path, sweep_dir: Path) -> tuple[list[RunSpec], list[str]]:
    """Each run's config: the base config + the sweep's overrides + the run's own."""
    runs: list[RunSpec] = []
    problems: list[str] = []
    sweep_ov = raw.get("overrides") or {}
    for r in raw["runs"]:
        run_ov = dict(r.get("overrides") or {})
        if r.get("paired_with"):
            if PAIRED_RUN_DIR in run_ov or PAIRED_RUN_DIR in sweep_ov:
                problems.append(f"runs.{r['name']}: paired_with and {PAIRED_RUN_DIR} both set; keep one")
                continue
            # recorded in the run's resolved config (outside the hash) so plots find the twin too
            run_ov[PAIRED_RUN_DIR] = str(sweep_dir / r["paired_with"])
        # the run's keys apply after the sweep's: a key both set takes the run's value
        merged = {**{k: v for k, v in sweep_ov.items() if k not in run_ov}, **run_ov}
        try:
            cfg = load_config(base, merged)
        except ConfigError as e:
            problems += [f"run {r['name']}: {p}" for p in e.problems]
            continue
        runs.append(RunSpec(r["name"], cfg, sweep_dir / r["name"], r.get("paired_with"), r.get("group"), run_ov))
    return runs, problems


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
        diffs = pairing_differences(r.cfg.to_dict(), twin.cfg.to_dict())
        if diffs:
            shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in diffs[:6])
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
