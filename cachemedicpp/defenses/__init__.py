"""Defenses of a KV cache, one module per defense (or tight family), each registered by name.

    no_defense          the baseline (no_defense.py)
    reference.py        the reference's four heuristics on the corruption's region (an oracle advantage)
    calibrated.py       range_clamp, norm_outlier_drop: calibrated on clean training-text caches, no mask
    calibrated_repair.py impute, prerope_clamp, denoise, calibrated_repair: entries restored from the clean-cache
                        model (calibration.py, prior.py), no mask
    oracle_drop.py      a ceiling: attention ignores exactly the changed entries
    checksum.py         checksum_recompute: per-block checksums, failing blocks recomputed (exact)
    detect_recompute.py the learned detector as an alarm, alarmed blocks recomputed
    learned.py          cachemedic, the learned operator (acts inside attention)

A new defense is one file: a dataclass subclassing `Defense`, decorated with `@register_defense` (base.py
says what to declare). Importing it (here, or from a plug-in module of one's own before a run) makes it
known to eval, stability, the lm-eval backend, bench and the figures. Registry order: the order of the
imports below, then plug-ins; it breaks ties of the best-baseline rule.
"""

from cachemedicpp.defenses.base import (CORRUPTED, NOWHERE, ORACLE_NOTE, PROTECTED, CacheInput, Cost, Defended,
                                        Defense, LayerInput, Needs, baseline_param, candidates, changed_entries,
                                        check_name, fit_drop, get, group, make, names, register_defense, replace_rows,
                                        required, style, unregister_defense)
from cachemedicpp.defenses import no_defense, reference, calibrated, calibrated_repair  # noqa: E402,I001
from cachemedicpp.defenses import oracle_drop, checksum  # noqa: E402,I001
from cachemedicpp.defenses import detect_recompute, learned  # noqa: E402
from cachemedicpp.defenses.checksum import block_checksums  # noqa: E402
from cachemedicpp.defenses.reference import ema_weights  # noqa: E402

__all__ = ["CORRUPTED", "NOWHERE", "ORACLE_NOTE", "PROTECTED", "CacheInput", "Cost", "Defended", "Defense",
           "LayerInput", "Needs", "baseline_param", "block_checksums", "candidates", "changed_entries", "check_name",
           "ema_weights", "fit_drop", "get", "group", "make", "names", "register_defense", "replace_rows", "required",
           "style", "unregister_defense", "no_defense", "reference", "calibrated", "calibrated_repair", "oracle_drop",
           "checksum", "detect_recompute", "learned"]
