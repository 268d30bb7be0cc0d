"""Committed results: a compact JSON per run, and the documentation's result tables rendered from it.

    python -m cachemedicpp.plots.publish RUN_DIR [RUN_DIR ...] --out docs/results [--name NAME]
    python -m cachemedicpp.plots.publish --selection SWEEP_DIR --out docs/results [--name NAME]
    python -m cachemedicpp.plots.publish --docs README.md docs/RESULTS.md --out docs/results [--check]

The first form reads each run dir's metrics, config, versions, machine and phase times and writes
`<out>/<name>.json` (`name`: the run dir's name, or --name with one run dir) with the run's figures A and C
beside it (`<name>_figA_score_vs_eps.png`, ...). The second form rewrites every block of the given Markdown
files that sits between `<!-- published:NAME:TABLE -->` and `<!-- /published -->` with the table rendered
from `<out>/NAME.json` (a table over several records, e.g. `heldout`, names them by a pattern: `NAME_*`); with --check it writes nothing and exits 1 when a block differs from its rendering
(the test suite runs it on the committed files). So every number a document shows is in a committed file,
and the documents cannot drift from them.

--selection publishes a selection sweep (e.g. configs/sweeps/cpu_selection.yaml) as one record: each run's
held-in validation AUCs on the selection split and the variant the written rule picks (`SELECTION_RULE`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from cachemedicpp.cli import guarded
from cachemedicpp.config import ConfigError
from cachemedicpp.fileio import atomic_write_json, atomic_write_text, read_json
from cachemedicpp.plots.outputs import FIGURES
from cachemedicpp.results import (BEST_HEURISTIC_NAME, BEST_HEURISTIC_SERIES, CACHEMEDIC,
                                  CACHEMEDIC_MINUS_BEST_HEURISTIC, CACHEMEDIC_MINUS_NO_DEFENSE, GROUP_CALIBRATED,
                                  GROUP_REFERENCE, NO_DEFENSE)
from cachemedicpp.rundir import RunDir

FORMAT = "cachemedicpp.published/1"
PHASES = ("train", "eval", "stability")
# the task-metrics blocks a published record keeps (what the tables and a reader's checks need)
TASK_KEYS = ("robustness_auc", "robustness_auc_ci", "robustness_auc_by_task", "robustness_auc_by_type",
             "clean_metrics", "clean_regression", "best_heuristic_name", "best_baseline_choice", "defense_groups",
             "damage", "damage_by_type", "recovered_fraction", "recovered_fraction_by_type", "paired_bootstrap",
             "paired_bootstrap_by_type", "exposure", "recompute_cost", "detect_recompute_cost", "detector")
FIGURES_KEPT = ("figA_score_vs_eps.png", "figC_logit_sensitivity.png")
SELECTION_RULE = ("the variant with the highest held-in validation robustness AUC of cachemedic on the selection "
                  "split (best_baseline_choice.validation_auc_cachemedic); ties: the variant listed first")
BLOCK = re.compile(r"(<!-- published:(?P<name>[\w.*-]+):(?P<table>[\w-]+) -->\n)(?P<body>.*?)(<!-- /published -->)",
                   re.S)


# --------------------------------------------------------------------------------------------------
# collecting a run


def _settings(cfg: dict) -> dict:
    ev, rep, tr = cfg.get("eval", {}), cfg.get("repair", {}), cfg.get("train", {})
    split = ev.get("ood_split") or {}
    return {"model": cfg.get("model", {}).get("name"), "seed": cfg.get("seed"), "dtype": cfg.get("dtype"),
            "repair": {k: rep.get(k) for k in ("family", "rank", "apply_to", "protect_layers", "detector")},
            "train": {k: tr.get(k) for k in ("steps", "batch_size", "lr", "prefix_len", "cont_len", "lambda_contr")},
            "ood_protocol": ev.get("ood_protocol"), "test_type": split.get("test_type"),
            "train_types": split.get("train_types"), "eps": ev.get("corruption_eval", {}).get("eps"),
            "tasks": {t["name"]: t.get("num_examples") for t in ev.get("tasks", [])},
            "validation": ev.get("validation"), "defenses": ev.get("defenses"),
            "bootstrap_samples": ev.get("bootstrap_samples"),
            "persistence": cfg.get("corruption", {}).get("persistence"),
            "axes": cfg.get("corruption", {}).get("axes")}


def _minutes(rd: RunDir) -> dict:
    """Wall minutes of each completed phase (its heartbeat's elapsed time, resumes included)."""
    out = {}
    for phase in PHASES:
        path = rd.heartbeat(phase)
        if path.is_file():
            hb = read_json(path, f"{phase} heartbeat")
            if isinstance(hb, dict) and hb.get("status") == "completed":
                out[phase] = round(float(hb.get("elapsed_wall_sec") or 0.0) / 60.0, 2)
    return out


def collect(run_dir: str | Path, name: str | None = None) -> dict:
    """The published record of one run dir (task metrics needed; stability metrics when measured)."""
    rd = RunDir(run_dir)
    if not rd.task_metrics.is_file():
        raise ConfigError(f"{rd.task_metrics}: not found (publish needs an evaluated run dir)")
    task = read_json(rd.task_metrics, "task metrics")
    cfg = rd.stored_config() or {}
    record = read_json(rd.record, "run record") if rd.record.is_file() else {}
    env = read_json(rd.env, "env") if rd.env.is_file() else {}
    out = {"format": FORMAT, "name": name or rd.path.name, "run_id": task.get("run_id"),
           "config_hash": task.get("config_hash"), "settings": _settings(cfg),
           "versions": record.get("env", {}), "git": record.get("git", {}), "machine": env,
           "minutes": _minutes(rd),
           "task_metrics": {k: task["metrics"][k] for k in TASK_KEYS if task["metrics"].get(k) is not None}}
    if rd.stability_metrics.is_file():
        stab = read_json(rd.stability_metrics, "stability metrics")
        sens = stab["metrics"]["stability.logit_sensitivity"]
        out["stability"] = {"points": sens["points"], "heuristic": sens.get("heuristic"),
                            "repair_clean_drift": sens.get("repair_clean_drift")}
    return out


def publish(run_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Write the record and the run's figures A and C (when drawn) under `out_dir`; the record's path."""
    if name is not None and "*" in name:
        raise ConfigError(f"--name {name!r}: a record's name has no '*' (it marks a pattern over names in a document)")
    rec = collect(run_dir, name)
    out_dir = Path(out_dir)
    path = out_dir / f"{rec['name']}.json"
    atomic_write_json(path, rec)
    rd = RunDir(run_dir)
    for fig in FIGURES_KEPT:
        if fig in FIGURES and rd.figure(fig).is_file():
            shutil.copyfile(rd.figure(fig), out_dir / f"{rec['name']}_{fig}")
    return path


def collect_selection(sweep_dir: str | Path, name: str | None = None) -> dict:
    """The published record of a selection sweep: every run's validation AUCs on the selection split, and
    the variant `SELECTION_RULE` picks. A run not evaluated, or evaluated on another split, is refused."""
    sweep_dir = Path(sweep_dir)
    summary_path = sweep_dir / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{summary_path}: not found (--selection needs a sweep dir)")
    summary = read_json(summary_path, "sweep summary")
    runs, machine, versions = [], {}, {}
    for r in summary.get("runs", []):
        rd = RunDir(sweep_dir / r["run_dir"])
        if not rd.task_metrics.is_file():
            raise ConfigError(f"{rd.task_metrics}: not found (run {r['name']} of the sweep is not evaluated)")
        task = read_json(rd.task_metrics, "task metrics")
        val = (task.get("settings") or {}).get("validation") or {}
        if val.get("split") != "selection":
            raise ConfigError(f"{rd.task_metrics}: its validation grid read the {val.get('split')!r} split, not "
                              "the selection split (eval.validation.split: selection)")
        c = task["metrics"]["best_baseline_choice"]
        if c.get("validation_auc_cachemedic") is None:
            raise ConfigError(f"{rd.task_metrics}: no validation AUC of cachemedic (is it in eval.defenses?)")
        cfg = rd.stored_config() or {}
        runs.append({"name": r["name"], "overrides": r.get("overrides") or {}, "config_hash": task.get("config_hash"),
                     "repair": _settings(cfg)["repair"], "lambda_contr": cfg.get("train", {}).get("lambda_contr"),
                     "validation_auc_cachemedic": c["validation_auc_cachemedic"],
                     "validation_auc_no_defense": c["validation_auc_no_defense"],
                     "validation_auc": c.get("validation_auc") or {}, "types": val.get("types"),
                     "num_examples": val.get("num_examples"), "minutes": _minutes(rd)})
        if not machine and rd.env.is_file():
            machine = read_json(rd.env, "env")
            record = read_json(rd.record, "run record") if rd.record.is_file() else {}
            versions = record.get("env", {})
    if not runs:
        raise ConfigError(f"{summary_path}: the sweep has no runs")
    best = max(runs, key=lambda x: x["validation_auc_cachemedic"])  # max keeps the first of equals
    return {"format": FORMAT, "kind": "selection", "name": name or summary.get("sweep_name") or sweep_dir.name,
            "sweep": summary.get("sweep_name"), "split": "selection", "rule": SELECTION_RULE, "runs": runs,
            "chosen": best["name"], "machine": machine, "versions": versions}


def publish_selection(sweep_dir: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    rec = collect_selection(sweep_dir, name)
    path = Path(out_dir) / f"{rec['name']}.json"
    atomic_write_json(path, rec)
    return path


# --------------------------------------------------------------------------------------------------
# rendering


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}".replace("-", "−")


def _ci(value, lo, hi, digits: int = 4) -> str:
    return f"{_f(value, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]"


def _columns(rec: dict) -> list[str]:
    """no_defense, the chosen best baseline, the ceilings and recomputing defenses, then cachemedic."""
    m = rec["task_metrics"]
    names = list(m["robustness_auc"])
    best = m.get(BEST_HEURISTIC_NAME)
    others = [d for d in names if d not in (NO_DEFENSE, best, CACHEMEDIC, BEST_HEURISTIC_SERIES)
              and m["defense_groups"].get(d) not in (GROUP_REFERENCE, GROUP_CALIBRATED)]
    return [NO_DEFENSE] + ([best] if best else []) + others + ([CACHEMEDIC] if CACHEMEDIC in names else [])


def _label(rec: dict, d: str) -> str:
    m = rec["task_metrics"]
    if d == m.get(BEST_HEURISTIC_NAME):
        return f"best baseline: {d} (chosen on validation data)"
    if d == CACHEMEDIC:
        return f"cachemedic (family {rec['settings']['repair']['family']})"
    return d.replace("_", " ") if d == NO_DEFENSE else d


def main_table(rec: dict) -> str:
    """Robustness AUC, recovered fraction, paired differences, clean scores and drift, one column per defense."""
    m = rec["task_metrics"]
    cols = _columns(rec)
    rf = m["recovered_fraction"]
    pb = m.get("paired_bootstrap") or {}
    paired = {NO_DEFENSE: pb.get(CACHEMEDIC_MINUS_NO_DEFENSE), m.get(BEST_HEURISTIC_NAME): pb.get(CACHEMEDIC_MINUS_BEST_HEURISTIC)}
    tasks = list(m["clean_metrics"])
    test_type = rec["settings"].get("test_type")
    head = f"held-out `{test_type}`" if test_type else "all evaluated types"
    rows = [[head, "clean (ceiling)"] + [_label(rec, d) for d in cols]]
    dmg = m["damage"]
    rows.append(["robustness AUC, 95% CI", _f(dmg["auc_clean"])]
                + [_ci(m["robustness_auc"][d], *m["robustness_auc_ci"][d]) for d in cols])
    rows.append(["recovered fraction of the damage, 95% CI", "1"]
                + ["0" if d == NO_DEFENSE else _ci(rf[d]["value"], rf[d]["ci_low"], rf[d]["ci_high"], 3) for d in cols])
    rows.append(["cachemedic − this defense (AUC), paired 95% CI", ""]
                + [_ci(paired[d]["diff"], paired[d]["ci_low"], paired[d]["ci_high"]) if paired.get(d) else ""
                   for d in cols])
    rows.append(["clean score (mean normalised)", _f(m["clean_regression"][NO_DEFENSE])]
                + [_f(m["clean_regression"][d]) for d in cols])
    rows.append([f"clean {' / '.join(tasks)}", " / ".join(_f(m["clean_metrics"][t][NO_DEFENSE], 3) for t in tasks)]
                + [" / ".join(_f(m["clean_metrics"][t][d], 3) for t in tasks) for d in cols])
    stab = rec.get("stability")
    if stab:
        pts = {p["delta_norm"]: p for p in stab["points"]}
        shown = [dl for dl in (1.0, 2.0) if dl in pts]

        def drift(d: str) -> str:
            vals = [pts[dl]["baseline"] if d == NO_DEFENSE else pts[dl]["cachemedic"] if d == CACHEMEDIC
                    else pts[dl]["heuristics"].get(d) for dl in shown]
            return "" if any(v is None for v in vals) else " / ".join(_f(v, 2) for v in vals)

        rows.append([f"logit drift at δ = {' / '.join(f'{x:g}' for x in shown)} (vs the undefended clean logits)", ""]
                    + [drift(d) for d in cols])
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines.append(f"Damage (clean − no defense, AUC): {_ci(dmg['diff'], dmg['ci_low'], dmg['ci_high'], 3)} over "
                 f"{dmg['n']} test examples.")
    return "\n".join(lines) + "\n"


def choice_table(rec: dict) -> str:
    """The validation grid's AUCs behind the best-baseline pick (never the test grid)."""
    c = rec["task_metrics"].get("best_baseline_choice") or {}
    val = dict(c.get("validation_auc") or {})
    rows = [("no_defense", c.get("validation_auc_no_defense"))] + sorted(val.items(), key=lambda kv: -kv[1])
    if c.get("validation_auc_cachemedic") is not None:
        rows.append((CACHEMEDIC, c["validation_auc_cachemedic"]))
    lines = ["| defense (validation grid) | robustness AUC |", "|---|---|"]
    lines += [f"| {d}{' (chosen)' if d == c.get('chosen') else ''} | {_f(a)} |" for d, a in rows]
    return "\n".join(lines) + "\n"


def run_table(rec: dict) -> str:
    """Where and how long: the machine, the versions and each phase's wall minutes."""
    mach, ver = rec.get("machine") or {}, rec.get("versions") or {}
    cpu = mach.get("cpu_model") or mach.get("cpu") or "unknown CPU"
    mins = rec.get("minutes") or {}
    total = sum(mins.values())
    lines = ["| what | value |", "|---|---|",
             f"| machine | {cpu} ({mach.get('torch_cpu_capability') or 'ISA not recorded'} kernels), "
             f"{mach.get('cpu_count', '?')} cores, torch threads {mach.get('torch_threads', '?')} |",
             f"| versions | python {ver.get('python', '?')}, torch {ver.get('torch', '?')}, transformers "
             f"{ver.get('transformers', '?')} |",
             "| phase minutes | " + ", ".join(f"{p} {mins[p]:.1f}" for p in PHASES if p in mins)
             + f" (total {total:.1f}) |",
             f"| config hash | `{rec['config_hash']}` |"]
    return "\n".join(lines) + "\n"


def selection_table(rec: dict) -> str:
    """A selection sweep: each variant's held-in validation AUCs on the selection split; the rule's pick."""
    if rec.get("kind") != "selection":
        raise ConfigError(f"published record {rec.get('name')!r} is not a selection sweep")
    lines = ["| variant | settings changed | cachemedic | no defense | best calibrated baseline |", "|---|---|---|---|---|"]
    for r in rec["runs"]:
        over = ", ".join(f"`{k}: {v}`" for k, v in r["overrides"].items()) or "(the base config)"
        base = max(r["validation_auc"].items(), key=lambda kv: kv[1], default=(None, None))
        mark = " (chosen)" if r["name"] == rec["chosen"] else ""
        lines.append(f"| {r['name']}{mark} | {over} | {_f(r['validation_auc_cachemedic'])} | "
                     f"{_f(r['validation_auc_no_defense'])} | {_f(base[1])} ({base[0]}) |")
    return "\n".join(lines) + "\n"


def _cost_header(kind: str) -> list[str]:
    """The header of a recompute-cost table whose second column names the corruption type as `kind`."""
    return [f"| defense | {kind} | ε | recovered fraction of the type's damage, 95% CI | caches recomputed | "
            "tokens recomputed | oracle's minimum | tokens / oracle | block recall |", "|" + "---|" * 9]


def _cost_row(defense: str, ctype: str, eps: str, rf: dict | None, c: dict) -> str:
    """One cost cell's row: the type's recovered fraction `rf` (— without one), the caches and tokens recomputed,
    the oracle's minimum, their ratio and the block recall (— where not measured)."""
    tok, oracle = c["tokens_mean"], c["corrupted_block_tokens_mean"]
    cells = [defense, ctype, eps, _ci(rf["value"], rf["ci_low"], rf["ci_high"], 3) if rf else "—",
             _f(c["recomputed_fraction"], 3), _f(tok, 1), _f(oracle, 1), _f(tok / oracle, 2) if oracle else "—",
             _f(c["block_recall"], 3) if "block_recall" in c else "—"]
    return "| " + " | ".join(cells) + " |"


def recompute_table(rec: dict) -> str:
    """The recomputing defenses' cost per (corruption type, ε) cell beside the type's recovered fraction: caches
    and tokens recomputed, the oracle's minimum and the block recall (— where not measured)."""
    m = rec.get("task_metrics") or {}
    costs = [m[k] for k in ("recompute_cost", "detect_recompute_cost") if m.get(k)]
    if not costs:
        raise ConfigError(f"published record {rec.get('name')!r} has no recompute cost (recompute_cost, "
                          "detect_recompute_cost)")
    by_type = m.get("recovered_fraction_by_type") or {}
    lines = _cost_header("type")
    for cost in costs:
        d = cost["defense"]
        for c in cost["by_cell"]:
            if c["epsilon"] == 0 and c["corruption_type"] != "clean":
                continue  # a type's ε = 0 cell is the clean cache again
            lines.append(_cost_row(d, c["corruption_type"], f"{c['epsilon']:g}",
                                   by_type.get(c["corruption_type"], {}).get(d), c))
    cost = costs[0]
    lines += ["", f"Means per example; blocks of {cost['block_size']} positions; a full recomputation forwards "
                  f"{_f(cost['context_tokens_mean'], 1)} tokens (the mean context). On the clean rows, caches "
                  "recomputed is the false-alarm rate."]
    return "\n".join(lines) + "\n"


def heldout_table(recs: list[dict]) -> str:
    """Leave-one-type-out runs of a recomputing defense: for each run, the clean cache and its held-out type's
    cells only (what the detector never saw in training): false alarms, block recall, tokens against the
    oracle's minimum, recovered fraction."""
    lines = _cost_header("held out")
    for rec in recs:
        m, held = rec.get("task_metrics") or {}, (rec.get("settings") or {}).get("test_type")
        costs = [m[k] for k in ("recompute_cost", "detect_recompute_cost") if m.get(k)]
        if not held or not costs:
            raise ConfigError(f"published record {rec.get('name')!r} is not a leave-one-type-out run of a recomputing "
                              "defense (settings.test_type, a recompute cost)")
        for cost in costs:
            d = cost["defense"]
            rf = (m.get("recovered_fraction_by_type") or {}).get(held, {}).get(d)
            for c in cost["by_cell"]:
                if c["corruption_type"] == "clean":
                    lines.append(_cost_row(d, held, "clean", None, c))
                elif c["corruption_type"] == held and c["epsilon"] > 0:
                    lines.append(_cost_row(d, held, f"{c['epsilon']:g}", rf, c))
    cost = costs[0]
    lines += ["", f"Means per example; blocks of {cost['block_size']} positions; records "
                  + ", ".join(f"`{r['name']}`" for r in recs) + ". On the clean rows, caches recomputed is the "
                  "false-alarm rate."]
    return "\n".join(lines) + "\n"


def by_type_table(rec: dict) -> str:
    """Every evaluated corruption type's damage and each defense's recovered fraction of it (paired CIs over the
    test examples, AUC scale, all tasks), then what each defense costs on the clean cache."""
    m = rec["task_metrics"]
    cols = [d for d in m["robustness_auc"] if d not in (NO_DEFENSE, BEST_HEURISTIC_SERIES)]
    lines = ["| type | damage (clean − no defense, AUC), 95% CI | " + " | ".join(cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for ctype, dmg in m["damage_by_type"].items():
        rf = m["recovered_fraction_by_type"].get(ctype, {})
        measurable = dmg["ci_low"] is not None and dmg["ci_low"] > 0
        cells = [_ci(rf[d]["value"], rf[d]["ci_low"], rf[d]["ci_high"], 3) if rf.get(d) and measurable else "—"
                 for d in cols]
        lines.append(f"| {ctype} | {_ci(dmg['diff'], dmg['ci_low'], dmg['ci_high'], 3)} | " + " | ".join(cells) + " |")
    clean = m["clean_metrics"]
    for task, per in clean.items():
        base = per[NO_DEFENSE]
        rel = (lambda d: f"{_f(per[d], 3)} ({(per[d] / base - 1) * 100:+.2f} %)".replace("-", "−")) \
            if task == "wikitext2_ppl" and base else (lambda d: _f(per[d], 3))
        lines.append(f"| clean {task} | {_f(base, 3)} (no defense) | " + " | ".join(rel(d) for d in cols) + " |")
    lines.append(f"| clean score (mean normalised) | {_f(m['clean_regression'][NO_DEFENSE])} (no defense) | "
                 + " | ".join(_f(m["clean_regression"][d]) for d in cols) + " |")
    n = next(iter(m["damage_by_type"].values()))["n"] if m["damage_by_type"] else 0
    lines += ["", f"Recovered fraction: (AUC of the defense − AUC of no defense) / damage, per type over its ε grid, "
                  f"with a paired bootstrap over {n} test examples; — where the type does no measurable damage (its damage CI "
                  "reaches 0: a fraction of nothing)."]
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[dict], str]] = {"main": main_table, "choice": choice_table, "run": run_table,
                                            "selection": selection_table, "recompute": recompute_table,
                                            "by_type": by_type_table}
# tables over every record whose name matches the block's pattern (`*` for any characters), in name order
MULTI_TABLES: dict[str, Callable[[list[dict]], str]] = {"heldout": heldout_table}


def render_doc(text: str, records: Callable[[str], dict | list[dict]], where: str = "") -> str:
    """`text` with every published block re-rendered from its record."""

    def sub(mt: re.Match) -> str:
        if mt["table"] in MULTI_TABLES:
            return mt.group(1) + MULTI_TABLES[mt["table"]](records(mt["name"])) + mt.group(5)
        table = TABLES.get(mt["table"])
        if table is None:
            raise ConfigError(f"{where}: unknown published table {mt['table']!r}; known: "
                              f"{list(TABLES) + list(MULTI_TABLES)}")
        if "*" in mt["name"]:
            raise ConfigError(f"{where}: a name pattern ({mt['name']!r}) goes with a table over several records "
                              f"({list(MULTI_TABLES)})")
        return mt.group(1) + table(records(mt["name"])) + mt.group(5)

    return BLOCK.sub(sub, text)


def _records(out_dir: Path) -> Callable[[str], dict | list[dict]]:
    """A record by name; for a pattern with `*`, every record whose name matches, in name order."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict | list[dict]:
        if "*" in name:
            names = sorted(p.stem for p in out_dir.glob(f"{name}.json") if "*" not in p.stem)
            if not names:
                raise ConfigError(f"{out_dir}: no published record matches {name!r}")
            return [get(n) for n in names]
        if name not in cache:
            path = out_dir / f"{name}.json"
            if not path.is_file():
                raise ConfigError(f"{path}: no published record named {name!r}")
            cache[name] = read_json(path, "published record")
        return cache[name]

    return get


def render_docs(docs: Sequence[str | Path], out_dir: str | Path, check: bool = False) -> list[Path]:
    """Re-render the published blocks of `docs`; the files whose blocks differed (written unless `check`)."""
    get, stale = _records(Path(out_dir)), []
    for doc in map(Path, docs):
        if not doc.is_file():
            raise ConfigError(f"{doc}: not found")
        text = doc.read_text(encoding="utf-8")
        new = render_doc(text, get, str(doc))
        if new != text:
            stale.append(doc)
            if not check:
                atomic_write_text(doc, new)
    return stale


# --------------------------------------------------------------------------------------------------
# the command


def run(runs: Sequence[str], out: str, name: str | None, docs: Sequence[str], check: bool,
        selection: str | None = None) -> int:
    if name and len(runs) + bool(selection) != 1:
        raise ConfigError("--name goes with exactly one run dir or one --selection sweep")
    for r in runs:
        print(f"published {publish(r, out, name)}")
    if selection:
        path = publish_selection(selection, out, name)
        print(f"published {path} (chosen: {read_json(path, 'published record')['chosen']})")
    stale = render_docs(docs, out, check)
    for doc in stale:
        print(f"{doc}: {'differs from' if check else 're-rendered from'} the records in {out}")
    return 1 if check and stale else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.plots.publish",
                                description="Compact JSON records of run dirs, and the documents' result tables "
                                            "rendered from them.")
    p.add_argument("runs", nargs="*", help="run dirs to publish")
    p.add_argument("--out", required=True, help="folder of the records (e.g. docs/results)")
    p.add_argument("--name", help="the record's name (one run dir only; default: the run dir's name)")
    p.add_argument("--selection", metavar="SWEEP_DIR", help="publish a selection sweep's choice as one record")
    p.add_argument("--docs", nargs="*", default=[], help="Markdown files whose published blocks are re-rendered")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block differs")
    args = p.parse_args(argv)
    return guarded(lambda: run(args.runs, args.out, args.name, args.docs, args.check, args.selection))


if __name__ == "__main__":
    sys.exit(main())
