"""Figures, tables and a short report from a run's metrics (SPEC §9).

`python -m cachemedicpp.plots --run_dir D` reads `metrics/task_metrics.json`,
`metrics/stability_metrics.json` and, when present, `config_resolved.yaml` (operator settings), and
writes the locked names under `paper/`. Plots read metrics, never model state.

Every input is validated before anything is drawn, and every output is rendered in memory before the
first one is written (each write atomic), so a missing or malformed input is one clear exit-2 message and
leaves no placeholder or half-updated artefacts. Numbers that were not measured are shown as such, never
made up (a null `overhead` turns figure B into clean score vs robustness AUC and the title says so).
"""

from __future__ import annotations

import argparse
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cachemedicpp.config import ConfigError, resolve_path
from cachemedicpp.fileio import atomic_write_bytes, atomic_write_text, read_json
from cachemedicpp.rundir import RunDir

FIGURES = ("figA_score_vs_eps.png", "figB_clean_vs_overhead_pareto.png", "figC_logit_sensitivity.png",
           "figD_amplification_map.png")
TABLES = ("table_main_results.tex", "table_ablation_summary.tex")
REPORT = "report.md"
DPI = 150
SENS_KEY, AMP_KEY, STAB_SETTINGS_KEY = ("stability.logit_sensitivity", "stability.amplification_map",
                                        "stability.settings")
SERIES = ("no_defense", "best_heuristic", "cachemedic")
Z_ORDER = {"cachemedic": 0, "best_heuristic": 1, "no_defense": 2}

# Okabe-Ito palette (distinguishable under the common colour-vision deficiencies); every curve also
# gets its own marker and line style so the figures survive greyscale printing.
BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, GREY = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#8C8C8C")
DEFENSE_STYLE = {  # colour, marker
    "no_defense": (BLACK, "o"),
    "reset_clear": (VERMILLION, "v"),
    "smoothing": (ORANGE, "s"),
    "masking_dropout": (GREEN, "P"),
    "clipping_renorm": (PURPLE, "X"),
    "cachemedic": (BLUE, "D"),
}
SPARE_STYLES = [(GREY, "h"), (YELLOW, "*"), (ORANGE, "<"), (GREEN, ">"), (PURPLE, "p")]
NO_CONTR_STYLE = (SKY, "^")  # a lighter shade of cachemedic's blue: the same operator without L_contr
RC = {
    "font.size": 10.5, "axes.titlesize": 11.5, "axes.labelsize": 10.5, "legend.fontsize": 9.5,
    "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "figure.titlesize": 13, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
}


def defense_style(name: str) -> tuple[str, str]:
    if name in DEFENSE_STYLE:
        return DEFENSE_STYLE[name]
    return SPARE_STYLES[sum(map(ord, name)) % len(SPARE_STYLES)]


# --------------------------------------------------------------------------------------------------
# input validation


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

    def nums(self, *keys: Any, length: int | None = None) -> np.ndarray:
        seq = self.need(*keys, kind=list)
        if length is not None and len(seq) != length:
            raise self.error(keys, f"has {len(seq)} values, expected {length}")
        return np.array([self.num(v, (*keys, i)) for i, v in enumerate(seq)], dtype=float)


@dataclass
class Curves:
    eps: np.ndarray
    series: dict[str, np.ndarray]
    ci: dict[str, tuple[np.ndarray, np.ndarray]]


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
    stab_path: Path
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
    sens: list[SensPoint]
    amp: dict
    stab_settings: dict
    cfg: dict | None
    paired_cfg: dict | None = None
    paired_dir: str | None = None
    oracle_note: str = ""
    by_type: dict = field(default_factory=dict)  # {type: {"auc": {...}, "boot": {...}}}, informational

    @property
    def has_pair(self) -> bool:
        return any(not math.isnan(p.no_contr) for p in self.sens)

    def best_auc(self) -> float:
        return self.auc.get("best_heuristic", self.auc.get(self.best or "", math.nan))

    def best_auc_ci(self) -> tuple[float, float] | None:
        return self.auc_ci.get("best_heuristic", self.auc_ci.get(self.best or ""))


def _curves(doc: _Doc, *keys: Any, best: str | None) -> Curves:
    eps = doc.nums(*keys, "eps")
    if len(eps) == 0:
        raise doc.error((*keys, "eps"), "is empty")
    series = {name: doc.nums(*keys, name, length=len(eps)) for name in SERIES if best or name != "best_heuristic"}
    ci = {}
    for name, band in _submap(doc, *keys, "ci").items():
        k = (*keys, "ci", name)
        if not isinstance(band, dict):
            raise doc.error(k, "must be a mapping {low, high}")
        ci[name] = (doc.nums(*k, "low", length=len(eps)), doc.nums(*k, "high", length=len(eps)))
    order = np.argsort(eps, kind="stable")
    return Curves(eps[order], {n: s[order] for n, s in series.items()},
                  {n: (lo[order], hi[order]) for n, (lo, hi) in ci.items()})


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mapping(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _float_map(doc: _Doc, *keys: Any, required: Sequence[str] = ()) -> dict[str, float]:
    """{name: number}: the required names must be numbers (or null); other entries that are not numbers
    (extra breakdowns a newer writer may add) are skipped."""
    obj = doc.need(*keys, kind=dict)
    out = {str(k): float(v) if _is_num(v) else math.nan for k, v in obj.items() if v is None or _is_num(v)}
    for name in required:
        out[name] = doc.num(doc.need(*keys, name), (*keys, name))
    return out


def _submap(doc: _Doc, *keys: Any) -> dict:
    obj = doc.get(*keys)
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise doc.error(keys, "must be a mapping")
    return obj


def _load_task(path: Path) -> dict:
    doc = _Doc(read_json(path, "task metrics"), path)
    m = ("metrics",)
    doc.need(*m, kind=dict)
    best = doc.need(*m, "best_heuristic_name", kind=(str, type(None)))
    auc = _float_map(doc, *m, "robustness_auc", required=("no_defense", "cachemedic"))
    if best and "best_heuristic" not in auc and best not in auc:
        raise ConfigError(f"{path}: missing required key metrics.robustness_auc.best_heuristic "
                          f"(or metrics.robustness_auc.{best})")
    auc_ci = {}
    for name, pair in _submap(doc, *m, "robustness_auc_ci").items():
        k = (*m, "robustness_auc_ci", name)
        if not isinstance(pair, list) or len(pair) != 2:
            raise doc.error(k, "must be a [low, high] pair")
        auc_ci[name] = (doc.num(pair[0], (*k, 0)), doc.num(pair[1], (*k, 1)))
    clean = _float_map(doc, *m, "clean_regression", required=("no_defense", "cachemedic"))
    boot = {}
    boot_obj = doc.need(*m, "paired_bootstrap", kind=dict)
    doc.need(*m, "paired_bootstrap", "cachemedic_minus_no_defense", kind=dict)
    for name, entry in boot_obj.items():
        k = (*m, "paired_bootstrap", name)
        if not isinstance(entry, dict):
            raise doc.error(k, "must be a mapping {diff, ci_low, ci_high, n}")
        boot[name] = {f: doc.num(doc.need(*k, f), (*k, f)) for f in ("diff", "ci_low", "ci_high")}
        boot[name]["n"] = entry.get("n")
        if isinstance(entry.get("metric"), str):
            boot[name]["metric"] = entry["metric"]
    overhead = doc.get(*m, "overhead")
    if overhead is not None:
        k = (*m, "overhead")
        if not isinstance(overhead, dict) or not overhead:
            raise doc.error(k, "must be null or a non-empty mapping {defense: {tokens_per_sec, ...}}")
        overhead = {d: {f: doc.num(doc.need(*k, d, f) if f == "tokens_per_sec" else doc.get(*k, d, f), (*k, d, f))
                        for f in ("tokens_per_sec", "wall_sec", "peak_mem_mb")} for d in overhead}
    by_task = {str(t): _curves(doc, *m, "score_vs_eps_by_task", t, best=best)
               for t in _submap(doc, *m, "score_vs_eps_by_task")}
    # Informational extras: shown when well-formed, never a reason to refuse the figures.
    clean_metrics = {str(t): {d: float(v) for d, v in per.items() if _is_num(v)}
                     for t, per in _mapping(doc.get(*m, "clean_metrics")).items() if isinstance(per, dict)}
    exposure = {str(t): float(v) for t, v in _mapping(doc.get(*m, "exposure")).items() if _is_num(v)}
    settings = doc.get("settings") or {}
    by_type = {}
    for ty, per in _mapping(doc.get(*m, "robustness_auc_by_type")).items():
        boots = _mapping(_mapping(doc.get(*m, "paired_bootstrap_by_type")).get(ty))
        if isinstance(per, dict):
            by_type[str(ty)] = {"auc": {d: float(v) for d, v in per.items() if _is_num(v)},
                                "boot": {k: b for k, b in boots.items() if isinstance(b, dict)
                                         and all(_is_num(b.get(f)) for f in ("diff", "ci_low", "ci_high"))}}
    return dict(run_id=doc.get("run_id"), config_hash=doc.get("config_hash"), by_type=by_type,
                curves=_curves(doc, *m, "score_vs_eps", best=best), by_task=by_task, auc=auc, auc_ci=auc_ci,
                clean=clean, clean_metrics=clean_metrics, best=best, boot=boot, overhead=overhead, exposure=exposure,
                settings=settings if isinstance(settings, dict) else {},
                oracle_note=(doc.get(*m, "oracle_note") or doc.get("settings", "oracle_note")
                             or doc.get("settings", "heuristic_note")))


def _load_stability(path: Path) -> dict:
    doc = _Doc(read_json(path, "stability metrics"), path)
    m = ("metrics",)
    pts_key = (*m, SENS_KEY, "points")
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
            baseline=doc.num(doc.need(*k, "baseline"), (*k, "baseline")),
            heuristics={str(h): doc.num(v, (*k, "heuristics", h)) for h, v in heur.items()},
            cachemedic=doc.num(doc.need(*k, "cachemedic"), (*k, "cachemedic")),
            vs_repaired=doc.num(p.get("cachemedic_vs_repaired_clean"), (*k, "cachemedic_vs_repaired_clean")),
            no_contr=doc.num(p.get("cachemedic_no_contr"), (*k, "cachemedic_no_contr"))))
    points.sort(key=lambda p: p.delta)

    a = (*m, AMP_KEY)
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
    amp = {"layers": layers, "heads": heads, "before": grids["baseline"], "after": grids["cachemedic"],
           "delta": None if amp_delta is None else doc.num(amp_delta, (*a, "delta_norm")),
           "flagged": {int(x) for x in flagged if isinstance(x, (int, float))}}
    st = doc.get(*m, STAB_SETTINGS_KEY) or doc.get("settings") or {}
    return dict(config_hash=doc.get("config_hash"), sens=points, amp=amp,
                stab_settings=st if isinstance(st, dict) else {})


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


def load_inputs(run_dir: str | Path) -> Inputs:
    rd = RunDir(run_dir)
    task_path, stab_path = rd.metrics / "task_metrics.json", rd.metrics / "stability_metrics.json"
    task, stab = _load_task(task_path), _load_stability(stab_path)
    th, sh = task["config_hash"], stab["config_hash"]
    if th and sh and th != sh:
        raise ConfigError(f"{task_path} (config {th}) and {stab_path} (config {sh}) come from different configs; "
                          "rerun eval or stability for this run dir")
    cfg = rd.stored_config()  # optional; a corrupted one is an error naming the file
    paired_cfg, paired_dir = _paired_config(rd, cfg, stab["stab_settings"])
    oracle = task.pop("oracle_note")
    if not isinstance(oracle, str) or not oracle:
        from cachemedicpp.defenses import ORACLE_NOTE

        oracle = ORACLE_NOTE
    return Inputs(run_dir=rd.path, task_path=task_path, stab_path=stab_path,
                  run_id=str(task["run_id"] or rd.path.name), config_hash=str(th or sh or "unknown"),
                  **{k: v for k, v in task.items() if k not in ("run_id", "config_hash")},
                  sens=stab["sens"], amp=stab["amp"], stab_settings=stab["stab_settings"], cfg=cfg,
                  paired_cfg=paired_cfg, paired_dir=paired_dir, oracle_note=oracle)


# --------------------------------------------------------------------------------------------------
# formatting


def fmt(x: float | None, digits: int = 4) -> str:
    """`digits` decimals below 1 (scores, AUCs), `digits` significant figures above (perplexity, drift)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.{max(digits - 1 - int(math.floor(math.log10(ax))), 0)}f}"
    if ax < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}g}"
    return f"{x:.{digits}f}"


def fmt_ci(x: float, ci: tuple[float, float] | None) -> str:
    return fmt(x) if ci is None else f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def excludes_zero(entry: dict) -> bool | None:
    lo, hi = entry["ci_low"], entry["ci_high"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo > 0 or hi < 0


def heuristic_label(best: str) -> str:
    return f"best heuristic ({best})"


def layer_ranges(layers: Sequence[int], dash: str = "–") -> str:
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}{dash}{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def ood_text(settings: dict) -> str | None:
    split, proto = settings.get("ood_split"), settings.get("ood_protocol")
    if isinstance(split, dict) and split.get("test_type"):
        return f"{split.get('name') or proto or 'OOD split'} (held out: {split['test_type']})"
    if isinstance(split, str) and split:
        return split
    return proto if isinstance(proto, str) and proto else None


def tasks_text(tasks: Any) -> str:
    """`name (n = ...)` per task from either a list of names/dicts or a {name: info} mapping."""
    if isinstance(tasks, dict):
        items = list(tasks.items())
    elif isinstance(tasks, list):
        items = [(t.get("name"), t) if isinstance(t, dict) else (t, {}) for t in tasks]
    else:
        return plain(tasks)
    out = []
    for name, info in items:
        n = info.get("n", info.get("num_examples")) if isinstance(info, dict) else None
        out.append(f"{name} (n = {n})" if n is not None else str(name))
    return ", ".join(out)


def checkpoint_text(ckpt: Any, run_hash: str) -> str:
    if not isinstance(ckpt, dict):
        return plain(ckpt)
    bits = [f"step {ckpt['step']}" if ckpt.get("step") is not None else None, ckpt.get("status"),
            f"sha256 {ckpt['sha256']}" if ckpt.get("sha256") else None]
    other = ckpt.get("config_hash")
    if other and not str(run_hash).startswith(str(other)) and not str(other).startswith(str(run_hash)):
        bits.append(f"written under config {other}, not this run's")
    extra = ", ".join(b for b in bits if b)
    return f"`{ckpt.get('path')}`" + (f" ({extra})" if extra else "")


def plain(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {plain(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(plain(x) for x in v)
    return str(v)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex(s: Any) -> str:
    return "".join(_TEX.get(c, c) for c in str(s))


# --------------------------------------------------------------------------------------------------
# figures


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _pad(values: Sequence[float], frac: float = 0.12, floor: float | None = None) -> tuple[float, float]:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi), 1e-3) * 0.2
    lo, hi = lo - frac * span, hi + frac * span
    if floor is not None and float(v.min()) >= floor:
        lo = max(lo, floor)
    return lo, hi


def _series_style(name: str, best: str | None) -> dict:
    if name == "best_heuristic":
        color, marker = defense_style(best)
        return dict(color=color, marker=marker, ls="--", label=heuristic_label(best))
    color, marker = defense_style(name)
    return dict(color=color, marker=marker, ls="-" if name == "cachemedic" else ":",
                label="no defense" if name == "no_defense" else name)


def _draw_curves(ax, c: Curves, best: str | None, auc: dict[str, float] | None = None) -> None:
    vals: list[float] = []
    for name in c.series:
        st = _series_style(name, best)
        if auc is not None:
            a = (auc.get(name, math.nan) if name != "best_heuristic"
                 else auc.get("best_heuristic", auc.get(best or "", math.nan)))
            st["label"] += f"  (AUC {fmt(a)})"
        # solid cachemedic underneath, so a dotted/dashed curve lying on it stays visible
        ax.plot(c.eps, c.series[name], lw=2, ms=6, zorder=3 + Z_ORDER[name], **st)
        band = c.ci.get(name, c.ci.get(best) if name == "best_heuristic" else None)
        if band is not None:
            lo, hi = band
            # light fill plus edges in the curve's own colour and style: overlapping bands stay attributable
            ax.fill_between(c.eps, lo, hi, color=st["color"], alpha=0.10, lw=0, zorder=2)
            for edge in (lo, hi):
                ax.plot(c.eps, edge, color=st["color"], ls=st["ls"], lw=0.8, alpha=0.7, zorder=2)
            vals += [*lo, *hi]
        vals += list(c.series[name])
    ax.set_xticks(c.eps)
    ax.set_xticklabels([f"{e:g}" for e in c.eps])
    ax.set_ylim(*_pad(vals, 0.08, floor=0.0))
    ax.set_xlabel("corruption severity ε")


def fig_score_vs_eps(inp: Inputs) -> bytes:
    tasks = list(inp.by_task) if len(inp.by_task) >= 2 else []
    ncols = min(len(tasks), 3) if tasks else 1
    nrows_tasks = math.ceil(len(tasks) / ncols) if tasks else 0
    fig = _new_figure(11.0, 5.6 + 3.3 * nrows_tasks)
    gs = fig.add_gridspec(1 + nrows_tasks, ncols, height_ratios=[1.5] + [1.0] * nrows_tasks)
    main = fig.add_subplot(gs[0, :])
    _draw_curves(main, inp.curves, inp.best, auc=inp.auc)
    main.set_ylabel("normalised score (higher is better)")
    main.set_title("Mean over tasks × corruption types" + (" (bands: 95% CI)" if inp.curves.ci else ""))
    handles, labels = main.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    task_axes = []
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(gs[1 + i // ncols, i % ncols])
        _draw_curves(ax, inp.by_task[t], inp.best)
        ax.set_title(t)
        if i % ncols == 0:
            ax.set_ylabel("normalised score")
        task_axes.append(ax)
    if task_axes:  # one y range for all task panels, so tasks compare at a glance
        lims = [ax.get_ylim() for ax in task_axes]
        for ax in task_axes:
            ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    s = inp.settings
    split = s.get("ood_split")
    split = split.get("name") if isinstance(split, dict) else split or s.get("ood_protocol")
    sub = [f"persistence: {s['persistence']}" if s.get("persistence") else None,
           f"OOD split: {split}" if isinstance(split, str) and split else None,
           f"types: {plain(s['types'])}" if s.get("types") else None]
    sub = " · ".join(x for x in sub if x)
    fig.suptitle("Task robustness vs corruption severity" + (f"\n{sub}" if sub else ""))
    return _png(fig)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points when both coordinates are to be maximised, by increasing x."""
    front = []
    for name, (x, y) in points.items():
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for o, (ox, oy) in points.items() if o != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _pareto_panel(ax, pts: dict[str, tuple[float, float]], best: str | None) -> None:
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], ls="--", color=GREY, lw=1.5, zorder=1,
                label="Pareto front")
    ax.scatter([pts[n][0] for n in front], [pts[n][1] for n in front], s=300, facecolors="none", edgecolors=GREY,
               linewidths=1.6, zorder=2, label="Pareto-optimal (non-dominated)")
    for d, (x, y) in pts.items():
        color, marker = defense_style(d)
        label = "no defense" if d == "no_defense" else d + (" (best heuristic)" if d == best else "")
        # no defense on top and smaller: a defense with (near) identical numbers must not hide it
        ax.scatter([x], [y], s=45 if d == "no_defense" else 110, color=color, marker=marker, edgecolors="white",
                   linewidths=0.8, zorder=4 if d == "no_defense" else 3, label=label)
    ax.set_xlim(*_pad([p[0] for p in pts.values()], 0.15))
    ax.set_ylim(*_pad([p[1] for p in pts.values()], 0.15))


def fig_pareto(inp: Inputs) -> bytes:
    """Clean score (and robustness) against throughput; without overhead data, clean score vs AUC."""
    defenses = [d for d in inp.clean if d != "best_heuristic"]
    auc = {d: inp.auc[d] for d in defenses if d in inp.auc}
    clean_y = "clean score (mean normalised)"
    if inp.overhead is not None:
        tp = {d: inp.overhead[d]["tokens_per_sec"] for d in defenses if d in inp.overhead}
        panels = [(tp, inp.clean, "throughput (processed tokens/s)", clean_y, "Clean score vs throughput"),
                  (tp, auc, "throughput (processed tokens/s)", "robustness AUC",
                   "Robustness AUC vs throughput")]
        title = "Cost of each defense: quality vs throughput (up and right is better)"
        needed = "metrics.overhead.<defense>.tokens_per_sec"
    else:
        panels = [(auc, inp.clean, "robustness AUC", clean_y, "Clean score vs robustness AUC")]
        title = ("Throughput not measured (overhead is null in task_metrics.json):\n"
                 "clean score vs robustness AUC instead (up and right is better)")
        needed = "metrics.robustness_auc.<defense>"
    fig = _new_figure(12.5 if len(panels) == 2 else 8.5, 5.4)
    missing: set[str] = set()
    for i, (xs, ys, xlabel, ylabel, sub) in enumerate(panels):
        pts = {d: (xs[d], ys[d]) for d in defenses
               if d in xs and d in ys and math.isfinite(xs[d]) and math.isfinite(ys[d])}
        if not pts:
            raise ConfigError(f"{inp.task_path}: no defense has both metrics.clean_regression.<defense> and {needed}")
        missing |= set(defenses) - set(pts)
        ax = fig.add_subplot(1, len(panels), i + 1)
        _pareto_panel(ax, pts, inp.best)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(sub)
        if i == 0:
            handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    if missing:
        title += f"\nnot plotted (no data): {', '.join(sorted(missing))}"
    fig.suptitle(title)
    return _png(fig)


def _wide(values: Sequence[float], ratio: float = 30.0) -> bool:
    v = [x for x in values if math.isfinite(x) and x > 0]
    return len(v) >= 2 and max(v) / min(v) > ratio


def fig_sensitivity(inp: Inputs) -> bytes:
    d = np.array([p.delta for p in inp.sens])
    lines = [("no defense", np.array([p.baseline for p in inp.sens]), BLACK, "o", ":")]
    for h in sorted({h for p in inp.sens for h in p.heuristics}):
        color, marker = defense_style(h)
        label = heuristic_label(h) if h == inp.best else f"heuristic ({h})"
        lines.append((label, np.array([p.heuristics.get(h, math.nan) for p in inp.sens]), color, marker, "--"))
    lines.append(("cachemedic", np.array([p.cachemedic for p in inp.sens]), BLUE, "D", "-"))
    if inp.has_pair:
        lines.append((r"cachemedic, $\lambda_{\mathrm{contr}} = 0$ pair", np.array([p.no_contr for p in inp.sens]),
                      *NO_CONTR_STYLE, "-."))
    vs_rep = np.array([p.vs_repaired for p in inp.sens])
    fig = _new_figure(12.0, 5.8)
    ax, rax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    values = [v for _, y, *_ in lines for v in y] + list(vs_rep)
    log = _wide(values)
    show = (lambda y: np.where(y > 0, y, math.nan)) if log else (lambda y: y)  # log axes cannot show zero drift
    for label, y, color, marker, ls in lines:
        ax.plot(d, show(y), color=color, marker=marker, ls=ls, lw=2, ms=6, label=label,
                zorder=3 if ls == "-" else 4)
    if np.isfinite(vs_rep).any():
        ax.plot(d, show(vs_rep), color=BLUE, marker="D", mfc="white", ls=(0, (1, 1.5)), lw=1.5, ms=5,
                label="cachemedic vs repaired-clean logits", zorder=3)
    title = "Logit sensitivity (lower is more stable)"
    if log:
        ax.set_yscale("log")
        if any(math.isfinite(v) and v <= 0 for v in values):
            title += "\n(log scale: zero drift is not shown)"
    ax.set_xticks(d)
    ax.set_xticklabels([f"{x:g}" for x in d])
    scale = inp.stab_settings.get("delta_scale")
    per_entry = f" (per-entry size δ·{scale:g}·RMS)" if isinstance(scale, (int, float)) else ""
    ax.set_xlabel("perturbation size δ" + per_entry)
    ax.set_ylabel("logit drift ‖Δz‖₂ over top-k logits" + (" (log)" if log else ""))
    ax.set_title(title)

    # Right panel: the same drifts relative to no defense, so "more or less sensitive" is read off directly.
    keep = np.array([p.baseline > 0 and math.isfinite(p.baseline) for p in inp.sens])
    ratios = []
    for label, y, color, marker, ls in lines[1:]:
        r = np.where(keep, y / np.where(keep, [p.baseline for p in inp.sens], 1.0), math.nan)
        ratios += list(r)
        rax.plot(d[keep], r[keep], color=color, marker=marker, ls=ls, lw=2, ms=6, zorder=3 if ls == "-" else 4)
    rax.axhline(1.0, color=BLACK, lw=1, ls=":", zorder=1)
    if _wide(ratios + [1.0], 8.0):
        rax.set_yscale("log")
    rax.set_xticks(d[keep])
    rax.set_xticklabels([f"{x:g}" for x in d[keep]])
    rax.set_xlabel("perturbation size δ")
    rax.set_ylabel("drift / drift without defense")
    rax.set_title("Relative to no defense (< 1: less sensitive)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    fig.suptitle("Stability of output logits under random cache perturbations")
    return _png(fig)


def _annotate(ax, grid: np.ndarray, norm, cmap) -> None:
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if not math.isfinite(v):
                continue
            r, g, b, _ = cmap(norm(v))
            ax.text(j, i, fmt(float(v), 3), ha="center", va="center", fontsize=7.5,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")


def fig_amplification(inp: Inputs) -> bytes:
    from matplotlib import colormaps

    a = inp.amp
    before, after = a["before"], a["after"]
    L, H = before.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(before > 0, after / before, math.nan)
    both = np.concatenate([before.ravel(), after.ravel()])
    finite = both[np.isfinite(both)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    shared = (mcolors.LogNorm(vmin, vmax) if vmin > 0 and vmax / vmin > 100 else mcolors.Normalize(vmin, vmax))
    rf = ratio[np.isfinite(ratio) & (ratio > 0)]
    m = float(np.abs(np.log10(rf)).max()) if rf.size else 0.0
    m = max(m, 0.05)
    rnorm = mcolors.LogNorm(10 ** -m, 10 ** m)  # symmetric in log space: 1 sits at the centre colour
    seq, div = colormaps["viridis"], colormaps["RdBu_r"]
    annotate = L * H <= 60

    fig = _new_figure(min(4.0 + 2.4 * H, 13.5) if H > 3 else 11.0, max(4.2, 0.32 * L + 2.2))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    ylabels = [f"{l}*" if l in a["flagged"] else str(l) for l in a["layers"]]
    panels = [(before, shared, seq, "before: no repair"), (after, shared, seq, "after: cachemedic repair"),
              (ratio, rnorm, div, "ratio after / before")]
    for k, (ax, (grid, norm, cmap, title)) in enumerate(zip(axes, panels)):
        im = ax.imshow(np.ma.masked_invalid(grid), norm=norm, cmap=cmap, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(H), [str(h) for h in a["heads"]])
        ax.set_yticks(range(L), ylabels if k == 0 else [""] * L)
        ax.set_xlabel("KV head")
        ax.grid(False)
        ax.set_title(title)
        if annotate:
            _annotate(ax, grid, norm, cmap)
        if k == 1:
            fig.colorbar(im, ax=axes[:2], label=r"amplification γ = drift / $\|\Delta\|_F$", shrink=0.9)
        if k == 2:
            cb = fig.colorbar(im, ax=ax, shrink=0.9)
            cb.set_label("after / before (< 1: repair damps)")
            if norm.vmax / norm.vmin < 4:
                ticks = [t for t in MaxNLocator(6).tick_values(norm.vmin, norm.vmax) if norm.vmin <= t <= norm.vmax]
            else:
                ticks = [t for t in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
                         if norm.vmin <= t <= norm.vmax]
            cb.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
            cb.minorticks_off()
    axes[0].set_ylabel("layer" + ("  (* outside the protected set)" if a["flagged"] else ""))
    delta = f" at δ = {a['delta']:g}" if a["delta"] is not None and math.isfinite(a["delta"]) else ""
    fig.suptitle(f"Amplification map γ(layer, head){delta}: median drift per unit perturbation\n"
                 "ratio < 1 (blue) means the repair damps the perturbation, > 1 (red) amplifies it")
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# tables


def tnum(text: str) -> str:
    """A formatted number (or CI) for LaTeX: proper minus signs."""
    return re.sub(r"(?<![\w.])-(?=\d)", "$-$", text)


def _table(label: str, caption: str, body: list[str]) -> str:
    return "\n".join([
        "% Generated by cachemedicpp.plots; requires \\usepackage{booktabs}.",
        "\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{caption}}}", f"\\label{{{label}}}",
        *body, "\\end{table}", ""])


def _tabular(cols: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule",
            *(" & ".join(r) + " \\\\" for r in rows), "\\bottomrule", "\\end{tabular}"]


def _ppl_task(inp: Inputs) -> str | None:
    return next((t for t in inp.clean_metrics if "ppl" in t), None)


def table_main(inp: Inputs) -> str:
    ppl_task = _ppl_task(inp)
    names = [("no_defense", "No defense")] + ([(inp.best, f"Best heuristic ({tex(inp.best)})")] if inp.best else []) \
        + [("cachemedic", "CacheMedic")]
    header = ["Defense", "Clean score"] + (["Clean PPL"] if ppl_task else []) + \
             ["Robustness AUC [95\\% CI]", "$\\Delta$\\,AUC vs no defense [95\\% CI]"]
    rows = []
    for key, label in names:
        auc = inp.best_auc() if key == inp.best else inp.auc.get(key, math.nan)
        ci = inp.best_auc_ci() if key == inp.best else inp.auc_ci.get(key)
        row = [label, fmt(inp.clean.get(key, math.nan))]
        if ppl_task:
            row.append(fmt(inp.clean_metrics[ppl_task].get(key, math.nan)))
        row.append(tnum(fmt_ci(auc, ci)))
        if key == "no_defense":
            boot = None
        elif key == "cachemedic":
            boot = inp.boot["cachemedic_minus_no_defense"]
        else:
            boot = inp.boot.get(f"{key}_minus_no_defense", inp.boot.get("best_heuristic_minus_no_defense"))
        row.append("---" if boot is None else tnum(fmt_ci(boot["diff"], (boot["ci_low"], boot["ci_high"]))))
        rows.append(row)
    cap = [f"Main results (run {tex(inp.run_id)}). Clean score: mean normalised clean score over tasks",
           f"(clean perplexity on {tex(ppl_task)})" if ppl_task else "",
           "; robustness AUC: trapezoid over $\\epsilon$ of the normalised score. CIs: 95\\% bootstrap "
           "over examples, paired for differences."]
    for key, what in (("cachemedic_minus_best_heuristic", "CacheMedic $-$ best heuristic, $\\Delta$\\,AUC"),
                      ("clean_cachemedic_minus_no_defense", "CacheMedic $-$ no defense, $\\Delta$\\,clean score"),
                      ("clean_cachemedic_minus_best_heuristic", "CacheMedic $-$ best heuristic, $\\Delta$\\,clean score")):
        b = inp.boot.get(key)
        if b is not None:
            cap.append(f"{what}: {tnum(fmt_ci(b['diff'], (b['ci_low'], b['ci_high'])))}.")
    cap.append(f"Heuristics {tex(_strip_heuristics(inp.oracle_note))}.")
    cols = "l" + "c" * (len(header) - 1)
    return _table("tab:main-results", " ".join(c for c in cap if c).replace(" ;", ";"), _tabular(cols, header, rows))


def _strip_heuristics(note: str) -> str:
    return note[len("heuristics "):] if note.lower().startswith("heuristics ") else note


def _setting(cfg: dict | None, section: str, key: str) -> str:
    if cfg is None:
        return "n/a"
    v = (cfg.get(section) or {}).get(key)
    if v is None:
        return "n/a"
    if key == "protect_layers":
        return tex(layer_ranges(v, dash="--"))
    return tex(f"{v:g}" if isinstance(v, float) else v)


SETTING_ROWS = [("Family", "repair", "family"), ("Rank", "repair", "rank"), ("Apply to", "repair", "apply_to"),
                ("Protected layers", "repair", "protect_layers"), ("$\\lambda_{\\mathrm{id}}$", "train", "lambda_id"),
                ("$\\lambda_{\\mathrm{contr}}$", "train", "lambda_contr"), ("Training steps", "train", "steps")]


def table_ablation(inp: Inputs) -> str:
    pair_cols = inp.paired_cfg is not None
    header = ["Setting", "This run"] + (["$\\lambda_{\\mathrm{contr}}=0$ pair"] if pair_cols else [])
    rows = [[label, _setting(inp.cfg, s, k)] + ([_setting(inp.paired_cfg, s, k)] if pair_cols else [])
            for label, s, k in SETTING_ROWS]
    body = _tabular("l" + "c" * (len(header) - 1), header, rows)
    cap = [f"Repair operator settings (run {tex(inp.run_id)})."]
    if inp.cfg is None:
        cap.append("config\\_resolved.yaml was not found, so settings are n/a.")
    if inp.has_pair:
        srows = []
        for p in inp.sens:
            ratio = p.cachemedic / p.no_contr if p.no_contr > 0 else math.nan
            srows.append([f"{p.delta:g}", *(tnum(fmt(x)) for x in (p.baseline, p.cachemedic, p.no_contr)),
                          fmt(ratio, 3)])
        body += ["", "\\vspace{0.8em}", ""] + _tabular(
            "ccccc", ["$\\delta$", "No defense", "CacheMedic", "$\\lambda_{\\mathrm{contr}}=0$",
                      "Ratio"], srows)
        cap.append("Bottom: logit sensitivity (drift over the top-$k$ logits) at each perturbation size $\\delta$; "
                   "ratio = CacheMedic / $\\lambda_{\\mathrm{contr}}=0$ pair (below 1: the contraction term lowers "
                   "sensitivity).")
    else:
        cap.append("No paired $\\lambda_{\\mathrm{contr}}=0$ run in the stability metrics, so no contrast is shown.")
    return _table("tab:ablation-summary", " ".join(cap), body)


# --------------------------------------------------------------------------------------------------
# report


def _sens_at(inp: Inputs, delta: float) -> SensPoint | None:
    return next((p for p in inp.sens if abs(p.delta - delta) < 1e-9), None)


def _ratio_words(x: float, ref: float) -> str:
    if not (math.isfinite(x) and math.isfinite(ref)) or ref <= 0:
        return "ratio n/a"
    r = x / ref
    return f"{r:.2f}× the undefended drift, " + ("less sensitive" if r < 1 else "more sensitive" if r > 1 else "equal")


def report_md(inp: Inputs) -> str:
    L: list[str] = []
    L += [f"# Results for run `{inp.run_id}`", "",
          f"Config hash `{inp.config_hash}`. Numbers below are read from `metrics/task_metrics.json` and "
          "`metrics/stability_metrics.json`"
          + (" (operator settings from `config_resolved.yaml`)." if inp.cfg else "."),
          ""]
    # task results
    trio = [("no defense", "no_defense"), *([(inp.best, inp.best)] if inp.best else []), ("cachemedic", "cachemedic")]

    def each(values: dict, ci: dict | None = None) -> str:
        return ", ".join(f"{label} {fmt_ci(values.get(k, math.nan), None if ci is None else ci.get(k))}"
                         for label, k in trio)

    L += ["## Task robustness", "",
          (f"- Best heuristic: **{inp.best}** (highest robustness AUC among the heuristics, "
           f"AUC {fmt_ci(inp.best_auc(), inp.best_auc_ci())})." if inp.best else
           "- No heuristic defense was evaluated, so there is no best heuristic."),
          f"- Clean score (mean normalised over tasks): {each(inp.clean)}."]
    ppl_task = _ppl_task(inp)
    if ppl_task:
        L.append(f"- Clean perplexity on {ppl_task}: {each(inp.clean_metrics[ppl_task])}.")
    auc = dict(inp.auc, **({inp.best: inp.best_auc()} if inp.best else {}))
    auc_ci = dict(inp.auc_ci, **({inp.best: inp.best_auc_ci()} if inp.best else {}))
    L.append(f"- Robustness AUC (trapezoid over ε of the normalised score, 95% CI): {each(auc, auc_ci)}.")
    for key, what in (("cachemedic_minus_no_defense", "robustness AUC, cachemedic − no defense"),
                      ("cachemedic_minus_best_heuristic", f"robustness AUC, cachemedic − {inp.best}"),
                      ("clean_cachemedic_minus_no_defense", "clean score, cachemedic − no defense"),
                      ("clean_cachemedic_minus_best_heuristic", f"clean score, cachemedic − {inp.best}")):
        b = inp.boot.get(key)
        if b is None:
            continue
        ex = excludes_zero(b)
        verdict = ("CI not available" if ex is None else "the interval excludes zero" if ex
                   else "the interval includes zero (no significant difference)")
        n = f", n = {b['n']} examples" if b.get("n") is not None else ""
        L.append(f"- Paired bootstrap, {what}: {fmt(b['diff'])} [{fmt(b['ci_low'])}, {fmt(b['ci_high'])}]{n}; "
                 f"{verdict}.")
    if len(inp.by_type) > 1:
        L += ["", "By corruption type (robustness AUC over that type's cells; paired bootstrap 95% CI of the "
              "difference; * where it excludes zero):", "",
              f"| type | no defense | {inp.best or '-'} | cachemedic | cachemedic − no defense | "
              f"cachemedic − {inp.best or 'best heuristic'} |", "|---|---|---|---|---|---|"]
        def diff(b: dict | None) -> str:
            if b is None:
                return "–"
            return f"{fmt(b['diff'])} [{fmt(b['ci_low'])}, {fmt(b['ci_high'])}]{'*' if excludes_zero(b) else ''}"

        for ty, e in inp.by_type.items():
            a, b = e["auc"], e["boot"]
            L.append(f"| {ty} | {fmt(a.get('no_defense', math.nan))} | {fmt(a.get(inp.best, math.nan)) if inp.best else '–'} | "
                     f"{fmt(a.get('cachemedic', math.nan))} | {diff(b.get('cachemedic_minus_no_defense'))} | "
                     f"{diff(b.get('cachemedic_minus_best_heuristic'))} |")
        L.append("")
    if inp.overhead:
        tp = "; ".join(f"{'no defense' if d == 'no_defense' else d} {fmt(v['tokens_per_sec'])} tokens/s"
                       for d, v in inp.overhead.items())
        L.append(f"- Throughput: {tp}.")
    else:
        L.append("- Throughput was not measured (`overhead` is null), so figure B plots clean score against "
                 "robustness AUC instead.")
    L.append("")
    # stability
    L += ["## Stability", ""]
    for delta in (1.0, 2.0):
        p = _sens_at(inp, delta)
        if p is None:
            L.append(f"- δ = {delta:g} is not in the stability grid ({', '.join(f'{q.delta:g}' for q in inp.sens)}).")
            continue
        parts = [f"no defense {fmt(p.baseline)}", f"cachemedic {fmt(p.cachemedic)} "
                 f"({_ratio_words(p.cachemedic, p.baseline)})"]
        parts += [f"{h} {fmt(v)}" for h, v in p.heuristics.items()]
        if math.isfinite(p.no_contr):
            parts.append(f"λ_contr = 0 pair {fmt(p.no_contr)} "
                         f"(cachemedic / pair = {fmt(p.cachemedic / p.no_contr, 3)})"
                         if p.no_contr > 0 else f"λ_contr = 0 pair {fmt(p.no_contr)}")
        L.append(f"- Logit drift at δ = {delta:g}: " + "; ".join(parts) + ".")
    if not inp.has_pair:
        L.append("- No paired λ_contr = 0 run was given to stability, so there is no contraction ablation here.")
    p0 = _sens_at(inp, 0.0)
    if p0 is not None:
        L.append(f"- At δ = 0 the repair's own drift on a clean cache is {fmt(p0.cachemedic)} "
                 f"(no defense: {fmt(p0.baseline)}).")
    a = inp.amp
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a["after"] / a["before"])[(a["before"] > 0) & np.isfinite(a["after"])]
    if r.size:
        L.append(f"- Amplification map over {len(a['layers'])} layers × {len(a['heads'])} KV heads: median "
                 f"after/before ratio {fmt(float(np.median(r)), 3)}; the repair damps (ratio < 1) in "
                 f"{int((r < 1).sum())} of {r.size} cells.")
    if a["flagged"]:
        L.append(f"- Layers outside the protected set (flagged): {layer_ranges(a['flagged'])}.")
    L.append("")
    # settings and provenance
    s = inp.settings
    L += ["## Settings and data", ""]
    if s.get("tasks"):
        L.append(f"- Tasks: {tasks_text(s['tasks'])}.")
    for key, label in (("eps", "ε grid"), ("types", "Corruption types"), ("persistence", "Persistence"),
                       ("data_sources", "Data sources")):
        if s.get(key) not in (None, "", [], {}):
            L.append(f"- {label}: {plain(s[key])}.")
    if s.get("checkpoint"):
        L.append(f"- Repair checkpoint: {checkpoint_text(s['checkpoint'], inp.config_hash)}.")
    if ood_text(s):
        L.append(f"- Out-of-distribution protocol: {ood_text(s)}.")
    L += [f"- Note: {n}" for n in (s.get("notes") or []) if isinstance(n, str)]
    if inp.exposure:
        L.append("- Exposure (fraction of context K/V entries the corruption masks cover): "
                 + ", ".join(f"{t} {fmt(v, 3)}" for t, v in inp.exposure.items()) + ".")
    if inp.cfg:
        rep, tr = inp.cfg.get("repair") or {}, inp.cfg.get("train") or {}
        L.append(f"- Operator: family {rep.get('family')}, rank {rep.get('rank')}, apply_to {rep.get('apply_to')}, "
                 f"protected layers {layer_ranges(rep.get('protect_layers') or [])}, λ_id {tr.get('lambda_id')}, "
                 f"λ_contr {tr.get('lambda_contr')}, {tr.get('steps')} steps.")
    if inp.paired_dir:
        L.append(f"- Paired λ_contr = 0 run: `{inp.paired_dir}`"
                 + ("" if inp.paired_cfg else " (its config was not found; settings not shown)") + ".")
    L.append(f"- Note: {inp.oracle_note[0].upper() + inp.oracle_note[1:]}.")
    L.append("")
    L += ["## Figures", ""]
    captions = ["Normalised score vs ε", "Clean score vs throughput (Pareto)" if inp.overhead else
                "Clean score vs robustness AUC (throughput not measured)", "Logit sensitivity vs δ",
                "Amplification map before/after repair"]
    for name, cap in zip(FIGURES, captions):
        L += [f"![{cap}](figures/{name})", ""]
    L += ["Tables: [`tables/table_main_results.tex`](tables/table_main_results.tex), "
          "[`tables/table_ablation_summary.tex`](tables/table_ablation_summary.tex).", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------------------------------
# entry points


def render(inp: Inputs) -> dict[str, bytes]:
    """Every output, relative to `paper/`, rendered in memory."""
    with rc_context(RC):
        figs = [fig_score_vs_eps(inp), fig_pareto(inp), fig_sensitivity(inp), fig_amplification(inp)]
    out = {f"figures/{n}": b for n, b in zip(FIGURES, figs)}
    out[f"tables/{TABLES[0]}"] = table_main(inp).encode("utf-8")
    out[f"tables/{TABLES[1]}"] = table_ablation(inp).encode("utf-8")
    out[REPORT] = report_md(inp).encode("utf-8")
    return out


def run(run_dir: str | Path) -> int:
    """Draw the figures, tables and report of one run dir. Bad input raises ConfigError (exit 2)."""
    inp = load_inputs(run_dir)
    outputs = render(inp)
    paper = RunDir(run_dir).paper
    for rel, data in outputs.items():
        if rel.endswith(".png"):
            atomic_write_bytes(paper / rel, data)
        else:
            atomic_write_text(paper / rel, data.decode("utf-8"))
    print(f"wrote {len(outputs)} files under {paper}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from cachemedicpp.cli import guarded

    p = argparse.ArgumentParser(prog="python -m cachemedicpp.plots",
                                description="Figures, tables and report from a run's metrics JSON.")
    p.add_argument("--run_dir", required=True, help="run directory holding metrics/")
    args = p.parse_args(argv)
    return guarded(lambda: run(args.run_dir))


if __name__ == "__main__":
    raise SystemExit(main())
