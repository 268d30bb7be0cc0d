"""sweep: many runs of the pipeline (train -> eval -> stability -> plots), resumable, on one machine or
on a Ray cluster, with a multi-seed and paired-ablation summary (SPEC §10).

    python -m cachemedicpp.sweep --sweep_config <YAML> --out_root <DIR> [--resume|--no-resume]
                                 [--launcher local|ray] [--dry_run]

Each run is the base config + the sweep's `overrides` + the run's `overrides` (dot keys, the same function
as `--set`), resolved like any config (so `eval.ood_protocol` restricts the training mixture to the
split's train types and evaluates on its held-out type). Run `r` lives in `<out_root>/<sweep_name>/<r>/`.

A run with `paired_with: <twin>` is the lambda_contr > 0 side of an ablation pair: its twin (same config
but train.lambda_contr = 0, checked) runs first and its run dir is handed to stability, so the sensitivity
curve carries the no-contraction operator beside the trained one. Pairs are named explicitly, never
guessed from run names.

Pause: `<sweep dir>/control/pause.request` (or SIGTERM/SIGINT, or budget.max_wall_hours running out)
makes the running phase save its progress and stop; the sweep then writes `control/pause_ack_sweep.json`,
removes the request and exits 3. Rerunning the same command continues where it stopped; runs whose
phases are all complete are skipped from their files alone, without loading a model.

Progress: `<sweep dir>/logs/sweep_heartbeat.json(l)` (step = runs completed, unit = run/phase) and
`<sweep dir>/summary.json` + `summary.md`, rewritten after every run.

Modules, in the order a sweep uses them: `plan` (the validated sweep file), `jobs` (one run, in-process or
in a Ray worker), `summary` (summary.json / summary.md), `runner` (the sweep's lifecycle and the command).
"""

from cachemedicpp.sweep.plan import PHASES, Plan, RunSpec, load_plan, order_runs
from cachemedicpp.sweep.jobs import import_ray, run_job
from cachemedicpp.sweep.summary import (Summary, ablation_summary, bootstrap_ci, describe, group_summary,
                                        numeric_metrics, render_markdown, run_metrics)
from cachemedicpp.sweep.runner import Sweep, dry_run, main, run

__all__ = ["PHASES", "Plan", "RunSpec", "load_plan", "order_runs", "import_ray", "run_job", "Summary",
           "ablation_summary", "bootstrap_ci", "describe", "group_summary", "numeric_metrics", "render_markdown",
           "run_metrics", "Sweep", "dry_run", "main", "run"]
