"""Reading and validating a run's metrics into `Inputs`, before anything is drawn.

Every accessor fails with the file and the dotted key (`ConfigError`, exit 2), so a missing or malformed
input is one clear message. Required keys are the ones a figure or table needs; informational extras
are shown when well-formed and never a reason to refuse the figures. Key names come from
`cachemedicpp.results`, the one description of the metrics files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cachemedicpp.config import ConfigError, resolve_path
from cachemedicpp import defenses
from cachemedicpp.defenses import ORACLE_NOTE
from cachemedicpp.fileio import read_json
from cachemedicpp.results import (AMP_KEY, BEST_BASELINE_CHOICE, BEST_HEURISTIC_NAME, BEST_HEURISTIC_SERIES,
                                  BIT_CLASS_SCORES, DETECT_RECOMPUTE_COST, RECOMPUTE_COST,
                                  CACHEMEDIC, CACHEMEDIC_MINUS_NO_DEFENSE, CLEAN_REGRESSION, CONFIG_HASH, DAMAGE,
                                  DAMAGE_BY_TYPE, DEFENSE_GROUPS, GROUP_BASELINE, GROUP_CALIBRATED, GROUP_CEILING,
                                  GROUP_LEARNED, GROUP_REFERENCE, METRICS, NO_DEFENSE, ORACLE_DROP, OVERHEAD,
                                  PAIRED_BOOTSTRAP, PAIRED_BOOTSTRAP_BY_TYPE, RECOVERED_FRACTION,
                                  RECOVERED_FRACTION_BY_TYPE, ROBUSTNESS_AUC, ROBUSTNESS_AUC_BY_TASK,
                                  ROBUSTNESS_AUC_BY_TYPE,
                                  ROBUSTNESS_AUC_CI, RUN_ID, SCORE_VS_EPS, SCORE_VS_EPS_BY_TASK, SENS_KEY, SETTINGS,
                                  STAB_SETTINGS_KEY)
from cachemedicpp.rundir import RunDir

SERIES = (NO_DEFENSE, BEST_HEURISTIC_SERIES, CACHEMEDIC)  # the curves of a score-vs-eps block
CI_FIELDS = ("diff", "ci_low", "ci_high")  # of a paired-bootstrap entry
DAMAGE_FIELDS = ("auc_clean", "auc_no_defense", "diff", "ci_low", "ci_high")  # of a damage entry
RF_FIELDS = ("value", "ci_low", "ci_high")  # of a recovered-fraction entry (null fields: NaN)
CLEAN, BEST, BEST_CALIBRATED = "clean", "best", "best_calibrated"  # headline roles besides the defenses' own
# older metrics files carry no defense_groups; every defense they could name but these was a reference heuristic
KNOWN_GROUPS = {NO_DEFENSE: GROUP_BASELINE, CACHEMEDIC: GROUP_LEARNED, ORACLE_DROP: GROUP_CEILING}


def _show(keys: Sequence[Any]) -> str:
    out = ""
    for k in keys:
        if isinstance(k, int):
            out += f"[{k}]"
        elif "." in str(k):
            out += f'["{k}"]'
        else:
            out += ("." if out else "") + str(k)
    return out


class _Doc:
    """A metrics JSON document whose accessors fail with the file and the dotted key."""

    def __init__(self, data: Any, path: Path):
        self.data, self.path = data, path
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")

    def error(self, keys: Sequence[Any], what: str) -> ConfigError:
        return ConfigError(f"{self.path}: key {_show(keys)} {what}")

    @staticmethod
    def _step(cur: Any, k: Any) -> tuple[bool, Any]:
        if isinstance(k, int) and isinstance(cur, list):
            return (True, cur[k]) if -len(cur) <= k < len(cur) else (False, None)
        if isinstance(cur, dict) and k in cur:
            return True, cur[k]
        return False, None

    def get(self, *keys: Any, default: Any = None) -> Any:
        cur = self.data
        for k in keys:
            ok, cur = self._step(cur, k)
            if not ok:
                return default
        return cur

    def need(self, *keys: Any, kind: type | tuple | None = None) -> Any:
        cur = self.data
        for i, k in enumerate(keys):
            ok, cur = self._step(cur, k)
            if not ok:
                raise ConfigError(f"{self.path}: missing required key {_show(keys[:i + 1])}")
        if cur is None and kind is not None and not (isinstance(kind, tuple) and type(None) in kind):
            raise self.error(keys, "is null (not measured?)")
        if kind is not None and not isinstance(cur, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(t.__name__ for t in kind)
            raise self.error(keys, f"must be a {names.replace('dict', 'mapping')}, got {type(cur).__name__}")
        return cur

    def num(self, value: Any, keys: Sequence[Any], allow_null: bool = True) -> float:
        if value is None and allow_null:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(keys, f"must be a number, got {value!r}")
        return float(value)

    def need_num(self, *keys: Any) -> float:
        """A required key whose value is a number or null (NaN)."""
        return self.num(self.need(*keys), keys)

    def nums(self, *keys: Any, length: int | None = None) -> np.ndarray:
        seq = self.need(*keys, kind=list)
        if length is not None and len(seq) != length:
            raise self.error(keys, f"has {len(seq)} values, expected {length}")
        return np.array([self.num(v, (*keys, i)) for i, v in enumerate(seq)], dtype=float)

    def submap(self, *keys: Any) -> dict:
        """An optional mapping: {} when absent or null, an error when something else."""
        obj = self.get(*keys)
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            raise self.error(keys, "must be a mapping")
        return obj


@dataclass
class Curves:
    eps: np.ndarray
    series: dict[str, np.ndarray]  # the required SERIES
    ci: dict[str, tuple[np.ndarray, np.ndarray]]
    per_defense: dict[str, np.ndarray] = field(default_factory=dict)  # every defense's curve (informational)


@dataclass
class SensPoint:
    delta: float
    baseline: float
    heuristics: dict[str, float]
    cachemedic: float
    vs_repaired: float
    no_contr: float


@dataclass
class Inputs:
    run_dir: Path
    task_path: Path
    run_id: str
    config_hash: str
    curves: Curves
    by_task: dict[str, Curves]
    auc: dict[str, float]
    auc_ci: dict[str, tuple[float, float]]
    clean: dict[str, float]
    clean_metrics: dict[str, dict[str, float]]
    best: str | None  # None when the eval ran no heuristic defense
    boot: dict[str, dict[str, float]]
    overhead: dict[str, dict[str, float]] | None
    exposure: dict[str, float]
    settings: dict
    sens: list[SensPoint] | None  # None: stability was not measured for this run (figures C and D not drawn)
    amp: dict | None  # None with sens
    stab_settings: dict
    cfg: dict | None
    paired_cfg: dict | None = None
    paired_dir: str | None = None
    oracle_note: str = ""
    # informational (older files lack them; shown as "—"):
    by_type: dict = field(default_factory=dict)  # {type: {"auc", "boot", "damage", "recovered"}}
    auc_by_task: dict = field(default_factory=dict)  # {task: {defense: robustness AUC over that task}}
    groups: dict[str, str] = field(default_factory=dict)  # metrics.defense_groups
    choice: dict | None = None  # metrics.best_baseline_choice {rule, types, examples, validation_auc, chosen}
    damage: dict[str, float] | None = None  # metrics.damage {auc_clean, auc_no_defense, diff, ci_low, ci_high, n}
    recovered: dict[str, dict[str, float]] = field(default_factory=dict)  # {defense: {value, ci_low, ci_high}}
    bits: dict | None = None  # metrics.bit_class_scores (figure E); None when absent or malformed
    bits_note: str = ""  # why figure E is not drawn (empty when it is)
    # {defense: {"context": mean context tokens, "by_cell": [{type, eps, tokens, oracle}]}} of the recomputing
    # defenses (figure F); empty when none was evaluated at rest
    recompute: dict = field(default_factory=dict)
    recompute_note: str = ""  # why figure F is not drawn (empty when it is)
    stability_note: str = ""  # why figures C and D are not drawn (empty when they are)

    @property
    def has_stability(self) -> bool:
        """Whether the run has stability metrics (a run of train -> eval -> plots has none)."""
        return self.sens is not None

    @property
    def has_pair(self) -> bool:
        return any(not math.isnan(p.no_contr) for p in self.sens or ())

    def group(self, name: str) -> str:
        """The defense's group (metrics.defense_groups; for older files, inferred from the name: the registered
        defense's group, a reference heuristic otherwise)."""
        if name in self.groups:
            return self.groups[name]
        return KNOWN_GROUPS.get(name) or (defenses.group(name) if name in defenses.names() else GROUP_REFERENCE)

    def chosen_on_validation(self) -> bool:
        """Whether best_heuristic_name was chosen on a validation grid (older files chose it on the test grid)."""
        return self.choice is not None and self.choice.get("chosen") == self.best

    def best_calibrated(self) -> str | None:
        """The best calibrated baseline: the chosen best baseline when it is calibrated, else the calibrated
        candidate with the highest validation AUC (ties: the order of the file); None without one."""
        if self.best and self.group(self.best) == GROUP_CALIBRATED:
            return self.best
        val = (self.choice or {}).get("validation_auc") or {}
        cands = [d for d in val if self.group(d) == GROUP_CALIBRATED and d in self.auc]
        return max(cands, key=lambda d: val[d]) if cands else None

    def headline(self) -> list[tuple[str, str]]:
        """(role, defense) of the main comparison, in order: the clean ceiling, no defense, the best baseline,
        the best calibrated baseline when that is another one, oracle_drop (the ceiling) and cachemedic; each
        when evaluated. Roles: "clean", "best", "best_calibrated", or the defense's own name."""
        rows = [(CLEAN, NO_DEFENSE), (NO_DEFENSE, NO_DEFENSE)]
        if self.best:
            rows.append((BEST, self.best))
        cal = self.best_calibrated()
        if cal and cal != self.best:
            rows.append((BEST_CALIBRATED, cal))
        if ORACLE_DROP in self.auc:
            rows.append((ORACLE_DROP, ORACLE_DROP))
        return rows + [(CACHEMEDIC, CACHEMEDIC)]

    def auc_of(self, role: str, name: str) -> tuple[float, tuple[float, float] | None]:
        """Robustness AUC and its CI of a headline entry (the clean ceiling has no interval of its own)."""
        if role == CLEAN:
            return (self.damage["auc_clean"] if self.damage else math.nan), None
        if role == BEST:
            return self.best_auc(), self.best_auc_ci()
        return self.auc.get(name, math.nan), self.auc_ci.get(name)

    def recovered_of(self, role: str, name: str) -> dict[str, float] | str | None:
        """Recovered fraction {value, ci_low, ci_high} of a headline entry; for the clean ceiling and no
        defense the number that holds by definition (a string); None when the file has none."""
        if role in (CLEAN, NO_DEFENSE):
            return None if self.damage is None else "1 (by definition)" if role == CLEAN else "0 (by definition)"
        return self.recovered.get(name)

    def best_auc(self) -> float:
        return self.auc.get(BEST_HEURISTIC_SERIES, self.auc.get(self.best or "", math.nan))

    def best_auc_ci(self) -> tuple[float, float] | None:
        return self.auc_ci.get(BEST_HEURISTIC_SERIES, self.auc_ci.get(self.best or ""))

    def ppl_task(self) -> str | None:
        """The perplexity task, whose clean perplexity the table and report show next to the scores."""
        return next((t for t in self.clean_metrics if "ppl" in t), None)


# --------------------------------------------------------------------------------------------------
# task metrics


def _curves(doc: _Doc, *keys: Any, best: str | None) -> Curves:
    eps = doc.nums(*keys, "eps")
    if len(eps) == 0:
        raise doc.error((*keys, "eps"), "is empty")
    series = {name: doc.nums(*keys, name, length=len(eps)) for name in SERIES
              if best or name != BEST_HEURISTIC_SERIES}
    ci = {}
    for name, band in doc.submap(*keys, "ci").items():
        k = (*keys, "ci", name)
        if not isinstance(band, dict):
            raise doc.error(k, "must be a mapping {low, high}")
        ci[name] = (doc.nums(*k, "low", length=len(eps)), doc.nums(*k, "high", length=len(eps)))
    order = np.argsort(eps, kind="stable")
    per = {}
    for name, seq in _mapping(doc.get(*keys, "per_defense")).items():  # informational: malformed curves are skipped
        if isinstance(seq, list) and len(seq) == len(eps) and all(v is None or _is_num(v) for v in seq):
            per[str(name)] = np.array([math.nan if v is None else float(v) for v in seq])[order]
    return Curves(eps[order], {n: s[order] for n, s in series.items()},
                  {n: (lo[order], hi[order]) for n, (lo, hi) in ci.items()}, per)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mapping(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _numbers(obj: Any) -> dict[str, float]:
    """The number-valued entries of an informational mapping; anything else is skipped."""
    return {str(k): float(v) for k, v in _mapping(obj).items() if _is_num(v)}


def _float_map(doc: _Doc, *keys: Any, required: Sequence[str] = ()) -> dict[str, float]:
    """{name: number}: the required names must be numbers (or null); other entries that are not numbers
    (extra breakdowns a newer writer may add) are skipped."""
    obj = doc.need(*keys, kind=dict)
    out = {str(k): float(v) if _is_num(v) else math.nan for k, v in obj.items() if v is None or _is_num(v)}
    for name in required:
        out[name] = doc.need_num(*keys, name)
    return out


def _auc(doc: _Doc, best: str | None) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    auc = _float_map(doc, METRICS, ROBUSTNESS_AUC, required=(NO_DEFENSE, CACHEMEDIC))
    if best and BEST_HEURISTIC_SERIES not in auc and best not in auc:
        key = f"{METRICS}.{ROBUSTNESS_AUC}"
        raise ConfigError(f"{doc.path}: missing required key {key}.{BEST_HEURISTIC_SERIES} (or {key}.{best})")
    auc_ci = {}
    for name, pair in doc.submap(METRICS, ROBUSTNESS_AUC_CI).items():
        k = (METRICS, ROBUSTNESS_AUC_CI, name)
        if not isinstance(pair, list) or len(pair) != 2:
            raise doc.error(k, "must be a [low, high] pair")
        auc_ci[name] = (doc.num(pair[0], (*k, 0)), doc.num(pair[1], (*k, 1)))
    return auc, auc_ci


def _paired_bootstrap(doc: _Doc) -> dict[str, dict[str, float]]:
    boot = {}
    boot_obj = doc.need(METRICS, PAIRED_BOOTSTRAP, kind=dict)
    doc.need(METRICS, PAIRED_BOOTSTRAP, CACHEMEDIC_MINUS_NO_DEFENSE, kind=dict)
    for name, entry in boot_obj.items():
        k = (METRICS, PAIRED_BOOTSTRAP, name)
        if not isinstance(entry, dict):
            raise doc.error(k, "must be a mapping {diff, ci_low, ci_high, n}")
        boot[name] = {f: doc.need_num(*k, f) for f in CI_FIELDS}
        boot[name]["n"] = entry.get("n")
    return boot


def _overhead(doc: _Doc) -> dict[str, dict[str, float]] | None:
    """Cost per defense, or None when it was not measured (figure B then plots AUC instead)."""
    k = (METRICS, OVERHEAD)
    overhead = doc.get(*k)
    if overhead is None:
        return None
    if not isinstance(overhead, dict) or not overhead:
        raise doc.error(k, "must be null or a non-empty mapping {defense: {tokens_per_sec, ...}}")
    # tokens_per_sec is what figure B plots; the others are only carried along
    return {d: {f: doc.num(doc.need(*k, d, f) if f == "tokens_per_sec" else doc.get(*k, d, f), (*k, d, f))
                for f in ("tokens_per_sec", "wall_sec", "peak_mem_mb")} for d in overhead}


def _damage(obj: Any) -> dict[str, float] | None:
    """A damage entry, or None when absent or malformed."""
    if not isinstance(obj, dict) or not all(_is_num(obj.get(f)) for f in DAMAGE_FIELDS):
        return None
    return {**{f: float(obj[f]) for f in DAMAGE_FIELDS}, "n": obj.get("n")}


def _recovered(obj: Any) -> dict[str, dict[str, float]]:
    """{defense: {value, ci_low, ci_high}} with null fields as NaN; malformed entries are skipped."""
    out = {}
    for d, e in _mapping(obj).items():
        if isinstance(e, dict) and all(e.get(f) is None or _is_num(e.get(f)) for f in RF_FIELDS):
            out[str(d)] = {f: math.nan if e.get(f) is None else float(e[f]) for f in RF_FIELDS}
    return out


def _by_type(doc: _Doc) -> dict:
    """Robustness AUC, paired bootstraps, damage and recovered fractions per corruption type (informational:
    malformed parts are skipped)."""
    by_type = {}
    boots_by_type = _mapping(doc.get(METRICS, PAIRED_BOOTSTRAP_BY_TYPE))
    damage_by_type = _mapping(doc.get(METRICS, DAMAGE_BY_TYPE))
    rf_by_type = _mapping(doc.get(METRICS, RECOVERED_FRACTION_BY_TYPE))
    for ty, per in _mapping(doc.get(METRICS, ROBUSTNESS_AUC_BY_TYPE)).items():
        boots = _mapping(boots_by_type.get(ty))
        if isinstance(per, dict):
            by_type[str(ty)] = {"auc": _numbers(per),
                                "boot": {k: b for k, b in boots.items() if isinstance(b, dict)
                                         and all(_is_num(b.get(f)) for f in CI_FIELDS)},
                                "damage": _damage(damage_by_type.get(ty)), "recovered": _recovered(rf_by_type.get(ty))}
    return by_type


def _recompute_costs(doc: _Doc) -> tuple[dict, str]:
    """(figure F's cost tables, note): per recomputing defense its cells' tokens recomputed and the oracle's
    minimum (tokens of the blocks the corruption touched), or {} and why figure F is not drawn."""
    out = {}
    for key in (RECOMPUTE_COST, DETECT_RECOMPUTE_COST):
        t = doc.get(METRICS, key)
        if not isinstance(t, dict) or not isinstance(t.get("defense"), str) or not _is_num(t.get("context_tokens_mean")):
            continue
        rows = [{"type": str(r["corruption_type"]), "eps": float(r["epsilon"]), "tokens": float(r["tokens_mean"]),
                 "oracle": float(r["corrupted_block_tokens_mean"]) if _is_num(r.get("corrupted_block_tokens_mean"))
                 else math.nan}
                for r in t.get("by_cell") or [] if isinstance(r, dict) and _is_num(r.get("tokens_mean"))
                and _is_num(r.get("epsilon")) and isinstance(r.get("corruption_type"), str)]
        if rows:
            out[t["defense"]] = {"context": float(t["context_tokens_mean"]), "by_cell": rows}
    if not out:
        return {}, (f"figure F not drawn: {doc.path.name} has no per-cell recomputation cost (no checksum_recompute "
                    "or detect_recompute evaluated at rest)")
    return out, ""


def _bit_classes(doc: _Doc) -> tuple[dict | None, str]:
    """(figure E's block, note): the block with per-class arrays (NaN for null), or None and why not."""
    key = f"{METRICS}.{BIT_CLASS_SCORES}"
    b = doc.get(METRICS, BIT_CLASS_SCORES)
    if b is None:
        return None, (f"figure E not drawn: {doc.path.name} has no {key} (eval.bit_classes was empty)")
    classes = b.get("classes") if isinstance(b, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return None, f"figure E not drawn: {key}.classes is missing or malformed"
    n = len(classes)

    def arr(seq: Any) -> np.ndarray | None:
        if isinstance(seq, list) and len(seq) == n and all(v is None or _is_num(v) for v in seq):
            return np.array([math.nan if v is None else float(v) for v in seq])
        return None

    per = {str(d): a for d, seq in _mapping(b.get("per_defense")).items() if (a := arr(seq)) is not None}
    if NO_DEFENSE not in per:
        return None, f"figure E not drawn: {key}.per_defense.{NO_DEFENSE} is missing or malformed"
    ci = {}
    for d, band in _mapping(b.get("ci")).items():
        lo, hi = arr(_mapping(band).get("low")), arr(_mapping(band).get("high"))
        if lo is not None and hi is not None:
            ci[str(d)] = (lo, hi)
    bits = {str(c): [int(x) for x in v] for c, v in _mapping(b.get("bits")).items()
            if isinstance(v, list) and all(isinstance(x, int) for x in v)}
    return {"classes": classes, "per_defense": per, "ci": ci, "bits": bits,
            **{k: float(b[k]) if _is_num(b.get(k)) else math.nan for k in ("eps", "flip_rate", "clean_no_defense")},
            **{k: b.get(k) for k in ("storage_format", "cache_dtype", "simulated", "burst")}}, ""


def _choice(doc: _Doc) -> dict | None:
    """best_baseline_choice, or None when absent or malformed."""
    c = doc.get(METRICS, BEST_BASELINE_CHOICE)
    if not isinstance(c, dict) or not isinstance(c.get("validation_auc"), dict):
        return None
    return {"rule": c.get("rule") if isinstance(c.get("rule"), str) else None,
            "types": [str(t) for t in c.get("types") or [] if isinstance(t, str)],
            "examples": c.get("examples") if _is_num(c.get("examples")) else None,
            "validation_auc": _numbers(c["validation_auc"]),
            "chosen": c.get("chosen") if isinstance(c.get("chosen"), str) else None}


def _load_task(path: Path) -> dict:
    doc = _Doc(read_json(path, "task metrics"), path)
    doc.need(METRICS, kind=dict)
    best = doc.need(METRICS, BEST_HEURISTIC_NAME, kind=(str, type(None)))
    auc, auc_ci = _auc(doc, best)
    clean = _float_map(doc, METRICS, CLEAN_REGRESSION, required=(NO_DEFENSE, CACHEMEDIC))
    boot = _paired_bootstrap(doc)
    overhead = _overhead(doc)
    by_task = {str(t): _curves(doc, METRICS, SCORE_VS_EPS_BY_TASK, t, best=best)
               for t in doc.submap(METRICS, SCORE_VS_EPS_BY_TASK)}
    clean_metrics = {str(t): _numbers(per) for t, per in _mapping(doc.get(METRICS, "clean_metrics")).items()
                     if isinstance(per, dict)}
    settings = doc.get(SETTINGS) or {}
    groups = {str(k): v for k, v in _mapping(doc.get(METRICS, DEFENSE_GROUPS)).items() if isinstance(v, str)}
    auc_by_task = {str(t): _numbers(per) for t, per in _mapping(doc.get(METRICS, ROBUSTNESS_AUC_BY_TASK)).items()
                   if isinstance(per, dict)}
    bits, bits_note = _bit_classes(doc)
    recompute, recompute_note = _recompute_costs(doc)
    return dict(run_id=doc.get(RUN_ID), config_hash=doc.get(CONFIG_HASH), by_type=_by_type(doc),
                bits=bits, bits_note=bits_note, recompute=recompute, recompute_note=recompute_note,
                auc_by_task=auc_by_task,
                groups=groups, choice=_choice(doc), damage=_damage(doc.get(METRICS, DAMAGE)),
                recovered=_recovered(doc.get(METRICS, RECOVERED_FRACTION)),
                curves=_curves(doc, METRICS, SCORE_VS_EPS, best=best), by_task=by_task, auc=auc, auc_ci=auc_ci,
                clean=clean, clean_metrics=clean_metrics, best=best, boot=boot, overhead=overhead,
                exposure=_numbers(doc.get(METRICS, "exposure")),
                settings=settings if isinstance(settings, dict) else {},
                oracle_note=(doc.get(METRICS, "oracle_note") or doc.get(SETTINGS, "oracle_note")
                             or doc.get(SETTINGS, "heuristic_note")))


# --------------------------------------------------------------------------------------------------
# stability metrics


def _sens_points(doc: _Doc) -> list[SensPoint]:
    pts_key = (METRICS, SENS_KEY, "points")
    raw = doc.need(*pts_key, kind=list)
    if not raw:
        raise doc.error(pts_key, "is empty")
    points = []
    for i, p in enumerate(raw):
        k = (*pts_key, i)
        doc.need(*k, kind=dict)
        heur = doc.get(*k, "heuristics") or {}
        if not isinstance(heur, dict):
            raise doc.error((*k, "heuristics"), "must be a mapping {name: value}")
        points.append(SensPoint(
            delta=doc.num(doc.need(*k, "delta_norm"), (*k, "delta_norm"), allow_null=False),
            baseline=doc.need_num(*k, "baseline"),
            heuristics={str(h): doc.num(v, (*k, "heuristics", h)) for h, v in heur.items()},
            cachemedic=doc.need_num(*k, "cachemedic"),
            vs_repaired=doc.num(p.get("cachemedic_vs_repaired_clean"), (*k, "cachemedic_vs_repaired_clean")),
            no_contr=doc.num(p.get("cachemedic_no_contr"), (*k, "cachemedic_no_contr"))))
    points.sort(key=lambda p: p.delta)
    return points


def _amplification(doc: _Doc) -> dict:
    a = (METRICS, AMP_KEY)
    layers, heads = ([int(doc.num(v, (*a, name, i), allow_null=False))
                      for i, v in enumerate(doc.need(*a, name, kind=list))] for name in ("layers", "heads"))
    if not layers or not heads:
        raise doc.error(a, "has no layers or no heads")
    grids = {}
    for name in ("baseline", "cachemedic"):
        rows = doc.need(*a, name, kind=list)
        if len(rows) != len(layers):
            raise doc.error((*a, name), f"has {len(rows)} rows, expected one per layer ({len(layers)})")
        grids[name] = np.stack([doc.nums(*a, name, i, length=len(heads)) for i in range(len(rows))])
    flagged = doc.get(*a, "flagged_layers") or []
    amp_delta = doc.get(*a, "delta_norm")
    return {"layers": layers, "heads": heads, "before": grids["baseline"], "after": grids["cachemedic"],
            "delta": None if amp_delta is None else doc.num(amp_delta, (*a, "delta_norm")),
            "flagged": {int(x) for x in flagged if isinstance(x, (int, float))}}


def _load_stability(path: Path) -> dict:
    doc = _Doc(read_json(path, "stability metrics"), path)
    points = _sens_points(doc)
    amp = _amplification(doc)
    st = doc.get(METRICS, STAB_SETTINGS_KEY) or doc.get(SETTINGS) or {}
    return dict(config_hash=doc.get(CONFIG_HASH), sens=points, amp=amp,
                stab_settings=st if isinstance(st, dict) else {})


# --------------------------------------------------------------------------------------------------
# the run dir


def _paired_config(rd: RunDir, cfg: dict | None, stab_settings: dict) -> tuple[dict | None, str | None]:
    """Settings of the paired lambda_contr = 0 run, when its directory can be found (optional)."""
    paired = stab_settings.get("paired_run")
    spec = ((paired.get("run_dir") if isinstance(paired, dict) else None) or stab_settings.get("paired_run_dir")
            or ((cfg or {}).get("stability") or {}).get("paired_run_dir"))
    if not isinstance(spec, str) or not spec:
        return None, None
    for cand in (resolve_path(spec), rd.path.parent / spec):
        try:
            stored = RunDir(cand).stored_config()
        except ConfigError:
            stored = None
        if stored is not None:
            return stored, str(spec)
    return None, str(spec)


def _load_stability_if_measured(path: Path) -> tuple[dict, str]:
    """(stability inputs, note): the empty note when the file exists, else no points and why figures C and D
    are not drawn. Only absence means "not measured": a file that is there is read and validated in full."""
    if not path.exists():
        return (dict(config_hash=None, sens=None, amp=None, stab_settings={}),
                f"figures C and D not drawn: stability was not measured for this run ({path.name} not found)")
    return _load_stability(path), ""


def load_inputs(run_dir: str | Path) -> Inputs:
    rd = RunDir(run_dir)
    task_path, stab_path = rd.task_metrics, rd.stability_metrics
    task = _load_task(task_path)  # required: figures A and B, the main table and the report need it
    stab, stability_note = _load_stability_if_measured(stab_path)
    th, sh = task["config_hash"], stab["config_hash"]
    if th and sh and th != sh:
        raise ConfigError(f"{task_path} (config {th}) and {stab_path} (config {sh}) come from different configs; "
                          "rerun eval or stability for this run dir")
    cfg = rd.stored_config()  # optional; a corrupted one is an error naming the file
    paired_cfg, paired_dir = _paired_config(rd, cfg, stab["stab_settings"])
    oracle = task.pop("oracle_note")
    if not isinstance(oracle, str) or not oracle:
        oracle = ORACLE_NOTE
    return Inputs(run_dir=rd.path, task_path=task_path,
                  run_id=str(task["run_id"] or rd.path.name), config_hash=str(th or sh or "unknown"),
                  **{k: v for k, v in task.items() if k not in ("run_id", "config_hash")},
                  sens=stab["sens"], amp=stab["amp"], stab_settings=stab["stab_settings"], cfg=cfg,
                  paired_cfg=paired_cfg, paired_dir=paired_dir, oracle_note=oracle, stability_note=stability_note)
