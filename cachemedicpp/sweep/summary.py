"""The sweep's summary: key metrics per run, mean ± std per group (seeds), the paired contraction
ablation and, for leave-one-type-out runs, a table per held-out type (damage, recovered fractions) with its
figure, written as summary.json + summary.md (+ SweepDir.loto_figure) in the sweep dir after every run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cachemedicpp import pipeline, results as R
from cachemedicpp.config import ConfigError, flatten
from cachemedicpp.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, utc_now
from cachemedicpp.rundir import RunDir
from cachemedicpp.stats import mean_ci
from cachemedicpp.sweep.plan import Plan, RunSpec

SENS_DELTAS = (1.0, 2.0)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


# --------------------------------------------------------------------------------------------------
# one run


def run_metrics(run_dir: Path) -> dict:
    """Key metrics of a run from its metrics files (whatever exists so far)."""
    rd, out = RunDir(run_dir), {}
    task = _read_optional(rd.task_metrics, out)
    if task:
        m = task.get(R.METRICS) or {}
        out.update(_task_summary(m))
        split = (task.get(R.SETTINGS) or {}).get(R.OOD_SPLIT)
        if isinstance(split, dict) and isinstance(split.get("test_type"), str):
            out["held_out"] = _held_out(m, split["test_type"])
    stab = _read_optional(rd.stability_metrics, out)
    if stab:
        out["sensitivity"] = _sensitivity_summary((stab.get(R.METRICS) or {}).get(R.SENS_KEY) or {})
    return out


def _task_summary(m: Mapping) -> dict:
    """AUC and clean score of no defense, the best baseline, oracle_drop and cachemedic (and the clean
    ceiling's AUC); eval's paired bootstrap, damage and recovered fractions (null where the file has none)."""
    best = m.get(R.BEST_HEURISTIC_NAME)

    def headline(d: Mapping) -> dict:
        return {R.NO_DEFENSE: _num(d.get(R.NO_DEFENSE)),
                R.BEST_HEURISTIC_SERIES: _num(d.get(R.BEST_HEURISTIC_SERIES, d.get(best))),
                R.ORACLE_DROP: _num(d.get(R.ORACLE_DROP)),
                R.CACHEMEDIC: _num(d.get(R.CACHEMEDIC))}

    auc = headline(m.get(R.ROBUSTNESS_AUC) or {})
    damage = _damage(m.get(R.DAMAGE))
    return {
        "best_heuristic_name": best,
        "auc": {"clean": damage["auc_clean"] if damage else None, **auc},
        "clean": headline(m.get(R.CLEAN_REGRESSION) or {}),
        "damage": damage,
        "recovered_fraction": _recovered(m.get(R.RECOVERED_FRACTION), best),
        "auc_diff": {R.CACHEMEDIC_MINUS_NO_DEFENSE: _sub(auc[R.CACHEMEDIC], auc[R.NO_DEFENSE]),
                     R.CACHEMEDIC_MINUS_BEST_HEURISTIC: _sub(auc[R.CACHEMEDIC], auc[R.BEST_HEURISTIC_SERIES])},
        "paired_bootstrap": {
            k: {f: _num(v.get(f)) for f in ("diff", "ci_low", "ci_high")} | {"n": v.get("n"), "metric": v.get("metric")}
            for k, v in (m.get(R.PAIRED_BOOTSTRAP) or {}).items() if isinstance(v, dict)},
    }


def _damage(d: Any) -> dict | None:
    if not isinstance(d, Mapping):
        return None
    out = {f: _num(d.get(f)) for f in ("auc_clean", "auc_no_defense", "diff", "ci_low", "ci_high")}
    return {**out, "n": d.get("n")} if out["diff"] is not None else None


def _recovered(rf: Any, best: str | None) -> dict:
    """Recovered fractions {value, ci_low, ci_high} of the best baseline, oracle_drop and cachemedic (None
    where the file has none)."""
    rf = rf if isinstance(rf, Mapping) else {}

    def one(name: str | None) -> dict | None:
        e = rf.get(name) if name else None
        return {f: _num(e.get(f)) for f in ("value", "ci_low", "ci_high")} if isinstance(e, Mapping) else None

    return {R.BEST_HEURISTIC_SERIES: one(best), R.ORACLE_DROP: one(R.ORACLE_DROP), R.CACHEMEDIC: one(R.CACHEMEDIC)}


def _held_out(m: Mapping, test_type: str) -> dict:
    """A leave-one-type-out run's numbers on its held-out type: the per-type entries of that type when the
    file has them (the run may evaluate held-in types too), else the overall ones."""
    best = m.get(R.BEST_HEURISTIC_NAME)

    def for_type(key: str, by_type_key: str) -> Any:
        by_type = m.get(by_type_key)
        if isinstance(by_type, Mapping) and test_type in by_type:
            return by_type[test_type]
        return m.get(key)

    auc = for_type(R.ROBUSTNESS_AUC, R.ROBUSTNESS_AUC_BY_TYPE) or {}
    damage = _damage(for_type(R.DAMAGE, R.DAMAGE_BY_TYPE))
    boot = (for_type(R.PAIRED_BOOTSTRAP, R.PAIRED_BOOTSTRAP_BY_TYPE) or {}).get(R.CACHEMEDIC_MINUS_NO_DEFENSE)
    return {
        "test_type": test_type, "best_baseline": best,
        "auc": {"clean": damage["auc_clean"] if damage else None, R.NO_DEFENSE: _num(auc.get(R.NO_DEFENSE)),
                R.BEST_HEURISTIC_SERIES: _num(auc.get(best)) if best else None,
                R.ORACLE_DROP: _num(auc.get(R.ORACLE_DROP)), R.CACHEMEDIC: _num(auc.get(R.CACHEMEDIC))},
        "damage": damage,
        "recovered_fraction": _recovered(for_type(R.RECOVERED_FRACTION, R.RECOVERED_FRACTION_BY_TYPE), best),
        R.CACHEMEDIC_MINUS_NO_DEFENSE: ({f: _num(boot.get(f)) for f in ("diff", "ci_low", "ci_high")}
                                        if isinstance(boot, Mapping) else None),
    }


def _sensitivity_summary(sens: Mapping) -> dict:
    """Logit drift at the summary's perturbation sizes, per defense (and the paired twin's operator)."""
    out = {}
    for p in sens.get("points") or []:
        if isinstance(p, dict) and _num(p.get("delta_norm")) in SENS_DELTAS:
            heur = p.get("heuristics") or {}
            out[f"delta_{_num(p['delta_norm']):g}"] = {
                R.NO_DEFENSE: _num(p.get("baseline")),
                R.BEST_HEURISTIC_SERIES: _num(next(iter(heur.values()))) if heur else None,
                R.CACHEMEDIC: _num(p.get(R.CACHEMEDIC)),
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
    """Flat {dotted key: value} of a run's numeric metrics (the per-run bootstrap CIs and the held-out
    block, which repeats them for the loto table, left out)."""
    flat = flatten({k: v for k, v in metrics.items() if k not in ("paired_bootstrap", "errors", "held_out")})
    return {k: v for k, v in flat.items()
            if _num(v) is not None and not k.endswith((".ci_low", ".ci_high", ".n"))}


# --------------------------------------------------------------------------------------------------
# across runs


def bootstrap_ci(values: Sequence[float], seed: int = BOOTSTRAP_SEED,
                 samples: int = BOOTSTRAP_SAMPLES) -> list[float] | None:
    """Percentile 95% CI of the mean, resampling the units (runs or pairs) with replacement."""
    return mean_ci(values, seed, samples)


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
        for k in (a.keys() & b.keys()) - {k for k in a if R.CACHEMEDIC not in k}:
            diffs.setdefault(k, []).append(a[k] - b[k])
    return {"pairs": [{"run": n, "twin": t, "seed": records[n]["seed"],
                       "lambda_contr": [records[n]["lambda_contr"], records[t]["lambda_contr"]]} for n, t in pairs],
            "contrast": "run (lambda_contr > 0) minus twin (lambda_contr = 0)",
            "metrics": {k: describe(v, ci=True) for k, v in sorted(diffs.items()) if len(v) == len(pairs)}}


LOTO_SERIES = (R.BEST_HEURISTIC_SERIES, R.ORACLE_DROP, R.CACHEMEDIC)  # the recovered fractions compared


def loto_summary(records: Sequence[dict], eval_suffices: bool = False) -> dict | None:
    """One row per completed leave-one-type-out run (its task metrics name a held-out type), ordered by the
    held-out type: AUCs of the clean ceiling, no defense, the best baseline, oracle_drop and cachemedic on
    that type, the damage, recovered fractions and cachemedic - no defense, each with the run's own paired
    bootstrap CI. None when the sweep has no such run. The sweep adds "figure": its figure's path in the
    sweep dir. Runs count once every phase is done, or (`eval_suffices`) once eval is."""
    rows = []
    for r in records:
        h = (r.get("metrics") or {}).get("held_out")
        done = r.get("status") == "completed" or (eval_suffices and "eval" in (r.get("phases_done") or []))
        if done and h:
            rows.append({"run": r["name"], "seed": r.get("seed"), **h})
    if not rows:
        return None
    rows.sort(key=lambda x: (x["test_type"], x["seed"] if isinstance(x["seed"], int) else -1, x["run"]))
    return {"rows": rows,
            "recovered_fraction": "(AUC - AUC no_defense) / (AUC clean - AUC no_defense) on the held-out type",
            "ci": "each run's own 95% paired bootstrap over its examples (eval)"}


def loto_figure(loto: dict) -> bytes:
    """Grouped bars per held-out type: recovered fraction of the best baseline, oracle_drop and cachemedic,
    with their CIs (n/a where the run measured no damage); lines at 0 (no better than no defense) and 1 (back
    to clean). Several runs of one type (seeds) stand side by side within each series, in seed order, the
    seeds named under the type."""
    # matplotlib only when a figure is drawn: the summary's tables and JSON do without it
    from matplotlib import rc_context

    from cachemedicpp.palette import GREY, ORANGE
    from cachemedicpp.plots.figures import RC, defense_style, new_figure, png

    types = list(dict.fromkeys(r["test_type"] for r in loto["rows"]))  # the rows' order (sorted by type)
    groups = [[r for r in loto["rows"] if r["test_type"] == t] for t in types]

    def label(t: str, runs: list[dict]) -> str:
        best = sorted({r["best_baseline"] or "none" for r in runs})
        if len(runs) == 1:
            return f"{t}\nbest: {best[0]}"
        seeds = [r["seed"] for r in runs]
        who = ("seeds " + ", ".join(map(str, seeds))) if len(set(seeds)) == len(seeds) and None not in seeds \
            else f"{len(runs)} runs"
        return f"{t}\n{who}\nbest: {', '.join(best)}"

    style = {R.BEST_HEURISTIC_SERIES: (ORANGE, "best baseline (chosen on validation data)", "//"),
             R.ORACLE_DROP: (GREY, f"{R.ORACLE_DROP} (ceiling)", ""),
             R.CACHEMEDIC: (defense_style(R.CACHEMEDIC)[0], R.CACHEMEDIC, "")}
    slot = 0.8 / len(LOTO_SERIES)
    most = max(len(g) for g in groups)
    with rc_context(RC):
        fig = new_figure(max(6.5, (1.6 + 0.3 * (most - 1)) * len(groups) + 2.5), 5.0)
        ax = fig.add_subplot(1, 1, 1)
        for j, name in enumerate(LOTO_SERIES):
            color, lab, hatch = style[name]
            xs, ys, lo, hi, ws = [], [], [], [], []
            for i, runs in enumerate(groups):
                width = slot / len(runs)
                for k, r in enumerate(runs):
                    x = i + (j - 1) * slot + (k - (len(runs) - 1) / 2) * width
                    e = r["recovered_fraction"].get(name)
                    dmg = r.get("damage") or {}
                    # not in the file, or no measurable damage to recover (the damage's CI reaches zero: the
                    # fraction divides by noise)
                    if not e or e.get("value") is None or not (dmg.get("ci_low") is None or dmg["ci_low"] > 0):
                        ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7.5, color=color, rotation=90)
                        continue
                    v = e["value"]
                    xs.append(x)
                    ys.append(v)
                    ws.append(width * 0.92)
                    lo.append(v - e["ci_low"] if e.get("ci_low") is not None else 0.0)
                    hi.append(e["ci_high"] - v if e.get("ci_high") is not None else 0.0)
            ax.bar(xs, ys, ws, yerr=[lo, hi] if xs else None, color=color, hatch=hatch, edgecolor="white",
                   capsize=2 if most > 1 else 3, error_kw={"lw": 1.0}, label=lab, zorder=3)
        ax.axhline(0.0, color="black", lw=1.0, zorder=2)
        ax.axhline(1.0, color=GREY, lw=1.0, ls=":", zorder=2, label="1: back to clean")
        ax.set_xticks(range(len(groups)), [label(t, g) for t, g in zip(types, groups)])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -0.05), max(hi, 1.1))  # both reference lines always in view
        ax.set_ylabel("recovered fraction of the damage (95% CI)")
        ax.set_title("Leave-one-type-out: damage recovered on the held-out corruption type")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8.5, frameon=False)
        return png(fig)


def combine(sweep_dirs: Sequence[Path], out_dir: Path) -> dict:
    """One leave-one-type-out table and figure from several sweeps (for instance one per seed): reads each
    sweep dir's summary.json (a run counts once its eval is done), writes loto_combined.json / .md / .png
    into `out_dir`."""
    records = []
    for d in sweep_dirs:
        doc = read_json(Path(d) / "summary.json", "sweep summary")
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
            raise ConfigError(f"{Path(d) / 'summary.json'}: not a sweep summary (no runs)")
        records += [{**r, "name": f"{doc.get('sweep_name', Path(d).name)}/{r.get('name')}"} for r in doc["runs"]
                    if isinstance(r, dict)]
    loto = loto_summary(records, eval_suffices=True)
    if loto is None:
        raise ConfigError(f"no leave-one-type-out run with its eval done in {[str(d) for d in sweep_dirs]}")
    out_dir = Path(out_dir)
    loto.update(sweeps=[str(d) for d in sweep_dirs], figure="loto_combined.png")
    atomic_write_json(out_dir / "loto_combined.json", loto)
    atomic_write_bytes(out_dir / "loto_combined.png", loto_figure(loto))
    atomic_write_text(out_dir / "loto_combined.md", "\n".join(["# Leave-one-type-out, combined", "",
                                                                  *[f"- {d}" for d in loto["sweeps"]],
                                                                  *_loto_section(loto)]) + "\n")
    return loto


# --------------------------------------------------------------------------------------------------
# the files


class Summary:
    """`summary.json` + `summary.md` in the sweep dir, rebuilt from the run dirs after every run."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.live: dict[str, dict] = {}  # this invocation's outcome per run
        self.over_budget = {r.name for r in plan.runs} - {r.name for r in plan.active()}

    def status(self, r: RunSpec, done: list[str]) -> str:
        live = self.live.get(r.name, {})
        if len(done) == len(self.plan.phases):
            return "completed"
        if live.get("status") not in (None, "completed"):
            return live["status"]
        if r.name in self.over_budget:
            return "over_budget"
        return "incomplete" if done else "pending"

    def record(self, r: RunSpec) -> dict:
        done = [p for p in self.plan.phases if pipeline.phase_done(r.run_dir, p)]
        live = self.live.get(r.name, {})
        split = r.cfg.eval.ood_split
        return {
            "name": r.name, "status": self.status(r, done), "phases_done": done, "run_dir": r.name,
            "config_hash": r.cfg.hash, "group": r.group, "paired_with": r.paired_with, "seed": r.cfg.seed,
            "lambda_contr": r.cfg.train.lambda_contr, "ood_protocol": r.cfg.eval.ood_protocol,
            "ood_test_type": split["test_type"] if split else None, "overrides": r.overrides,
            "this_invocation": live.get("action"), "error": live.get("error"), "reason": live.get("reason"),
            "metrics": run_metrics(r.run_dir),
        }

    def write(self, status: str) -> dict:
        plan = self.plan
        records = {r.name: self.record(r) for r in plan.runs}
        loto = loto_summary(list(records.values()))
        if loto:
            loto["figure"] = plan.dir.loto_figure.relative_to(plan.dir.path).as_posix()
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
            "loto": loto,
            "notes": {"bootstrap": f"percentile 95% CI of the mean over runs (groups) or pairs (ablation), "
                                   f"{BOOTSTRAP_SAMPLES} resamples, numpy seed {BOOTSTRAP_SEED}",
                      "std": "sample standard deviation (ddof = 1)",
                      "per_run_ci": "metrics.paired_bootstrap: eval's paired bootstrap over examples"},
        }
        atomic_write_json(plan.dir.summary_json, doc)
        if loto:
            atomic_write_bytes(plan.dir.loto_figure, loto_figure(loto))
        atomic_write_text(plan.dir.summary_md, render_markdown(doc))
        return doc


# --------------------------------------------------------------------------------------------------
# summary.md


def _f(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _stat(s: dict | None) -> str:
    if not s:
        return "–"
    txt = _f(s["mean"]) + (f" ± {_f(s['std'])}" if s.get("std") is not None else "")
    if s.get("ci95"):
        txt += f" [{_f(s['ci95'][0])}, {_f(s['ci95'][1])}]"
    return txt + f" (n={s['n']})"


def _ci(e: dict | None, key: str = "diff") -> str:
    """`value [low, high]` of an entry with a CI; "–" when absent, "n/a" when null (no damage)."""
    if not e:
        return "–"
    if e.get(key) is None:
        return "n/a"
    ci = f" [{_f(e.get('ci_low'))}, {_f(e.get('ci_high'))}]" if e.get("ci_low") is not None else ""
    return _f(e[key]) + ci


def _loto_section(loto: dict) -> list[str]:
    L = ["", "## Leave-one-type-out: per held-out type", "",
         f"Robustness AUC on the held-out type; damage = clean ceiling − no defense; recovered fraction = "
         f"{loto['recovered_fraction']}; 95% CIs: {loto['ci']}. The best baseline is chosen on validation "
         "data of the held-in types.", "",
         "| held out | run | AUC clean | AUC none | AUC best baseline | AUC oracle_drop | AUC cachemedic | damage | "
         "recovered: best baseline | recovered: oracle_drop | recovered: cachemedic | cachemedic − none |",
         "|---" * 12 + "|"]
    for r in loto["rows"]:
        a, rf = r["auc"], r["recovered_fraction"]
        best = _f(a.get(R.BEST_HEURISTIC_SERIES)) + (f" ({r['best_baseline']})" if r["best_baseline"] else "")
        L.append(f"| {r['test_type']} | {r['run']} | {_f(a.get('clean'))} | {_f(a.get(R.NO_DEFENSE))} | {best} | "
                 f"{_f(a.get(R.ORACLE_DROP))} | {_f(a.get(R.CACHEMEDIC))} | {_ci(r['damage'])} | "
                 + " | ".join(_ci(rf.get(k), "value") for k in LOTO_SERIES)
                 + f" | {_ci(r.get(R.CACHEMEDIC_MINUS_NO_DEFENSE))} |")
    return L + (["", f"![Recovered fraction per held-out type]({loto['figure']})"] if loto.get("figure") else [])


def _run_row(r: dict) -> str:
    m = r["metrics"]
    auc, clean = m.get("auc") or {}, m.get("clean") or {}
    s1 = (m.get("sensitivity") or {}).get("delta_1") or {}
    best = _f(auc.get(R.BEST_HEURISTIC_SERIES))
    if m.get("best_heuristic_name"):
        best += f" ({m['best_heuristic_name']})"
    return (f"| {r['name']} | {r['status']} | {r['group'] or ''} | {r['paired_with'] or ''} | {r['seed']} | "
            f"{r['lambda_contr']:g} | {r['ood_test_type'] or ''} | {_f(auc.get(R.NO_DEFENSE))} | {best} | "
            f"{_f(auc.get(R.CACHEMEDIC))} | {_f(clean.get(R.CACHEMEDIC))} | "
            f"{_f((m.get('auc_diff') or {}).get(R.CACHEMEDIC_MINUS_NO_DEFENSE))} | "
            f"{_f(s1.get(R.NO_DEFENSE), 3)} / {_f(s1.get(R.CACHEMEDIC), 3)} |")


def render_markdown(doc: dict) -> str:
    L = [f"# Sweep {doc['sweep_name']}", "",
         f"Status **{doc['status']}**, {doc['runs_completed']}/{doc['runs_total']} runs complete "
         f"(updated {doc['updated_utc']}).", ""]
    if doc["description"]:
        L += [doc["description"].strip(), ""]
    L += ["| run | status | group | paired with | seed | λ_contr | OOD held out | AUC none | AUC best baseline | "
          "AUC cachemedic | clean cachemedic | Δ AUC vs none | sens δ=1 none / cachemedic |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    L += [_run_row(r) for r in doc["runs"]]
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
    if doc.get("loto"):
        L += _loto_section(doc["loto"])
    return "\n".join(L) + "\n"
