"""The timed measurements: train step vs bare step, eval grid vs bare forwards, each defense's overhead
(checksum_recompute's recomputation included) vs no defense, decode tokens/s of each repair variant vs no
defense. Each returns its block of the results JSON for one device."""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any

from cachemedicpp import calibration, defenses, hf
from cachemedicpp import eval as ev
from cachemedicpp.bench.settings import Settings, bench_config, decode_variants
from cachemedicpp.bench.timing import abba, interleaved, median, paired_ratios, ratio
from cachemedicpp.bench.workloads import (decode_workload, eval_end_to_end, eval_workloads, perturbed_operator, tag_costs,
                                          prefilled, train_workloads, variant_agreement)
from cachemedicpp.config import ConfigError
from cachemedicpp.results import CHECKSUM_RECOMPUTE, NO_DEFENSE

log = logging.getLogger("cachemedicpp")

TRAIN_BARE = ("clean prefix prefill (no grad) + teacher continuation forward (no grad) + student continuation "
              "forward reading K*s on the protected layers (s: one scalar parameter) + the same KD loss + "
              "backward; no harness")
EVAL_GRID = ("eval.score_example over every example (clean prefill shared per example, cells corrupted, "
             "defended and batched as the eval does, repair active on cachemedic cells)")
EVAL_BARE = ("per example one clean prefill + one batch-1 continuation forward of its feeds per grid cell, no "
             "hook plan, cache copies untimed; `ratio_vs_computed_cells` counts only the cells the eval "
             "computes (it reuses cells provably equal to a clean cell)")
DECODE_DESIGN = ("per repetition and variant an ABBA block against no defense (none, v, v, none or v, none, "
                 "none, v), each run decoding tokens_per_run tokens greedily from a copy of one shared "
                 "prefilled cache; ratio = time(none) / time(v) per block, median over repetitions")


def bench_train(s: Settings, lm: hf.LoadedModel) -> dict:
    cfg = bench_config(s, str(lm.device), lm.arch)
    train, bare = train_workloads(cfg, lm)
    t, c = interleaved(lm.device, [train, bare], s.reps)
    per_rep = paired_ratios(t["train_step"], t["train_bare"])
    info = dict(train.info)
    info["step_corruption_types"] = info["step_corruption_types"][1:]  # drop the warm-up step
    return {"ratio": median(per_rep), "ratio_of_medians": ratio(median(t["train_step"]), median(t["train_bare"])),
            "per_rep_ratios": per_rep, "train_step_sec": t["train_step"], "bare_step_sec": t["train_bare"],
            "median_train_step_sec": median(t["train_step"]), "median_bare_step_sec": median(t["train_bare"]),
            "cpu_time_ratio": median(paired_ratios(c["train_step"], c["train_bare"])),
            "train_step_cpu_sec": c["train_step"], "bare_step_cpu_sec": c["train_bare"],
            "target": "<= 1.15", "shapes": info, "bare_definition": TRAIN_BARE}


def bench_eval(s: Settings, lm: hf.LoadedModel) -> dict:
    grid, bare, extra = eval_workloads(s, lm)
    t, c = interleaved(lm.device, [grid, bare], s.eval_reps or s.reps, warmup=0)  # the set-up ran the grid once
    strict_wall = [w for w, _ in extra["strict"]]
    per_rep = paired_ratios(t["eval_grid"], t["eval_bare"])
    out = {"ratio": median(per_rep), "ratio_of_medians": ratio(median(t["eval_grid"]), median(t["eval_bare"])),
           "ratio_vs_computed_cells": median(paired_ratios(t["eval_grid"], strict_wall)),
           "cpu_time_ratio": median(paired_ratios(c["eval_grid"], c["eval_bare"])), "per_rep_ratios": per_rep,
           "grid_sec": t["eval_grid"], "bare_sec": t["eval_bare"], "bare_computed_cells_sec": strict_wall,
           "grid_cpu_sec": c["eval_grid"], "bare_cpu_sec": c["eval_bare"],
           "median_grid_sec": median(t["eval_grid"]), "median_bare_sec": median(t["eval_bare"]),
           "cells": grid.info["cells_per_example"] * grid.info["examples"], "grid": grid.info, "target": "<= 1.3",
           "grid_definition": EVAL_GRID, "bare_definition": EVAL_BARE}
    if s.eval_end_to_end:
        e2e = eval_end_to_end(extra["cfg"], extra["op"])
        e2e["ratio_vs_bare"] = ratio(e2e["wall_sec"], out["median_bare_sec"])
        e2e["note"] = "includes model load, data loading, example building, bootstrap aggregation and file writes"
        out["end_to_end"] = e2e
    return out


DEFENSE_OVERHEAD = ("eval's own overhead measurement (eval.measure_overhead, figure B's throughput): per defense, "
                    "one warm-up, then `reps` x one example per task of one corrupted cell (the first evaluated type "
                    "at the smallest positive eps), building the row (corrupt + defend) and scoring its continuation; "
                    "checksum_recompute runs its real recomputation (baseline.recompute_mode: the failing blocks, or "
                    "the whole context) whenever a block fails its checksum (counted in recompute_tokens / "
                    "recompute_sec, part of wall_sec). Defenses "
                    "run one after another (not interleaved): ratios move with the machine's load")


def bench_defense_overhead(s: Settings, lm: hf.LoadedModel) -> dict:
    """Every defense of the base config plus checksum_recompute, timed as the eval times them, with wall
    time and throughput relative to no_defense and checksum_recompute's recomputation cost."""
    cfg = bench_config(s, str(lm.device), lm.arch, extra_defenses=[NO_DEFENSE, CHECKSUM_RECOMPUTE])
    names, _ = ev.eval_defenses(cfg)
    cal = calibration.build(cfg, lm) if defenses.required(names, "calibration") else None
    ctx = ev.build_context(cfg, lm, perturbed_operator(cfg, lm), cal)
    reps = s.eval_reps or s.reps
    protocol = ev.overhead_protocol(ctx, reps)
    measured = ev.measure_overhead(ctx, reps)
    base = measured[NO_DEFENSE]
    rows = {}
    for d, m in measured.items():
        row = dict(m, group=defenses.group(d),
                   wall_ratio_vs_no_defense=ratio(m["wall_sec"], base["wall_sec"]),
                   throughput_ratio_vs_no_defense=(ratio(m["tokens_per_sec"], base["tokens_per_sec"])
                                                   if m["tokens_per_sec"] and base["tokens_per_sec"] else None))
        if "recompute_tokens" in m:
            runs = reps * len(protocol["examples"])
            row.update(recompute_tokens_per_run=m["recompute_tokens"] / runs,
                       recompute_share_of_wall=ratio(m["recompute_sec"], m["wall_sec"]))
        rows[d] = row
    return {"defenses": rows, "cell": {"corruption_type": protocol["corruption_type"], "epsilon": protocol["epsilon"]},
            "examples": protocol["examples"], "reps": reps, "persistence": ctx.persistence,
            "context_tokens": [int(ex.prefix.numel()) for ex in ctx.examples],
            "checksum_block_size": int(ctx.baseline["checksum_block_size"]), "definition": DEFENSE_OVERHEAD}


def bench_decode(s: Settings, lm: hf.LoadedModel) -> dict:
    cfg = bench_config(s, str(lm.device), lm.arch)
    if s.run_dir is not None:  # the trained operator, through the loader `protect` uses (its checks included)
        from cachemedicpp import protection

        op = protection.operator(lm.model, s.run_dir, "cachemedic")
    else:
        op = perturbed_operator(cfg, lm)
    block = int(getattr(op, "score_block", 1))
    if s.decode_tokens % block:
        # family D scores appended entries in blocks: a timed run covers whole blocks, so their scoring counts
        s = dataclasses.replace(s, decode_tokens=-(-s.decode_tokens // block) * block)
        log.info("decode: %d tokens per run (whole detector blocks of %d)", s.decode_tokens, block)
    out: dict[str, Any] = {"protect_layers": list(op.layers), "rank": op.rank, "apply_to": op.apply_to,
                           "family": op.family, "tokens_per_run": s.decode_tokens, "design": DECODE_DESIGN,
                           "operator": f"trained ({s.run_dir})" if s.run_dir else "stand-in (random windows)",
                           "prefill": s.prefill,
                           "agreement_max_abs_logit_diff": variant_agreement(lm, op, seed=s.seed),
                           "lengths": {}}
    for length in s.lengths:
        if length + s.decode_tokens > lm.arch.max_positions:
            raise ConfigError(f"--lengths: {length} + {s.decode_tokens} decoded tokens exceeds the model's "
                              f"{lm.arch.max_positions} positions")
        start = prefilled(lm, length, s.seed, s.prefill)  # one prefill shared by every variant
        variants = decode_variants(op.family)
        ws = {v: decode_workload(lm, op, length, s.decode_tokens, v, s.seed, start, s.prefill) for v in variants}
        res = abba(lm.device, ws["none"], [ws[v] for v in variants[1:]], s.reps)
        out["lengths"][str(length)] = _decode_row(s, {v: res["runs"][ws[v].name] for v in variants},
                                                  {v: res["ratios"][ws[v].name] for v in variants[1:]})
        out["lengths"][str(length)]["tags"] = tag_costs(lm, length, s.reps, s.seed, s.prefill)
        del ws, start
        gc.collect()
    return out


def _decode_row(s: Settings, runs: dict, ratios: dict) -> dict:
    """One cache length's block: tokens/s and run times per variant, ratios to no defense."""
    row: dict[str, Any] = {
        "tokens_per_sec": {v: s.decode_tokens / median(runs[v]["wall"]) for v in runs},
        "sec_per_run": {v: runs[v]["wall"] for v in runs},
        "cpu_sec_per_run": {v: runs[v]["cpu"] for v in runs},
        "ratios": {}, "cpu_time_ratios": {}, "ratio_of_fastest_runs": {}, "per_rep_ratios": {}}
    for v, rat in ratios.items():
        row["per_rep_ratios"][v] = rat["wall"]
        row["ratios"][v] = median(rat["wall"])
        row["cpu_time_ratios"][v] = median(rat["cpu"])
        row["ratio_of_fastest_runs"][v] = min(runs["none"]["wall"]) / min(runs[v]["wall"])
    return row
