"""pipeline: train -> eval -> stability -> plots for one config and run dir (the quickstart, and the
unit of work of a sweep). Each phase resumes by default; a pause in any phase stops the pipeline
with exit code 3, and rerunning the same command continues where it stopped.

    python -m cachemedicpp.pipeline --config <YAML> --run_dir <DIR> [--resume|--no-resume]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from cachemedicpp.cli import EXIT_OK, run_phase
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.fileio import read_jsonl
from cachemedicpp.rundir import RunDir

PHASES = ("train", "eval", "stability", "plots")


def phase_done(run_dir: str | Path, phase: str) -> bool:
    """Whether a phase's outputs are complete (so a resumed sweep can skip it without loading a model):
    plots by its report, the others by a last heartbeat that says completed."""
    rd = RunDir(run_dir)
    if phase == "plots":
        return rd.report.is_file()
    hb = read_jsonl(rd.timeline(phase))
    return bool(hb) and hb[-1].get("status") == "completed"


def run_one(phase: str, cfg: Config, run_dir: str | Path, *, resume: bool, config_path: str | None,
            sweep_pause: Path | None = None, extra: dict | None = None) -> int:
    # each stage is imported when it runs, not with this module: watch and the sweep's planning read PHASES
    # and must not pay for torch and transformers
    if phase == "train":
        from cachemedicpp import train

        return train.run(cfg, run_dir, resume=resume, config_path=config_path, sweep_pause=sweep_pause)
    if phase == "eval":
        from cachemedicpp import eval as eval_

        return eval_.run(cfg, run_dir, resume=resume, config_path=config_path, sweep_pause=sweep_pause)
    if phase == "stability":
        from cachemedicpp import stability

        return stability.run(cfg, run_dir, resume=resume, config_path=config_path, sweep_pause=sweep_pause,
                             **(extra or {}))
    if phase == "plots":
        from cachemedicpp import plots

        return plots.run(run_dir)
    raise ValueError(f"unknown phase {phase!r}; known: {PHASES}")


def run(cfg: Config, run_dir: str | Path, *, resume: bool = True, config_path: str | None = None,
        phases: Sequence[str] = PHASES, sweep_pause: Path | None = None, stability_extra: dict | None = None,
        verbose: bool = True) -> int:
    t0 = time.perf_counter()
    took: dict[str, float] = {}
    for phase in phases:
        t = time.perf_counter()
        if verbose:
            print(f"== {phase} ==", file=sys.stderr, flush=True)
        rc = run_one(phase, cfg, run_dir, resume=resume, config_path=config_path, sweep_pause=sweep_pause,
                     extra=stability_extra if phase == "stability" else None)
        took[phase] = time.perf_counter() - t
        if verbose:
            print(f"== {phase}: exit {rc} after {took[phase]:.1f}s ==", file=sys.stderr, flush=True)
        if rc != EXIT_OK:
            return rc
    if verbose:
        _where(RunDir(run_dir), time.perf_counter() - t0, took)
    return EXIT_OK


def _where(rd: RunDir, seconds: float, took: dict[str, float]) -> None:
    phases = ", ".join(f"{p} {t / 60:.1f}" for p, t in took.items())
    print(f"\ncachemedicpp: pipeline finished in {seconds / 60:.1f} min ({phases}). Results:")
    print(f"  report   {rd.report}")
    print(f"  figures  {rd.figures}/")
    print(f"  tables   {rd.tables}/")
    print(f"  metrics  {rd.task_metrics}, {rd.stability_metrics}")


def main(argv: Sequence[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, in order")

    def body(cfg, run_dir, a):
        phases = [x.strip() for x in a.phases.split(",") if x.strip()]
        bad = [x for x in phases if x not in PHASES]
        if bad:
            raise ConfigError(f"--phases: unknown phase(s) {bad}; known: {list(PHASES)}")
        return run(cfg, run_dir, resume=a.resume, config_path=a.config, phases=phases)

    return run_phase("pipeline", "Run train -> eval -> stability -> plots for one config.", argv, body,
                     extra_args=extra)


if __name__ == "__main__":
    raise SystemExit(main())
