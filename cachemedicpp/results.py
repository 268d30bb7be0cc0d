"""The results files of a run, described once: `metrics/task_metrics.json` and `metrics/stability_metrics.json`.

Each file has one writer (`eval.run`, `stability.run`) and several readers (plots, sweep, stability's
choice of heuristic). This module is the single description they share:

- TypedDicts, one per object, with ONE comment per key: `Annotated[type, "what it means"]` (units, which
  defenses, which interval). A dict metadata item adds JSON-Schema keywords (a pattern, a minimum).
  Keys that name things (a defense, a task, a corruption type) are `dict[str, X]` values, and the
  comment says what the keys are.
- Constants for the key names readers look up, so writer and readers import one spelling.
- `json_schema(td)`: a TypedDict -> a JSON Schema (draft 2020-12) whose descriptions are those comments.
  `schemas/task_metrics.schema.json`, `schemas/stability_metrics.schema.json` and the common envelope
  `schemas/metric_record.schema.json` are generated from here: `python -m cachemedicpp.results`
  (`--check` only reports stale files). Do not edit them by hand.
- `validate(doc, which)`: the problems of a document against a checked-in schema, each naming its key.

Objects are closed (`additionalProperties: false`): a key a writer adds must be described here first.
Keys a writer does not always write are `NotRequired`; values it may leave empty are `X | None`.

Why one long module: the description is the schema of two files that share their envelope and most
record types; split up, a reader would have to assemble one file's format from several places.
"""

import argparse
import collections.abc
import json
import re
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

import jsonschema
from jsonschema.exceptions import best_match

try:  # Python >= 3.11
    from typing import NotRequired, Required, TypedDict, get_args, get_origin, get_type_hints, is_typeddict
except ImportError:  # Python 3.10: the backport, whose TypedDict understands its own NotRequired
    from typing_extensions import (NotRequired, Required, TypedDict, get_args, get_origin,  # type: ignore
                                   get_type_hints, is_typeddict)

from cachemedicpp.config import SCHEMA_DIR, load_schema

DRAFT = "https://json-schema.org/draft/2020-12/schema"

# --------------------------------------------------------------------------------------------------
# names readers and writers share

TASK_METRICS_SCHEMA = "task_metrics.schema.json"  # under schemas/
STABILITY_METRICS_SCHEMA = "stability_metrics.schema.json"
METRIC_RECORD_SCHEMA = "metric_record.schema.json"  # the envelope both files share

# envelope (both files)
RUN_ID, CONFIG_HASH, METRICS, SETTINGS = "run_id", "config_hash", "metrics", "settings"

# task_metrics.json: metrics[...]
BEST_HEURISTIC_NAME = "best_heuristic_name"  # metrics key: the best baseline chosen on validation data (or null)
BEST_HEURISTIC_SERIES = "best_heuristic"  # entry/series label standing for that baseline in AUC maps and curves
NO_DEFENSE, CACHEMEDIC = "no_defense", "cachemedic"  # defense names of the baseline and the learned repair
ORACLE_DROP = "oracle_drop"  # defense name of the ceiling (never a candidate for the best baseline)
CHECKSUM_RECOMPUTE = "checksum_recompute"  # exact recovery: per-block checksums, failing blocks recomputed
DETECT_RECOMPUTE = "detect_recompute"  # family D's detector as an alarm: the blocks it flags are recomputed
RECOMPUTE_COST = "recompute_cost"  # metrics key: what checksum_recompute's recomputations cost over the grid
DETECT_RECOMPUTE_COST = "detect_recompute_cost"  # metrics key: the same for detect_recompute
DETECTOR = "detector"  # metrics key: the detecting operator's (family D) recall and false positives per cell
BIT_CLASS_SCORES = "bit_class_scores"  # metrics key: figure E, bitflip scored per bit class at one flip rate
ROBUSTNESS_AUC, ROBUSTNESS_AUC_CI = "robustness_auc", "robustness_auc_ci"
ROBUSTNESS_AUC_BY_TASK, ROBUSTNESS_AUC_BY_TYPE = "robustness_auc_by_task", "robustness_auc_by_type"
CLEAN_REGRESSION, CLEAN_SCORES = "clean_regression", "clean_scores"
PAIRED_BOOTSTRAP, PAIRED_BOOTSTRAP_BY_TYPE, OVERHEAD = "paired_bootstrap", "paired_bootstrap_by_type", "overhead"
SCORE_VS_EPS, SCORE_VS_EPS_BY_TASK = "score_vs_eps", "score_vs_eps_by_task"
CACHEMEDIC_MINUS_NO_DEFENSE = "cachemedic_minus_no_defense"  # paired_bootstrap entries
CACHEMEDIC_MINUS_BEST_HEURISTIC = "cachemedic_minus_best_heuristic"
BEST_BASELINE_CHOICE = "best_baseline_choice"  # how best_heuristic_name was chosen (validation grid)
DEFENSE_GROUPS = "defense_groups"  # {defense: one of DEFENSE_GROUP_NAMES}
DAMAGE, DAMAGE_BY_TYPE = "damage", "damage_by_type"  # AUC lost to corruption: clean ceiling - no_defense
RECOVERED_FRACTION, RECOVERED_FRACTION_BY_TYPE = "recovered_fraction", "recovered_fraction_by_type"
EXPOSURE, EXPOSURE_EVICTED = "exposure", "exposure_evicted"  # masked entries held / no longer held (sliding layers)
SLIDING_WINDOW = "sliding_window"  # settings key: the sliding-window layers among the corruptible ones

# the groups of metrics.defense_groups (each registered defense names its own: defenses/)
GROUP_BASELINE = "baseline"  # no_defense
GROUP_REFERENCE = "reference heuristic (oracle region)"  # reset_clear, smoothing, ...: act on the corruption's region
GROUP_CALIBRATED = "calibrated baseline"  # range_clamp, norm_outlier_drop: no oracle, calibrated on clean caches
GROUP_CALIBRATED_REPAIR = "calibrated repair"  # calibrated_repair, denoise, ...: entries restored from the clean model
GROUP_CEILING = "ceiling"  # oracle_drop: attention ignores exactly the changed entries
GROUP_LEARNED = "learned"  # cachemedic
GROUP_RECOMPUTE = "exact recovery (checksum + recompute)"  # checksum_recompute: pays a forward per faulted cache
GROUP_DETECT_RECOMPUTE = "detect + recompute (no checksums)"  # detect_recompute: recomputes what the detector flags
DEFENSE_GROUP_NAMES = (GROUP_BASELINE, GROUP_REFERENCE, GROUP_CALIBRATED, GROUP_CEILING, GROUP_LEARNED,
                       GROUP_RECOMPUTE, GROUP_DETECT_RECOMPUTE, GROUP_CALIBRATED_REPAIR)

# task_metrics.json: settings[...]
CALIBRATION, VALIDATION, OOD_SPLIT = "calibration", "validation", "ood_split"

# stability_metrics.json: metrics[...]
SENS_KEY = "stability.logit_sensitivity"
AMP_KEY = "stability.amplification_map"
STAB_SETTINGS_KEY = "stability.settings"
MAP_DEFENSES = ("baseline", "cachemedic", "cachemedic_vs_clean_no_defense")  # the maps of AMP_KEY


# --------------------------------------------------------------------------------------------------
# the envelope

RunId = Annotated[str, "id of the run directory that wrote the file (run_record.json)", {"minLength": 1}]
ConfigHash = Annotated[str, "hash of the resolved config the file was computed under (locations excluded)",
                       {"pattern": "^[0-9a-f]{16}$"}]


class MetricRecord(TypedDict):
    """The envelope of a metrics file (task_metrics.json, stability_metrics.json).

    The full contents of each file are described by task_metrics.schema.json and
    stability_metrics.schema.json (generated from cachemedicpp/results.py)."""

    run_id: RunId
    config_hash: ConfigHash
    metrics: Annotated[dict[str, Any], "the measured numbers (see the file's own schema)"]
    settings: Annotated[dict[str, Any], "how they were measured: protocol, seeds, sources (see the file's own schema)"]


# --------------------------------------------------------------------------------------------------
# task_metrics.json


class TaskCurveRow(TypedDict):
    """One grid cell of one task: its value, normalised score and bootstrap interval."""

    task: Annotated[str, "task name (wikitext2_ppl, sst2_prompted, needle_long_context, kv_retrieval)"]
    corruption_type: Annotated[str, "corruption type of the cell, or 'clean' for the uncorrupted cell (eps 0)"]
    epsilon: Annotated[float, "corruption severity of the cell (0 for clean cells)"]
    defense: Annotated[str, "defense of the cell (no_defense, a reference heuristic, a calibrated baseline, "
                            "oracle_drop, or cachemedic; groups in metrics.defense_groups)"]
    value: Annotated[float, "task value from the mean over examples: perplexity (wikitext2_ppl), or accuracy / "
                            "fraction recalled (kv_retrieval) in [0, 1]"]
    score: Annotated[float, "normalised score: accuracy as is; perplexity as ppl_clean_no_defense / ppl (not clipped)"]
    n: Annotated[int, "examples of the task averaged in this cell"]
    ci_low: Annotated[float, "lower end of the 95% percentile bootstrap interval of `score` (examples resampled)"]
    ci_high: Annotated[float, "upper end of the 95% percentile bootstrap interval of `score`"]


class CurveCI(TypedDict):
    """A 95% percentile bootstrap band around a curve, one value per eps."""

    low: Annotated[list[float], "lower ends, aligned with `eps`"]
    high: Annotated[list[float], "upper ends, aligned with `eps`"]


class CurveBlock(TypedDict):
    """Normalised score vs corruption severity: mean over corruption types at each eps > 0, the clean cell
    at eps 0."""

    eps: Annotated[list[float], "severities, ascending (eval.corruption_eval.eps, de-duplicated)"]
    no_defense: Annotated[list[float] | None, "score of no_defense per eps"]
    best_heuristic: Annotated[list[float] | None,
                              "score of the best baseline (best_heuristic_name, chosen on validation data) per eps; "
                              "null when no candidate was evaluated"]
    cachemedic: Annotated[list[float] | None, "score of the learned repair per eps; null when it was not evaluated"]
    per_defense: Annotated[dict[str, list[float]], "keys: every evaluated defense; score per eps"]
    ci: Annotated[dict[str, CurveCI],
                  "keys: every evaluated defense, plus best_heuristic when a best baseline was chosen; 95% "
                  "percentile bootstrap band of the curve (one resample of examples per task shared by all "
                  "defenses)"]


class PairedDifference(TypedDict):
    """Paired bootstrap of cachemedic minus another defense (the same example resamples for both)."""

    metric: Annotated[Literal["robustness_auc", "clean_score"],
                      "what is compared: robustness_auc, or clean_score (clean_regression)"]
    other: Annotated[str, "the defense subtracted (no_defense, or the best baseline's name)"]
    diff: Annotated[float, "point estimate: cachemedic minus other"]
    ci_low: Annotated[float, "lower end of the 95% percentile bootstrap interval of the difference"]
    ci_high: Annotated[float, "upper end of the 95% percentile bootstrap interval of the difference"]
    n: Annotated[int, "examples over all tasks behind the bootstrap"]
    samples: Annotated[int, "bootstrap resamples (eval.bootstrap_samples)"]
    frac_samples_le_0: Annotated[float, "fraction of resampled differences <= 0 (a one-sided bootstrap p-value for "
                                        "cachemedic > other)"]


class PairedBootstrap(TypedDict):
    """Paired differences of cachemedic against the baselines. Empty when cachemedic was not evaluated;
    the best_heuristic entries need a chosen best baseline (best_heuristic_name)."""

    cachemedic_minus_no_defense: NotRequired[Annotated[PairedDifference, "robustness AUC, cachemedic - no_defense"]]
    cachemedic_minus_best_heuristic: NotRequired[Annotated[PairedDifference,
                                                           "robustness AUC, cachemedic - best baseline"]]
    clean_cachemedic_minus_no_defense: NotRequired[Annotated[PairedDifference,
                                                             "clean score (clean_regression), cachemedic - no_defense"]]
    clean_cachemedic_minus_best_heuristic: NotRequired[Annotated[PairedDifference,
                                                                 "clean score, cachemedic - best baseline"]]


class PairedBootstrapAUC(TypedDict):
    """Paired robustness-AUC differences over one corruption type's cells (against the overall best baseline)."""

    cachemedic_minus_no_defense: NotRequired[Annotated[PairedDifference, "robustness AUC, cachemedic - no_defense"]]
    cachemedic_minus_best_heuristic: NotRequired[Annotated[PairedDifference,
                                                           "robustness AUC, cachemedic - best baseline"]]


class OverheadEntry(TypedDict):
    """Cost of one defense: continuations scored over a corrupted, defended cache (the clean prefill excluded)."""

    tokens_per_sec: Annotated[float | None, "continuation tokens per wall second (null when no time elapsed)"]
    wall_sec: Annotated[float, "wall seconds of the timed runs"]
    peak_mem_mb: Annotated[float, "peak memory in MiB during the timed runs (see peak_mem_method)"]
    peak_mem_method: Annotated[str, "how peak_mem_mb was measured (CUDA allocator peak, or CPU peak RSS)"]
    tokens: Annotated[int, "continuation tokens scored in the timed runs"]
    recompute_tokens: NotRequired[Annotated[int, "recomputing defenses only: tokens their recomputation forwards "
                                                 "processed in the timed runs (included in wall_sec)"]]
    recompute_sec: NotRequired[Annotated[float, "recomputing defenses only: wall seconds of those recomputation "
                                                "forwards (part of wall_sec)"]]


class NonfiniteCell(TypedDict):
    """A grid cell whose model output had non-finite logits (a flipped exponent bit can make it NaN)."""

    corruption_type: Annotated[str, "corruption type of the cell, or 'clean'"]
    epsilon: Annotated[float, "severity of the cell"]
    defense: Annotated[str, "the defense of the cell"]
    examples: Annotated[int, "examples whose output had a position with non-finite logits; such a position is "
                              "scored as the uniform distribution (no information)"]


class DetectorCell(TypedDict):
    """The detecting operator's decisions in one grid cell (at-rest persistence), over every example."""

    corruption_type: Annotated[str, "corruption type of the cell, or 'clean'"]
    epsilon: Annotated[float, "severity of the cell"]
    n: Annotated[int, "examples counted"]
    changed_entries: Annotated[int, "protected-layer context entries (layer, KV head, position; sinks excluded) the "
                                    "corruption changed, summed over examples"]
    recall: Annotated[float | None, "fraction of the changed entries the detector gated (null when none changed)"]
    false_positive_rate: Annotated[float | None, "fraction of the untouched entries the detector gated"]
    roc_auc: NotRequired[Annotated[float | None, "the detector's per-entry ROC-AUC (its score against the changed "
                                                 "entries, ties counted half) within each example's cache, mean over "
                                                 "the examples with changed and untouched entries (null: none)"]]
    roc_auc_ci: NotRequired[Annotated[list[float] | None, "95% percentile bootstrap interval of roc_auc over examples"]]


class DetectorStats(TypedDict):
    """What the detecting operator (repair family D) saw: recall and false positives against the entries the
    corruption really changed, per grid cell."""

    by_cell: Annotated[list[DetectorCell], "one entry per cachemedic grid cell"]
    threshold: Annotated[dict[str, float], "keys: protected layer; the gate's threshold tau (set on clean training "
                                           "windows after training)"]
    sink_tokens: Annotated[int, "first positions never gated (left out of the counts)"]
    how: Annotated[str, "what is counted"]


class RecomputeCell(TypedDict):
    """checksum_recompute's recomputations in one grid cell (at-rest persistence)."""

    corruption_type: Annotated[str, "corruption type of the cell, or 'clean'"]
    epsilon: Annotated[float, "severity of the cell"]
    n: Annotated[int, "examples behind the means"]
    recomputed_fraction: Annotated[float, "fraction of examples where a block failed its checksum (something was "
                                          "recomputed)"]
    tokens_mean: Annotated[float, "mean forward tokens recomputed per example (0 when no block failed; selective: "
                                  "the failing blocks' tokens, from position 0 where a sliding-window layer no "
                                  "longer holds a block's window; full: the context length)"]
    blocks_failed_mean: Annotated[float, "mean blocks (block x layer) that failed their checksum per example "
                                         "(detect_recompute: blocks of positions that raised the alarm)"]
    corrupted_block_tokens_mean: Annotated[float, "the oracle's minimum: mean tokens of the blocks of positions the "
                                                  "corruption changed in any layer (what a recomputation that knew "
                                                  "the damage would forward; 0 on clean cells)"]
    seconds_mean: NotRequired[Annotated[float, "mean wall seconds of the recomputations that ran (eval.recompute_exact: "
                                               "the real forwards; absent when the clean prefill stood in for all)"]]
    corrupted_blocks_mean: NotRequired[Annotated[float, "mean blocks of block_size positions holding an entry the "
                                                        "corruption changed in any layer, per example (0 on clean "
                                                        "cells; absent when the run's progress predates the count)"]]
    block_recall: NotRequired[Annotated[float, "recalled over corrupted blocks, each summed over the examples: a "
                                               "corrupted block is recalled when the recomputation covers it (every "
                                               "one when it redoes the whole context, the requested ones when "
                                               "selective, none when nothing failed); absent when no block was "
                                               "corrupted or the run's progress predates the count"]]


class RecomputeCost(TypedDict):
    """What a recomputing defense costs over the grid: the recomputation whenever a block fails its checksum
    (checksum_recompute) or the detector flags one (detect_recompute), of the failing blocks or of the whole
    context (baseline.recompute_mode, recompute.py)."""

    defense: Annotated[str, "the defense (checksum_recompute or detect_recompute)"]
    block_size: Annotated[int, "cache positions per checksummed block (baseline.checksum_block_size)"]
    persistence: Annotated[Literal["at_rest", "on_read"], "the evaluation's persistence"]
    context_tokens_mean: Annotated[float, "mean context tokens per example: the cost of one full recomputation"]
    by_cell: Annotated[list[RecomputeCell], "one entry per grid cell of the defense; empty under on_read "
                                            "persistence (verified on every read, not counted)"]
    how: Annotated[str, "how the recomputed entries were obtained in the grid"]
    alarm_min_gated: NotRequired[Annotated[int, "detect_recompute: gated entries (protected layers and KV heads "
                                                "pooled) that make a block of positions raise the alarm, set on "
                                                "clean selection-split caches within the false-alarm budget"]]
    alarm_budget: NotRequired[Annotated[float, "detect_recompute: the false-alarm budget (baseline.alarm_budget)"]]
    alarm_caches: NotRequired[Annotated[int, "detect_recompute: clean selection-split caches the level was set on"]]


class ClassCI(TypedDict):
    """A 95% percentile bootstrap interval per bit class."""

    low: Annotated[list[float], "lower ends, aligned with `classes`"]
    high: Annotated[list[float], "upper ends, aligned with `classes`"]


class BitClassScores(TypedDict):
    """Figure E: the bitflip fault scored once per bit class at one severity (eval.bit_classes,
    eval.bit_class_eps), in grid cells of their own outside task_curves, the curves and the AUCs. The same
    elements are hit in every class (the draws of the bitflip cells at that eps); only the bit differs."""

    eps: Annotated[float, "severity of every bit-class cell (eval.bit_class_eps; null there: the largest eval eps)"]
    classes: Annotated[list[str], "bit classes, in eval.bit_classes order (sign, exponent, exponent_high, "
                                  "mantissa, all)"]
    per_defense: Annotated[dict[str, list[float]],
                           "keys: every evaluated defense; normalised score per class (aligned with `classes`), mean "
                           "over tasks"]
    ci: Annotated[dict[str, ClassCI], "keys: every evaluated defense; 95% percentile bootstrap interval per class "
                                      "(the resamples every interval of the file shares)"]
    by_task: Annotated[dict[str, dict[str, list[float]]],
                       "keys: task, then evaluated defense; that task's normalised score per class"]
    clean_no_defense: Annotated[float, "no_defense's clean score, mean over tasks (the ceiling, for reference)"]
    storage_format: Annotated[Literal["float32", "float16", "bfloat16"], "storage format whose bits were flipped"]
    cache_dtype: Annotated[str, "dtype the cache was computed in"]
    simulated: Annotated[bool, "whether that storage was simulated by cast, flip, cast back (format != cache dtype)"]
    flip_rate: Annotated[float, "per-element flip probability at `eps`"]
    burst: Annotated[int, "adjacent bits flipped per hit word (corruption.params.bitflip_burst)"]
    bits: Annotated[dict[str, list[int]], "keys: class; its bit indices in the storage word (0 = least significant)"]
    how: Annotated[str, "how the block was computed"]


DefenseGroup = Literal["baseline", "reference heuristic (oracle region)", "calibrated baseline", "ceiling", "learned",
                       "exact recovery (checksum + recompute)", "detect + recompute (no checksums)",
                       "calibrated repair"]
assert get_args(DefenseGroup) == DEFENSE_GROUP_NAMES


class Damage(TypedDict):
    """What the corruption costs: the robustness AUC lost between the clean ceiling and no_defense, with a
    95% percentile paired bootstrap over examples (the resamples every interval of the file shares)."""

    auc_clean: Annotated[float, "AUC of the flat curve at no_defense's clean score (its clean cell at every eps): "
                                "the ceiling a perfect defense reaches"]
    auc_no_defense: Annotated[float, "robustness AUC of no_defense (over the same cells)"]
    diff: Annotated[float, "the damage: auc_clean - auc_no_defense"]
    ci_low: Annotated[float, "lower end of the 95% percentile paired bootstrap interval of diff"]
    ci_high: Annotated[float, "upper end of the 95% percentile paired bootstrap interval of diff"]
    n: Annotated[int, "examples over all tasks behind the bootstrap"]


class RecoveredFraction(TypedDict):
    """The share of the damage a defense wins back, (AUC_defense - AUC_no_defense) / (AUC_clean -
    AUC_no_defense): 1 back at the clean ceiling, 0 no better than no defense, below 0 worse."""

    value: Annotated[float | None, "the fraction; null when the damage is 0"]
    ci_low: Annotated[float | None, "lower end of its 95% percentile paired bootstrap interval; null when the "
                                    "damage is 0"]
    ci_high: Annotated[float | None, "upper end of its 95% percentile paired bootstrap interval; null when the "
                                     "damage is 0"]


class BestBaselineChoice(TypedDict):
    """How best_heuristic_name was chosen: every candidate (reference heuristics and calibrated baselines
    evaluated; never oracle_drop or cachemedic) scored on a validation grid of held-in corruption types and
    validation examples separate from the test examples, then a fixed rule."""

    rule: Annotated[str, "the fixed rule applied to validation_auc"]
    types: Annotated[list[str], "corruption types of the validation grid (held-in types)"]
    examples: Annotated[int, "validation examples over all tasks"]
    validation_auc: Annotated[dict[str, float], "keys: candidate defense; its robustness AUC on the validation grid"]
    validation_auc_no_defense: Annotated[float, "robustness AUC of no_defense on the validation grid (for reference)"]
    validation_auc_cachemedic: NotRequired[Annotated[float, "robustness AUC of the learned operator on the validation "
                                                            "grid (never a candidate; it chooses between operator "
                                                            "families without the test grid)"]]
    chosen: Annotated[str | None, "the candidate chosen (= best_heuristic_name); null when none"]


class TaskMetrics(TypedDict):
    """metrics of task_metrics.json: a deterministic function of the per-example values, except `overhead`.
    Intervals are 95% percentile bootstraps over examples, one resample of example indices per task shared
    by every cell and defense (paired)."""

    task_curves: Annotated[list[TaskCurveRow], "one row per task x grid cell (defenses x (clean + types x eps)); "
                                               "figure E's bit-class cells are in bit_class_scores"]
    clean_metrics: Annotated[dict[str, dict[str, float]],
                             "keys: task, then defense; task value (perplexity or accuracy) on the clean cell"]
    clean_scores: Annotated[dict[str, dict[str, float]],
                            "keys: task, then defense; normalised score on the clean cell"]
    score_vs_eps: Annotated[CurveBlock, "normalised score vs eps, mean over tasks"]
    score_vs_eps_by_task: Annotated[dict[str, CurveBlock], "keys: task; that task's score vs eps"]
    robustness_auc: Annotated[dict[str, float],
                              "keys: every evaluated defense, plus best_heuristic (the chosen best baseline) when one "
                              "was chosen; unnormalised trapezoid area under score_vs_eps over eps"]
    robustness_auc_ci: Annotated[dict[str, tuple[float, float]],
                                 "keys as robustness_auc; [low, high] 95% percentile bootstrap interval of the AUC"]
    robustness_auc_by_task: Annotated[dict[str, dict[str, float]],
                                      "keys: task, then evaluated defense; AUC of that task's curve"]
    clean_regression: Annotated[dict[str, float],
                                "keys: evaluated defense; clean-cell normalised score, mean over tasks"]
    best_heuristic_name: Annotated[str | None,
                                   "the best baseline: the candidate (reference heuristic or calibrated baseline) "
                                   "chosen on the validation grid by best_baseline_choice.rule; null when no candidate "
                                   "was evaluated"]
    heuristic_auc: Annotated[float | None, "robustness_auc of best_heuristic_name on the test grid (null without one)"]
    best_baseline_choice: Annotated[BestBaselineChoice | None,
                                    "how best_heuristic_name was chosen; null when no validation ran (no candidate)"]
    defense_groups: Annotated[dict[str, DefenseGroup],
                              "keys: every evaluated defense; its group: baseline (no_defense), reference heuristic "
                              "(oracle region), calibrated baseline, ceiling (oracle_drop) or learned (cachemedic)"]
    damage: Annotated[Damage, "robustness AUC lost to corruption: clean ceiling - no_defense, over every type"]
    damage_by_type: Annotated[dict[str, Damage], "keys: evaluated corruption type; damage over that type's cells alone"]
    recovered_fraction: Annotated[dict[str, RecoveredFraction],
                                  "keys: every evaluated defense but no_defense; the share of the damage it recovers"]
    recovered_fraction_by_type: Annotated[dict[str, dict[str, RecoveredFraction]],
                                          "keys: evaluated corruption type, then every evaluated defense but "
                                          "no_defense; recovered fraction over that type's cells alone"]
    paired_bootstrap: Annotated[PairedBootstrap, "paired differences of cachemedic against the baselines"]
    robustness_auc_by_type: Annotated[dict[str, dict[str, float]],
                                      "keys: evaluated corruption type, then evaluated defense; AUC over that type's "
                                      "cells alone (eps 0: the shared clean cell)"]
    paired_bootstrap_by_type: Annotated[dict[str, PairedBootstrapAUC],
                                        "keys: evaluated corruption type; paired AUC differences over that type's "
                                        "cells; empty when cachemedic was not evaluated"]
    exposure: Annotated[dict[str, float],
                        "keys: task; fraction of the corruptible layers' context K/V entries (every context "
                        "position) inside the corruption masks and held in the layer's cache, mean over examples "
                        "and (type, eps) cells; positions a sliding-window layer no longer holds count as not "
                        "exposed (see exposure_evicted)"]
    exposure_evicted: NotRequired[Annotated[
        dict[str, float], "keys: task; fraction of the corruptible layers' context K/V entries inside the corruption "
                          "masks at positions a sliding-window layer no longer holds (the corruption and the defenses "
                          "never see them; not counted in exposure), same means; 0 without sliding-window layers"]]
    overhead: Annotated[dict[str, OverheadEntry] | None,
                        "keys: evaluated defense; wall-clock cost (the only non-deterministic block); null unless "
                        "eval.measure_overhead"]
    recompute_cost: NotRequired[Annotated[RecomputeCost, "checksum_recompute's recomputation cost per grid cell "
                                                         "(only when it was evaluated)"]]
    detect_recompute_cost: NotRequired[Annotated[RecomputeCost, "detect_recompute's recomputation cost per grid "
                                                                "cell, clean cells = false alarms (only when it was "
                                                                "evaluated)"]]
    nonfinite_outputs: NotRequired[Annotated[list[NonfiniteCell], "cells whose output had non-finite logits (scored as "
                                                                  "uniform there); empty when none"]]
    detector: NotRequired[Annotated[DetectorStats, "the detecting operator's recall and false positives per cell (only "
                                                   "for repair family D at rest)"]]
    bit_class_scores: NotRequired[Annotated[BitClassScores, "figure E: bitflip scored per bit class at one flip rate "
                                                            "(only when eval.bit_classes is not empty)"]]


class LmevalInfo(TypedDict):
    """An lm-evaluation-harness task (eval.tasks name lmeval:<task>)."""

    task: Annotated[str, "the lm-eval task name"]
    output_type: Annotated[str, "its output type: multiple_choice (accuracy kind) or loglikelihood_rolling (perplexity)"]
    num_fewshot: Annotated[int, "few-shot demonstrations lm-eval put in each context (eval.tasks[].few_shot)"]
    metric: Annotated[str, "lm-eval's per-document metric scored as x (multiple choice: acc or e.g. acc_norm)"]
    include_path: Annotated[str | None, "folder of custom YAML tasks (eval.tasks[].include_path; null: none)"]
    version: Annotated[str, "lm-eval version that built the requests"]


class TaskInfo(TypedDict):
    """One evaluated task: what was asked for and built. Keys after value_name depend on the task."""

    num_examples: Annotated[int, "examples requested (eval.tasks[].num_examples)"]
    n: Annotated[int, "examples built and scored (fewer when the source has fewer)"]
    few_shot: Annotated[int, "eval.tasks[].few_shot: demonstrations in front of each prompt (used by sst2_prompted)"]
    kind: Annotated[Literal["ppl", "accuracy"], "how raw values become a value and a score"]
    value_name: Annotated[Literal["perplexity", "accuracy", "fraction recalled"], "what `value` in task_curves is"]
    source: Annotated[str, "where the task's text came from ('offline:<path>' or 'hf:<repo>/<name>:<split>'; an lm-eval "
                          "task: 'lmeval:<task>:<dataset>:<split>')"]
    split: NotRequired[Annotated[Literal["test", "validation", "selection"], "the evaluation split the examples come "
                                 "from (data.SPLITS: disjoint parts of the text stream, rows and documents)"]]
    rows: NotRequired[Annotated[list[int], "sst2_prompted: [first, last) row of the SST-2 evaluation set scored"]]
    # wikitext2_ppl
    window_len: NotRequired[Annotated[int, "wikitext2_ppl: tokens per window (eval.max_seq_len)"]]
    cont_len: NotRequired[Annotated[int, "wikitext2_ppl: scored continuation tokens at the end of each window"]]
    scored_tokens_per_example: NotRequired[Annotated[int, "wikitext2_ppl: tokens whose NLL is averaged per example"]]
    first_token_note: NotRequired[Annotated[str, "wikitext2_ppl: how the continuation's first token is predicted"]]
    # wikitext2_ppl, needle_long_context, kv_retrieval
    context_len: NotRequired[Annotated[int, "wikitext2_ppl / needle_long_context / kv_retrieval: context tokens per "
                                            "example"]]
    cache_len: NotRequired[Annotated[int, "wikitext2_ppl / needle_long_context / kv_retrieval: tokens held in the KV "
                                          "cache (needle, kv_retrieval: of the first example)"]]
    # sst2_prompted
    labels: NotRequired[Annotated[list[str], "sst2_prompted: the label strings scored (negative, positive)"]]
    demo_source: NotRequired[Annotated[str | None, "sst2_prompted: source of the demonstrations (null: none)"]]
    demo_choice: NotRequired[Annotated[str | None, "sst2_prompted: how demonstrations are drawn (null: none)"]]
    cache_len_min: NotRequired[Annotated[int, "sst2_prompted: shortest cached prompt, tokens"]]
    cache_len_max: NotRequired[Annotated[int, "sst2_prompted: longest cached prompt, tokens"]]
    label_balance: NotRequired[Annotated[float, "sst2_prompted: fraction of positive gold labels"]]
    # needle_long_context, kv_retrieval
    seed: NotRequired[Annotated[int, "needle_long_context / kv_retrieval: seed of the filler, key-value and position "
                                     "draws (data.long_context.seed)"]]
    scoring: NotRequired[Annotated[str, "needle_long_context / kv_retrieval: the exact-match rule"]]
    # needle_long_context
    needles: NotRequired[Annotated[Literal["seeded", "fixed"],
                                   "needle_long_context: a key-value pair drawn per example (seeded) or the "
                                   "configured needle in every example (fixed; data.long_context.needles)"]]
    needle_spans: NotRequired[Annotated[list[tuple[int, int]],
                                        "needle_long_context: per example, the [start, end) token positions of its "
                                        "needle line in the cache"]]
    distinct_keys: NotRequired[Annotated[int, "needle_long_context: distinct needle keys over the examples"]]
    needle: NotRequired[Annotated[str, "needle_long_context: the needle line's template ({key}, {value})"]]
    question: NotRequired[Annotated[str, "needle_long_context: the question's template ({key}), ending with the "
                                         "answer cue"]]
    # lmeval:<task>
    lmeval: NotRequired[Annotated[LmevalInfo, "lmeval:<task>: the lm-evaluation-harness task behind the examples"]]
    # kv_retrieval
    pairs: NotRequired[Annotated[int, "kv_retrieval: key-value lines per context (eval.tasks[].pairs), each "
                                      "asked for"]]


class CorruptionRegion(TypedDict):
    """Where corruption (and the heuristics) act in the evaluation (corruption.axes)."""

    time_mode: Annotated[Literal["all_past", "old_only", "window"], "which cached positions are corruptible"]
    N_recent: Annotated[int, "recent positions spared under old_only"]
    window: Annotated[list[int], "[start, end) positions under time_mode window"]
    layer_mode: Annotated[Literal["all", "bernoulli", "targeted"], "how layers are chosen among protect_layers"]
    head_mode: Annotated[Literal["all", "bernoulli", "targeted"], "how KV heads are chosen"]
    protect_layers: Annotated[list[int], "layers that may be corrupted and that the repair covers"]
    eps_ref: Annotated[float, "reference severity the corruption parameters are scaled to (corruption.eps_ref)"]


class OodSplit(TypedDict):
    """A leave-one-type-out split: train on some corruption types, evaluate on a held-out one."""

    name: Annotated[str, "split name (configs/corruption/ood_splits.yaml)"]
    train_types: Annotated[list[str], "corruption types trained on"]
    test_type: Annotated[str, "the held-out type evaluated"]


class EvalCheckpoint(TypedDict):
    """The repair weights scored as cachemedic."""

    path: Annotated[str | None, "checkpoint relative to the run dir; null when none was loaded"]
    step: Annotated[int | None, "training step stored in the checkpoint; null when none was loaded"]
    sha256: Annotated[str | None, "first 16 hex digits of the checkpoint file's sha256; null when none"]
    status: Annotated[str, "'loaded', 'cachemedic not evaluated', or 'missing: ...' (untrained identity operator)"]
    config_hash: NotRequired[Annotated[str | None, "config hash stored in a loaded checkpoint"]]


class EvalSeeds(TypedDict):
    """Seeds and how each random draw is derived from them."""

    seed: Annotated[int, "the run seed (config seed)"]
    long_context_seed: Annotated[int, "seed of the needle filler (data.long_context.seed)"]
    corruption_draws: Annotated[str, "how a corruption draw is seeded"]
    bootstrap: Annotated[str, "how the bootstrap generator is seeded"]


class ArchFacts(TypedDict):
    """Architecture facts (hf.ArchInfo)."""

    model_type: Annotated[str, "transformers model_type"]
    num_layers: Annotated[int, "decoder layers"]
    num_heads: Annotated[int, "query heads"]
    num_kv_heads: Annotated[int, "key/value heads"]
    head_dim: Annotated[int, "dimension per head"]
    max_positions: Annotated[int, "maximum positions"]
    sliding_layers: Annotated[list[int], "layers with sliding-window attention"]
    sliding_window: Annotated[int | None, "sliding window length, tokens (null without sliding layers)"]


class ModelInfo(TypedDict):
    """The model evaluated."""

    name: Annotated[str, "model.name (path, hub id or embedded:<name>)"]
    revision: Annotated[str | None, "model.revision (null: default)"]
    dtype: Annotated[str, "dtype the model ran in (torch name without 'torch.')"]
    device: Annotated[str, "device type (cpu, cuda, ...)"]
    arch: Annotated[ArchFacts, "architecture facts read from the model config"]


class OverheadProtocol(TypedDict):
    """How metrics.overhead was timed."""

    corruption_type: Annotated[str, "corruption type of the timed cell (the first evaluated type)"]
    epsilon: Annotated[float, "severity of the timed cell (the first eps > 0, else 0)"]
    reps: Annotated[int, "timed repetitions over the examples"]
    examples: Annotated[list[str], "example keys timed (the first example of each task)"]
    tokens: Annotated[str, "what a counted token is"]
    peak_mem: Annotated[str, "what the peak memory figure is"]


class CalibrationTry(TypedDict):
    """One candidate tried during the selection."""

    q: Annotated[float, "the candidate quantile (range_clamp: bounds at q and 1 - q; norm_outlier_drop: the "
                        "token-norm band [q, 1 - q])"]
    ppl: Annotated[float, "clean perplexity over the selection windows with it applied"]
    cost: Annotated[float, "relative clean cost: ppl / ppl_no_defense - 1"]


class CalibrationSelection(TypedDict):
    """How each calibrated baseline's candidate was chosen on the selection windows (clean training text)."""

    ppl_no_defense: Annotated[float, "clean perplexity over the selection windows without a defense"]
    tried: Annotated[dict[str, list[CalibrationTry]],
                     "keys: calibrated baseline; the candidates tried, tightest first, up to the one chosen"]


class CalibrationChoice(TypedDict):
    """The candidate a calibrated baseline uses."""

    index: Annotated[int, "its index in baseline.calibration.clamp_q (range_clamp) or band_q (norm_outlier_drop)"]
    q: Annotated[float, "its quantile"]


class CalibrationPrior(TypedDict):
    """The model of the clean cache the calibrated repairs restore entries with (calibration.py, prior.py)."""

    keys: Annotated[str, "the frame keys are modelled in (before RoPE, un-rotated with their positions; or as "
                         "projected, without RoPE)"]
    quantiles: Annotated[list[float], "the per-channel range: quantiles [q, 1 - q] of the calibration windows"]
    block: Annotated[int, "positions per block of the white-noise estimate"]
    levels: Annotated[str, "where the held-in levels calibrated_repair compares a cache with come from"]
    level_examples: NotRequired[Annotated[int, "selection-split examples per task among the held-in caches of "
                                               "the levels (baseline.calibration.level_examples)"]]


class CalibrationRecord(TypedDict):
    """The calibration of range_clamp and norm_outlier_drop and the clean-cache model of the calibrated
    repairs: statistics of clean K/V from training-corpus windows (never the evaluation text, never a
    corruption), stored in the run dir (calibration.py)."""

    format: Annotated[str, "format tag of the stored calibration file"]
    hash: Annotated[str, "hash of what it depends on: model, layers, calibration settings, data source"]
    data_source: Annotated[str, "where the training text came from"]
    windows: Annotated[int, "windows the statistics were gathered on"]
    select_windows: Annotated[int, "further windows (disjoint) the candidates were chosen on"]
    window_len: Annotated[int, "tokens per window"]
    tokens: Annotated[int, "tokens in the statistics windows"]
    layers: Annotated[list[int], "layers calibrated (repair.protect_layers)"]
    sink_tokens: Annotated[int, "first positions left out of the statistics and never clamped or dropped "
                                "(attention sinks)"]
    keys: Annotated[str, "how keys are bounded (rotary pair norm, or per channel)"]
    rule: Annotated[str, "the rule choosing each baseline's candidate"]
    selection: Annotated[CalibrationSelection, "the clean costs seen while choosing"]
    chosen: Annotated[dict[str, CalibrationChoice], "keys: calibrated baseline; the candidate it uses"]
    prior: NotRequired[Annotated[CalibrationPrior, "the clean-cache model (calibration format 2 on)"]]


class ValidationSettings(TypedDict):
    """The validation grid the best baseline is chosen on: held-in corruption types, examples from the
    validation (or selection) split of each task's data, disjoint from the test split."""

    num_examples: Annotated[dict[str, int], "keys: task; validation examples"]
    types: Annotated[list[str], "corruption types of the validation grid (held-in: never the OOD test type)"]
    split: Annotated[Literal["validation", "selection"], "the evaluation split its examples come from "
                                                          "(eval.validation.split)"]


class SlidingWindowSettings(TypedDict):
    """What sliding-window attention does to the corruption region."""

    window: Annotated[int | None, "the model's sliding window, tokens (null without sliding-window layers)"]
    layers: Annotated[list[int], "corruptible layers with sliding-window attention (their cache holds only the "
                                 "last positions of the context)"]
    note: Annotated[str, "how their positions are counted"]


class TaskSettings(TypedDict):
    """settings of task_metrics.json: the protocol behind the numbers. String-valued keys named like a metric
    (score, score_vs_eps, robustness_auc, exposure, ...) state that metric's definition."""

    tasks: Annotated[dict[str, TaskInfo], "keys: task name; what was built for it"]
    eps: Annotated[list[float], "severities evaluated, ascending"]
    types: Annotated[list[str], "corruption types evaluated"]
    defenses: Annotated[list[str], "defenses evaluated (no_defense always included)"]
    heuristics: Annotated[list[str], "evaluated candidates for the best baseline (reference heuristics and "
                                     "calibrated baselines), registry order"]
    persistence: Annotated[Literal["at_rest", "on_read"], "whether corruption is written into the cache or applied "
                                                          "to what attention reads"]
    corruption_region: Annotated[CorruptionRegion, "where corruption acts"]
    ood_protocol: Annotated[str | None, "eval.ood_protocol: the OOD split's name (null: none)"]
    ood_split: Annotated[OodSplit | None, "the resolved OOD split (null: none)"]
    data_sources: Annotated[dict[str, str], "keys: data set (wikitext2, sst2, sst2_train); where it came from"]
    checkpoint: Annotated[EvalCheckpoint, "the repair weights scored as cachemedic"]
    seeds: Annotated[EvalSeeds, "seeds and derivations"]
    bootstrap_samples: Annotated[int, "bootstrap resamples behind every interval"]
    ci: Annotated[str, "definition of the intervals"]
    oracle_note: Annotated[str, "the reference heuristics get the corruption's own masks (an oracle advantage)"]
    clean_cells: Annotated[str, "definition of the clean cells"]
    score: Annotated[str, "definition of the normalised score"]
    score_vs_eps: Annotated[str, "definition of score_vs_eps"]
    robustness_auc: Annotated[str, "definition of robustness_auc"]
    best_heuristic_rule: Annotated[str, "rule choosing best_heuristic_name (on the validation grid)"]
    exposure: Annotated[str, "definition of exposure"]
    exposure_evicted: NotRequired[Annotated[str, "definition of exposure_evicted"]]
    sliding_window: NotRequired[Annotated[SlidingWindowSettings, "sliding-window layers among the corruptible ones"]]
    model: Annotated[ModelInfo, "the model evaluated"]
    cell_batch_size: Annotated[int, "grid rows scored per batched forward (eval.cell_batch_size)"]
    overhead: Annotated[OverheadProtocol | None, "how metrics.overhead was timed; null unless eval.measure_overhead"]
    calibration: Annotated[CalibrationRecord | None,
                           "the clean-cache calibration of the calibrated baselines; null when none was evaluated"]
    validation: Annotated[ValidationSettings | None,
                          "the validation grid the best baseline is chosen on; null when no candidate was evaluated"]
    defense_groups: Annotated[dict[str, DefenseGroup], "keys: every evaluated defense; its group (as "
                                                       "metrics.defense_groups)"]
    notes: Annotated[list[str], "notes about this evaluation (e.g. fewer examples than requested)"]
    fault_models: NotRequired[Annotated[dict[str, dict[str, Any]],
                                        "keys: evaluated fault model (bitflip, block_fault); its parameters at "
                                        "eps_ref, and for bitflip the storage format flipped (storage_format), the "
                                        "cache dtype and whether that storage was simulated by cast-flip-cast "
                                        "(simulated); only when a fault model was evaluated"]]


class TaskMetricsFile(TypedDict):
    """metrics/task_metrics.json, written by `python -m cachemedicpp.eval`.

    Task robustness under the corruption grid, per defense."""

    run_id: RunId
    config_hash: ConfigHash
    metrics: Annotated[TaskMetrics, "the measured numbers"]
    settings: Annotated[TaskSettings, "how they were measured"]


# --------------------------------------------------------------------------------------------------
# stability_metrics.json


class SensitivityPoint(TypedDict):
    """Logit sensitivity at one perturbation size: mean over prompts x directions of the drift, the L2 norm
    (logit units, fp32) of the change of the top-k clean logits, against the clean undefended logits unless
    the key says otherwise."""

    delta_norm: Annotated[float, "perturbation size delta: ||Delta_l||_F = delta * delta_scale * rms(S_l) * "
                                 "sqrt(#masked entries), per perturbed layer and K/V tensor"]
    baseline: Annotated[float, "drift with no defense"]
    heuristics: Annotated[dict[str, float], "keys: the baseline measured (one entry, settings.heuristic); drift "
                                            "with it applied: a reference heuristic on the perturbed region (an "
                                            "oracle advantage), a calibrated baseline on every cached entry of the "
                                            "protected layers"]
    heuristics_vs_defended_clean: Annotated[dict[str, float],
                                            "keys: the heuristic measured; drift against the heuristic's own "
                                            "output on the clean cache"]
    cachemedic: Annotated[float, "drift with the repair active in attention"]
    cachemedic_vs_repaired_clean: Annotated[float, "drift of the repair against its own clean (repaired) logits"]
    cachemedic_no_contr: Annotated[float | None,
                                   "drift with the paired train.lambda_contr = 0 run's repair; null without a "
                                   "paired run"]
    n: Annotated[int, "drifts averaged (prompts x directions)"]


class SensitivityBlock(TypedDict):
    """Logit sensitivity curves: drift vs perturbation size per defense."""

    points: Annotated[list[SensitivityPoint], "one per measured delta, ascending (0 always included)"]
    heuristic: Annotated[str, "the baseline measured (the eval's best baseline, chosen on validation data, else "
                              "stability.heuristic_fallback)"]
    repair_clean_drift: Annotated[float, "drift the repair alone causes on the clean cache, mean over prompts"]


AmplificationMap = TypedDict("AmplificationMap", {
    "layers": Annotated[list[int], "layer of each map row (stability.layers, else repair.protect_layers)"],
    "heads": Annotated[list[int], "KV head of each map column (stability.head_subset, else all)"],
    "baseline": Annotated[list[list[float | None]],
                          "[layer][head]: gamma = median over prompts x directions of drift / ||Delta_{l,h}||_F "
                          "(logits per unit of K+V Frobenius norm) for a perturbation confined to layer l, head h "
                          "and the segment, no defense; null where that layer's cache holds none of the segment "
                          "(sliding-window layers)"],
    "cachemedic": Annotated[list[list[float | None]],
                            "[layer][head]: gamma with the repair active, drift against the repaired clean logits"],
    "cachemedic_vs_clean_no_defense": Annotated[list[list[float | None]],
                                                "[layer][head]: gamma with the repair active, drift against the "
                                                "undefended clean logits"],
    "delta_norm": Annotated[float, "perturbation size of the maps"],
    "delta_choice": Annotated[str, "why that size (1, else the largest nonzero delta <= 1, else the smallest)"],
    "flagged_layers": Annotated[list[int], "map layers outside repair.protect_layers (the repair does not act there)"],
    "protected": Annotated[list[bool], "per map row: is the layer in repair.protect_layers"],
})
AmplificationMap.__doc__ = "Amplification maps gamma(layer, KV head): how much a perturbation of one head is amplified."


class PairedRun(TypedDict):
    """The paired run trained with train.lambda_contr = 0 (same config otherwise)."""

    run_dir: Annotated[str, "its run directory, absolute"]
    config_hash: Annotated[str, "its config hash"]
    lambda_contr: Annotated[float, "its train.lambda_contr (0)"]
    this_lambda_contr: Annotated[float | None, "this run's train.lambda_contr"]
    ignored_keys: Annotated[list[str], "config keys allowed to differ"]
    check: Annotated[str, "what was checked"]
    checkpoint: Annotated[str, "its repair checkpoint, absolute path"]
    checkpoint_step: Annotated[int, "that checkpoint's step"]
    checkpoint_sha256: Annotated[str, "first 16 hex digits of that checkpoint's sha256"]


class StabilityRepair(TypedDict):
    """The repair operator measured as cachemedic."""

    checkpoint: Annotated[str | None, "checkpoint relative to the run dir; null: untrained identity operator"]
    checkpoint_step: Annotated[int | None, "its step (null without one)"]
    checkpoint_sha256: Annotated[str | None, "first 16 hex digits of its sha256 (null without one)"]
    identity_operator: Annotated[bool, "true when no checkpoint existed and the identity operator was measured"]
    note: NotRequired[Annotated[str, "why the identity operator was measured (only without a checkpoint)"]]
    family: Annotated[str, "repair.family (a registered family: A, B, C, D, E)"]
    rank: Annotated[int, "repair.rank"]


class PromptInfo(TypedDict):
    """The prompts: the last consecutive windows of the evaluation token stream."""

    source: Annotated[str, "where the text came from"]
    stream_tokens: Annotated[int, "tokens in the stream's test split (the prompts are its last windows)"]
    windows: Annotated[str, "how windows are chosen"]
    token_starts: Annotated[list[int], "first token of each prompt in the stream"]
    prompt_len: Annotated[int, "tokens per prompt (the last one is processed over the cached rest)"]
    overlaps_wikitext2_eval_windows: Annotated[bool, "whether the prompts overlap the windows wikitext2_ppl scores"]


class StabilitySettings(TypedDict):
    """settings of stability_metrics.json (also stored as metrics['stability.settings'])."""

    delta_norms: Annotated[list[float], "perturbation sizes measured, ascending, 0 included"]
    delta_norms_configured: Annotated[list[float], "stability.delta_norms as configured"]
    delta_scale: Annotated[float, "stability.delta_scale: multiplies delta into a per-entry size"]
    perturbation_size: Annotated[str, "definition of ||Delta||"]
    topk: Annotated[int, "top-k clean logits the drift is measured over (capped at the vocabulary)"]
    topk_configured: Annotated[int, "stability.topk_logits"]
    num_prompts: Annotated[int, "prompts measured"]
    num_directions: Annotated[int, "random directions per prompt and delta"]
    time_mode: Annotated[Literal["all_past", "old_only", "window"], "which cached positions are perturbed"]
    N_recent: Annotated[int, "recent positions spared under old_only"]
    window: Annotated[list[int] | None, "[start, end) positions (corruption.axes.window) under time_mode window; "
                                        "null otherwise"]
    layers: Annotated[list[int], "layers of the amplification map"]
    sensitivity_layers: Annotated[list[int], "layers perturbed for the sensitivity curves (inside protect_layers)"]
    protect_layers: Annotated[list[int], "repair.protect_layers"]
    flagged_layers: Annotated[list[int], "map layers outside protect_layers"]
    heads: Annotated[list[int], "KV heads perturbed"]
    num_kv_heads: Annotated[int, "KV heads of the model"]
    sliding_layers: Annotated[list[int], "sliding-window layers of the model"]
    heuristic: Annotated[str, "the baseline measured (a reference heuristic or a calibrated baseline)"]
    heuristic_origin: Annotated[str, "where it came from (task_metrics.json's best_heuristic_name or the fallback)"]
    heuristic_note: Annotated[str, "reference heuristics get the perturbed region (an oracle advantage)"]
    reference: Annotated[str, "which logits drift is measured against"]
    map_delta_norm: Annotated[float, "perturbation size of the amplification maps"]
    map_delta_choice: Annotated[str, "why that size"]
    map_cachemedic_reference: Annotated[str, "reference logits of the cachemedic maps"]
    paired_run: Annotated[PairedRun | None, "the lambda_contr = 0 run compared against; null: none"]
    repair: Annotated[StabilityRepair, "the repair operator measured"]
    prompts: Annotated[PromptInfo, "the prompts"]
    model: Annotated[str, "model.name"]
    compute_dtype: Annotated[Literal["float32"], "dtype of the computation (always float32)"]
    config_dtype: Annotated[Literal["float32", "bfloat16", "float16"], "the config's dtype (not used here)"]
    seed: Annotated[int, "the run seed"]
    rng: Annotated[str, "how directions are drawn"]
    segment_positions: Annotated[dict[str, int],
                                 "keys: map layer index (as a string); positions of the perturbed segment held in "
                                 "that layer's cache (fewer in sliding-window layers)"]


StabilityMetrics = TypedDict("StabilityMetrics", {
    SENS_KEY: Annotated[SensitivityBlock, "logit sensitivity curves"],
    AMP_KEY: Annotated[AmplificationMap, "amplification maps"],
    STAB_SETTINGS_KEY: Annotated[StabilitySettings, "the same object as the file's settings"],
})
StabilityMetrics.__doc__ = "metrics of stability_metrics.json."


class StabilityMetricsFile(TypedDict):
    """metrics/stability_metrics.json, written by `python -m cachemedicpp.stability`.

    How far the output logits move per unit of KV-cache perturbation, with and without repair."""

    run_id: RunId
    config_hash: ConfigHash
    metrics: Annotated[StabilityMetrics, "the measured numbers"]
    settings: Annotated[StabilitySettings, "how they were measured"]


SCHEMAS: dict[str, type] = {
    TASK_METRICS_SCHEMA: TaskMetricsFile,
    STABILITY_METRICS_SCHEMA: StabilityMetricsFile,
    METRIC_RECORD_SCHEMA: MetricRecord,
}


# --------------------------------------------------------------------------------------------------
# TypedDict -> JSON Schema


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _unwrap(hint: Any) -> tuple[Any, str | None, dict, bool | None]:
    """(type, comment, extra schema keywords, required: True/False when marked, else None) of a key's hint."""
    tp, doc, extra, req = hint, None, {}, None
    while True:
        origin = get_origin(tp)
        if origin in (NotRequired, Required):
            req = origin is Required
            tp = get_args(tp)[0]
        elif origin is Annotated:
            args = get_args(tp)
            tp = args[0]
            for meta in args[1:]:
                if isinstance(meta, str) and doc is None:
                    doc = meta
                elif isinstance(meta, Mapping):
                    extra = {**meta, **extra}
        else:
            return tp, doc, extra, req


def field_docs(td: type) -> dict[str, tuple[Any, str, dict, bool]]:
    """{key: (type, comment, extra schema keywords, required)} of a TypedDict, in declaration order.
    Raises TypeError for a key without a comment."""
    required_keys = getattr(td, "__required_keys__", None)
    out = {}
    for key, hint in get_type_hints(td, include_extras=True).items():
        tp, doc, extra, req = _unwrap(hint)
        if not doc or not doc.strip():
            raise TypeError(f"{td.__name__}.{key}: no comment; declare it as Annotated[type, 'what it means']")
        if req is None:
            req = key in required_keys if required_keys is not None else bool(getattr(td, "__total__", True))
        out[key] = (tp, doc, extra, req)
    return out


def _doc(td: type) -> str:
    return " ".join((td.__doc__ or "").split())


class _Defs:
    """The `$defs` of one schema: one entry per TypedDict, by class name."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict] = {}
        self.types: dict[str, type] = {}

    def ref(self, td: type) -> dict:
        name = td.__name__
        if name in self.types and self.types[name] is not td:
            raise TypeError(f"two TypedDicts named {name}: {self.types[name]!r} and {td!r}")
        if name not in self.types:
            self.types[name] = td
            self.schemas[name] = _object(td, self)
        return {"$ref": f"#/$defs/{name}"}


def _convert(tp: Any, defs: _Defs) -> dict:
    if is_typeddict(tp):
        return defs.ref(tp)
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:  # inside a container: keep its schema keywords (its comment has no key to go to)
        inner = _convert(args[0], defs)
        for meta in args[1:]:
            if isinstance(meta, Mapping):
                inner.update(meta)
        return inner
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if origin in (list, collections.abc.Sequence):
        return {"type": "array", "items": _convert(args[0], defs)}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _convert(args[0], defs)}
        return {"type": "array", "prefixItems": [_convert(a, defs) for a in args], "items": False,
                "minItems": len(args), "maxItems": len(args)}
    if origin in (dict, collections.abc.Mapping):
        if args and args[0] is not str:
            raise TypeError(f"JSON object keys are strings: {tp}")
        values = _convert(args[1], defs) if args else {}
        return {"type": "object", **({"additionalProperties": values} if values else {})}
    if origin in (Union, types.UnionType):
        parts = [_convert(a, defs) for a in args]
        if all(set(p) == {"type"} and isinstance(p["type"], str) for p in parts):
            return {"type": [p["type"] for p in parts]}
        return {"anyOf": parts}
    raise TypeError(f"no JSON Schema for {tp!r}")


def _object(td: type, defs: _Defs) -> dict:
    props, required = {}, []
    for key, (tp, doc, extra, req) in field_docs(td).items():
        props[key] = {"description": doc, **_convert(tp, defs), **extra}
        if req:
            required.append(key)
    out: dict[str, Any] = {"description": _doc(td), "type": "object", "properties": props}
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    return out


def json_schema(td: type) -> dict:
    """A JSON Schema (draft 2020-12) for a TypedDict: nested TypedDicts under `$defs` (by class name),
    objects closed, `NotRequired` keys optional, `X | None` nullable, `dict[str, X]` as
    additionalProperties, and each key's comment as its `description`."""
    if not is_typeddict(td):
        raise TypeError(f"{td!r} is not a TypedDict")
    defs = _Defs()
    body = _object(td, defs)
    name = next((f for f, t in SCHEMAS.items() if t is td), f"{td.__name__}.schema.json")
    title = re.split(r"(?<=\.)\s+", _doc(td), maxsplit=1)[0] or td.__name__
    out = {"$schema": DRAFT, "$id": f"cachemedicpp/{name}", "title": title, **body}
    if defs.schemas:
        out["$defs"] = dict(sorted(defs.schemas.items()))
    return out


def schema_text(td: type) -> str:
    """The file content of a generated schema."""
    return json.dumps(json_schema(td), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------
# validation


def _stem(which: str) -> str:
    which = Path(which).name
    for suffix in (".schema.json", ".json"):
        if which.endswith(suffix):
            return which[:-len(suffix)]
    return which


@lru_cache(maxsize=None)
def _validator(stem: str):
    return jsonschema.Draft202012Validator(load_schema(stem))


def _where(path: Sequence) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(doc: Any, which: str) -> list[str]:
    """Problems of `doc` against a checked-in schema (TASK_METRICS_SCHEMA, STABILITY_METRICS_SCHEMA,
    METRIC_RECORD_SCHEMA, or their stems / data file names), each as "dotted.key: message"; empty when valid."""
    stem = _stem(which)
    if stem in ("task_metrics", "stability_metrics", "metric_record"):
        v = _validator(stem)
    else:
        raise ValueError(f"unknown results schema {which!r}; known: {list(SCHEMAS)}")
    problems = []
    for e in sorted(v.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        if e.context:  # anyOf (a nullable object): report the branch that got furthest
            e = best_match([e]) or e
        path = list(e.absolute_path)
        missing = [k for k in (e.validator_value if e.validator == "required" else ())
                   if isinstance(e.instance, dict) and k not in e.instance and repr(k) in e.message]
        if missing:
            problems.append(f"{_where(path + missing[:1])}: required key missing")
        else:
            problems.append(f"{_where(path)}: {e.message}")
    return problems


# --------------------------------------------------------------------------------------------------
# regenerate the schema files


def stale_schemas(folder: Path = SCHEMA_DIR) -> list[str]:
    """Schema files that differ from what the TypedDicts generate now."""
    out = []
    for name, td in SCHEMAS.items():
        p = Path(folder) / name
        if not p.is_file() or p.read_text(encoding="utf-8") != schema_text(td):
            out.append(name)
    return out


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    paths = []
    for name, td in SCHEMAS.items():
        p = Path(folder) / name
        p.write_text(schema_text(td), encoding="utf-8")
        paths.append(p)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cachemedicpp.results",
                                 description="Regenerate schemas/{task_metrics,stability_metrics,metric_record}"
                                             ".schema.json from the TypedDicts in cachemedicpp/results.py.")
    ap.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    a = ap.parse_args(argv)
    if a.check:
        stale = stale_schemas()
        for name in stale:
            print(f"stale: schemas/{name} (run python -m cachemedicpp.results)", file=sys.stderr)
        return 1 if stale else 0
    for p in write_schemas():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
