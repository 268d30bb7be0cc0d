"""Overhead: wall time and peak memory per defense (the only non-deterministic part of the metrics,
kept in their own `overhead` block so everything else stays bit-identical across runs)."""

from __future__ import annotations

import dataclasses
import time

import torch

from cachemedicpp import hf, memory, tasks
from cachemedicpp.eval.grid import CLEAN, Cell, EvalContext, cell_rows, run_batch


def _timed_cell(ctx: EvalContext) -> tuple[str, float]:
    """(type, eps) of the cell timed: the first evaluated type at the smallest positive eps."""
    return next((t for t in ctx.types), CLEAN), next((e for e in ctx.eps if e > 0), 0.0)


def _first_per_task(ctx: EvalContext) -> list[tasks.Example]:
    first: dict[str, tasks.Example] = {}
    for ex in ctx.examples:
        first.setdefault(ex.task, ex)
    return list(first.values())


def measure_overhead(ctx: EvalContext, reps: int = 3) -> dict:
    """Per defense: tokens/s of scoring continuations over a corrupted cache (the shared clean prefill
    excluded), wall seconds, and peak memory during that defense's timed runs (CUDA allocator peak; on CPU
    the process's peak RSS with the kernel's peak mark reset before the runs, where Linux allows it)."""
    exs = _first_per_task(ctx)
    ctype, eps = _timed_cell(ctx)
    out = {}
    with torch.no_grad():
        caches = {ex.key: hf.forward(ctx.lm.model, ex.prefix[None].to(ctx.lm.device), logits_to_keep=1)[1]
                  for ex in exs}
        for d in ctx.defense_names:
            cell = Cell(ctype, eps, d)
            # a recomputing defense runs its real recomputation forward here, so its cost is measured, not assumed
            recomputes = ctx.defense(d).needs.recompute
            sub = dataclasses.replace(ctx, cells=[cell], recompute_exact=recomputes)
            for ex in exs:  # warm-up
                run_batch(sub, ex, caches[ex.key], [next(cell_rows(sub, ex, caches[ex.key], dedupe=False))],
                          cell.repaired)
            method = memory.method(ctx.lm.device, memory.reset_peak(ctx.lm.device))
            t0, tokens, re_tokens, re_sec = time.perf_counter(), 0, 0, 0.0
            for _ in range(reps):
                for ex in exs:  # building the row (corrupt + defend) is part of the timed work
                    row = next(cell_rows(sub, ex, caches[ex.key], dedupe=False))
                    run_batch(sub, ex, caches[ex.key], [row], cell.repaired)
                    tokens += int(ex.feeds.numel())
                    if row.recompute is not None:
                        re_tokens += int(row.recompute["tokens"])
                        re_sec += float(row.recompute.get("seconds", 0.0))
            peak = memory.peak_mib(ctx.lm.device)
            wall = time.perf_counter() - t0
            out[d] = {"tokens_per_sec": tokens / wall if wall > 0 else None, "wall_sec": wall, "peak_mem_mb": peak,
                      "peak_mem_method": method, "tokens": tokens}
            if recomputes:
                out[d].update(recompute_tokens=re_tokens, recompute_sec=re_sec)
    return out


def overhead_protocol(ctx: EvalContext, reps: int = 3) -> dict:
    """How `measure_overhead` measures, for the settings block (written before any timing)."""
    ctype, eps = _timed_cell(ctx)
    return {"corruption_type": ctype, "epsilon": eps, "reps": reps,
            "examples": [ex.key for ex in _first_per_task(ctx)],
            "tokens": "continuation tokens scored over the corrupted, defended cache (the clean prefill excluded)",
            "peak_mem": f"per defense, during its timed runs: {memory.method(ctx.lm.device)}"}
