"""The names of the files plots writes. The run dir owns the folders (`RunDir.figure`, `RunDir.table`,
`RunDir.report`); these names are plots' own outputs, spelled here only."""

from __future__ import annotations

FIG_SCORE_VS_EPS = "figA_score_vs_eps.png"
FIG_PARETO = "figB_clean_vs_overhead_pareto.png"
FIG_SENSITIVITY = "figC_logit_sensitivity.png"
FIG_AMPLIFICATION = "figD_amplification_map.png"
# A and B are drawn for every run; C and D (the last two) only when the run has stability metrics
FIGURES = (FIG_SCORE_VS_EPS, FIG_PARETO, FIG_SENSITIVITY, FIG_AMPLIFICATION)
FIG_BIT_POSITION = "figE_bit_position_damage.png"  # only when the metrics have bit_class_scores (eval.bit_classes)
# only when a recomputing defense (checksum_recompute, detect_recompute) was evaluated at rest
FIG_COST_FRONTIER = "figF_recovery_vs_recompute_cost.png"
OPTIONAL_FIGURES = (FIG_BIT_POSITION, FIG_COST_FRONTIER)

TABLE_MAIN = "table_main_results.tex"
TABLE_ABLATION = "table_ablation_summary.tex"
TABLES = (TABLE_MAIN, TABLE_ABLATION)
