"""python -m cachemedicpp.eval: task robustness under the corruption grid, paired and resumable (SPEC §7).

    python -m cachemedicpp.eval --config <YAML> --run_dir <DIR> [--resume|--no-resume] [--set k=v]

`grid` builds the grid and scores one example (the unit of work), `aggregate` turns the per-example
values into the metrics (a pure function), `overhead` times the defenses, `stage` runs the phase.
"""

from cachemedicpp.eval.aggregate import CI_ALPHA, aggregate, best_heuristic, unit_matrices
from cachemedicpp.eval.grid import (CLEAN, PHASE, REPAIR_NAME, Cell, EvalContext, Row, build_context,
                                    cell_rows, defense_rng, eval_defenses, exposure, make_grid, run_batch,
                                    score_example)
from cachemedicpp.eval.overhead import measure_overhead, overhead_protocol
from cachemedicpp.eval.stage import (examples_fingerprint, load_operator, load_progress, main, resolve_checkpoint,
                                     run, settings, write_results)

__all__ = [
    "CI_ALPHA", "CLEAN", "PHASE", "REPAIR_NAME",
    "Cell", "EvalContext", "Row", "make_grid", "eval_defenses", "build_context", "defense_rng", "cell_rows",
    "run_batch", "exposure", "score_example",
    "aggregate", "best_heuristic", "unit_matrices",
    "measure_overhead", "overhead_protocol",
    "resolve_checkpoint", "load_operator", "examples_fingerprint", "load_progress", "settings", "write_results",
    "run", "main",
]
