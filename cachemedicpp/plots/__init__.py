"""plots: figures, tables and a short report from a run's metrics (SPEC §9).

`python -m cachemedicpp.plots --run_dir D` reads the run's task metrics (required), its stability metrics and
its resolved config (operator settings) when present, and writes the locked names (`outputs.py`) under the run
dir's figure and table folders, plus the report. Plots read metrics, never model state.

Numbers that were not measured are shown as such, never made up (a null `overhead` turns figure B into
clean score vs robustness AUC and the title says so; a run without stability metrics gets no figures C and
D, and the report says stability was not measured).

    inputs.py   read and validate the metrics into `Inputs`
    figures.py  the figures (PNG bytes): A, B always, C, D with stability metrics, E (bit positions) with
                bit-class scores
    tables.py   the two LaTeX tables
    report.py   the markdown report
    text.py     number formatting they share
    outputs.py  the output file names
    stage.py    render, run, main
"""

from __future__ import annotations

from cachemedicpp.plots.figures import (fig_amplification, fig_bit_position, fig_pareto, fig_score_vs_eps,
                                        fig_sensitivity, pareto_front)
from cachemedicpp.plots.inputs import Curves, Inputs, SensPoint, load_inputs
from cachemedicpp.plots.outputs import FIG_BIT_POSITION, FIGURES, OPTIONAL_FIGURES, TABLES
from cachemedicpp.plots.report import report_md
from cachemedicpp.plots.stage import main, render, run
from cachemedicpp.plots.tables import table_ablation, table_main, tex, tnum
from cachemedicpp.plots.text import fmt, layer_ranges

__all__ = ["Curves", "FIG_BIT_POSITION", "FIGURES", "Inputs", "OPTIONAL_FIGURES", "SensPoint", "TABLES",
           "fig_amplification", "fig_bit_position", "fig_pareto",
           "fig_score_vs_eps", "fig_sensitivity", "fmt", "layer_ranges", "load_inputs", "main", "pareto_front",
           "render", "report_md", "run", "table_ablation", "table_main", "tex", "tnum"]
