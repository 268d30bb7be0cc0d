"""The figures (A and B always, C and D when the run has stability metrics, E when the task metrics have
bit-class scores), each rendered to PNG bytes in memory (nothing is written here).

Figures are deterministic for the same metrics: no timestamps or software tag in the PNG metadata.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cachemedicpp import defenses
from cachemedicpp.config import ConfigError
from cachemedicpp.palette import BLACK, BLUE, GREY, SKY
from cachemedicpp.plots.inputs import Curves, Inputs
from cachemedicpp.plots.outputs import FIG_BIT_POSITION, FIG_COST_FRONTIER, FIGURES
from cachemedicpp.plots.text import fmt, plain
from cachemedicpp.results import (BEST_HEURISTIC_SERIES, CACHEMEDIC, CLEAN_REGRESSION, GROUP_BASELINE,
                                  GROUP_CALIBRATED, GROUP_DETECT_RECOMPUTE, GROUP_LEARNED, GROUP_RECOMPUTE,
                                  GROUP_REFERENCE, METRICS, NO_DEFENSE, ORACLE_DROP, OVERHEAD, ROBUSTNESS_AUC)

DPI = 150
REFERENCE_TITLE = "reference heuristics, oracle region"  # the group of the heuristics that see the corruption's region
CLEAN_LABEL, CEILING_LABEL = "clean (ceiling)", f"{ORACLE_DROP} (ceiling)"

BIT_SERIES_GROUPS = (GROUP_LEARNED, GROUP_RECOMPUTE, GROUP_DETECT_RECOMPUTE)  # figure E, after the baselines
NO_CONTR_STYLE = (SKY, "^")  # a lighter shade of cachemedic's blue: the same operator without L_contr
RC = {
    "font.size": 10.5, "axes.titlesize": 11.5, "axes.labelsize": 10.5, "legend.fontsize": 9.5,
    "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "figure.titlesize": 13, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
}


def defense_style(name: str) -> tuple[str, str]:
    """(colour, marker): the registered defense's own style (a stable spare one for an unknown name)."""
    return defenses.style(name)


def heuristic_label(best: str) -> str:
    return f"best baseline ({best})"


def render_figures(inp: Inputs) -> dict[str, bytes]:
    """{file name: PNG bytes} of the figures the metrics allow, in FIGURES order, then figure E. C and D need
    the stability metrics, E the bit-class scores; without them they are skipped (`inp.stability_note`,
    `inp.bits_note` say why), never drawn from made-up numbers."""
    with rc_context(RC):
        figs = [fig_score_vs_eps(inp), fig_pareto(inp)]
        if inp.has_stability:  # C and D, the last two of FIGURES
            figs += [fig_sensitivity(inp), fig_amplification(inp)]
        out = dict(zip(FIGURES, figs))
        if inp.bits is not None:
            out[FIG_BIT_POSITION] = fig_bit_position(inp)
        if inp.recompute:
            out[FIG_COST_FRONTIER] = fig_cost_frontier(inp)
    return out


def new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
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


def _set_x_ticks(ax, xs: np.ndarray) -> None:
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])


# --------------------------------------------------------------------------------------------------
# figure A: score vs eps


def best_label(inp: Inputs) -> str:
    """How figure A names the best baseline: where it was chosen, and its group."""
    group = inp.group(inp.best)
    if not inp.chosen_on_validation():  # an older file: chosen on the test grid among the heuristics
        return f"best heuristic ({inp.best})"
    what = ("calibrated" if group == GROUP_CALIBRATED else "reference heuristic, oracle region"
            if group == GROUP_REFERENCE else group)
    return f"best baseline: {inp.best} ({what}, chosen on validation data)"


def _clean_level(c: Curves) -> float:
    """no_defense's clean score: its curve at eps 0 (the clean cell), the ceiling a defense can reach."""
    at0 = np.flatnonzero(c.eps == 0)
    return float(c.series[NO_DEFENSE][at0[0]]) if at0.size else math.nan


def _panel_lines(inp: Inputs, c: Curves, references: bool) -> list[dict]:
    """The curves of one score-vs-eps panel, drawn in list order (later on top). Each: name (its AUC key),
    y, style, band, and ref (True: a reference heuristic other than the best, for the group legend)."""
    best, lines = inp.best, []

    def add(name, y, color, marker, ls, label, lw=2.0, band=None, ref=False, **extra):
        lines.append(dict(name=name, y=y, band=band, ref=ref,
                          style={"color": color, "marker": marker, "ls": ls, "label": label, "lw": lw, "ms": 6,
                                 **extra}))

    clean = _clean_level(c)
    if math.isfinite(clean):
        add("clean", np.full(len(c.eps), clean), GREY, None, ":", CLEAN_LABEL, lw=1.6)
    if ORACLE_DROP in c.per_defense:
        add(ORACLE_DROP, c.per_defense[ORACLE_DROP], GREY, ".", "--", CEILING_LABEL, band=c.ci.get(ORACLE_DROP))
    if references:  # thin, under the others: context, not the comparison
        for d in c.per_defense:
            if inp.group(d) == GROUP_REFERENCE and d != best:
                color, marker = defense_style(d)
                add(d, c.per_defense[d], color, marker, "-", d, lw=1.0, ref=True, alpha=0.55, ms=4)
    add(NO_DEFENSE, c.series[NO_DEFENSE], *defense_style(NO_DEFENSE), ":", "no defense", band=c.ci.get(NO_DEFENSE))
    for d in c.per_defense:
        if inp.group(d) == GROUP_CALIBRATED:
            label = best_label(inp) if d == best else f"{d} (calibrated)"
            add(BEST_HEURISTIC_SERIES if d == best else d, c.per_defense[d], *defense_style(d),
                "--" if d == best else "-.", label, band=c.ci.get(d))
    if best and BEST_HEURISTIC_SERIES in c.series and inp.group(best) != GROUP_CALIBRATED:
        add(BEST_HEURISTIC_SERIES, c.series[BEST_HEURISTIC_SERIES], *defense_style(best), "--", best_label(inp),
            band=c.ci.get(BEST_HEURISTIC_SERIES, c.ci.get(best)))
    if best and inp.group(best) == GROUP_CALIBRATED and best not in c.per_defense:  # no per_defense: the series
        add(BEST_HEURISTIC_SERIES, c.series[BEST_HEURISTIC_SERIES], *defense_style(best), "--", best_label(inp),
            band=c.ci.get(BEST_HEURISTIC_SERIES, c.ci.get(best)))
    add(CACHEMEDIC, c.series[CACHEMEDIC], *defense_style(CACHEMEDIC), "-", "cachemedic", band=c.ci.get(CACHEMEDIC))
    return lines


def _line_auc(inp: Inputs, name: str) -> float:
    if name == "clean":
        return inp.damage["auc_clean"] if inp.damage else math.nan
    if name == BEST_HEURISTIC_SERIES:
        return inp.best_auc()
    return inp.auc.get(name, math.nan)


def _draw_curves(ax, inp: Inputs, c: Curves, main: bool = False) -> list:
    """Draw a panel; returns the handles of the reference heuristics (their own legend)."""
    vals: list[float] = []
    refs = []
    lines = _panel_lines(inp, c, references=main)
    for i, line in enumerate(lines):
        st = dict(line["style"])
        if main and not line["ref"]:
            st["label"] += f"  (AUC {fmt(_line_auc(inp, line['name']))})"
        # ceilings and thin reference lines at the bottom, then solid cachemedic, so a dotted or dashed
        # curve lying on it stays visible
        z = {"clean": 0, ORACLE_DROP: 1, CACHEMEDIC: 3}.get(line["name"], 2 if line["ref"] else 4 + i)
        handle, = ax.plot(c.eps, line["y"], zorder=3 + z, **st)
        if line["ref"]:
            refs.append(handle)
        band = line["band"]
        if band is not None:
            lo, hi = band
            # light fill plus edges in the curve's own colour and style: overlapping bands stay attributable
            ax.fill_between(c.eps, lo, hi, color=st["color"], alpha=0.08, lw=0, zorder=2)
            for edge in (lo, hi):
                ax.plot(c.eps, edge, color=st["color"], ls=st["ls"], lw=0.7, alpha=0.6, zorder=2)
            vals += [*lo, *hi]
        vals += list(line["y"])
    _set_x_ticks(ax, c.eps)
    ax.set_ylim(*_pad(vals, 0.08, floor=0.0))
    ax.set_xlabel("corruption severity ε")
    return refs


def _settings_subtitle(s: dict) -> str:
    split = s.get("ood_split")
    split = split.get("name") if isinstance(split, dict) else split or s.get("ood_protocol")
    sub = [f"persistence: {s['persistence']}" if s.get("persistence") else None,
           f"OOD split: {split}" if isinstance(split, str) and split else None,
           f"types: {plain(s['types'])}" if s.get("types") else None]
    return " · ".join(x for x in sub if x)


def fig_score_vs_eps(inp: Inputs) -> bytes:
    tasks = list(inp.by_task) if len(inp.by_task) >= 2 else []
    ncols = min(len(tasks), 3) if tasks else 1
    nrows_tasks = math.ceil(len(tasks) / ncols) if tasks else 0
    fig = new_figure(11.0, 5.6 + 3.3 * nrows_tasks)
    gs = fig.add_gridspec(1 + nrows_tasks, ncols, height_ratios=[1.5] + [1.0] * nrows_tasks)
    main = fig.add_subplot(gs[0, :])
    refs = _draw_curves(main, inp, inp.curves, main=True)
    main.set_ylabel("normalised score (higher is better)")
    main.set_title("Mean over tasks × corruption types" + (" (bands: 95% CI)" if inp.curves.ci else ""))
    handles, labels = main.get_legend_handles_labels()
    keep = [i for i, h in enumerate(handles) if h not in refs]
    fig.legend([handles[i] for i in keep], [labels[i] for i in keep], loc="outside lower center",
               ncol=min(len(keep), 2), frameon=False)
    if refs:  # the heuristics that see the corruption's own region, as one group
        main.legend(refs, [h.get_label() for h in refs], title=REFERENCE_TITLE, loc="lower left", fontsize=8,
                    title_fontsize=8.5, framealpha=0.8)
    task_axes = []
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(gs[1 + i // ncols, i % ncols])
        _draw_curves(ax, inp, inp.by_task[t])
        ax.set_title(t)
        if i % ncols == 0:
            ax.set_ylabel("normalised score")
        task_axes.append(ax)
    if task_axes:  # one y range for all task panels, so tasks compare at a glance
        lims = [ax.get_ylim() for ax in task_axes]
        for ax in task_axes:
            ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    sub = _settings_subtitle(inp.settings)
    fig.suptitle("Task robustness vs corruption severity" + (f"\n{sub}" if sub else ""))
    return png(fig)


# --------------------------------------------------------------------------------------------------
# figure B: quality vs cost


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points when both coordinates are to be maximised, by increasing x."""
    front = []
    for name, (x, y) in points.items():
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for o, (ox, oy) in points.items() if o != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _pareto_panel(ax, pts: dict[str, tuple[float, float]], best: str | None) -> None:
    front = pareto_front({d: p for d, p in pts.items() if d != ORACLE_DROP})  # a ceiling is not a contender
    if len(front) > 1:
        ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], ls="--", color=GREY, lw=1.5, zorder=1,
                label="Pareto front")
    ax.scatter([pts[n][0] for n in front], [pts[n][1] for n in front], s=300, facecolors="none", edgecolors=GREY,
               linewidths=1.6, zorder=2, label="Pareto-optimal (non-dominated)")
    for d, (x, y) in pts.items():
        color, marker = defense_style(d)
        label = ("no defense" if d == NO_DEFENSE else CEILING_LABEL if d == ORACLE_DROP
                 else d + (" (best baseline)" if d == best else ""))
        # no defense on top and smaller: a defense with (near) identical numbers must not hide it
        ax.scatter([x], [y], s=45 if d == NO_DEFENSE else 110, color=color, marker=marker, edgecolors="white",
                   linewidths=0.8, zorder=4 if d == NO_DEFENSE else 3, label=label)
    ax.set_xlim(*_pad([p[0] for p in pts.values()], 0.15))
    ax.set_ylim(*_pad([p[1] for p in pts.values()], 0.15))


def _pareto_panels(inp: Inputs, defenses: list[str]) -> tuple[list[tuple], str, str]:
    """(x values, y values, x label, y label, subtitle) per panel, the figure title, and the metrics key
    a defense needs to be plotted."""
    auc = {d: inp.auc[d] for d in defenses if d in inp.auc}
    clean_y = "clean score (mean normalised)"
    if inp.overhead is not None:
        tp = {d: inp.overhead[d]["tokens_per_sec"] for d in defenses if d in inp.overhead}
        panels = [(tp, inp.clean, "throughput (processed tokens/s)", clean_y, "Clean score vs throughput"),
                  (tp, auc, "throughput (processed tokens/s)", "robustness AUC",
                   "Robustness AUC vs throughput")]
        title = "Cost of each defense: quality vs throughput (up and right is better)"
        return panels, title, f"{METRICS}.{OVERHEAD}.<defense>.tokens_per_sec"
    panels = [(auc, inp.clean, "robustness AUC", clean_y, "Clean score vs robustness AUC")]
    title = (f"Throughput not measured (overhead is null in {inp.task_path.name}):\n"
             "clean score vs robustness AUC instead (up and right is better)")
    return panels, title, f"{METRICS}.{ROBUSTNESS_AUC}.<defense>"


def fig_pareto(inp: Inputs) -> bytes:
    """Clean score (and robustness) against throughput; without overhead data, clean score vs AUC."""
    defenses = [d for d in inp.clean if d != BEST_HEURISTIC_SERIES]
    panels, title, needed = _pareto_panels(inp, defenses)
    fig = new_figure(12.5 if len(panels) == 2 else 8.5, 5.4)
    missing: set[str] = set()
    for i, (xs, ys, xlabel, ylabel, sub) in enumerate(panels):
        pts = {d: (xs[d], ys[d]) for d in defenses
               if d in xs and d in ys and math.isfinite(xs[d]) and math.isfinite(ys[d])}
        if not pts:
            raise ConfigError(f"{inp.task_path}: no defense has both {METRICS}.{CLEAN_REGRESSION}.<defense> "
                              f"and {needed}")
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
    return png(fig)


# --------------------------------------------------------------------------------------------------
# figure C: logit sensitivity


def _wide(values: Sequence[float], ratio: float = 30.0) -> bool:
    v = [x for x in values if math.isfinite(x) and x > 0]
    return len(v) >= 2 and max(v) / min(v) > ratio


def _sensitivity_lines(inp: Inputs) -> list[tuple]:
    """(label, drift per delta, colour, marker, line style); no defense first."""
    lines = [("no defense", np.array([p.baseline for p in inp.sens]), BLACK, "o", ":")]
    for h in sorted({h for p in inp.sens for h in p.heuristics}):
        color, marker = defense_style(h)
        label = heuristic_label(h) if h == inp.best else f"heuristic ({h})"
        lines.append((label, np.array([p.heuristics.get(h, math.nan) for p in inp.sens]), color, marker, "--"))
    lines.append(("cachemedic", np.array([p.cachemedic for p in inp.sens]), BLUE, "D", "-"))
    if inp.has_pair:
        lines.append((r"cachemedic, $\lambda_{\mathrm{contr}} = 0$ pair", np.array([p.no_contr for p in inp.sens]),
                      *NO_CONTR_STYLE, "-."))
    return lines


def _drift_panel(ax, inp: Inputs, d: np.ndarray, lines: list[tuple]) -> None:
    vs_rep = np.array([p.vs_repaired for p in inp.sens])
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
    _set_x_ticks(ax, d)
    scale = inp.stab_settings.get("delta_scale")
    per_entry = f" (per-entry size δ·{scale:g}·RMS)" if isinstance(scale, (int, float)) else ""
    ax.set_xlabel("perturbation size δ" + per_entry)
    ax.set_ylabel("logit drift ‖Δz‖₂ over top-k logits" + (" (log)" if log else ""))
    ax.set_title(title)


def _relative_panel(rax, inp: Inputs, d: np.ndarray, lines: list[tuple]) -> None:
    """The same drifts relative to no defense, so "more or less sensitive" is read off directly."""
    keep = np.array([p.baseline > 0 and math.isfinite(p.baseline) for p in inp.sens])
    ratios = []
    for label, y, color, marker, ls in lines[1:]:
        r = np.where(keep, y / np.where(keep, [p.baseline for p in inp.sens], 1.0), math.nan)
        ratios += list(r)
        rax.plot(d[keep], r[keep], color=color, marker=marker, ls=ls, lw=2, ms=6, zorder=3 if ls == "-" else 4)
    rax.axhline(1.0, color=BLACK, lw=1, ls=":", zorder=1)
    if _wide(ratios + [1.0], 8.0):
        rax.set_yscale("log")
    _set_x_ticks(rax, d[keep])
    rax.set_xlabel("perturbation size δ")
    rax.set_ylabel("drift / drift without defense")
    rax.set_title("Relative to no defense (< 1: less sensitive)")


def fig_sensitivity(inp: Inputs) -> bytes:
    d = np.array([p.delta for p in inp.sens])
    lines = _sensitivity_lines(inp)
    fig = new_figure(12.0, 5.8)
    ax, rax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _drift_panel(ax, inp, d, lines)
    _relative_panel(rax, inp, d, lines)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    fig.suptitle("Stability of output logits under random cache perturbations")
    return png(fig)


# --------------------------------------------------------------------------------------------------
# figure D: amplification map


def _annotate(ax, grid: np.ndarray, norm, cmap) -> None:
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if not math.isfinite(v):
                continue
            r, g, b, _ = cmap(norm(v))
            ax.text(j, i, fmt(float(v), 3), ha="center", va="center", fontsize=7.5,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")


def _map_norms(before: np.ndarray, after: np.ndarray, ratio: np.ndarray) -> tuple:
    """One colour scale shared by the before and after maps, and a log scale centred on 1 for the ratio."""
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
    return shared, rnorm


def _ratio_colorbar(fig, im, ax, norm) -> None:
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("after / before (< 1: repair damps)")
    if norm.vmax / norm.vmin < 4:
        ticks = [t for t in MaxNLocator(6).tick_values(norm.vmin, norm.vmax) if norm.vmin <= t <= norm.vmax]
    else:
        ticks = [t for t in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
                 if norm.vmin <= t <= norm.vmax]
    cb.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    cb.minorticks_off()


def fig_amplification(inp: Inputs) -> bytes:
    a = inp.amp
    before, after = a["before"], a["after"]
    L, H = before.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(before > 0, after / before, math.nan)
    shared, rnorm = _map_norms(before, after, ratio)
    seq, div = colormaps["viridis"], colormaps["RdBu_r"]
    annotate = L * H <= 60

    fig = new_figure(min(4.0 + 2.4 * H, 13.5) if H > 3 else 11.0, max(4.2, 0.32 * L + 2.2))
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
            _ratio_colorbar(fig, im, ax, norm)
    axes[0].set_ylabel("layer" + ("  (* outside the protected set)" if a["flagged"] else ""))
    delta = f" at δ = {a['delta']:g}" if a["delta"] is not None and math.isfinite(a["delta"]) else ""
    fig.suptitle(f"Amplification map γ(layer, head){delta}: median drift per unit perturbation\n"
                 "ratio < 1 (blue) means the repair damps the perturbation, > 1 (red) amplifies it")
    return png(fig)


# --------------------------------------------------------------------------------------------------
# figure E: bit-position damage


def bit_position_series(inp: Inputs) -> list[tuple[str, str]]:
    """(defense, label) of figure E's bars, in order: no defense, the best calibrated baseline (chosen on
    validation data), then the learned operator and the recomputing defenses (in that group order), each when
    the block has it."""
    per = inp.bits["per_defense"] if inp.bits else {}
    out = [(NO_DEFENSE, "no defense")]
    cal = inp.best_calibrated()
    if cal and cal in per:
        how = "best baseline" if cal == inp.best else "best calibrated baseline"
        out.append((cal, f"{cal} ({how}, chosen on validation data)"))
    out += [(d, d) for g in BIT_SERIES_GROUPS for d in per if inp.group(d) == g]
    return [(d, label) for d, label in out if d in per]


def _class_label(cls: str, bits: Sequence[int]) -> str:
    if not bits:
        return cls
    if len(bits) == 1:
        return f"{cls}\n(bit {bits[0]})"
    contiguous = list(bits) == list(range(min(bits), max(bits) + 1))
    return f"{cls}\n(bits {min(bits)}–{max(bits)})" if contiguous else f"{cls}\n({len(bits)} bits)"


def fig_bit_position(inp: Inputs) -> bytes:
    """Mean normalised score per bit class at one flip rate, one bar per defense with its 95% CI."""
    b = inp.bits
    classes = b["classes"]
    series = bit_position_series(inp)
    x = np.arange(len(classes), dtype=float)
    width = 0.8 / len(series)
    hatches = {GROUP_BASELINE: "", GROUP_LEARNED: "", GROUP_RECOMPUTE: "..", GROUP_DETECT_RECOMPUTE: "//"}
    fig = new_figure(max(7.5, 1.9 * len(classes) + 3.0), 5.4)
    ax = fig.add_subplot(1, 1, 1)
    vals: list[float] = []
    for i, (d, label) in enumerate(series):
        y = b["per_defense"][d]
        color, _ = defense_style(d)
        pos = x - 0.4 + width * (i + 0.5)
        err = None
        if d in b["ci"]:
            lo, hi = b["ci"][d]
            err = np.stack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            err = np.where(np.isfinite(err), err, 0.0)
            vals += [v for v in (*lo, *hi) if math.isfinite(v)]
        ax.bar(pos, np.where(np.isfinite(y), y, 0.0), width * 0.92, color=color, edgecolor=BLACK, linewidth=0.6,
               hatch=hatches.get(inp.group(d), "//"), label=label, yerr=err, capsize=3, error_kw={"lw": 1.0}, zorder=3)
        for px, v in zip(pos, y):
            if not math.isfinite(v):  # undefined (e.g. every example's value NaN): say so, draw nothing
                ax.text(px, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, zorder=4)
        vals += [v for v in y if math.isfinite(v)]
    clean = b.get("clean_no_defense", math.nan)
    if math.isfinite(clean):
        ax.axhline(clean, color=GREY, ls=":", lw=1.6, label=CLEAN_LABEL, zorder=2)
        vals.append(clean)
    ax.set_xticks(x)
    ax.set_xticklabels([_class_label(c, b["bits"].get(c, [])) for c in classes])
    lo, hi = _pad(vals + [0.0], 0.08, floor=0.0)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("bit class flipped in the stored word")
    ax.set_ylabel("normalised score, mean over tasks (higher is better)")
    ax.grid(axis="x", visible=False)
    fig.legend(loc="outside lower center", ncol=min(len(series) + 1, 3), frameon=False)
    fmt_name = b.get("storage_format") or "?"
    sim = f", simulated on a {b.get('cache_dtype')} cache" if b.get("simulated") else ""
    rate = f"flip rate {b['flip_rate']:.3g} per element" if math.isfinite(b.get("flip_rate", math.nan)) else ""
    eps = f"ε = {b['eps']:g}" if math.isfinite(b.get("eps", math.nan)) else ""
    burst = f", bursts of {b['burst']} bits" if isinstance(b.get("burst"), int) and b["burst"] > 1 else ""
    detail = ", ".join(t for t in (rate, eps) if t)
    fig.suptitle(f"Bit-position damage: bit flips in the {fmt_name} word{sim}{burst}\n{detail} · the same elements "
                 "hit in every class (bars: 95% CI)")
    return png(fig)


def cost_frontier_points(inp: Inputs) -> list[dict]:
    """Figure F's points: per corruption type of the test grid and defense with a recovered fraction, its
    recompute cost as a fraction of the context (mean over the type's corrupted cells; 0 for a defense that
    recomputes nothing) and the oracle's minimum there (the blocks the corruption touched), NaN when unknown."""
    out = []
    for ty, per in inp.by_type.items():
        for d, rf in (per.get("recovered") or {}).items():
            cost, oracle = 0.0, math.nan
            table = inp.recompute.get(d)
            if table is not None:
                rows = [r for r in table["by_cell"] if r["type"] == ty and r["eps"] > 0]
                if not rows:
                    continue
                ctx = max(table["context"], 1.0)
                cost = float(np.mean([r["tokens"] for r in rows])) / ctx
                oracle = float(np.mean([r["oracle"] for r in rows])) / ctx
            out.append({"type": ty, "defense": d, "cost": cost, "oracle": oracle, **rf})
    return out


def fig_cost_frontier(inp: Inputs) -> bytes:
    """Recovered fraction of the damage (AUC scale, 95% CI) against recompute cost (tokens recomputed / context
    tokens), one panel per corruption type of the test grid, every defense a point, the oracle's minimum cost
    (the blocks the corruption touched) a dashed line: the frontier on which methods compare. Cache-only
    repairs sit at cost 0. Points beyond the panel's range (a type that does almost no damage makes the
    fraction explode) sit on its edge, hollow, with their value written."""
    points = cost_frontier_points(inp)
    types = list(dict.fromkeys(p["type"] for p in points))
    cols = min(4, max(1, len(types)))
    rows = -(-len(types) // cols) if types else 1
    fig = new_figure(3.2 * cols + 1.2, 2.9 * rows + 1.4)
    lo_y, hi_y = -0.3, 1.15
    handles: dict[str, Any] = {}
    for i, ty in enumerate(types or ["none"]):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(ty)
        for p in (q for q in points if q["type"] == ty):
            color, marker = defense_style(p["defense"])
            y = p["value"]
            if not math.isfinite(y):
                continue
            inside = lo_y <= y <= hi_y
            shown = min(max(y, lo_y), hi_y)
            err = None
            if inside and math.isfinite(p["ci_low"]) and math.isfinite(p["ci_high"]):
                err = [[max(y - max(p["ci_low"], lo_y), 0.0)], [max(min(p["ci_high"], hi_y) - y, 0.0)]]
            h = ax.errorbar([p["cost"]], [shown], yerr=err, fmt=marker, color=color, ms=7, capsize=2.5, lw=1.0,
                            mfc=color if inside else "white", zorder=3)
            handles.setdefault(p["defense"], h)
            if not inside:
                ax.annotate(f"{y:.3g}", (p["cost"], shown), textcoords="offset points", xytext=(6, -3 if y < lo_y else 2),
                            fontsize=7)
        oracle = [q["oracle"] for q in points if q["type"] == ty and math.isfinite(q["oracle"])]
        if oracle:
            line = ax.axvline(oracle[0], color=GREY, ls="--", lw=1.2, zorder=1)
            handles.setdefault("oracle's minimum (blocks the corruption touched)", line)
        ax.axhline(1.0, color=BLACK, lw=0.7, ls=":", zorder=1)
        ax.axhline(0.0, color=BLACK, lw=0.7, zorder=1)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(lo_y - 0.05, hi_y + 0.05)
        if i % cols == 0:
            ax.set_ylabel("recovered fraction")
        if i >= (rows - 1) * cols:
            ax.set_xlabel("tokens recomputed / context")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4),
               frameon=False)
    fig.suptitle("Recovery against recomputation: recovered fraction of the damage (AUC scale, 95% CI) per type\n"
                 "1 recovers everything, 0 nothing; cache-only defenses recompute nothing (cost 0)")
    return png(fig)
