"""plots: figures, tables and report from small hand-made metrics files (tests/data/metrics/):
task_metrics.json is an older file (no fair-benchmark keys), task_metrics_fair.json a schema-valid one
with calibrated baselines, oracle_drop, damage and recovered fractions."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cachemedicpp import ROOT, plots, results

DATA = Path(__file__).parent / "data" / "metrics"
EXPECTED = {
    "figures/figA_score_vs_eps.png", "figures/figB_clean_vs_overhead_pareto.png",
    "figures/figC_logit_sensitivity.png", "figures/figD_amplification_map.png",
    "tables/table_main_results.tex", "tables/table_ablation_summary.tex", "report.md",
}


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


FAIR = "task_metrics_fair.json"


def make_run(tmp_path: Path, task=None, stab=None, config: bool = True, task_file: str = "task_metrics.json") -> Path:
    """A run dir holding the fixture metrics (the task file: `task_file`), optionally edited by `task(d)` /
    `stab(d)`."""
    rd = tmp_path / "run"
    (rd / "metrics").mkdir(parents=True)
    for name, edit in (("task_metrics.json", task), ("stability_metrics.json", stab)):
        d = _load(task_file if name == "task_metrics.json" else name)
        if edit is not None:
            edit(d)
        (rd / "metrics" / name).write_text(json.dumps(d))
    if config:
        shutil.copy(DATA / "config_resolved.yaml", rd / "config_resolved.yaml")
    return rd


def paper_files(rd: Path) -> set[str]:
    paper = rd / "paper"
    return {str(p.relative_to(paper)) for p in paper.rglob("*") if p.is_file()} if paper.exists() else set()


def strip_math(text: str) -> str:
    return re.sub(r"\$[^$]*\$", "", text)


def check_table(text: str, rows: list[str]) -> None:
    assert text.count(r"\begin{tabular}") == text.count(r"\end{tabular}") >= 1
    assert text.count(r"\begin{table}") == text.count(r"\end{table}") == 1
    n = text.count(r"\begin{tabular}")
    assert text.count(r"\toprule") == text.count(r"\midrule") == text.count(r"\bottomrule") == n
    assert text.count("{") == text.count("}")
    assert text.count("$") % 2 == 0
    body = strip_math(text)
    assert not re.search(r"(?<!\\)_", body), "unescaped underscore outside math mode"
    code = "\n".join(line for line in body.splitlines() if not line.startswith("%"))
    assert not re.search(r"(?<!\\)[%#^~]", code), "unescaped LaTeX special outside math mode"
    for line in text.splitlines():  # every row of a tabular has the same number of cells
        if line.endswith(r"\\") and "&" in line:
            assert line.count("&") == _ncols(text, line) - 1, line
    for r in rows:
        assert any(line.startswith(r) for line in text.splitlines()), f"row {r!r} missing"


def _ncols(text: str, line: str) -> int:
    spec = None
    for ln in text.splitlines():
        m = re.match(r"\\begin\{tabular\}\{(\w+)\}", ln)
        if m:
            spec = m.group(1)
        if ln == line:
            return len(spec)
    raise AssertionError("row outside a tabular")


def test_outputs_from_sample_metrics(tmp_path):
    rd = make_run(tmp_path)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED  # exact set: no temp files, no extras

    for name in plots.FIGURES:
        with Image.open(rd / "paper" / "figures" / name) as im:
            im.load()
            assert im.format == "PNG"
            assert im.width >= 600 and im.height >= 400
            assert len(np.unique(np.asarray(im.convert("L")))) > 20  # something was drawn

    main = (rd / "paper" / "tables" / "table_main_results.tex").read_text()
    check_table(main, ["No defense &", "Best heuristic (smoothing) &", "CacheMedic &"])
    assert r"\usepackage{booktabs}" in main
    assert "0.1008 [0.0958, 0.1058]" in main  # cachemedic AUC with CI
    assert "0.0412 [0.0321, 0.0507]" in main  # paired bootstrap vs no defense
    assert "$-$0.0012" in main  # vs best heuristic in the caption, with a real minus
    assert "wikitext2\\_ppl" in main and "oracle advantage" in main

    abl = (rd / "paper" / "tables" / "table_ablation_summary.tex").read_text()
    check_table(abl, ["Family & A", "Rank & 8", "Apply to & KV", "Protected layers & 8--11",
                      r"$\lambda_{\mathrm{id}}$ & 1", r"$\lambda_{\mathrm{contr}}$ & 0.5", "Training steps & 200",
                      "1 & 5.300 & 2.610 & 3.850 & 0.678", "2 & 10.60 & 5.010 & 7.450 & 0.672"])
    assert abl.count(r"\begin{tabular}") == 2

    report = (rd / "paper" / "report.md").read_text()
    # an older metrics file: no damage, recovered fractions or validation choice, shown as such
    assert "Damage (clean − no defense) = — (not in this metrics file)" in report
    assert "| recovered fraction, 95% CI | — | — | — | — |" in report
    assert "this metrics file records no validation choice" in report and "beats" not in report
    for needle in ("0.8567", "0.8517", "24.00", "0.1008 [0.0958, 0.1058]", "0.0742 [0.0705, 0.0779]",
                   "0.0412 [0.0321, 0.0507]", "excludes zero", "includes zero", "**smoothing**",
                   "δ = 1: no defense 5.300; cachemedic 2.610", "δ = 2: no defense 10.60", "0.49×",
                   "oracle advantage", "offline:data/offline/wikitext2_eval.txt", "1,268 tokens/s"):
        assert needle in report, needle
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(f"figures/{n}" for n in plots.FIGURES)
    assert all((rd / "paper" / link).is_file() for link in links)


def test_overhead_null_and_no_pair_no_config(tmp_path):
    def task(d):
        d["metrics"]["overhead"] = None
        d["metrics"]["best_heuristic_name"] = "clipping_renorm"  # a name that needs LaTeX escaping

    def stab(d):
        for p in d["metrics"]["stability.logit_sensitivity"]["points"]:
            p["cachemedic_no_contr"] = None

    rd = make_run(tmp_path, task, stab, config=False)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED
    report = (rd / "paper" / "report.md").read_text()
    assert "Throughput was not measured" in report and "tokens/s" not in report
    assert "λ_contr = 0 pair" not in report
    main = (rd / "paper" / "tables" / "table_main_results.tex").read_text()
    check_table(main, ["No defense &", r"Best heuristic (clipping\_renorm) &", "CacheMedic &"])
    abl = (rd / "paper" / "tables" / "table_ablation_summary.tex").read_text()
    check_table(abl, ["Family & n/a", "Training steps & n/a"])
    assert abl.count(r"\begin{tabular}") == 1 and "No paired" in abl


def test_pareto_uses_auc_when_overhead_is_null(tmp_path, monkeypatch):
    """Figure B never invents throughput: with overhead null its x axis is the robustness AUC."""
    titles = []
    orig = plots.figures._pareto_panel

    def spy(ax, pts, best):
        orig(ax, pts, best)
        titles.append(dict(pts))

    monkeypatch.setattr(plots.figures, "_pareto_panel", spy)
    inp = plots.load_inputs(make_run(tmp_path, lambda d: d["metrics"].update(overhead=None)))
    plots.fig_pareto(inp)
    assert len(titles) == 1
    assert titles[0]["cachemedic"] == (inp.auc["cachemedic"], inp.clean["cachemedic"])
    inp.overhead = {"no_defense": {"tokens_per_sec": 100.0}, "cachemedic": {"tokens_per_sec": 90.0}}
    titles.clear()
    plots.fig_pareto(inp)
    assert titles[0] == {"no_defense": (100.0, inp.clean["no_defense"]), "cachemedic": (90.0, inp.clean["cachemedic"])}


def test_pareto_front():
    pts = {"a": (1.0, 5.0), "b": (2.0, 4.0), "c": (1.5, 3.0), "d": (3.0, 1.0), "e": (3.0, 0.5)}
    assert plots.pareto_front(pts) == ["a", "b", "d"]


def test_tex_escape_and_formatting():
    assert plots.tex("a_b & 50% #1 $x") == r"a\_b \& 50\% \#1 \$x"
    assert plots.fmt(0.03841) == "0.0384" and plots.fmt(23.456) == "23.46" and plots.fmt(1480.2) == "1,480"
    assert plots.fmt(None) == "n/a" and plots.fmt(float("nan")) == "n/a"
    assert plots.tnum("-0.0012 [-0.1, 0.2]") == "$-$0.0012 [$-$0.1, 0.2]"
    assert plots.layer_ranges([11, 8, 9, 10, 20]) == "8–11, 20"


def _fails(tmp_path, capsys, rd: Path, *needles: str) -> None:
    assert plots.main(["--run_dir", str(rd)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert paper_files(rd) == set()  # no placeholder images


def test_missing_task_metrics_file(tmp_path, capsys):
    rd = make_run(tmp_path)
    (rd / "metrics" / "task_metrics.json").unlink()
    _fails(tmp_path, capsys, rd, "task_metrics.json", "not found")


def test_malformed_json(tmp_path, capsys):
    rd = make_run(tmp_path)
    (rd / "metrics" / "task_metrics.json").write_text('{"metrics": {"score_vs_eps": ')
    _fails(tmp_path, capsys, rd, "task_metrics.json", "corrupted")


@pytest.mark.parametrize("which,edit,needle", [
    ("task", lambda d: d["metrics"]["score_vs_eps"].pop("cachemedic"), "metrics.score_vs_eps.cachemedic"),
    ("task", lambda d: d["metrics"].pop("best_heuristic_name"), "metrics.best_heuristic_name"),
    ("task", lambda d: d["metrics"]["paired_bootstrap"].pop("cachemedic_minus_no_defense"),
     "metrics.paired_bootstrap.cachemedic_minus_no_defense"),
    ("task", lambda d: d["metrics"]["score_vs_eps"]["no_defense"].pop(), "has 3 values, expected 4"),
    ("task", lambda d: d["metrics"]["robustness_auc"].update(cachemedic="high"), "must be a number"),
    ("task", lambda d: d["metrics"]["overhead"]["smoothing"].pop("tokens_per_sec"),
     "metrics.overhead.smoothing.tokens_per_sec"),
    ("stab", lambda d: d["metrics"]["stability.logit_sensitivity"]["points"][1].pop("cachemedic"),
     'metrics["stability.logit_sensitivity"].points[1].cachemedic'),
    ("stab", lambda d: d["metrics"].pop("stability.amplification_map"), 'metrics["stability.amplification_map"]'),
    ("stab", lambda d: d["metrics"]["stability.amplification_map"]["cachemedic"].pop(), "expected one per layer"),
    ("stab", lambda d: d.update(config_hash="ffff"), "different configs"),
])
def test_missing_or_bad_key(tmp_path, capsys, which, edit, needle):
    rd = make_run(tmp_path, **{which: edit})
    _fails(tmp_path, capsys, rd, needle, "task_metrics.json" if which == "task" else "stability_metrics.json")


def test_bad_input_leaves_previous_outputs_untouched(tmp_path):
    rd = make_run(tmp_path)
    for i, f in enumerate(sorted(EXPECTED)):  # outputs of an earlier plots run
        (rd / "paper" / f).parent.mkdir(parents=True, exist_ok=True)
        (rd / "paper" / f).write_bytes(b"earlier %d" % i)
    before = {f: (rd / "paper" / f).read_bytes() for f in EXPECTED}
    (rd / "metrics" / "stability_metrics.json").write_text("not json")
    assert plots.main(["--run_dir", str(rd)]) == 2
    assert {f: (rd / "paper" / f).read_bytes() for f in EXPECTED} == before


def test_cli_module(tmp_path):
    rd = make_run(tmp_path)
    r = subprocess.run([sys.executable, "-m", "cachemedicpp.plots", "--run_dir", str(rd)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert paper_files(rd) == EXPECTED


def test_paired_run_settings_and_gaps_in_the_map(tmp_path):
    """The lambda_contr = 0 twin's settings come from its own run dir; missing map cells stay blank."""
    pair = tmp_path / "pair"
    pair.mkdir()
    cfg = (DATA / "config_resolved.yaml").read_text().replace("lambda_contr: 0.5", "lambda_contr: 0.0")
    (pair / "config_resolved.yaml").write_text(cfg)

    def stab(d):
        d["metrics"]["stability.settings"]["paired_run"] = {"run_dir": str(pair), "lambda_contr": 0.0}
        d["metrics"]["stability.amplification_map"]["cachemedic"][0][1] = None

    inp = plots.load_inputs(make_run(tmp_path, stab=stab))
    assert inp.paired_dir == str(pair) and inp.has_pair
    abl = plots.table_ablation(inp)
    check_table(abl, ["Setting & This run & $\\lambda_{\\mathrm{contr}}=0$ pair", "Family & A & A",
                      r"$\lambda_{\mathrm{contr}}$ & 0.5 & 0"])
    with Image.open(io.BytesIO(plots.fig_amplification(inp))) as im:
        assert im.width >= 600


def test_no_heuristic_evaluated_and_partial_overhead(tmp_path):
    """An eval without heuristic defenses, a defense whose throughput is null and a dict OOD split."""
    def task(d):
        m = d["metrics"]
        m["best_heuristic_name"] = None
        m["heuristic_auc"] = None
        for block in [m["score_vs_eps"], *m["score_vs_eps_by_task"].values()]:
            block["best_heuristic"] = None
            block["ci"].pop("best_heuristic")
        m["robustness_auc"].pop("best_heuristic")
        m["paired_bootstrap"].pop("cachemedic_minus_best_heuristic")
        m["overhead"]["smoothing"]["tokens_per_sec"] = None
        d["settings"]["ood_split"] = {"name": "loto_holdout_quant_noise", "train_types": ["gaussian"],
                                      "test_type": "quant_noise"}

    rd = make_run(tmp_path, task)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED
    main = (rd / "paper" / "tables" / "table_main_results.tex").read_text()
    check_table(main, ["No defense &", "CacheMedic &"])
    assert "Best heuristic" not in main
    report = (rd / "paper" / "report.md").read_text()
    assert "No baseline candidate was evaluated" in report
    assert "loto_holdout_quant_noise (held out: quant_noise)" in report
    assert "smoothing n/a tokens/s" in report


def test_report_lists_each_corruption_type(tmp_path):
    def by_type(d):
        m = d["metrics"]
        m["robustness_auc_by_type"] = {"gaussian": {"no_defense": 0.31, "smoothing": 0.30, "cachemedic": 0.35},
                                       "quant_noise": {"no_defense": 0.48, "smoothing": 0.39, "cachemedic": 0.47}}
        pb = lambda diff, lo, hi: {"diff": diff, "ci_low": lo, "ci_high": hi, "n": 9}  # noqa: E731
        m["paired_bootstrap_by_type"] = {
            "gaussian": {"cachemedic_minus_no_defense": pb(0.04, 0.01, 0.07),
                         "cachemedic_minus_best_heuristic": pb(0.05, -0.01, 0.1)},
            "quant_noise": {"cachemedic_minus_no_defense": pb(-0.01, -0.03, 0.02)}}

    rd = make_run(tmp_path, task=by_type)
    assert plots.run(rd) == 0
    report = (rd / "paper" / "report.md").read_text()
    # an older file: no damage, oracle_drop or recovered fractions per type ("—")
    assert ("| gaussian | — | 0.3100 | 0.3000 | — | 0.3500 | — | — | — | 0.0400 [0.0100, 0.0700]* | "
            "0.0500 [-0.0100, 0.1000] |") in report
    assert ("| quant_noise | — | 0.4800 | 0.3900 | — | 0.4700 | — | — | — | -0.0100 [-0.0300, 0.0200] | — |"
            in report)

    rd2 = make_run(tmp_path / "one", task=lambda d: d["metrics"].update(
        robustness_auc_by_type={"gaussian": {"no_defense": 0.3, "cachemedic": 0.3}}))
    assert plots.run(rd2) == 0
    assert "By corruption type" not in (rd2 / "paper" / "report.md").read_text()  # one type: nothing to split


# --------------------------------------------------------------------------------------------------
# the fair benchmark: calibrated baselines, oracle_drop, damage, recovered fractions


def test_fair_fixture_is_a_valid_task_metrics_file():
    """The fixture is held to the schema, so the plots are tested against what eval writes."""
    assert results.validate(_load(FAIR), results.TASK_METRICS_SCHEMA) == []


def test_fair_metrics_table_and_report(tmp_path):
    rd = make_run(tmp_path, task_file=FAIR)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED
    main = (rd / "paper" / "tables" / "table_main_results.tex").read_text()
    check_table(main, [
        "Clean (ceiling) & 0.8567 & 24.00 & 0.1371 & 1 (by definition) & --- \\\\",
        "No defense & 0.8567 & 24.00 & 0.0742 [0.0702, 0.0782] & 0 (by definition) & --- \\\\",
        r"Best baseline (chosen on validation data: range\_clamp, calibrated) & 0.8501 & 24.16 & "
        r"0.0865 [0.0825, 0.0905] & 0.1956 [0.1056, 0.2856] & --- \\",
        r"oracle\_drop (ceiling) & 0.8567 & 24.00 & 0.1205 [0.1165, 0.1245] & 0.7368 [0.6468, 0.8268] & --- \\",
        r"CacheMedic & 0.8517 & 24.12 & 0.1008 [0.0968, 0.1048] & 0.4231 [0.3331, 0.5131] & "
        r"0.0266 [0.0173, 0.0359] \\"])
    assert "Best calibrated baseline" not in main  # the best baseline is the calibrated one
    assert "Damage (clean $-$ no defense) = 0.0629 [0.0568, 0.0690]" in main
    assert "24 validation examples" in main and "best heuristic" not in main.lower()

    report = (rd / "paper" / "report.md").read_text()
    assert "Damage (clean − no defense) = 0.0629 [0.0568, 0.0690]" in report
    assert "Best baseline (chosen on validation data: **range_clamp**, calibrated baseline)" in report
    assert "validation AUC range_clamp 0.0872, smoothing 0.0841" in report
    assert ("| | clean (ceiling) | no defense | best baseline (chosen on validation data: range_clamp, calibrated) | "
            "oracle_drop (ceiling) | cachemedic |") in report
    assert ("| recovered fraction, 95% CI | 1 (by definition) | 0 (by definition) | 0.1956 [0.1056, 0.2856] | "
            "0.7368 [0.6468, 0.8268] | 0.4231 [0.3331, 0.5131] |") in report
    assert ("| robustness AUC, 95% CI | 0.1371 | 0.0742 [0.0702, 0.0782] | 0.0865 [0.0825, 0.0905] | "
            "0.1205 [0.1165, 0.1245] | 0.1008 [0.0968, 0.1048] |") in report
    # per type: damage, AUCs and the recovered fractions of the best baseline, oracle_drop and cachemedic
    assert ("| gaussian | 0.0535 [0.0455, 0.0615] | 0.0836 | 0.0971 | 0.1346 | 0.1129 | 0.2530 [0.1330, 0.3730] | "
            "0.9534 [0.8334, 1.073] | 0.5474 [0.4274, 0.6674] | 0.0293 [0.0183, 0.0403]* | "
            "0.0157 [0.0037, 0.0277]* |") in report
    assert "best heuristic" not in report.lower() and "beats" not in report
    # per task: the AUC of no defense, the best baseline, oracle_drop and cachemedic
    assert "| task | no_defense | range_clamp | oracle_drop | cachemedic |" in report
    assert "| wikitext2_ppl | 0.0866 | 0.0989 | 0.1329 | 0.1177 |" in report
    assert ("- Calibrated baselines: calibrated on 4096 tokens of offline:data/offline/train_corpus.txt (clean "
            "training text), layers 8–11") in report and "range_clamp q = 0.001 (clean cost +0.33%)" in report


def test_fair_metrics_best_baseline_is_a_reference_heuristic(tmp_path):
    """When validation picks a reference heuristic, the best calibrated baseline gets its own row; a null
    recovered fraction (no damage) says so."""
    def task(d):
        m = d["metrics"]
        m["best_heuristic_name"] = m["best_baseline_choice"]["chosen"] = "smoothing"
        m["best_baseline_choice"]["validation_auc"]["smoothing"] = 0.09
        m["robustness_auc"]["best_heuristic"] = m["robustness_auc"]["smoothing"]
        m["robustness_auc_ci"]["best_heuristic"] = m["robustness_auc_ci"]["smoothing"]
        m["recovered_fraction"]["oracle_drop"] = {"value": None, "ci_low": None, "ci_high": None}

    rd = make_run(tmp_path, task, task_file=FAIR)
    assert plots.run(rd) == 0
    main = (rd / "paper" / "tables" / "table_main_results.tex").read_text()
    check_table(main, [
        r"Best baseline (chosen on validation data: smoothing, reference heuristic, oracle region) & 0.8367",
        r"Best calibrated baseline (chosen on validation data: range\_clamp) & 0.8501 & 24.16 & "
        r"0.0865 [0.0825, 0.0905] & 0.1956 [0.1056, 0.2856] & --- \\",
        r"oracle\_drop (ceiling) & 0.8567 & 24.00 & 0.1205 [0.1165, 0.1245] & n/a (no damage) & --- \\"])
    report = (rd / "paper" / "report.md").read_text()
    assert "Best baseline (chosen on validation data: **smoothing**, reference heuristic (oracle region))" in report


def test_fig_a_draws_ceilings_groups_and_calibrated_baselines(tmp_path, monkeypatch):
    inp = plots.load_inputs(make_run(tmp_path, task_file=FAIR))
    lines = {ln["style"]["label"]: ln for ln in plots.figures._panel_lines(inp, inp.curves, references=True)}
    clean, ceiling = lines["clean (ceiling)"], lines["oracle_drop (ceiling)"]
    assert clean["style"]["ls"] == ":" and np.allclose(clean["y"], 0.8567)  # no defense's clean score, flat
    assert ceiling["style"]["ls"] == "--" and ceiling["style"]["color"] == plots.figures.GREY
    best = lines["best baseline: range_clamp (calibrated, chosen on validation data)"]
    other = lines["norm_outlier_drop (calibrated)"]
    own = [ln["style"]["color"] for ln in lines.values() if not ln["ref"] and ln not in (clean, ceiling)]
    assert len(own) == 4 and len(set(own)) == 4  # no defense, two calibrated baselines, cachemedic: own colours
    assert best["style"]["ls"] == "--" and other["style"]["ls"] == "-."
    assert {k for k, ln in lines.items() if ln["ref"]} == {"reset_clear", "smoothing", "masking_dropout",
                                                            "clipping_renorm"}
    from matplotlib.axes import Axes

    titles, orig = [], Axes.legend

    def spy(self, *a, **k):
        titles.append(k.get("title"))
        return orig(self, *a, **k)

    monkeypatch.setattr(Axes, "legend", spy)
    with Image.open(io.BytesIO(plots.fig_score_vs_eps(inp))) as im:
        assert im.width >= 600
    assert titles == ["reference heuristics, oracle region"]


def test_fig_a_labels_of_an_older_file(tmp_path):
    """Without a validation choice the best is still called the best heuristic (it was chosen on test data)."""
    inp = plots.load_inputs(make_run(tmp_path))
    labels = [ln["style"]["label"] for ln in plots.figures._panel_lines(inp, inp.curves, references=False)]
    assert labels == ["clean (ceiling)", "no defense", "best heuristic (smoothing)", "cachemedic"]


# figure E: bit-position damage (only when the metrics have bit_class_scores)

FIG_E = "figures/figE_bit_position_damage.png"


def add_bit_classes(d: dict) -> None:
    """A bit_class_scores block as eval writes it for eval.bit_classes = [sign, exponent_high, exponent, mantissa]
    on a bf16 storage simulated on a float32 cache (checksum_recompute evaluated too)."""
    classes = ["sign", "exponent_high", "exponent", "mantissa"]
    names = list(d["metrics"]["clean_regression"]) + ["checksum_recompute"]
    base = {"sign": 0.70, "exponent_high": 0.20, "exponent": 0.45, "mantissa": 0.84}
    per = {n: [round(base[c] + (0.6 * (0.86 - base[c]) if n in ("cachemedic", "range_clamp") else 0.0)
                     + (0.86 - base[c] if n == "checksum_recompute" else 0.0), 4) for c in classes] for n in names}
    d["metrics"]["bit_class_scores"] = {
        "eps": 0.64, "classes": classes, "per_defense": per,
        "ci": {n: {"low": [v - 0.03 for v in per[n]], "high": [v + 0.03 for v in per[n]]} for n in names},
        "by_task": {t: {n: list(per[n]) for n in names} for t in d["metrics"]["score_vs_eps_by_task"]},
        "clean_no_defense": 0.8567, "storage_format": "bfloat16", "cache_dtype": "float32", "simulated": True,
        "flip_rate": 0.008, "burst": 1,
        "bits": {"sign": [15], "exponent_high": [14], "exponent": list(range(7, 15)), "mantissa": list(range(7))},
        "how": "bitflip scored once per bit class at one severity"}


def test_fig_e_is_drawn_from_bit_class_scores(tmp_path, capsys):
    rd = make_run(tmp_path, add_bit_classes, task_file=FAIR)
    doc = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    assert results.validate(doc, results.TASK_METRICS_SCHEMA) == []  # the block is what the schema describes
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED | {FIG_E}
    assert "figure E not drawn" not in capsys.readouterr().out
    with Image.open(rd / "paper" / FIG_E) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400
        assert len(np.unique(np.asarray(im.convert("L")))) > 20
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (rd / "paper" / "report.md").read_text())
    assert sorted(links) == sorted([f"figures/{n}" for n in plots.FIGURES] + [FIG_E])
    inp = plots.load_inputs(rd)
    series = plots.figures.bit_position_series(inp)
    assert [d for d, _ in series] == ["no_defense", "range_clamp", "cachemedic", "checksum_recompute"]
    assert "best baseline, chosen on validation data" in series[1][1]


def test_fig_e_uses_the_best_calibrated_baseline_when_the_best_is_a_heuristic(tmp_path):
    def task(d):
        add_bit_classes(d)
        m = d["metrics"]
        m["best_heuristic_name"] = m["best_baseline_choice"]["chosen"] = "smoothing"
        m["best_baseline_choice"]["validation_auc"]["smoothing"] = 0.09
        m["robustness_auc"]["best_heuristic"] = m["robustness_auc"]["smoothing"]

    inp = plots.load_inputs(make_run(tmp_path, task, task_file=FAIR))
    series = plots.figures.bit_position_series(inp)
    assert series[1][0] == "range_clamp" and "best calibrated baseline" in series[1][1]
    assert "smoothing" not in [d for d, _ in series]
    plots.fig_bit_position(inp)


@pytest.mark.parametrize("edit", [
    None,  # no block: eval.bit_classes was empty
    lambda d: (add_bit_classes(d), d["metrics"]["bit_class_scores"].update(classes="sign")),
    lambda d: (add_bit_classes(d), d["metrics"]["bit_class_scores"]["per_defense"].pop("no_defense")),
])
def test_fig_e_is_skipped_with_a_note_without_a_usable_block(tmp_path, capsys, edit):
    rd = make_run(tmp_path, edit, task_file=FAIR)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED
    note = "figure E not drawn"
    assert note in capsys.readouterr().out and note in (rd / "paper" / "report.md").read_text()


TASK_ONLY = {"figures/figA_score_vs_eps.png", "figures/figB_clean_vs_overhead_pareto.png",
             "tables/table_main_results.tex", "tables/table_ablation_summary.tex", "report.md"}


@pytest.mark.parametrize("task_file,edit", [("task_metrics.json", None), (FAIR, add_bit_classes)])
def test_task_metrics_alone_draw_what_they_allow(tmp_path, capsys, task_file, edit):
    """train -> eval -> plots (no stability): figures A, B (and E with bit-class scores), both tables and the
    report; C and D are skipped and said so, and a figure C left by an earlier plots run is removed. The task
    numbers are the same as with stability metrics."""
    full = make_run(tmp_path / "full", edit, task_file=task_file)
    assert plots.run(full) == 0
    capsys.readouterr()
    rd = make_run(tmp_path / "task_only", edit, task_file=task_file)
    (rd / "metrics" / "stability_metrics.json").unlink()
    stale = rd / "paper" / "figures" / "figC_logit_sensitivity.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier plots run")

    assert plots.main(["--run_dir", str(rd)]) == 0
    assert paper_files(rd) == TASK_ONLY | ({FIG_E} if edit else set())
    out = capsys.readouterr().out
    assert "note: figures C and D not drawn: stability was not measured for this run" in out
    assert "removed paper/figures/figC_logit_sensitivity.png" in out
    assert ("figure E not drawn" in out) == (edit is None)

    report = (rd / "paper" / "report.md").read_text()
    assert "Stability was not measured for this run" in report and "figures C and D are not drawn" in report
    assert "stability_metrics.json` and" not in report and "Logit drift" not in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(f"figures/{n}" for n in plots.FIGURES[:2]) + ([FIG_E] if edit else [])
    for name in ("figA_score_vs_eps.png", "figB_clean_vs_overhead_pareto.png", *([FIG_E[8:]] if edit else [])):
        assert (rd / "paper" / "figures" / name).read_bytes() == (full / "paper" / "figures" / name).read_bytes()
    main = "tables/table_main_results.tex"
    assert (rd / "paper" / main).read_text() == (full / "paper" / main).read_text()
    abl = (rd / "paper" / "tables" / "table_ablation_summary.tex").read_text()
    check_table(abl, ["Family & A", "Rank & 8", "Training steps & 200"])
    assert abl.count(r"\begin{tabular}") == 1 and "Stability was not measured for this run" in abl


def test_stale_figure_e_is_removed_when_the_metrics_no_longer_have_bit_classes(tmp_path, capsys):
    rd = make_run(tmp_path, add_bit_classes, task_file=FAIR)
    assert plots.run(rd) == 0 and paper_files(rd) == EXPECTED | {FIG_E}
    make_run(tmp_path / "again", task_file=FAIR)  # the same run, evaluated again without eval.bit_classes
    shutil.copy(tmp_path / "again" / "run" / "metrics" / "task_metrics.json", rd / "metrics" / "task_metrics.json")
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED
    assert f"removed paper/{FIG_E}" in capsys.readouterr().out


# figure F: recovered fraction against recompute cost (only when a recomputing defense was evaluated at rest)

FIG_F = "figures/figF_recovery_vs_recompute_cost.png"


def add_recompute_cost(d: dict) -> None:
    """checksum_recompute's cost table and recovered fractions as eval writes them, on the gaussian and
    dropout_zero cells of the fair fixture (context 40 tokens, blocks of 16)."""
    m = d["metrics"]
    rows = [{"corruption_type": ty, "epsilon": e, "n": 8, "recomputed_fraction": 1.0 if e else 0.0,
             "tokens_mean": 20.0 if e else 0.0, "blocks_failed_mean": 2.0 if e else 0.0,
             "corrupted_block_tokens_mean": 16.0 if e else 0.0}
            for ty in m["recovered_fraction_by_type"] for e in (0.0, 0.16, 0.64)]
    m["recompute_cost"] = {"defense": "checksum_recompute", "block_size": 16, "persistence": "at_rest",
                           "context_tokens_mean": 40.0, "by_cell": rows, "how": "selective"}
    for per in m["recovered_fraction_by_type"].values():
        per["checksum_recompute"] = {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_fig_f_is_drawn_from_the_recompute_cost(tmp_path, capsys):
    rd = make_run(tmp_path, add_recompute_cost, task_file=FAIR)
    assert plots.run(rd) == 0
    assert paper_files(rd) == EXPECTED | {FIG_F}
    assert "figure F not drawn" not in capsys.readouterr().out
    with Image.open(rd / "paper" / FIG_F) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600 and len(np.unique(np.asarray(im.convert("L")))) > 20
    inp = plots.load_inputs(rd)
    pts = {(p["type"], p["defense"]): p for p in plots.figures.cost_frontier_points(inp)}
    assert pts[("gaussian", "checksum_recompute")]["cost"] == pytest.approx(0.5)  # 20 of 40 tokens
    assert pts[("gaussian", "checksum_recompute")]["oracle"] == pytest.approx(0.4)  # the touched blocks: 16 of 40
    assert pts[("gaussian", "range_clamp")]["cost"] == 0.0 and math.isnan(pts[("gaussian", "range_clamp")]["oracle"])
    # without a recomputing defense figure F is skipped, and one left by an earlier run is removed
    d = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    del d["metrics"]["recompute_cost"]
    (rd / "metrics" / "task_metrics.json").write_text(json.dumps(d))
    assert plots.run(rd) == 0 and paper_files(rd) == EXPECTED
    out = capsys.readouterr().out
    assert "figure F not drawn" in out and f"removed paper/{FIG_F}" in out
