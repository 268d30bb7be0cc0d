"""Aggregation: the metrics block of the task metrics file as a pure function of the per-example values.

The bootstrap draws one resample of example indices per task from (seed, "eval-bootstrap") and shares it
by every cell and defense, so comparisons are paired and the file is bit-identical for the same values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cachemedicpp import defenses, seeding, stats, tasks
from cachemedicpp.eval.grid import BIT_TYPE, CLEAN, REPAIR_NAME, Cell, EvalContext
from cachemedicpp.results import NO_DEFENSE

CI_ALPHA = 0.05


def unit_matrices(ctx: EvalContext, units: dict, key: str = "exposure") -> tuple[dict[str, np.ndarray],
                                                                               dict[str, float]]:
    """({task: [n, n_cells] raw values}, {task: mean of the units' `key`: exposure, or evicted (0 in units
    written before it was recorded)}) from the finished units, in example order."""
    values: dict[str, list] = {}
    expo: dict[str, list] = {}
    for ex in ctx.examples:
        u = units[ex.key]
        values.setdefault(ex.task, []).append([u["cells"][c.key] for c in ctx.cells])
        expo.setdefault(ex.task, []).append(u.get(key, 0.0))
    return ({t: np.asarray(v, dtype=np.float64) for t, v in values.items()},
            {t: float(np.mean(v)) for t, v in expo.items()})


def _summarise(ctx_tasks: dict, means: dict[str, np.ndarray], cells: list[Cell], names: list[str],
               types: list[str], eps: list[float]) -> dict:
    """Curves, AUCs and clean scores for S sets of per-task cell means ({task: [S, n_cells]})."""
    idx = {c.key: i for i, c in enumerate(cells)}
    nd = idx[Cell(CLEAN, 0.0, NO_DEFENSE).key]
    out = {"value": {}, "score": {}, "by_task": {}, "clean": {}}
    for t, m in means.items():
        kind = ctx_tasks[t]["kind"]
        score = tasks.score_from_means(kind, m, m[:, nd:nd + 1])
        out["value"][t] = tasks.value_from_mean(kind, m)
        out["score"][t] = score
        curves = {}
        for d in names:
            cols = []
            for e in eps:
                if e == 0:
                    cols.append(score[:, idx[Cell(CLEAN, 0.0, d).key]])
                else:
                    cols.append(np.mean([score[:, idx[Cell(ty, e, d).key]] for ty in types], axis=0))
            curves[d] = np.stack(cols, axis=1)  # [S, n_eps]
        out["by_task"][t] = curves
        out["clean"][t] = {d: score[:, idx[Cell(CLEAN, 0.0, d).key]] for d in names}
    out["curve"] = {d: np.mean([out["by_task"][t][d] for t in means], axis=0) for d in names}
    out["auc"] = {d: np.asarray(stats.trapezoid_auc(eps, out["curve"][d])) for d in names}
    out["auc_by_task"] = {t: {d: np.asarray(stats.trapezoid_auc(eps, out["by_task"][t][d])) for d in names}
                          for t in means}
    out["clean_regression"] = {d: np.mean([out["clean"][t][d] for t in means], axis=0) for d in names}
    # the ceiling: the undefended model's clean score at every eps (the damage is its AUC minus no_defense's)
    flat = np.repeat(out["clean_regression"][NO_DEFENSE][:, None], len(eps), axis=1)
    out["auc_clean"] = np.asarray(stats.trapezoid_auc(eps, flat))
    return out


BEST_RULE = ("highest robustness AUC on the validation grid (held-in corruption types, validation examples "
             "disjoint from the test examples) among the evaluated baselines (reference heuristics and calibrated "
             "baselines; never a ceiling or the learned operator); ties: registry order")


def best_heuristic(auc: dict[str, float], names: Sequence[str]) -> str | None:
    """The fixed rule applied to `auc` (validation AUCs): the candidate with the highest one."""
    best = None
    for h in defenses.candidates():
        if h in names and h in auc and (best is None or auc[h] > auc[best]):
            best = h
    return best


def validation_aucs(task_info: dict, values: dict[str, np.ndarray], cells: list[Cell], names: list[str],
                    types: list[str], eps: list[float]) -> dict[str, float]:
    """Robustness AUC of every defense on the validation grid."""
    means = {t: v.mean(axis=0, keepdims=True) for t, v in values.items()}
    point = _summarise(task_info, means, cells, names, types, eps)
    return {d: float(point["auc"][d][0]) for d in names}


def _damage(point: dict, boot: dict, n: int) -> dict:
    """clean − no_defense on the AUC scale (the room any defense has), paired over resamples."""
    d = stats.paired_difference(float(point["auc_clean"][0]), float(point["auc"][NO_DEFENSE][0]),
                                boot["auc_clean"], boot["auc"][NO_DEFENSE], n)
    return {"auc_clean": float(point["auc_clean"][0]), "auc_no_defense": float(point["auc"][NO_DEFENSE][0]),
            **{k: d[k] for k in ("diff", "ci_low", "ci_high", "n")}}


def _recovered(point: dict, boot: dict, names: list[str]) -> dict:
    """(defense − none) / (clean − none) on the AUC scale, with a paired percentile CI."""
    den_p = float(point["auc_clean"][0] - point["auc"][NO_DEFENSE][0])
    den_b = boot["auc_clean"] - boot["auc"][NO_DEFENSE]
    return {d: stats.ratio_ci(float(point["auc"][d][0] - point["auc"][NO_DEFENSE][0]), den_p,
                              boot["auc"][d] - boot["auc"][NO_DEFENSE], den_b, CI_ALPHA)
            for d in names if d != NO_DEFENSE}


def _curve_block(curves: dict, boot: dict, eps: list[float], names: list[str], best: str | None) -> dict:
    def pick(name):
        return None if name is None or name not in curves else stats.to_list(curves[name][0])

    ci = {}
    for name in names + (["best_heuristic"] if best else []):
        src = boot[best if name == "best_heuristic" else name]
        lo, hi = stats.percentile_ci(src, CI_ALPHA, axis=0)
        ci[name] = {"low": stats.to_list(lo), "high": stats.to_list(hi)}
    return {"eps": list(eps), "no_defense": pick(NO_DEFENSE), "best_heuristic": pick(best),
            "cachemedic": pick(REPAIR_NAME), "per_defense": {d: pick(d) for d in names}, "ci": ci}


def _task_rows(point: dict, boot: dict, values: dict[str, np.ndarray], cells: list[Cell]) -> list[dict]:
    """One row per task and cell (figure E's bit-class cells aside): value, normalised score and its CI."""
    rows = []
    for t in values:
        lo, hi = stats.percentile_ci(boot["score"][t], CI_ALPHA, axis=0)
        for i, c in enumerate(cells):
            if c.bits is not None:
                continue
            rows.append({"task": t, "corruption_type": c.ctype, "epsilon": c.eps, "defense": c.defense,
                         "value": float(point["value"][t][0, i]), "score": float(point["score"][t][0, i]),
                         "n": int(values[t].shape[0]), "ci_low": float(lo[i]), "ci_high": float(hi[i])})
    return rows


def bit_class_block(point: dict, boot: dict, cells: list[Cell], names: list[str]) -> dict | None:
    """Figure E: the normalised score of every defense per bit class (mean over tasks, with its CI and per
    task), from the bit-class cells; None when the grid has none."""
    bit_cells = [c for c in cells if c.bits is not None]
    if not bit_cells:
        return None
    idx = {c.key: i for i, c in enumerate(cells)}
    classes = list(dict.fromkeys(c.bits for c in bit_cells))
    eps = float(bit_cells[0].eps)

    def per_class(score: np.ndarray, d: str) -> np.ndarray:  # [S, n_classes]
        return np.stack([score[:, idx[Cell(BIT_TYPE, eps, d, bits=b).key]] for b in classes], axis=1)

    tasks_ = list(point["score"])
    out: dict = {"eps": eps, "classes": classes, "per_defense": {}, "ci": {}, "by_task": {t: {} for t in tasks_},
                 "clean_no_defense": float(point["clean_regression"][NO_DEFENSE][0])}
    for d in names:
        pt = np.mean([per_class(point["score"][t], d) for t in tasks_], axis=0)
        bt = np.mean([per_class(boot["score"][t], d) for t in tasks_], axis=0)
        lo, hi = stats.percentile_ci(bt, CI_ALPHA, axis=0)
        out["per_defense"][d] = stats.to_list(pt[0])
        out["ci"][d] = {"low": stats.to_list(lo), "high": stats.to_list(hi)}
        for t in tasks_:
            out["by_task"][t][d] = stats.to_list(per_class(point["score"][t], d)[0])
    return out


def _paired(metric: str, key: str, point: dict, boot: dict, other: str, n: int) -> dict:
    """cachemedic − `other` on point[key] / boot[key], over the shared resamples."""
    return {"metric": metric, "other": other, **stats.paired_difference(
        float(point[key][REPAIR_NAME][0]), float(point[key][other][0]), boot[key][REPAIR_NAME], boot[key][other], n)}


def aggregate(task_info: dict, values: dict[str, np.ndarray], exposures: dict[str, float], cells: list[Cell],
              names: list[str], types: list[str], eps: list[float], samples: int, seed: int,
              best: str | None = None, choice: dict | None = None) -> dict:
    """metrics["..."] of the task metrics file from raw per-example values ({task: [n, n_cells]}); `best` is
    the baseline chosen on the validation grid (`choice` records how), never picked here on test data."""
    order = list(values)
    means = {t: values[t].mean(axis=0, keepdims=True) for t in order}
    point = _summarise(task_info, means, cells, names, types, eps)
    rng = seeding.numpy_rng(seed, "eval-bootstrap")
    # one resample of example indices per task, shared by every cell and defense: paired comparisons
    idx = {t: stats.bootstrap_indices(values[t].shape[0], samples, rng) for t in order}
    resampled = {t: stats.resampled_means(values[t], idx[t]) for t in order}
    boot = _summarise(task_info, resampled, cells, names, types, eps)

    auc = {d: float(point["auc"][d][0]) for d in names}
    auc_all = dict(auc, **({"best_heuristic": auc[best]} if best else {}))
    auc_ci = {}
    for name in auc_all:
        lo, hi = stats.percentile_ci(boot["auc"][best if name == "best_heuristic" else name], CI_ALPHA)
        auc_ci[name] = [float(lo), float(hi)]
    n_total = int(sum(v.shape[0] for v in values.values()))
    others = [(o, label) for o, label in ((NO_DEFENSE, "no_defense"), (best, "best_heuristic")) if o is not None]
    paired = {}
    if REPAIR_NAME in names:
        for other, label in others:
            paired[f"cachemedic_minus_{label}"] = _paired("robustness_auc", "auc", point, boot, other, n_total)
            paired[f"clean_cachemedic_minus_{label}"] = _paired("clean_score", "clean_regression", point, boot, other,
                                                                n_total)
    # per corruption type: the same AUC over that type's cells alone, and its paired differences (the
    # overall best heuristic), so a multi-type grid shows under which types the repair helps
    auc_by_type, paired_by_type, damage_by_type, recovered_by_type = {}, {}, {}, {}
    for ty in types:
        pt = _summarise(task_info, means, cells, names, [ty], eps)
        bt = _summarise(task_info, resampled, cells, names, [ty], eps)
        auc_by_type[ty] = {d: float(pt["auc"][d][0]) for d in names}
        damage_by_type[ty] = _damage(pt, bt, n_total)
        recovered_by_type[ty] = _recovered(pt, bt, names)
        if REPAIR_NAME in names:
            paired_by_type[ty] = {f"cachemedic_minus_{label}": _paired("robustness_auc", "auc", pt, bt, other, n_total)
                                  for other, label in others}
    clean_idx = {c.defense: i for i, c in enumerate(cells) if c.ctype == CLEAN}
    bits = bit_class_block(point, boot, cells, names)
    return {**({"bit_class_scores": bits} if bits is not None else {}),
        "task_curves": _task_rows(point, boot, values, cells),
        "clean_metrics": {t: {d: float(point["value"][t][0, clean_idx[d]]) for d in names} for t in order},
        "clean_scores": {t: {d: float(point["clean"][t][d][0]) for d in names} for t in order},
        "score_vs_eps": _curve_block(point["curve"], boot["curve"], eps, names, best),
        "score_vs_eps_by_task": {t: _curve_block(point["by_task"][t], boot["by_task"][t], eps, names, best)
                                 for t in order},
        "robustness_auc": auc_all,
        "robustness_auc_ci": auc_ci,
        "robustness_auc_by_task": {t: {d: float(point["auc_by_task"][t][d][0]) for d in names} for t in order},
        "clean_regression": {d: float(point["clean_regression"][d][0]) for d in names},
        "best_heuristic_name": best,
        "heuristic_auc": auc[best] if best else None,
        "best_baseline_choice": choice,
        "defense_groups": {d: defenses.group(d) for d in names},
        "damage": _damage(point, boot, n_total),
        "damage_by_type": damage_by_type,
        "recovered_fraction": _recovered(point, boot, names),
        "recovered_fraction_by_type": recovered_by_type,
        "paired_bootstrap": paired,
        "robustness_auc_by_type": auc_by_type,
        "paired_bootstrap_by_type": paired_by_type,
        "exposure": {t: float(exposures[t]) for t in order},
        "overhead": None,
    }


def recompute_cost(ctx: EvalContext, units: dict, name: str) -> dict | None:
    """The cost table of a recomputing defense `name` (metrics[its cost_key], e.g. recompute_cost for
    checksum_recompute): the recomputations per grid cell (None when not evaluated). For an alarm
    (detect_recompute), the clean cells' count is the false alarms."""
    if name not in ctx.defense_names:
        return None
    rows = []
    for c in ctx.cells:
        if c.defense != name or c.bits is not None:  # figure E's bit-class cells: not in the cost table
            continue
        costs = [(units[ex.key].get("recompute") or {}).get(c.key) for ex in ctx.examples]
        known = [x for x in costs if x is not None]
        if known:
            rows.append({"corruption_type": c.ctype, "epsilon": c.eps, "n": len(known),
                         "recomputed_fraction": float(np.mean([x["tokens"] > 0 for x in known])),
                         "tokens_mean": float(np.mean([x["tokens"] for x in known])),
                         "blocks_failed_mean": float(np.mean([x["blocks"] for x in known])),
                         "corrupted_block_tokens_mean": float(np.mean([x.get("corrupted_block_tokens", 0)
                                                                       for x in known]))})
            secs = [x["seconds"] for x in known if "seconds" in x]
            if secs:
                rows[-1]["seconds_mean"] = float(np.mean(secs))
            rows[-1].update(_block_recall([x for x in known if "corrupted_blocks" in x]))
    return {"defense": name, "block_size": int(ctx.baseline["checksum_block_size"]), "persistence": ctx.persistence,
            "context_tokens_mean": float(np.mean([int(ex.prefix.numel()) for ex in ctx.examples])), "by_cell": rows,
            "how": _recompute_how(ctx.defense(name)) + ctx.defense(name).cost_how,
            **ctx.defense(name).cost_settings()}



def _block_recall(costs: list[dict]) -> dict:
    """corrupted_blocks_mean and block_recall (recalled over corrupted blocks, summed over the examples) of the
    costs that count blocks (none in progress files written before they did); block_recall only when a block
    was corrupted."""
    if not costs:
        return {}
    hit = sum(x["corrupted_blocks"] for x in costs)
    out = {"corrupted_blocks_mean": hit / len(costs)}
    if hit:
        out["block_recall"] = sum(x["recalled_blocks"] for x in costs) / hit
    return out


def _recompute_how(dfn) -> str:
    if getattr(dfn, "recompute_mode", "full") == "full":
        return ("full recomputation (baseline.recompute_mode): the clean prefill stands for its result (recompute.py "
                "reproduces it bit for bit, tested); the tokens counted are those it forwards (the whole context)")
    return ("selective recomputation (baseline.recompute_mode): the failing blocks only, in position order, through "
            "the cache before them; the clean prefill stands for its result where every changed entry before them "
            "is recomputed too (equal within recompute.TOLERANCE, tested), else it runs; the tokens counted are "
            "those it forwards (the failing blocks', or from position 0 where a sliding-window layer no longer "
            "holds a block's window)")


def detector_stats(ctx: EvalContext, units: dict) -> dict | None:
    """metrics.detector: the detecting operator's recall and false-positive rate per grid cell, summed over
    examples and protected layers (None unless a family-D operator was evaluated at rest)."""
    if not any("detector" in units[ex.key] for ex in ctx.examples):
        return None
    rows = []
    for c in ctx.cells:
        if c.defense != REPAIR_NAME or c.bits is not None:  # figure E's bit-class cells: not in this table
            continue
        counts = [units[ex.key].get("detector", {}).get(c.key) for ex in ctx.examples]
        counts = [x for x in counts if x is not None]
        if not counts:
            continue
        tp, pos, fp, neg = (int(sum(x[i] for x in counts)) for i in range(4))
        aucs = [x[4] for x in counts if len(x) > 4 and x[4] is not None]
        auc = float(np.mean(aucs)) if aucs else None
        ci = stats.mean_ci(aucs, seed=0, samples=1000, alpha=CI_ALPHA)
        rows.append({"corruption_type": c.ctype, "epsilon": c.eps, "n": len(counts), "changed_entries": pos,
                     "recall": tp / pos if pos else None, "false_positive_rate": fp / neg if neg else None,
                     "roc_auc": auc, "roc_auc_ci": ci})
    op = ctx.op
    threshold = {str(l): float(op.tau[i]) for i, l in enumerate(op.layers)}
    return {"by_cell": rows, "threshold": threshold, "sink_tokens": int(op.sink),
            "how": "entries of the protected layers' stored context (sinks excluded) that the corruption changed "
                   "(K or V differs from the clean cache) vs those the detector gated (gate > 0), summed over examples; "
                   "roc_auc: the detector's score against the changed entries within each example's cache (a "
                   "threshold-free measure of the alarm), mean over examples"}


def nonfinite_outputs(ctx: EvalContext, units: dict) -> list[dict]:
    """metrics.nonfinite_outputs: the grid cells whose model output had non-finite logits in some example
    (scored as the uniform distribution there), with how many examples; empty when none did."""
    out = []
    for c in ctx.cells:
        n = sum(c.key in (units[ex.key].get("nonfinite") or ()) for ex in ctx.examples)
        if n:
            out.append({"corruption_type": c.ctype, "epsilon": c.eps, "defense": c.defense, "examples": int(n)})
    return out
