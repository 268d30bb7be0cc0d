"""python -m cachemedicpp.eval: task robustness under the corruption grid, paired and resumable (SPEC §7).

Per example (one unit of work, key "<task>/<index>"):
  1. prefill the clean context once (no hook);
  2. for every grid cell — defenses × (clean + types × eps) — copy that cache (one batch row per cell),
     corrupt its old region at rest with the draws of (seed, "eval", example id, type, eps, layer), so
     every defense sees the very same corrupted cache (paired), apply the heuristic defense on the
     region the corruption's masks select (an oracle advantage, recorded), and write it back;
  3. score the example's continuation rows with one forward over the batched cache; cachemedic rows run
     with the repair operator active inside attention (their own batches).
Clean cells use eps 0 with the region of the first evaluated type, so heuristics act on clean inputs
too (their clean cost is measured, never a silent no-op). A cell whose input is provably identical to
its defense's clean cell (eps 0 on the same region, or a region covering nothing at rest) reuses the
clean cell's value instead of recomputing it.

Progress (`metrics/eval_progress.json`) holds each finished unit's raw per-cell values; a resumed run
skips exactly those units and recomputes nothing, and `metrics/task_metrics.json` is a pure function of
them (deterministic bootstrap): an interrupted run produces a bit-identical file. Wall times live only
in the optional `overhead` block.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cachemedicpp import cli, corruption, defenses, hf, memory, repair, seeding, stats, tasks
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.cli import EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import atomic_write_json, read_json, truncate_jsonl
from cachemedicpp.phase import JsonlLog, PhaseSession
from cachemedicpp.rundir import RunDir

log = logging.getLogger("cachemedicpp")

PHASE = "eval"
REPAIR_NAME = "cachemedic"
HEURISTICS = ("reset_clear", "smoothing", "masking_dropout", "clipping_renorm")
CLEAN = "clean"
PROGRESS_FILE = "eval_progress.json"
METRICS_FILE = "task_metrics.json"
CI_ALPHA = 0.05


# --------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Cell:
    ctype: str  # "clean" or a corruption type
    eps: float
    defense: str

    @property
    def key(self) -> str:
        return f"{self.ctype}|{float(self.eps)!r}|{self.defense}"

    @property
    def repaired(self) -> bool:
        return self.defense == REPAIR_NAME


def make_grid(defense_names: Sequence[str], types: Sequence[str], eps: Sequence[float]) -> list[Cell]:
    cells = [Cell(CLEAN, 0.0, d) for d in defense_names]
    cells += [Cell(t, float(e), d) for t in types for e in eps for d in defense_names]
    return cells


def eval_defenses(cfg: Config) -> tuple[list[str], list[str]]:
    """(defenses evaluated, notes). no_defense is always evaluated: it normalises perplexity."""
    names, notes = [], []
    for d in cfg.eval.defenses:
        if d != REPAIR_NAME:
            defenses.get_defense(d)  # unknown name -> ConfigError listing the known ones
        if d not in names:
            names.append(d)
    if "no_defense" not in names:
        names.insert(0, "no_defense")
        notes.append("no_defense added: it is the baseline and normalises perplexity")
    return names, notes


@dataclass
class Row:
    """One grid cell of one example, ready to be batched."""

    cell: Cell
    overrides: dict | None  # layer -> (k, v) batch-1 tensors written at rest (None: clean cache)
    on_read: Callable | None  # (layer, k, v) -> (k, v) for on-read persistence
    region: corruption.Region
    alias: Cell | None = None  # provably identical to this cell: reuse its value


@dataclass
class EvalContext:
    cfg: Config
    lm: hf.LoadedModel
    corruptor: corruption.Corruptor
    op: repair.RepairOperator | None
    defense_names: list[str]
    types: list[str]
    eps: list[float]
    cells: list[Cell]
    examples: list[tasks.Example]
    task_info: dict
    sources: dict
    baseline: dict
    persistence: str
    ref_type: str
    batch_rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        """Every layer a corruption may touch (protected layers and targeted ones)."""
        ls = set(self.cfg.repair.protect_layers)
        if "targeted" in self.types:
            ls |= set(self.cfg.corruption.axes.layers)
        return sorted(ls)


# --------------------------------------------------------------------------------------------------
# building the context


def _needs_donor(cfg: Config, types: Sequence[str]) -> bool:
    return "contiguous_overwrite" in types or (
        "targeted" in types and cfg.corruption.params.targeted_base == "contiguous_overwrite")


def build_context(cfg: Config, lm: hf.LoadedModel, op: repair.RepairOperator | None = None) -> EvalContext:
    """Examples, corruptor (with donor KV when needed) and grid for one evaluation."""
    ev = cfg.eval
    names, notes = eval_defenses(cfg)
    types = list(ev.corruption_eval.types)
    eps = sorted({float(e) for e in ev.corruption_eval.eps})
    n_layers = lm.arch.num_layers
    bad = [l for l in list(cfg.repair.protect_layers) + list(cfg.corruption.axes.layers) if l >= n_layers]
    if bad:
        raise ConfigError(f"repair.protect_layers / corruption.axes.layers: {sorted(set(bad))} out of range for "
                          f"a {n_layers}-layer model")
    task_names = [t["name"] for t in ev.tasks]
    dup = sorted({n for n in task_names if task_names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.tasks: task(s) {dup} listed twice")
    for n in task_names:
        tasks.get_task(n)
    sources = tasks.load_sources(cfg, lm, task_names)
    examples, info = [], {}
    for tcfg in ev.tasks:
        task = tasks.get_task(tcfg["name"])
        exs, tinfo = task.build(lm, cfg, tcfg, sources)
        if not exs:
            raise ConfigError(f"eval.tasks {task.name}: no example could be built")
        if len(exs) < int(tcfg["num_examples"]):
            notes.append(f"{task.name}: {len(exs)} examples available, {tcfg['num_examples']} requested")
        info[task.name] = {"num_examples": int(tcfg["num_examples"]), "n": len(exs), "few_shot": int(tcfg["few_shot"]),
                           "kind": task.kind, "value_name": task.value_name, **tinfo}
        examples += exs
    donor = None
    if _needs_donor(cfg, types):
        longest = max(int(e.prefix.numel()) for e in examples)
        layers = sorted(set(cfg.repair.protect_layers) | set(cfg.corruption.axes.layers))
        donor = corruption.donor_kv(lm, cfg.corruption.params.donor_prompt, longest, layers)
    corruptor = corruption.Corruptor(cfg.corruption.to_dict(), list(cfg.repair.protect_layers),
                                     lm.arch.num_kv_heads, cfg.seed, donor_kv=donor)
    axes = cfg.corruption.axes
    needles = [e for e in examples if e.task == "needle_long_context"]
    if needles:
        where = (f"corruption.axes.time_mode={axes.time_mode}, N_recent={axes.N_recent}, window={list(axes.window)}")
        tasks.check_needle(needles, corruptor.time_mask, where)
    if REPAIR_NAME in names and op is None:
        raise ValueError("cachemedic is evaluated but no repair operator was given")
    ref = next((t for t in types if t != "targeted"), types[0])
    return EvalContext(cfg, lm, corruptor, op.to(lm.device) if op is not None else None, names, types, eps,
                       make_grid(names, types, eps), examples, info, sources, cfg.baseline.to_dict(),
                       cfg.corruption.persistence, ref, int(ev.cell_batch_size), notes)


# --------------------------------------------------------------------------------------------------
# one example


def defense_rng(ctx: EvalContext, ex: tasks.Example, name: str, layer: int) -> torch.Generator:
    """A defense's own randomness (masking_dropout): per example, defense and layer, the same in every
    cell of the example, so defense noise is paired across eps like the corruption."""
    return seeding.torch_rng(ctx.cfg.seed, "eval-defense", ex.example_id, name, layer)


def _defend(ctx: EvalContext, ex: tasks.Example, name: str, kv: dict, region: corruption.Region) -> dict:
    if name in ("no_defense", REPAIR_NAME):
        return dict(kv)
    return {l: defenses.apply_defense(name, k, v, region.mask(l), ctx.baseline, gen=defense_rng(ctx, ex, name, l))
            for l, (k, v) in kv.items()}


def _covers_nothing(region: corruption.Region) -> bool:
    return not region.layers or not bool(region.time.any())


def _same_region(a: corruption.Region, b: corruption.Region) -> bool:
    return (a.layers == b.layers and torch.equal(a.time, b.time)
            and all(torch.equal(a.heads[l], b.heads[l]) for l in a.layers))


def _region(ctx: EvalContext, ctype: str, eps: float, T: int, ex: tasks.Example) -> corruption.Region:
    if ctype == CLEAN:
        return ctx.corruptor.region(ctx.ref_type, 0.0, T, PHASE, ex.example_id)
    return ctx.corruptor.region(ctype, eps, T, PHASE, ex.example_id)


def _read_fn(ctx: EvalContext, ex: tasks.Example, cell: Cell) -> Callable:
    """On-read persistence: corrupt what attention reads, then defend it, with the region of the length read."""
    corrupt = None if cell.ctype == CLEAN else ctx.corruptor.on_read(cell.ctype, cell.eps, PHASE, ex.example_id)
    regions: dict[int, corruption.Region] = {}

    def fn(layer: int, k: torch.Tensor, v: torch.Tensor):
        T = int(k.shape[2])
        if T not in regions:
            regions.clear()
            regions[T] = _region(ctx, cell.ctype, cell.eps, T, ex)
        if corrupt is not None:
            k, v = corrupt(layer, k, v)
        if cell.defense not in ("no_defense", REPAIR_NAME) and layer in regions[T].layers:
            k, v = defenses.apply_defense(cell.defense, k, v, regions[T].mask(layer), ctx.baseline,
                                          gen=defense_rng(ctx, ex, cell.defense, layer))
        return k, v

    return fn


def cell_rows(ctx: EvalContext, ex: tasks.Example, clean_cache, dedupe: bool = True) -> Iterator[Row]:
    """The grid's rows for one example, in grid order. At rest, every defense of a (type, eps) pair
    starts from one corrupted copy of the clean K/V."""
    T = int(ex.prefix.numel())
    ref = _region(ctx, CLEAN, 0.0, T, ex)
    at_rest = ctx.persistence == "at_rest"
    group: tuple | None = None
    region, kv = ref, {}
    for cell in ctx.cells:
        if (cell.ctype, cell.eps) != group:
            group = (cell.ctype, cell.eps)
            region = ref if cell.ctype == CLEAN else _region(ctx, cell.ctype, cell.eps, T, ex)
            kv = {l: hf.get_kv(clean_cache, l) for l in region.layers}
            if at_rest and cell.ctype != CLEAN:
                kv, _ = ctx.corruptor.apply_cache(kv, cell.ctype, cell.eps, PHASE, ex.example_id, region=region)
        if dedupe and cell.ctype != CLEAN and (
                (cell.eps == 0 and _same_region(region, ref))
                or (at_rest and _covers_nothing(region) and _covers_nothing(ref))):
            yield Row(cell, None, None, region, alias=Cell(CLEAN, 0.0, cell.defense))
            continue
        if at_rest:
            yield Row(cell, _defend(ctx, ex, cell.defense, kv, region), None, region)
        else:
            yield Row(cell, None, _read_fn(ctx, ex, cell), region)


def _rows_on_read(fns: list[Callable | None]) -> Callable:
    """One on-read function for a batch: row i goes through its own cell's function."""

    def fn(layer, k, v):
        ks, vs = [], []
        for i, f in enumerate(fns):
            ki, vi = k[i:i + 1], v[i:i + 1]
            if f is not None:
                ki, vi = f(layer, ki, vi)
            ks.append(ki)
            vs.append(vi)
        return torch.cat(ks), torch.cat(vs)

    return fn


def run_batch(ctx: EvalContext, ex: tasks.Example, clean_cache, rows: list[Row], repaired: bool) -> list[float]:
    """Score `rows` (cells of one example) with one forward over a batched copy of the cache."""
    R = ex.rows
    cache = hf.repeat_cache(clean_cache, R * len(rows))
    layers = sorted({l for r in rows if r.overrides for l in r.overrides})
    for l in layers:
        k0, v0 = hf.get_kv(clean_cache, l)
        ks, vs = [], []
        for r in rows:
            k, v = r.overrides.get(l, (k0, v0)) if r.overrides else (k0, v0)
            ks.append(k.expand(R, -1, -1, -1))
            vs.append(v.expand(R, -1, -1, -1))
        hf.set_kv(cache, l, torch.cat(ks), torch.cat(vs))
    plan = None
    reads = [r.on_read for r in rows for _ in range(R)]
    if repaired or any(f is not None for f in reads):
        plan = hf.HookPlan(layers=frozenset(ctx.layers) if any(reads) else frozenset(),
                           on_read=_rows_on_read(reads) if any(reads) else None,
                           repair=ctx.op if repaired else None)
    feeds = ex.feeds.repeat(len(rows), 1).to(ctx.lm.device)
    logits, _ = hf.forward(ctx.lm.model, feeds, cache, plan=plan)
    logits = logits.float().cpu()
    score = tasks.get_task(ex.task).score
    return [score(logits[i * R:(i + 1) * R], ex) for i in range(len(rows))]


def exposure(ctx: EvalContext, regions: Sequence[corruption.Region]) -> float:
    """Mean fraction of the corruptible layers' context K/V entries that the masks cover."""
    vals = []
    for reg in regions:
        layers = sorted(set(ctx.layers) | set(reg.layers))
        vals.append(sum(reg.fraction(l) for l in layers) / max(1, len(layers)))
    return float(np.mean(vals)) if vals else 0.0


def score_example(ctx: EvalContext, ex: tasks.Example, dedupe: bool = True) -> dict:
    """All grid cells of one example: {"cells": {cell key: raw value}, "exposure": float, "tokens": int}."""
    with torch.no_grad():
        _, clean = hf.forward(ctx.lm.model, ex.prefix[None].to(ctx.lm.device), logits_to_keep=1)
        per_batch = max(1, ctx.batch_rows // ex.rows)
        values: dict[str, float] = {}
        pending: dict[bool, list[Row]] = {False: [], True: []}
        aliases, regions, seen = [], [], set()
        for row in cell_rows(ctx, ex, clean, dedupe):
            if row.cell.ctype != CLEAN and (row.cell.ctype, row.cell.eps) not in seen:
                seen.add((row.cell.ctype, row.cell.eps))
                regions.append(row.region)
            if row.alias is not None:
                aliases.append(row)
                continue
            q = pending[row.cell.repaired]
            q.append(row)
            if len(q) == per_batch:
                values.update(zip([r.cell.key for r in q], run_batch(ctx, ex, clean, q, row.cell.repaired)))
                q.clear()
        for repaired, q in pending.items():
            if q:
                values.update(zip([r.cell.key for r in q], run_batch(ctx, ex, clean, q, repaired)))
        computed = len(values)
        for row in aliases:
            values[row.cell.key] = values[row.alias.key]
    return {"cells": {c.key: float(values[c.key]) for c in ctx.cells}, "exposure": exposure(ctx, regions),
            "tokens": int(ex.prefix.numel() + computed * ex.feeds.numel())}


# --------------------------------------------------------------------------------------------------
# aggregation: a pure function of the per-example values


def _summarise(ctx_tasks: dict, means: dict[str, np.ndarray], cells: list[Cell], names: list[str],
               types: list[str], eps: list[float]) -> dict:
    """Curves, AUCs and clean scores for S sets of per-task cell means ({task: [S, n_cells]})."""
    idx = {c.key: i for i, c in enumerate(cells)}
    nd = idx[Cell(CLEAN, 0.0, "no_defense").key]
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
    return out


def best_heuristic(auc: dict[str, float], names: Sequence[str]) -> str | None:
    """Fixed rule: the heuristic with the highest robustness AUC (ties: registry order)."""
    best = None
    for h in HEURISTICS:
        if h in names and (best is None or auc[h] > auc[best]):
            best = h
    return best


def _curve_block(curves: dict, boot: dict, eps: list[float], names: list[str], best: str | None) -> dict:
    def pick(name):
        return None if name is None or name not in curves else stats.to_list(curves[name][0])

    ci = {}
    for name in names + (["best_heuristic"] if best else []):
        src = boot[best if name == "best_heuristic" else name]
        lo, hi = stats.percentile_ci(src, CI_ALPHA, axis=0)
        ci[name] = {"low": stats.to_list(lo), "high": stats.to_list(hi)}
    return {"eps": list(eps), "no_defense": pick("no_defense"), "best_heuristic": pick(best),
            "cachemedic": pick(REPAIR_NAME), "per_defense": {d: pick(d) for d in names}, "ci": ci}


def aggregate(task_info: dict, values: dict[str, np.ndarray], exposures: dict[str, float], cells: list[Cell],
              names: list[str], types: list[str], eps: list[float], samples: int, seed: int) -> dict:
    """metrics["..."] of task_metrics.json from raw per-example values ({task: [n, n_cells]})."""
    order = list(values)
    means = {t: values[t].mean(axis=0, keepdims=True) for t in order}
    point = _summarise(task_info, means, cells, names, types, eps)
    rng = seeding.numpy_rng(seed, "eval-bootstrap")
    # one resample of example indices per task, shared by every cell and defense: paired comparisons
    idx = {t: stats.bootstrap_indices(values[t].shape[0], samples, rng) for t in order}
    resampled = {t: stats.resampled_means(values[t], idx[t]) for t in order}
    boot = _summarise(task_info, resampled, cells, names, types, eps)

    clean_idx = {c.defense: i for i, c in enumerate(cells) if c.ctype == CLEAN}
    rows = []
    for t in order:
        lo, hi = stats.percentile_ci(boot["score"][t], CI_ALPHA, axis=0)
        for i, c in enumerate(cells):
            rows.append({"task": t, "corruption_type": c.ctype, "epsilon": c.eps, "defense": c.defense,
                         "value": float(point["value"][t][0, i]), "score": float(point["score"][t][0, i]),
                         "n": int(values[t].shape[0]), "ci_low": float(lo[i]), "ci_high": float(hi[i])})
    auc = {d: float(point["auc"][d][0]) for d in names}
    best = best_heuristic(auc, names)
    auc_all = dict(auc, **({"best_heuristic": auc[best]} if best else {}))
    auc_ci = {}
    for name in auc_all:
        lo, hi = stats.percentile_ci(boot["auc"][best if name == "best_heuristic" else name], CI_ALPHA)
        auc_ci[name] = [float(lo), float(hi)]
    n_total = int(sum(v.shape[0] for v in values.values()))
    others = [(o, label) for o, label in (("no_defense", "no_defense"), (best, "best_heuristic")) if o is not None]

    def auc_difference(point_auc: dict, boot_auc: dict, other: str) -> dict:
        return {"metric": "robustness_auc", "other": other, **stats.paired_difference(
            point_auc[REPAIR_NAME], point_auc[other], boot_auc[REPAIR_NAME], boot_auc[other], n_total)}

    paired = {}
    if REPAIR_NAME in names:
        for other, label in others:
            paired[f"cachemedic_minus_{label}"] = auc_difference(auc, boot["auc"], other)
            paired[f"clean_cachemedic_minus_{label}"] = {"metric": "clean_score", "other": other, **stats.paired_difference(
                float(point["clean_regression"][REPAIR_NAME][0]), float(point["clean_regression"][other][0]),
                boot["clean_regression"][REPAIR_NAME], boot["clean_regression"][other], n_total)}
    # per corruption type: the same AUC over that type's cells alone, and its paired differences (the
    # overall best heuristic), so a multi-type grid shows under which types the repair helps
    auc_by_type, paired_by_type = {}, {}
    for ty in types:
        pt = _summarise(task_info, means, cells, names, [ty], eps)
        bt = _summarise(task_info, resampled, cells, names, [ty], eps)
        auc_by_type[ty] = {d: float(pt["auc"][d][0]) for d in names}
        if REPAIR_NAME in names:
            paired_by_type[ty] = {f"cachemedic_minus_{label}": auc_difference(auc_by_type[ty], bt["auc"], other)
                                  for other, label in others}
    return {
        "task_curves": rows,
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
        "paired_bootstrap": paired,
        "robustness_auc_by_type": auc_by_type,
        "paired_bootstrap_by_type": paired_by_type,
        "exposure": {t: float(exposures[t]) for t in order},
        "overhead": None,
    }


def unit_matrices(ctx: EvalContext, units: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    values: dict[str, list] = {}
    expo: dict[str, list] = {}
    for ex in ctx.examples:
        u = units[ex.key]
        values.setdefault(ex.task, []).append([u["cells"][c.key] for c in ctx.cells])
        expo.setdefault(ex.task, []).append(u["exposure"])
    return ({t: np.asarray(v, dtype=np.float64) for t, v in values.items()},
            {t: float(np.mean(v)) for t, v in expo.items()})


# --------------------------------------------------------------------------------------------------
# overhead (timing; the only non-deterministic part of the metrics)


def measure_overhead(ctx: EvalContext, reps: int = 3) -> dict:
    """Per defense: tokens/s of scoring continuations over a corrupted cache (the shared clean prefill
    excluded), wall seconds, and peak memory during that defense's timed runs (CUDA allocator peak; on CPU
    the process's peak RSS with the kernel's peak mark reset before the runs, where Linux allows it)."""
    first = {}
    for ex in ctx.examples:
        first.setdefault(ex.task, ex)
    exs = list(first.values())
    ctype = next((t for t in ctx.types), CLEAN)
    eps = next((e for e in ctx.eps if e > 0), 0.0)
    out = {}
    with torch.no_grad():
        caches = {ex.key: hf.forward(ctx.lm.model, ex.prefix[None].to(ctx.lm.device), logits_to_keep=1)[1]
                  for ex in exs}
        for d in ctx.defense_names:
            cell = Cell(ctype, eps, d)
            sub = EvalContext(**{**ctx.__dict__, "cells": [cell]})
            rows = {ex.key: next(cell_rows(sub, ex, caches[ex.key], dedupe=False)) for ex in exs}
            for ex in exs:  # warm-up
                run_batch(sub, ex, caches[ex.key], [rows[ex.key]], cell.repaired)
            method = memory.method(ctx.lm.device, memory.reset_peak(ctx.lm.device))
            t0, tokens = time.perf_counter(), 0
            for _ in range(reps):
                for ex in exs:
                    row = next(cell_rows(sub, ex, caches[ex.key], dedupe=False))
                    run_batch(sub, ex, caches[ex.key], [row], cell.repaired)
                    tokens += int(ex.feeds.numel())
            peak = memory.peak_mib(ctx.lm.device)
            wall = time.perf_counter() - t0
            out[d] = {"tokens_per_sec": tokens / wall if wall > 0 else None, "wall_sec": wall, "peak_mem_mb": peak,
                      "peak_mem_method": method, "tokens": tokens}
    return out


def overhead_protocol(ctx: EvalContext, reps: int = 3) -> dict:
    first = {}
    for ex in ctx.examples:
        first.setdefault(ex.task, ex.key)
    return {"corruption_type": next((t for t in ctx.types), CLEAN), "epsilon": next((e for e in ctx.eps if e > 0), 0.0),
            "reps": reps, "examples": list(first.values()),
            "tokens": "continuation tokens scored over the corrupted, defended cache (the clean prefill excluded)",
            "peak_mem": f"per defense, during its timed runs: {memory.method(ctx.lm.device)}"}


# --------------------------------------------------------------------------------------------------
# checkpoint, progress, settings


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_checkpoint(cfg: Config, rd: RunDir, names: Sequence[str]) -> dict:
    """Which repair weights cachemedic uses. A missing checkpoint is bad input unless allowed."""
    if REPAIR_NAME not in names:
        return {"path": None, "step": None, "sha256": None, "status": "cachemedic not evaluated"}
    p = rd.latest_repair_checkpoint()
    if p is None:
        if not cfg.eval.allow_missing_checkpoint:
            raise ConfigError(
                f"no repair checkpoint (repair_step_<N>.pt) in {rd.checkpoints}: run `python -m cachemedicpp.train` "
                "on this run dir first, set eval.allow_missing_checkpoint=true to score the untrained identity "
                "operator as cachemedic, or remove cachemedic from eval.defenses")
        return {"path": None, "step": None, "sha256": None,
                "status": "missing: untrained identity operator scored as cachemedic (eval.allow_missing_checkpoint)"}
    return {"path": str(p.relative_to(rd.path)), "step": None, "sha256": _sha256(p), "status": "loaded"}


def load_operator(cfg: Config, rd: RunDir, ckpt: dict, arch) -> repair.RepairOperator | None:
    if ckpt["status"] == "cachemedic not evaluated":
        return None
    if ckpt["path"] is None:
        return repair.build_operator(cfg.repair.to_dict(), arch, cfg.seed)
    op, payload = repair.load_repair_checkpoint(rd.path / ckpt["path"], cfg.repair.to_dict(), arch, cfg.seed)
    ckpt["step"] = int(payload.get("step", -1))
    ckpt["config_hash"] = payload.get("config_hash")
    return op


def examples_fingerprint(examples: Sequence[tasks.Example]) -> str:
    """Hash of every example's token ids: a resumed run must score the same inputs (e.g. the same data
    source, which can change when a hub dataset becomes reachable or not)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.key.encode())
        for t in (ex.prefix, ex.feeds, ex.targets):
            h.update(t.to(torch.int64).numpy().tobytes())
        h.update(str(ex.label).encode())
    return h.hexdigest()[:16]


def load_progress(path: Path, cfg: Config, ckpt: dict, ctx: EvalContext, resume: bool) -> dict:
    """Finished units from a previous run of the same config, checkpoint and examples (else none)."""
    keys = [ex.key for ex in ctx.examples]
    fresh = {"status": "running", "config_hash": cfg.hash, "checkpoint": ckpt.get("sha256"),
             "examples": examples_fingerprint(ctx.examples), "total_units": len(keys), "completed_units": 0,
             "elapsed_wall_sec": 0.0, "units": {}}
    if not resume or not path.is_file():
        return fresh
    prog = read_json(path, "eval progress")
    if not isinstance(prog, dict) or prog.get("config_hash") != cfg.hash:
        raise ConfigError(f"eval progress {path} belongs to another config; rerun with --no-resume")
    if prog.get("checkpoint") != ckpt.get("sha256"):
        log.warning("repair checkpoint changed since the saved eval progress: recomputing every unit")
        return fresh
    if prog.get("examples") != fresh["examples"]:
        log.warning("evaluation examples changed since the saved eval progress (data source?): recomputing "
                    "every unit")
        return fresh
    want = {c.key for c in ctx.cells}
    units = {k: u for k, u in (prog.get("units") or {}).items()
             if k in keys and isinstance(u, dict) and set((u.get("cells") or {})) == want}
    fresh.update(units=units, completed_units=len(units), elapsed_wall_sec=float(prog.get("elapsed_wall_sec", 0.0)))
    return fresh


def settings(ctx: EvalContext, ckpt: dict) -> dict:
    cfg = ctx.cfg
    ax = cfg.corruption.axes
    data_sources = {k: v for k, v in ctx.sources.items() if k.endswith("_source")}
    return {
        "tasks": ctx.task_info,
        "eps": ctx.eps,
        "types": ctx.types,
        "defenses": ctx.defense_names,
        "heuristics": [h for h in HEURISTICS if h in ctx.defense_names],
        "persistence": ctx.persistence,
        "corruption_region": {"time_mode": ax.time_mode, "N_recent": ax.N_recent, "window": list(ax.window),
                              "layer_mode": ax.layer_mode, "head_mode": ax.head_mode,
                              "protect_layers": list(cfg.repair.protect_layers), "eps_ref": cfg.corruption.eps_ref},
        "ood_protocol": cfg.eval.ood_protocol,
        "ood_split": cfg.eval.ood_split.to_dict() if cfg.eval.ood_split is not None else None,
        "data_sources": {k[:-len("_source")]: v for k, v in data_sources.items()},
        "checkpoint": ckpt,
        "seeds": {"seed": cfg.seed, "long_context_seed": cfg.data.long_context.seed,
                  "corruption_draws": "sha256(seed, 'eval', example_id, type, eps, layer, draw, K|V)",
                  "bootstrap": "sha256(seed, 'eval-bootstrap')"},
        "bootstrap_samples": int(cfg.eval.bootstrap_samples),
        "ci": f"{int(100 * (1 - CI_ALPHA))}% percentile bootstrap over examples; one resample of example indices "
              "per task shared by every cell and defense (paired)",
        "oracle_note": defenses.ORACLE_NOTE,
        "clean_cells": f"eps 0 on the region {ctx.ref_type}'s masks select at eps 0; heuristics act on it",
        "score": "accuracy as is; perplexity as ppl_clean_no_defense / ppl (above 1 when a defense lowers "
                 "perplexity below the clean undefended one; not clipped)",
        "score_vs_eps": "mean normalised score over tasks x types; eps 0 uses the clean cells",
        "robustness_auc": "trapezoid over eps of score_vs_eps (unnormalised)",
        "best_heuristic_rule": "highest robustness_auc among the evaluated heuristics (ties: registry order)",
        "exposure": "fraction of the corruptible layers' context K/V entries inside the corruption masks, "
                    "mean over examples and (type, eps) cells",
        "model": {"name": cfg.model.name, "revision": cfg.model.revision, "dtype": str(ctx.lm.dtype).replace("torch.", ""),
                  "device": ctx.lm.device.type, "arch": ctx.lm.arch.to_dict()},
        "cell_batch_size": ctx.batch_rows,
        "overhead": overhead_protocol(ctx) if cfg.eval.measure_overhead else None,
        "notes": list(ctx.notes),
    }


def _summary_records(metrics: dict, ctx: EvalContext) -> list[dict]:
    recs = []
    for t, block in list(metrics["score_vs_eps_by_task"].items()) + [("all", metrics["score_vs_eps"])]:
        n = ctx.task_info[t]["n"] if t != "all" else sum(i["n"] for i in ctx.task_info.values())
        for j, e in enumerate(block["eps"]):
            recs.append({"kind": "summary", "task": t, "epsilon": e, "n": n,
                         "scores": {d: v[j] for d, v in block["per_defense"].items()},
                         "best_heuristic": metrics["best_heuristic_name"]})
    return recs


# --------------------------------------------------------------------------------------------------
# the command


def run(cfg: Config, run_dir, *, resume: bool = True, config_path: str | None = None, sweep_pause=None) -> int:
    names, _ = eval_defenses(cfg)
    ckpt = resolve_checkpoint(cfg, RunDir(run_dir), names)  # fail before any expensive work
    with PhaseSession(cfg, run_dir, PHASE, config_path, sweep_pause=sweep_pause) as s:
        rd = s.rd
        _clear_stale_temps(rd)
        if not resume:
            for name in (PROGRESS_FILE, METRICS_FILE):
                (rd.metrics / name).unlink(missing_ok=True)
        lm = hf.load_model(cfg.model.to_dict(), cfg.device, cfg.dtype)
        op = load_operator(cfg, rd, ckpt, lm.arch)
        ctx = build_context(cfg, lm, op)
        keys = [ex.key for ex in ctx.examples]
        progress_path = rd.metrics / PROGRESS_FILE
        prog = load_progress(progress_path, cfg, ckpt, ctx, resume)
        units = prog["units"]
        hb = s.heartbeat(len(keys), prog["elapsed_wall_sec"])
        hb.latest = {"checkpoint": ckpt["path"], "state": str(progress_path.relative_to(rd.path))}
        s.step = len(units)
        hb.beat("resumed" if units else "running", s.step, reason="resume" if units else "start", force=True)
        log.info("eval: %d units (%d done), %d cells each, persistence %s", len(keys), len(units), len(ctx.cells),
                 ctx.persistence)
        bar = _bar(len(keys), len(units))

        def save(status: str) -> None:
            prog.update(status=status, completed_units=len(units), elapsed_wall_sec=round(hb.elapsed(), 3))
            atomic_write_json(progress_path, prog)

        for ex in ctx.examples:
            if ex.key in units:
                continue
            reason = s.pause.requested()
            if reason:
                save("paused")
                s.pause.acknowledge(s.run_id, s.step, reason, str(progress_path))
                hb.beat("paused", s.step, reason=reason, unit=ex.key, force=True)
                bar.close()
                log.info("eval paused (%s) after %d/%d units", reason, len(units), len(keys))
                return EXIT_PAUSED
            t0 = time.perf_counter()
            units[ex.key] = score_example(ctx, ex)
            dt = time.perf_counter() - t0
            save("running")
            s.step = len(units)
            bar.update(1)
            hb.beat("running", s.step, unit=ex.key, tokens_per_sec=units[ex.key]["tokens"] / dt if dt > 0 else None)
        bar.close()

        values, expo = unit_matrices(ctx, units)
        metrics = aggregate(ctx.task_info, values, expo, ctx.cells, ctx.defense_names, ctx.types, ctx.eps,
                            int(cfg.eval.bootstrap_samples), int(cfg.seed))
        if cfg.eval.measure_overhead:
            metrics["overhead"] = measure_overhead(ctx)
        atomic_write_json(rd.metrics / METRICS_FILE, {"run_id": s.run_id, "config_hash": cfg.hash,
                                                      "metrics": metrics, "settings": settings(ctx, ckpt)})
        # one summary record per (task, eps): drop this run's earlier ones so a rerun never duplicates them
        log_path = rd.logs / "eval.jsonl"
        truncate_jsonl(log_path, lambda r: not (r.get("run_id") == s.run_id and r.get("kind") == "summary"))
        elog = JsonlLog(log_path, s.run_id, PHASE)
        for rec in _summary_records(metrics, ctx):
            elog.write(len(keys), **rec)
        save("completed")
        hb.beat("completed", s.step, reason="done", force=True)
        log.info("eval done: robustness AUC %s", {k: round(v, 4) for k, v in metrics["robustness_auc"].items()})
    return EXIT_OK


def _clear_stale_temps(rd: RunDir) -> None:
    """Temp files of a process killed mid-write (the run dir lock guarantees no writer is alive)."""
    for folder, pattern in ((rd.metrics, ".eval_progress.json.tmp*"), (rd.metrics, ".task_metrics.json.tmp*"),
                            (rd.logs, ".eval*.tmp*"), (rd.control, ".pause_ack_eval.json.tmp*")):
        for p in folder.glob(pattern):
            p.unlink(missing_ok=True)


def _bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="ex", file=sys.stderr,
                disable=not sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    def body(cfg, run_dir, args) -> int:
        return run(cfg, run_dir, resume=args.resume, config_path=args.config)

    return cli.run_phase(PHASE, "Evaluate tasks under the corruption grid (paired, resumable).", argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
