"""The stability phase: resolve what to measure, measure one prompt per unit of work through the shared
unit loop (pause, resume), aggregate over prompts and write the stability metrics."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

import cachemedicpp.stability as package
from cachemedicpp import calibration, defenses, hf, repair
from cachemedicpp.cli import EXIT_OK, run_phase
from cachemedicpp.config import Config
from cachemedicpp.fileio import atomic_write_json
from cachemedicpp.phase import PhaseSession, run_units
from cachemedicpp.progress import Progress
from cachemedicpp.results import AMP_KEY, CONFIG_HASH, METRICS, RUN_ID, SENS_KEY, SETTINGS, STAB_SETTINGS_KEY
from cachemedicpp.stability import amplification, sensitivity
from cachemedicpp.stability.perturb import clean_state, drift
from cachemedicpp.stability.setup import (PHASE, Setup, best_heuristic, build_setup, check_paired_run, fingerprint,
                                          load_prompts, map_delta, measured_deltas, repair_checkpoint,
                                          settings_record)

log = logging.getLogger("cachemedicpp")


def measure_prompt(lm: hf.LoadedModel, s: Setup, op, op_paired, p_idx: int, ids: torch.Tensor) -> dict:
    """One unit of work: the sensitivity drifts (every delta x direction x defense) and the map's
    gammas of prompt `p_idx`."""
    clean = clean_state(lm, s, ids)
    sens, ref = sensitivity.measure(lm, s, clean, op, op_paired, p_idx)
    amp = amplification.measure(lm, s, clean, op, ref, p_idx)
    return {"prompt_index": p_idx, "sensitivity": sens, "amplification": amp,
            "repair_clean_drift": drift(ref.repaired.view(1, -1), ref.clean, ref.topk)[0],
            "segment_positions": {str(l): int(clean.time[l].sum()) for l in s.layers}}


def aggregate(units: list[dict], s: Setup, paired: bool, settings: dict) -> dict:
    """The metrics of the stability metrics file (results.StabilityMetrics) from every prompt's unit."""
    # positions of the segment held in each layer's cache (fewer in sliding-window layers)
    settings["segment_positions"] = units[0]["segment_positions"]
    return {SENS_KEY: sensitivity.block(units, s, paired), AMP_KEY: amplification.block(units, s),
            STAB_SETTINGS_KEY: settings}


# --------------------------------------------------------------------------------------------------
# progress


def prompt_key(i: int) -> str:
    """The unit key of prompt `i` in the progress file."""
    return f"prompt_{i:04d}"


def load_progress(prog: Progress, saved: dict | None, total: int) -> None:
    """Keep the finished prompts of `saved` (the session's resumed record) that this run measures."""
    if prog.resume(saved):
        keys = {prompt_key(i) for i in range(total)}
        prog.keep("units", lambda key, unit: key in keys)


def ordered_units(prog: Progress, total: int) -> list[dict]:
    """The finished prompts' units in prompt order (the aggregation's order, whatever order they were run in)."""
    units = prog.units()
    return [units[prompt_key(i)] for i in range(total) if prompt_key(i) in units]


# --------------------------------------------------------------------------------------------------
# the phase


def _load_operator(cfg: Config, lm: hf.LoadedModel, path: Path | str | None, expected_hash: str):
    """The repair operator of a checkpoint, or the untrained identity operator when `path` is None."""
    if path is None:
        op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    else:
        op, payload = repair.load_repair_checkpoint(str(path), cfg.repair.to_dict(), lm.arch, cfg.seed)
        if payload.get("config_hash") not in (None, expected_hash):
            log.warning("stability: checkpoint %s was written under config %s, its run dir is %s",
                        path, payload.get("config_hash"), expected_hash)
    op.requires_grad_(False)
    return op.to(lm.device).eval()


def run(cfg: Config, run_dir: str | Path, *, resume: bool = True, config_path: str | None = None,
        sweep_pause: Path | None = None, paired_run_dir: str | None = None, command: str | None = None) -> int:
    """Measure the logit sensitivity curves and amplification maps of a run; EXIT_OK or EXIT_PAUSED."""
    st = cfg.stability
    map_delta(measured_deltas(st.delta_norms))  # bad input fails before the run dir is touched
    paired = check_paired_run(cfg, paired_run_dir if paired_run_dir is not None else st.paired_run_dir)
    with PhaseSession(cfg, run_dir, PHASE, config_path, command, sweep_pause, resume=resume) as session, \
            torch.no_grad():
        rd = session.rd
        total = int(st.num_prompts)
        hb = session.heartbeat(total)  # from here on, a crash leaves a `failed` heartbeat
        ckpt, repair_fields = repair_checkpoint(rd, bool(cfg.eval.allow_missing_checkpoint))
        heuristic, h_origin = best_heuristic(rd, st.heuristic_fallback)
        lm = hf.load_model(cfg.model.to_dict(), cfg.device, "float32")
        s = build_setup(cfg, lm.arch, int(lm.model.get_output_embeddings().weight.shape[0]), heuristic)
        if defenses.get(heuristic).needs.calibration:  # the eval's calibration, reused (computed here if eval did not run)
            s.cal = calibration.obtain(cfg, lm, rd.calibration)
        prompts, prompt_info = load_prompts(cfg, lm.tokenizer)
        op = _load_operator(cfg, lm, rd.resolve(ckpt["path"]), cfg.hash)
        # the paired config equals this one except train.lambda_contr, so this repair section builds it
        op_paired = _load_operator(cfg, lm, paired["checkpoint"], paired["config_hash"]) if paired else None
        settings = settings_record(cfg, s, lm.arch, repair_fields, paired, h_origin, prompt_info)

        progress = Progress(rd.progress(PHASE), cfg, total, ckpt, {"setup": fingerprint(s, paired, prompt_info)})
        load_progress(progress, session.saved, total)
        if not progress.units() and rd.stability_metrics.is_file():
            rd.stability_metrics.unlink()  # stale results of a discarded computation
        hb.elapsed_before = progress.elapsed
        hb.latest = {"checkpoint": ckpt["path"], "state": rd.rel(progress.path)}
        session.step = done = progress.completed
        hb.beat("resumed" if done else "running", done, reason="resume" if done else "start", force=True)
        log.info("stability: %d/%d prompts done; layers %s, heads %s, deltas %s, heuristic %s (%s)",
                 done, total, s.layers, s.heads, s.deltas, heuristic, h_origin)

        def work(i: int) -> None:
            # looked up on the package, so that a test can wrap stability.measure_prompt
            progress.units()[prompt_key(i)] = package.measure_prompt(lm, s, op, op_paired, i, prompts[i])
            progress.save("running", hb.elapsed())

        pending = [i for i in range(total) if prompt_key(i) not in progress.units()]
        code = run_units(session, pending, name=prompt_key, work=work,
                         save=lambda: progress.save("paused", hb.elapsed()), state=progress.path, total=total,
                         unit="prompt")
        if code != EXIT_OK:
            return code

        metrics = aggregate(ordered_units(progress, total), s, paired is not None, settings)
        atomic_write_json(rd.stability_metrics, {RUN_ID: session.run_id, CONFIG_HASH: cfg.hash, METRICS: metrics,
                                                 SETTINGS: settings})
        progress.save("completed", hb.elapsed())
        hb.beat("completed", total, reason="done", force=True)
        _summary(metrics[SENS_KEY], s, paired is not None, hb.elapsed())
        return EXIT_OK


def _summary(sens: dict, s: Setup, paired: bool, seconds: float) -> None:
    log.info("stability: done in %.1fs; logit sensitivity (mean top-%d drift):", seconds, s.topk)
    for p in sens["points"]:
        extra = f"  no_contr {p['cachemedic_no_contr']:.4g}" if paired else ""
        log.info("  delta %-5g baseline %.4g  %s %.4g  cachemedic %.4g (vs repaired clean %.4g)%s", p["delta_norm"],
                 p["baseline"], s.heuristic, p["heuristics"][s.heuristic], p["cachemedic"],
                 p["cachemedic_vs_repaired_clean"], extra)


def main(argv: Sequence[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--paired_run_dir", default=None,
                       help="run dir of the same config trained with train.lambda_contr = 0 "
                            "(overrides stability.paired_run_dir)")

    def body(cfg: Config, run_dir: str, a) -> int:
        cmd = f"python -m cachemedicpp.{PHASE} " + " ".join(sys.argv[1:] if argv is None else argv)
        return run(cfg, run_dir, resume=a.resume, config_path=a.config, paired_run_dir=a.paired_run_dir,
                   command=cmd.strip())

    return run_phase(PHASE, "Logit sensitivity curves and amplification maps of the KV cache.", argv, body,
                     extra_args=extra)
