"""The markdown report: the run's numbers in words, one function per section, with links to the figures and tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cachemedicpp.plots.inputs import BEST, Inputs, SensPoint
from cachemedicpp.plots.outputs import FIG_BIT_POSITION, FIG_COST_FRONTIER, FIGURES, TABLES
from cachemedicpp.plots.tables import choice_text, headline_label
from cachemedicpp.plots.text import MISSING, fmt, fmt_ci, fmt_damage, fmt_diff, fmt_rf, layer_ranges, plain
from cachemedicpp.results import (CACHEMEDIC, CACHEMEDIC_MINUS_BEST_HEURISTIC, CACHEMEDIC_MINUS_NO_DEFENSE,
                                  GROUP_CALIBRATED, NO_DEFENSE, ORACLE_DROP)
from cachemedicpp.rundir import RunDir


def excludes_zero(entry: dict) -> bool | None:
    lo, hi = entry["ci_low"], entry["ci_high"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo > 0 or hi < 0


def ood_text(settings: dict) -> str | None:
    split, proto = settings.get("ood_split"), settings.get("ood_protocol")
    if isinstance(split, dict) and split.get("test_type"):
        return f"{split.get('name') or proto or 'OOD split'} (held out: {split['test_type']})"
    if isinstance(split, str) and split:
        return split
    return proto if isinstance(proto, str) and proto else None


def tasks_text(tasks: Any) -> str:
    """`name (n = ...)` per task from either a list of names/dicts or a {name: info} mapping."""
    if isinstance(tasks, dict):
        items = list(tasks.items())
    elif isinstance(tasks, list):
        items = [(t.get("name"), t) if isinstance(t, dict) else (t, {}) for t in tasks]
    else:
        return plain(tasks)
    out = []
    for name, info in items:
        n = info.get("n", info.get("num_examples")) if isinstance(info, dict) else None
        out.append(f"{name} (n = {n})" if n is not None else str(name))
    return ", ".join(out)


def checkpoint_text(ckpt: Any, run_hash: str) -> str:
    if not isinstance(ckpt, dict):
        return plain(ckpt)
    bits = [f"step {ckpt['step']}" if ckpt.get("step") is not None else None, ckpt.get("status"),
            f"sha256 {ckpt['sha256']}" if ckpt.get("sha256") else None]
    other = ckpt.get("config_hash")
    # either hash may be the other's prefix (checkpoints store a shortened one)
    if other and not str(run_hash).startswith(str(other)) and not str(other).startswith(str(run_hash)):
        bits.append(f"written under config {other}, not this run's")
    extra = ", ".join(b for b in bits if b)
    return f"`{ckpt.get('path')}`" + (f" ({extra})" if extra else "")


def _sens_at(inp: Inputs, delta: float) -> SensPoint | None:
    return next((p for p in inp.sens if abs(p.delta - delta) < 1e-9), None)


def _ratio_words(x: float, ref: float) -> str:
    if not (math.isfinite(x) and math.isfinite(ref)) or ref <= 0:
        return "ratio n/a"
    r = x / ref
    return f"{r:.2f}× the undefended drift, " + ("less sensitive" if r < 1 else "more sensitive" if r > 1 else "equal")


def _link(rd: RunDir, path: Path) -> str:
    """A path as linked from the report (relative to its folder)."""
    return path.relative_to(rd.report.parent).as_posix()


# --------------------------------------------------------------------------------------------------
# sections


def _header(inp: Inputs, rd: RunDir) -> list[str]:
    sources = f"`{rd.rel(rd.task_metrics)}`" + (f" and `{rd.rel(rd.stability_metrics)}`" if inp.has_stability
                                                 else " (stability was not measured for this run)")
    return [f"# Results for run `{inp.run_id}`", "",
            f"Config hash `{inp.config_hash}`. Numbers below are read from {sources}"
            + (f" (operator settings from `{rd.rel(rd.resolved_config_path)}`)." if inp.cfg else "."),
            ""]


def _bootstrap_lines(inp: Inputs) -> list[str]:
    lines = []
    for key, what in ((CACHEMEDIC_MINUS_NO_DEFENSE, "robustness AUC, cachemedic − no defense"),
                      (CACHEMEDIC_MINUS_BEST_HEURISTIC, f"robustness AUC, cachemedic − {inp.best}"),
                      ("clean_cachemedic_minus_no_defense", "clean score, cachemedic − no defense"),
                      ("clean_cachemedic_minus_best_heuristic", f"clean score, cachemedic − {inp.best}")):
        b = inp.boot.get(key)
        if b is None:
            continue
        ex = excludes_zero(b)
        verdict = ("CI not available" if ex is None else "the interval excludes zero" if ex
                   else "the interval includes zero (no significant difference)")
        n = f", n = {b['n']} examples" if b.get("n") is not None else ""
        lines.append(f"- Paired bootstrap, {what}: {fmt_diff(b)}{n}; {verdict}.")
    return lines


def _star(b: dict | None) -> str:
    return MISSING if b is None else fmt_diff(b) + ("*" if excludes_zero(b) else "")


def _by_type_table(inp: Inputs) -> list[str]:
    """Robustness and recovered fractions per corruption type; nothing when there is only one type to split."""
    if len(inp.by_type) <= 1:
        return []
    best = inp.best or "best baseline"
    others = [d for d in (inp.best, ORACLE_DROP, CACHEMEDIC) if d]
    lines = ["", "By corruption type (robustness AUC over that type's cells; damage = clean ceiling − no defense; "
             "recovered fraction = (AUC − AUC none) / damage; 95% CIs, paired bootstrap over examples; * where a "
             "difference's interval excludes zero; — where the metrics file has no such entry):", "",
             f"| type | damage | no defense | {best} | {ORACLE_DROP} | cachemedic | "
             + " | ".join(f"recovered: {d}" for d in others)
             + f" | cachemedic − no defense | cachemedic − {best} |",
             "|---" * (8 + len(others)) + "|"]

    def auc(a: dict, d: str | None) -> str:
        return fmt(a[d]) if d and d in a else MISSING

    for ty, e in inp.by_type.items():
        a, b, rf = e["auc"], e["boot"], e.get("recovered") or {}
        lines.append(f"| {ty} | {fmt_damage(e.get('damage'))} | {auc(a, NO_DEFENSE)} | {auc(a, inp.best)} | "
                     f"{auc(a, ORACLE_DROP)} | {auc(a, CACHEMEDIC)} | "
                     + " | ".join(fmt_rf(rf.get(d)) for d in others)
                     + f" | {_star(b.get(CACHEMEDIC_MINUS_NO_DEFENSE))} | "
                     f"{_star(b.get(CACHEMEDIC_MINUS_BEST_HEURISTIC))} |")
    return lines + [""]


def _by_task_table(inp: Inputs) -> list[str]:
    """Robustness AUC per task (the same grid restricted to one task's examples); nothing for one task."""
    if len(inp.auc_by_task) <= 1:
        return []
    cols = [d for d in (NO_DEFENSE, inp.best, ORACLE_DROP, CACHEMEDIC) if d]
    lines = ["", "By task (robustness AUC over that task's examples):", "",
             "| task | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for t, a in inp.auc_by_task.items():
        lines.append(f"| {t} | " + " | ".join(fmt(a[d]) if d in a else MISSING for d in cols) + " |")
    return lines + [""]


def _headline_table(inp: Inputs) -> list[str]:
    """The main comparison: one column per headline entry (clean ceiling, no defense, best baseline, ...)."""
    heads = inp.headline()
    ppl_task = inp.ppl_task()

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(role, key) for role, key in heads) + " |"

    def auc(role, key):
        a, ci = inp.auc_of(role, key)
        return fmt_ci(a, ci) if math.isfinite(a) else MISSING

    def diff(role, key):
        if role == NO_DEFENSE:
            return _star(inp.boot.get(CACHEMEDIC_MINUS_NO_DEFENSE))
        if role == BEST:
            return _star(inp.boot.get(CACHEMEDIC_MINUS_BEST_HEURISTIC))
        return ""

    L = ["| | " + " | ".join(headline_label(inp, r, k, latex=False) for r, k in heads) + " |",
         "|---" * (len(heads) + 1) + "|",
         row("robustness AUC, 95% CI", auc),
         row("recovered fraction, 95% CI", lambda r, k: fmt_rf(inp.recovered_of(r, k))),
         row("cachemedic − this defense (AUC), paired 95% CI", diff),
         row("clean score", lambda r, k: fmt(inp.clean.get(k, math.nan)))]
    if ppl_task:
        L.append(row(f"clean perplexity ({ppl_task})", lambda r, k: fmt(inp.clean_metrics[ppl_task].get(k, math.nan))))
    return L + [""]


def _best_line(inp: Inputs) -> str:
    if not inp.best:
        return "- No baseline candidate was evaluated, so there is no best baseline."
    test = f"AUC on the test grid {fmt_ci(inp.best_auc(), inp.best_auc_ci())}"
    if not inp.chosen_on_validation():
        return (f"- Best heuristic: **{inp.best}** (highest robustness AUC among the heuristics on the test grid; "
                f"this metrics file records no validation choice), {test}.")
    group = "calibrated baseline" if inp.group(inp.best) == GROUP_CALIBRATED else inp.group(inp.best)
    val = inp.choice["validation_auc"]
    ranked = ", ".join(f"{d} {fmt(v)}" for d, v in sorted(val.items(), key=lambda kv: -kv[1]))
    return (f"- Best baseline (chosen on validation data: **{inp.best}**, {group}): {choice_text(inp)}; "
            f"validation AUC {ranked}; {test}.")


def _throughput(inp: Inputs) -> str:
    if not inp.overhead:
        return ("- Throughput was not measured (`overhead` is null), so figure B plots clean score against "
                "robustness AUC instead.")
    tp = "; ".join(f"{'no defense' if d == NO_DEFENSE else d} {fmt(v['tokens_per_sec'])} tokens/s"
                   for d, v in inp.overhead.items())
    return f"- Throughput: {tp}."


def _task_section(inp: Inputs) -> list[str]:
    L = ["## Task robustness", "", _best_line(inp)]
    if inp.damage is not None:
        n = f", n = {inp.damage['n']} examples" if inp.damage.get("n") is not None else ""
        L.append(f"- Damage (clean − no defense) = {fmt_damage(inp.damage)} (robustness AUC: clean ceiling "
                 f"{fmt(inp.damage['auc_clean'])}, no defense {fmt(inp.damage['auc_no_defense'])}; paired bootstrap "
                 f"95% CI{n}).")
    else:
        L.append(f"- Damage (clean − no defense) = {MISSING} (not in this metrics file).")
    L += ["", *_headline_table(inp)]
    return L + _bootstrap_lines(inp) + _by_task_table(inp) + _by_type_table(inp) + [_throughput(inp), ""]


def _drift_line(p: SensPoint, delta: float) -> str:
    parts = [f"no defense {fmt(p.baseline)}", f"cachemedic {fmt(p.cachemedic)} "
             f"({_ratio_words(p.cachemedic, p.baseline)})"]
    parts += [f"{h} {fmt(v)}" for h, v in p.heuristics.items()]
    if math.isfinite(p.no_contr):
        parts.append(f"λ_contr = 0 pair {fmt(p.no_contr)} "
                     f"(cachemedic / pair = {fmt(p.cachemedic / p.no_contr, 3)})"
                     if p.no_contr > 0 else f"λ_contr = 0 pair {fmt(p.no_contr)}")
    return f"- Logit drift at δ = {delta:g}: " + "; ".join(parts) + "."


def _amplification_lines(amp: dict) -> list[str]:
    lines = []
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (amp["after"] / amp["before"])[(amp["before"] > 0) & np.isfinite(amp["after"])]
    if r.size:
        lines.append(f"- Amplification map over {len(amp['layers'])} layers × {len(amp['heads'])} KV heads: median "
                     f"after/before ratio {fmt(float(np.median(r)), 3)}; the repair damps (ratio < 1) in "
                     f"{int((r < 1).sum())} of {r.size} cells.")
    if amp["flagged"]:
        lines.append(f"- Layers outside the protected set (flagged): {layer_ranges(amp['flagged'])}.")
    return lines


def _stability_section(inp: Inputs, rd: RunDir) -> list[str]:
    L = ["## Stability", ""]
    if not inp.has_stability:
        return L + [f"- Stability was not measured for this run (`{rd.rel(rd.stability_metrics)}` not found), so "
                    "figures C and D are not drawn.", ""]
    for delta in (1.0, 2.0):
        p = _sens_at(inp, delta)
        L.append(_drift_line(p, delta) if p is not None else
                 f"- δ = {delta:g} is not in the stability grid ({', '.join(f'{q.delta:g}' for q in inp.sens)}).")
    if not inp.has_pair:
        L.append("- No paired λ_contr = 0 run was given to stability, so there is no contraction ablation here.")
    p0 = _sens_at(inp, 0.0)
    if p0 is not None:
        L.append(f"- At δ = 0 the repair's own drift on a clean cache is {fmt(p0.cachemedic)} "
                 f"(no defense: {fmt(p0.baseline)}).")
    return L + _amplification_lines(inp.amp) + [""]


def _operator_line(cfg: dict) -> str:
    rep, tr = cfg.get("repair") or {}, cfg.get("train") or {}
    return (f"- Operator: family {rep.get('family')}, rank {rep.get('rank')}, apply_to {rep.get('apply_to')}, "
            f"protected layers {layer_ranges(rep.get('protect_layers') or [])}, λ_id {tr.get('lambda_id')}, "
            f"λ_contr {tr.get('lambda_contr')}, {tr.get('steps')} steps.")


def calibration_text(cal: Any) -> str | None:
    """settings.calibration in words (what the calibrated baselines were fitted on and which candidate each
    uses); None when absent or not a record."""
    if not isinstance(cal, dict):
        return None
    chosen = cal.get("chosen") if isinstance(cal.get("chosen"), dict) else {}
    tried = ((cal.get("selection") or {}).get("tried") or {}) if isinstance(cal.get("selection"), dict) else {}
    picks = []
    for d, c in chosen.items():
        q = c.get("q") if isinstance(c, dict) else None
        cost = next((t.get("cost") for t in tried.get(d) or [] if isinstance(t, dict) and t.get("q") == q), None)
        picks.append(f"{d} q = {q:g}" + (f" (clean cost {100 * cost:+.2f}%)" if isinstance(cost, (int, float)) else "")
                     if isinstance(q, (int, float)) else d)
    where = (f"{cal.get('tokens')} tokens of {cal.get('data_source')} (clean training text), layers "
             f"{layer_ranges(cal.get('layers') or [])}, the first {cal.get('sink_tokens')} positions left alone")
    return f"calibrated on {where}; " + ("; ".join(picks) or "no candidate recorded")


def _settings_section(inp: Inputs) -> list[str]:
    s = inp.settings
    L = ["## Settings and data", ""]
    if s.get("tasks"):
        L.append(f"- Tasks: {tasks_text(s['tasks'])}.")
    for key, label in (("eps", "ε grid"), ("types", "Corruption types"), ("persistence", "Persistence"),
                       ("data_sources", "Data sources")):
        if s.get(key) not in (None, "", [], {}):
            L.append(f"- {label}: {plain(s[key])}.")
    if s.get("checkpoint"):
        L.append(f"- Repair checkpoint: {checkpoint_text(s['checkpoint'], inp.config_hash)}.")
    if ood_text(s):
        L.append(f"- Out-of-distribution protocol: {ood_text(s)}.")
    if calibration_text(s.get("calibration")):
        L.append(f"- Calibrated baselines: {calibration_text(s['calibration'])}.")
    L += [f"- Note: {n}" for n in (s.get("notes") or []) if isinstance(n, str)]
    if inp.exposure:
        L.append("- Exposure (fraction of context K/V entries the corruption masks cover): "
                 + ", ".join(f"{t} {fmt(v, 3)}" for t, v in inp.exposure.items()) + ".")
    if inp.cfg:
        L.append(_operator_line(inp.cfg))
    if inp.paired_dir:
        L.append(f"- Paired λ_contr = 0 run: `{inp.paired_dir}`"
                 + ("" if inp.paired_cfg else " (its config was not found; settings not shown)") + ".")
    L.append(f"- Note: {inp.oracle_note[0].upper() + inp.oracle_note[1:]}.")
    return L + [""]


def _figures_section(inp: Inputs, rd: RunDir) -> list[str]:
    captions = ["Normalised score vs ε", "Clean score vs throughput (Pareto)" if inp.overhead else
                "Clean score vs robustness AUC (throughput not measured)", "Logit sensitivity vs δ",
                "Amplification map before/after repair"]
    L = ["## Figures", ""]
    for name, cap in zip(FIGURES if inp.has_stability else FIGURES[:2], captions):
        L += [f"![{cap}]({_link(rd, rd.figure(name))})", ""]
    if inp.stability_note:
        L += [f"Note: {inp.stability_note}.", ""]
    if inp.bits is not None:
        L += [f"![Bit-position damage: score per bit class at one flip rate]({_link(rd, rd.figure(FIG_BIT_POSITION))})",
              ""]
    else:
        L += [f"Note: {inp.bits_note}.", ""]
    if inp.recompute:
        L += [f"![Recovered fraction against recompute cost]({_link(rd, rd.figure(FIG_COST_FRONTIER))})", ""]
    else:
        L += [f"Note: {inp.recompute_note}.", ""]
    tables = [_link(rd, rd.table(name)) for name in TABLES]
    return L + ["Tables: " + ", ".join(f"[`{t}`]({t})" for t in tables) + ".", ""]


def report_md(inp: Inputs) -> str:
    rd = RunDir(inp.run_dir)
    return "\n".join(_header(inp, rd) + _task_section(inp) + _stability_section(inp, rd) + _settings_section(inp)
                     + _figures_section(inp, rd))
