"""The eval stage: checkpoint resolution, resumable progress, the settings record, `run` and `main`.

Progress holds each finished unit's raw per-cell values; a resumed run skips exactly those units and
recomputes nothing, and the task metrics file is a pure function of them (deterministic bootstrap): an
interrupted run produces a bit-identical file. Wall times live only in the optional `overhead` block.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import cachemedicpp.eval as package  # score_example is looked up on the package: tests substitute it there
from cachemedicpp import calibration, cli, corruption, defenses, hf, progress, repair, tasks, workers
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import FAULT_TYPES, Config, ConfigError, load_config
from cachemedicpp.eval.aggregate import (BEST_RULE, CI_ALPHA, aggregate, best_heuristic, detector_stats,
                                         nonfinite_outputs, recompute_cost, unit_matrices, validation_aucs)
from cachemedicpp.eval.grid import PHASE, REPAIR_NAME, EvalContext, build_context, eval_defenses, make_grid
from cachemedicpp.eval.overhead import measure_overhead, overhead_protocol
from cachemedicpp.fileio import atomic_write_json, truncate_jsonl
from cachemedicpp.phase import Done, JsonlLog, PhaseSession, run_units, run_units_spread
from cachemedicpp.progress import Progress
from cachemedicpp.results import (BEST_HEURISTIC_NAME, BIT_CLASS_SCORES, CONFIG_HASH, DETECTOR, EXPOSURE_EVICTED,
                                  METRICS, NO_DEFENSE, ROBUSTNESS_AUC, RUN_ID, SCORE_VS_EPS,
                                  SCORE_VS_EPS_BY_TASK, SETTINGS, SLIDING_WINDOW)
from cachemedicpp.rundir import RunDir

log = logging.getLogger("cachemedicpp")

NOT_EVALUATED = "cachemedic not evaluated"
VALIDATION, TEST = "validation", "test"  # the two grids a worker scores units of


# --------------------------------------------------------------------------------------------------
# checkpoint and progress


def resolve_checkpoint(cfg: Config, rd: RunDir, names: Sequence[str]) -> dict:
    """Which repair weights cachemedic (and detect_recompute, whose alarm is the family-D operator's detector)
    uses (`progress.checkpoint_record`). A missing checkpoint is bad input unless allowed."""
    if not defenses.required(names, "operator"):
        return progress.checkpoint_record(rd, None, NOT_EVALUATED)
    return progress.latest_checkpoint(
        rd, allow_missing=bool(cfg.eval.allow_missing_checkpoint),
        missing="missing: untrained identity operator scored as cachemedic (eval.allow_missing_checkpoint)",
        remedy="run `python -m cachemedicpp.train` on this run dir first, set eval.allow_missing_checkpoint=true "
               "to score the untrained identity operator as cachemedic, or remove cachemedic from eval.defenses")


def load_operator(cfg: Config, rd: RunDir, ckpt: dict, arch) -> repair.RepairOperator | None:
    if ckpt["status"] == NOT_EVALUATED:
        return None
    if ckpt["path"] is None:
        return repair.build_operator(cfg.repair.to_dict(), arch, cfg.seed)
    op, payload = repair.load_repair_checkpoint(rd.resolve(ckpt["path"]), cfg.repair.to_dict(), arch, cfg.seed)
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


def _scored_on(ctx: EvalContext | None) -> Callable[[str, dict], bool]:
    """Whether a saved unit is one of `ctx`'s examples scored on exactly `ctx`'s grid."""
    if ctx is None:
        return lambda key, unit: False
    keys, want = {ex.key for ex in ctx.examples}, {c.key for c in ctx.cells}
    return lambda key, unit: key in keys and isinstance(unit, dict) and set(unit.get("cells") or {}) == want


def new_progress(path: Path, cfg: Config, ckpt: dict, ctx: EvalContext, vctx: EvalContext | None = None) -> Progress:
    """The eval progress record: test units under "units", validation units under "validation_units"; the
    units depend on the checkpoint and on the examples' tokens beyond the config (`progress` policy)."""
    vexs = list(vctx.examples) if vctx is not None else []
    return Progress(path, cfg, len(ctx.examples) + len(vexs), ckpt,
                    {"examples": examples_fingerprint(list(ctx.examples) + vexs)},
                    groups=("units", "validation_units"))


def load_progress(prog: Progress, saved: dict | None, ctx: EvalContext, vctx: EvalContext | None = None) -> None:
    """Keep the finished units of `saved` (the session's resumed record) that this run would compute:
    validation first, since its pick narrows the test grid the test units were scored on."""
    if not prog.resume(saved):
        return
    vunits = prog.keep("validation_units", _scored_on(vctx))
    narrow_to_choice(ctx, vctx, vunits)  # a test grid narrowed to the validation pick is kept as such
    prog.keep("units", _scored_on(ctx))


# --------------------------------------------------------------------------------------------------
# what the results record besides the numbers


def fault_models(ctx: EvalContext) -> dict:
    """settings.fault_models: the evaluated fault models' parameters at eps_ref; for bitflip the storage
    format flipped and whether it was simulated on a cache of another dtype."""
    cfg = ctx.cfg
    bases = {cfg.corruption.params.targeted_base if t == "targeted" else t for t in ctx.types}
    out = {}
    for t in sorted(bases & set(FAULT_TYPES)):
        sev = corruption.severity(t, cfg.corruption.eps_ref, cfg.corruption.params.to_dict(), cfg.corruption.eps_ref)
        if t == "bitflip":
            fmt, simulated = corruption.storage_format(cfg.corruption.params.to_dict(), ctx.lm.dtype)
            sev.update(storage_format=fmt, cache_dtype=corruption.format_name(ctx.lm.dtype), simulated=simulated)
        out[t] = sev
    return out


def sliding_window(ctx: EvalContext) -> dict:
    """settings.sliding_window: the corruptible layers that keep only the last positions of the context."""
    arch = ctx.lm.arch
    return {"window": arch.sliding_window, "layers": [l for l in ctx.layers if l in set(arch.sliding_layers)],
            "note": "a sliding-window layer's cache holds only the last positions of the context: corruption, "
                    "defenses, oracle and checksums act on those; the masked positions it no longer holds are "
                    "reported in metrics.exposure_evicted and count as not exposed in metrics.exposure"}


def bit_class_settings(ctx: EvalContext) -> dict:
    """What figure E's bit-class cells flipped: the storage format, the flip rate at their eps, the burst and
    each class's bit indices."""
    params = ctx.cfg.corruption.params.to_dict()
    sev = corruption.severity("bitflip", ctx.bit_eps, params, ctx.cfg.corruption.eps_ref)
    fmt, simulated = corruption.storage_format(params, ctx.lm.dtype)
    return {"storage_format": fmt, "cache_dtype": corruption.format_name(ctx.lm.dtype), "simulated": simulated,
            "flip_rate": float(sev["p"]), "burst": int(sev["burst"]),
            "bits": {b: list(corruption.bit_positions(fmt, b)) for b in ctx.bit_classes},
            "how": "bitflip scored once per bit class at one severity: the same elements hit in every class (the "
                   "draws of the bitflip cells at that eps), only the bit flipped differs; normalised score, mean "
                   "over tasks; intervals: the shared paired bootstrap"}


def settings(ctx: EvalContext, ckpt: dict, vctx: EvalContext | None = None) -> dict:
    cfg = ctx.cfg
    ax = cfg.corruption.axes
    data_sources = {k: v for k, v in ctx.sources.items() if k.endswith("_source")}
    faults = fault_models(ctx)
    return {**({"fault_models": faults} if faults else {}),
        "tasks": ctx.task_info,
        "eps": ctx.eps,
        "types": ctx.types,
        "defenses": ctx.defense_names,
        "heuristics": [h for h in defenses.candidates() if h in ctx.defense_names],
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
        "best_heuristic_rule": BEST_RULE,
        "validation": None if vctx is None else {
            "num_examples": {t: i["n"] for t, i in vctx.task_info.items()}, "types": vctx.types,
            "split": vctx.cfg.eval.validation.split},
        "calibration": ctx.cal.summary() if ctx.cal is not None else None,
        "defense_groups": {d: defenses.group(d) for d in ctx.defense_names},
        "exposure": "fraction of the corruptible layers' context K/V entries (every context position) inside the "
                    "corruption masks and held in the layer's cache, mean over examples and (type, eps) cells; "
                    "positions a sliding-window layer no longer holds count as not exposed",
        EXPOSURE_EVICTED: "fraction of the corruptible layers' context K/V entries inside the corruption masks at "
                          "positions a sliding-window layer no longer holds, same means",
        SLIDING_WINDOW: sliding_window(ctx),
        "model": {"name": cfg.model.name, "revision": cfg.model.revision,
                  "dtype": str(ctx.lm.dtype).replace("torch.", ""), "device": ctx.lm.device.type,
                  "arch": ctx.lm.arch.to_dict()},
        "cell_batch_size": ctx.batch_rows,
        "overhead": overhead_protocol(ctx) if cfg.eval.measure_overhead else None,
        "notes": list(ctx.notes),
    }


def _summary_records(metrics: dict, ctx: EvalContext) -> list[dict]:
    recs = []
    for t, block in list(metrics[SCORE_VS_EPS_BY_TASK].items()) + [("all", metrics[SCORE_VS_EPS])]:
        n = ctx.task_info[t]["n"] if t != "all" else sum(i["n"] for i in ctx.task_info.values())
        for j, e in enumerate(block["eps"]):
            recs.append({"kind": "summary", "task": t, "epsilon": e, "n": n,
                         "scores": {d: v[j] for d, v in block["per_defense"].items()},
                         "best_heuristic": metrics[BEST_HEURISTIC_NAME]})
    return recs


def choose_best(vctx: EvalContext | None, vunits: dict) -> tuple[str | None, dict | None]:
    """The best baseline by the fixed rule on the validation grid (the test results are never read)."""
    if vctx is None:
        return None, None
    values, _ = unit_matrices(vctx, vunits)
    aucs = validation_aucs(vctx.task_info, values, vctx.cells, vctx.defense_names, vctx.types, vctx.eps)
    best = best_heuristic(aucs, vctx.defense_names)
    out = {"rule": BEST_RULE, "types": list(vctx.types), "examples": len(vctx.examples),
           "validation_auc": {d: a for d, a in aucs.items() if d not in (NO_DEFENSE, REPAIR_NAME)},
           "validation_auc_no_defense": aucs[NO_DEFENSE], "chosen": best}
    if REPAIR_NAME in aucs:
        out["validation_auc_cachemedic"] = aucs[REPAIR_NAME]
    return best, out


def narrow_to_choice(ctx: EvalContext, vctx: EvalContext | None, vunits: dict) -> bool:
    """With eval.validation.test_candidates: chosen, once every validation unit is scored, drop from the test
    grid the candidate baselines the validation grid did not choose (in place; idempotent). True when the
    test grid is final (narrowed, or nothing to narrow)."""
    if vctx is None or ctx.cfg.eval.validation.test_candidates != "chosen":
        return True
    candidates = defenses.candidates()
    if sum(d in candidates for d in ctx.defense_names) <= 1:
        return True  # narrowed already (or one candidate only): nothing to choose again per test unit
    if len(vunits) < len(vctx.examples):
        return False
    best, _ = choose_best(vctx, vunits)
    keep = [d for d in ctx.defense_names if d not in candidates or d == best]
    ctx.defense_names = keep
    ctx.cells = make_grid(keep, ctx.types, ctx.eps, ctx.bit_classes, ctx.bit_eps)
    ctx.notes.append(f"eval.validation.test_candidates: chosen: the test grid scores {best} of the candidate "
                     "baselines (the validation pick)")
    return True


def write_results(s: PhaseSession, ctx: EvalContext, ckpt: dict, units: dict, vctx: EvalContext | None = None,
                  vunits: dict | None = None) -> dict:
    """The task metrics file and one summary log record per (task, eps), from the finished units."""
    cfg, rd = ctx.cfg, s.rd
    values, expo = unit_matrices(ctx, units)
    _, evicted = unit_matrices(ctx, units, "evicted")
    best, choice = choose_best(vctx, vunits or {})
    metrics = aggregate(ctx.task_info, values, expo, ctx.cells, ctx.defense_names, ctx.types, ctx.eps,
                        int(cfg.eval.bootstrap_samples), int(cfg.seed), best=best, choice=choice)
    metrics[EXPOSURE_EVICTED] = {t: float(evicted[t]) for t in metrics["exposure"]}
    if BIT_CLASS_SCORES in metrics:
        metrics[BIT_CLASS_SCORES].update(bit_class_settings(ctx))
    for name in ctx.defense_names:  # recomputing defenses: their cost tables
        key = ctx.defense(name).cost_key
        if key is not None:
            metrics[key] = recompute_cost(ctx, units, name)
    metrics["nonfinite_outputs"] = nonfinite_outputs(ctx, units)
    det = detector_stats(ctx, units)
    if det is not None:
        metrics[DETECTOR] = det
    if cfg.eval.measure_overhead:
        metrics["overhead"] = measure_overhead(ctx)
    atomic_write_json(rd.task_metrics, {RUN_ID: s.run_id, CONFIG_HASH: cfg.hash, METRICS: metrics,
                                        SETTINGS: settings(ctx, ckpt, vctx)})
    # drop this run's earlier summary records so a rerun never duplicates them
    truncate_jsonl(rd.log(PHASE), lambda r: not (r.get("run_id") == s.run_id and r.get("kind") == "summary"))
    elog = JsonlLog(rd.log(PHASE), s.run_id, PHASE)
    for rec in _summary_records(metrics, ctx):
        elog.write(len(ctx.examples), **rec)
    return metrics


# --------------------------------------------------------------------------------------------------
# the command


def validation_config(cfg: Config) -> Config | None:
    """The validation grid's config (see `eval.validation` in the config schema); None without candidates."""
    names, _ = eval_defenses(cfg)
    candidates = [d for d in names if d in defenses.candidates()]
    if not candidates:
        return None
    v = cfg.eval.validation
    split = cfg.eval.ood_split
    types = list(v.types) if v.types else (list(split.train_types) if split is not None
                                           else list(cfg.eval.corruption_eval.types))
    data = cfg.to_dict()
    ev = data["eval"]
    ev["tasks"] = [{**t, "split": v.split, "start": 0, "num_examples": int(v.num_examples)} for t in ev["tasks"]]
    # the learned operator is scored too (never a candidate): its held-in validation AUC chooses between
    # operator families without reading the test grid
    learned = [REPAIR_NAME] if REPAIR_NAME in names else []
    ev.update(defenses=[NO_DEFENSE] + candidates + learned, ood_protocol=None, ood_split=None,
              measure_overhead=False, bit_classes=[])
    ev["corruption_eval"]["types"] = types
    return load_config(data=data)


def load_contexts(cfg: Config, rd: RunDir, ckpt: dict, cal=None) -> tuple[EvalContext, EvalContext | None]:
    """The model, then the test grid and the validation grid (None without candidate baselines), sharing the
    calibration (`cal`: the stored one, already checked; else the run dir's, built and stored there when a
    calibrated baseline is evaluated). The phase and each of its worker processes build their grids here."""
    lm = hf.load_model(cfg.model.to_dict(), cfg.device, cfg.dtype)
    names, _ = eval_defenses(cfg)
    if cal is None and defenses.required(names, "calibration"):
        cal = calibration.obtain(cfg, lm, rd.calibration)
    op = load_operator(cfg, rd, ckpt, lm.arch)
    ctx = build_context(cfg, lm, op, cal)
    vcfg = validation_config(cfg)
    return ctx, (build_context(vcfg, lm, op, cal) if vcfg is not None else None)


# --------------------------------------------------------------------------------------------------
# worker processes (eval.workers > 1)


def _signature(ctx: EvalContext, vctx: EvalContext | None) -> dict:
    """What a worker's grids must share with the phase's as built: the examples' tokens and the set-up's notes
    (they record e.g. an alarm level set on selection data)."""
    vexs = list(vctx.examples) if vctx is not None else []
    return {"examples": examples_fingerprint(list(ctx.examples) + vexs),
            "notes": list(ctx.notes) + (list(vctx.notes) if vctx is not None else [])}


def _worker(cfg_data: dict, source: str | None, run_dir: str, ckpt: dict, signature: dict) -> Callable:
    """A worker's set-up: the grids the phase built, rebuilt from the config and the run dir (the stored
    calibration, the checkpoint the phase resolved); its work function scores one unit (the phase's `payload`) and
    gives (unit, seconds). A test unit brings the validation units: the worker narrows its test grid to the
    validation pick as the phase does (`narrow_to_choice`)."""
    cli.setup_logging()
    logging.getLogger("cachemedicpp").setLevel(logging.ERROR)  # the phase has logged the same set-up
    cfg = Config(cfg_data, source)
    ctx, vctx = load_contexts(cfg, RunDir(run_dir), dict(ckpt))
    if _signature(ctx, vctx) != signature:
        raise RuntimeError("a worker built other examples or another set-up than the eval phase (a data source "
                           "that changed between them?)")
    grids = {TEST: (ctx, {ex.key: ex for ex in ctx.examples})}
    if vctx is not None:
        grids[VALIDATION] = (vctx, {ex.key: ex for ex in vctx.examples})

    def work(item: tuple[str, str, dict | None]) -> tuple[dict, float]:
        grid, key, vunits = item
        c, examples = grids[grid]
        if grid == TEST and not narrow_to_choice(ctx, vctx, vunits or {}):
            raise RuntimeError("a test unit was handed out before the validation grid was complete")
        t0 = time.perf_counter()
        return package.score_example(c, examples[key]), time.perf_counter() - t0

    return work


def _spread(s: PhaseSession, ckpt: dict, signature: dict, ctx: EvalContext, vctx: EvalContext | None, vunits: dict,
            pending: list, record: Callable[[str], None], **loop) -> int:
    """The pending units over eval.workers worker processes (`phase.run_units_spread`, given the rest of its
    arguments; `record(status)` saves the progress), each with an equal share of this process's torch
    threads. Validation units all finish before a test unit is handed out; this process narrows its test grid
    then, as the serial loop does, and each test unit brings the validation units for the worker to narrow
    its own."""
    cfg = s.cfg
    n = int(cfg.eval.workers)
    threads = max(1, torch.get_num_threads() // n)
    log.info("eval: %d units on %d worker processes of %d torch threads", len(pending), min(n, len(pending)), threads)

    def payload(item: tuple[EvalContext, dict, tasks.Example]) -> tuple[str, str, dict | None]:
        c, _, ex = item
        if c is vctx:
            return VALIDATION, ex.key, None
        if not narrow_to_choice(ctx, vctx, vunits):
            raise RuntimeError("a test unit was reached before the validation grid was complete")
        return TEST, ex.key, (dict(vunits) if vctx is not None else None)

    t0, tokens = time.perf_counter(), [0]

    def finish(item: tuple[EvalContext, dict, tasks.Example], out: tuple[dict, float]) -> Done:
        _, done, ex = item
        done[ex.key] = out[0]
        record("running")
        tokens[0] += out[0]["tokens"]
        dt = time.perf_counter() - t0
        return Done(tokens_per_sec=tokens[0] / dt if dt > 0 else None)  # all workers together, start-up included

    args = (cfg.to_dict(), cfg.source, str(s.rd.path), dict(ckpt), signature)
    with workers.Pool(min(n, len(pending)), _worker, args, threads, name="eval-worker") as pool:
        return run_units_spread(s, pending, pool=pool, payload=payload, finish=finish,
                                rank=lambda it: 0 if it[0] is vctx else 1, **loop)


def check_test_split(cfg: Config) -> None:
    """The test grid reads the test split only: validation and selection examples are never test examples."""
    for i, t in enumerate(cfg.eval.tasks):
        if (t.get("split") or "test") != "test":
            raise ConfigError(f"eval.tasks[{i}].split: {t['split']!r}: the test grid reads the test split; the "
                              "validation grid reads eval.validation.split")


def run(cfg: Config, run_dir, *, resume: bool = True, config_path: str | None = None, sweep_pause=None) -> int:
    check_test_split(cfg)
    names, _ = eval_defenses(cfg)
    ckpt = resolve_checkpoint(cfg, RunDir(run_dir), names)  # fail before any expensive work
    cal = None
    if defenses.required(names, "calibration"):
        cal = calibration.check_file(cfg, RunDir(run_dir).calibration)  # a foreign file: refused, nothing touched
    with PhaseSession(cfg, run_dir, PHASE, config_path, sweep_pause=sweep_pause, resume=resume) as s:
        rd = s.rd
        progress_path = rd.progress(PHASE)
        if not resume:
            progress_path.unlink(missing_ok=True)
            rd.task_metrics.unlink(missing_ok=True)
        ctx, vctx = load_contexts(cfg, rd, ckpt, cal)
        signature = _signature(ctx, vctx)
        vexs = list(vctx.examples) if vctx is not None else []
        total = len(ctx.examples) + len(vexs)
        prog = new_progress(progress_path, cfg, ckpt, ctx, vctx)
        load_progress(prog, s.saved, ctx, vctx)
        units, vunits = prog.units(), prog.units("validation_units")
        hb = s.heartbeat(total, prog.elapsed)
        hb.latest = {"checkpoint": ckpt["path"], "state": rd.rel(progress_path)}
        s.step = len(units) + len(vunits)
        hb.beat("resumed" if s.step else "running", s.step, reason="resume" if s.step else "start", force=True)
        log.info("eval: %d units (%d done; %d validation), %d cells each, persistence %s", total, s.step, len(vexs),
                 len(ctx.cells), ctx.persistence)

        def save(status: str) -> None:
            prog.save(status, hb.elapsed())

        def score(item: tuple[EvalContext, dict, tasks.Example]) -> Done:
            c, done, ex = item
            if c is ctx and not narrow_to_choice(ctx, vctx, vunits):
                raise RuntimeError("a test unit was reached before the validation grid was complete")
            t0 = time.perf_counter()
            done[ex.key] = package.score_example(c, ex)
            dt = time.perf_counter() - t0
            save("running")
            return Done(tokens_per_sec=done[ex.key]["tokens"] / dt if dt > 0 else None)

        # validation first: the best baseline is known before any test unit is scored
        pending = [(vctx, vunits, ex) for ex in vexs if ex.key not in vunits]
        pending += [(ctx, units, ex) for ex in ctx.examples if ex.key not in units]
        name = lambda it: ("validation " if it[0] is vctx else "") + it[2].key  # noqa: E731
        loop = dict(name=name, save=lambda: save("paused"), state=progress_path, total=total, unit="ex")
        if int(cfg.eval.workers) > 1 and pending:
            code = _spread(s, ckpt, signature, ctx, vctx, vunits, pending, save, **loop)
        else:
            code = run_units(s, pending, work=score, **loop)
        if code != EXIT_OK:
            return code
        narrow_to_choice(ctx, vctx, vunits)
        metrics = write_results(s, ctx, ckpt, units, vctx, vunits)
        save("completed")
        hb.beat("completed", s.step, reason="done", force=True)
        log.info("eval done: robustness AUC %s", {k: round(v, 4) for k, v in metrics[ROBUSTNESS_AUC].items()})
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    def body(cfg, run_dir, args) -> int:
        return run(cfg, run_dir, resume=args.resume, config_path=args.config)

    return cli.run_phase(PHASE, "Evaluate tasks under the corruption grid (paired, resumable).", argv, body)
