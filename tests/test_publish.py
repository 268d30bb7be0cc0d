"""Committed results: `plots.publish` writes a compact record per run dir, the documents' result tables are
rendered from the committed records, and the committed documents equal their rendering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cachemedicpp import ROOT
from cachemedicpp.config import ConfigError
from cachemedicpp.plots import publish

DATA = ROOT / "tests" / "data" / "metrics"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    rd = tmp_path / "demo_run"
    (rd / "metrics").mkdir(parents=True)
    shutil.copyfile(DATA / "task_metrics_fair.json", rd / "metrics" / "task_metrics.json")
    shutil.copyfile(DATA / "config_resolved.yaml", rd / "config_resolved.yaml")
    stab = json.loads((DATA / "stability_metrics.json").read_text())
    stab["config_hash"] = json.loads((rd / "metrics" / "task_metrics.json").read_text())["config_hash"]
    (rd / "metrics" / "stability_metrics.json").write_text(json.dumps(stab))
    return rd


def test_a_record_holds_the_numbers_the_tables_need(run_dir, tmp_path):
    out = tmp_path / "out"
    assert publish.main([str(run_dir), "--out", str(out), "--name", "demo"]) == 0
    rec = json.loads((out / "demo.json").read_text())
    task = json.loads((run_dir / "metrics" / "task_metrics.json").read_text())["metrics"]
    assert rec["format"] == publish.FORMAT and rec["config_hash"] == "1a2b3c4d5e6f7788"
    for key in ("robustness_auc", "recovered_fraction", "paired_bootstrap", "best_baseline_choice", "damage"):
        assert rec["task_metrics"][key] == task[key]
    assert rec["stability"]["points"] and rec["settings"]["repair"]["family"] == "A"


def test_documents_are_rendered_from_the_records_and_checked(run_dir, tmp_path):
    out = tmp_path / "out"
    publish.publish(run_dir, out, "demo")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- published:demo:main -->\nstale\n<!-- /published -->\nmiddle\n"
                   "<!-- published:demo:choice -->\n<!-- /published -->\n")
    assert publish.main(["--out", str(out), "--docs", str(doc), "--check"]) == 1
    assert "stale" in doc.read_text()  # --check writes nothing
    assert publish.main(["--out", str(out), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and "stale" not in text
    assert "0.0742 [0.0702, 0.0782]" in text  # no_defense's AUC and CI from the record
    assert "range_clamp (chosen)" in text
    assert publish.main(["--out", str(out), "--docs", str(doc), "--check"]) == 0
    # a number edited by hand in the document is caught
    doc.write_text(text.replace("0.0742 [0.0702", "0.0800 [0.0702"))
    assert publish.render_docs([doc], out, check=True) == [doc]


def test_unknown_record_or_table_is_bad_input(run_dir, tmp_path):
    out = tmp_path / "out"
    publish.publish(run_dir, out, "demo")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- published:nothing:main -->\n<!-- /published -->\n")
    with pytest.raises(ConfigError, match="nothing"):
        publish.render_docs([doc], out)
    doc.write_text("<!-- published:demo:sideways -->\n<!-- /published -->\n")
    with pytest.raises(ConfigError, match="sideways"):
        publish.render_docs([doc], out)
    assert publish.main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_the_committed_documents_equal_their_rendering():
    """Every result table of the README and docs/ is what `publish` renders from docs/results."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert publish.render_docs(docs, ROOT / "docs" / "results", check=True) == []


def _selection_sweep(tmp_path: Path, aucs: dict[str, float], split: str = "selection") -> Path:
    sweep = tmp_path / "sweep"
    runs = []
    for name, auc in aucs.items():
        rd = sweep / name
        (rd / "metrics").mkdir(parents=True)
        task = json.loads((DATA / "task_metrics_fair.json").read_text())
        task["settings"]["validation"]["split"] = split
        task["metrics"]["best_baseline_choice"]["validation_auc_cachemedic"] = auc
        (rd / "metrics" / "task_metrics.json").write_text(json.dumps(task))
        shutil.copyfile(DATA / "config_resolved.yaml", rd / "config_resolved.yaml")
        runs.append({"name": name, "run_dir": name, "overrides": {"train.lambda_contr": auc}})
    (sweep / "summary.json").write_text(json.dumps({"sweep_name": "sel", "runs": runs}))
    return sweep


def test_a_selection_sweep_is_published_with_the_rules_pick(tmp_path):
    out = tmp_path / "out"
    sweep = _selection_sweep(tmp_path, {"first": 0.20, "second": 0.25, "third": 0.25})
    assert publish.main(["--selection", str(sweep), "--out", str(out)]) == 0
    rec = json.loads((out / "sel.json").read_text())
    assert rec["chosen"] == "second"  # the highest; of equals, the one listed first
    assert [r["validation_auc_cachemedic"] for r in rec["runs"]] == [0.20, 0.25, 0.25]
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- published:sel:selection -->\n<!-- /published -->\n")
    publish.render_docs([doc], out)
    text = doc.read_text()
    assert "| second (chosen) |" in text and "| third |" in text and "0.2500" in text
    # a run whose validation grid read another split cannot decide: bad input, nothing written
    other = _selection_sweep(tmp_path / "x", {"only": 0.3}, split="validation")
    assert publish.main(["--selection", str(other), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


def _cost(defense: str, rows: list[tuple]) -> dict:
    """A cost table; each row (type, ε, recomputed fraction, tokens, oracle's minimum[, block recall])."""
    keys = ("corruption_type", "epsilon", "recomputed_fraction", "tokens_mean", "corrupted_block_tokens_mean")
    cells = [dict(zip(keys, r[:5]), n=4, blocks_failed_mean=1.0, **({"block_recall": r[5]} if len(r) > 5 else {}))
             for r in rows]
    return {"defense": defense, "block_size": 16, "persistence": "at_rest", "context_tokens_mean": 224.0,
            "by_cell": cells, "how": "selective"}


def test_the_recompute_table_shows_the_cost_beside_the_recovery():
    rf = {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0}
    rec = {"name": "rc", "task_metrics": {
        "recovered_fraction_by_type": {"block_fault": {"checksum_recompute": rf,
                                                       "detect_recompute": {**rf, "value": -0.05, "ci_low": -0.1}}},
        "recompute_cost": _cost("checksum_recompute", [("clean", 0.0, 0.0, 0.0, 0.0),
                                                       ("block_fault", 0.0, 0.0, 0.0, 0.0),  # clean again: no row
                                                       ("block_fault", 0.16, 1.0, 32.0, 32.0, 1.0)]),
        "detect_recompute_cost": _cost("detect_recompute", [("clean", 0.0, 0.25, 12.0, 0.0),
                                                            ("block_fault", 0.16, 0.75, 48.0, 32.0, 0.5),
                                                            ("block_fault", 0.32, 1.0, 64.0, 32.0)])}}
    text = publish.render_doc("<!-- published:rc:recompute -->\n<!-- /published -->\n", lambda name: rec)
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| checksum_recompute | clean | 0 | — | 0.000 | 0.0 | 0.0 | — | — |",
        "| checksum_recompute | block_fault | 0.16 | 0.900 [0.800, 1.000] | 1.000 | 32.0 | 32.0 | 1.00 | 1.000 |",
        "| detect_recompute | clean | 0 | — | 0.250 | 12.0 | 0.0 | — | — |",  # the false-alarm rate
        "| detect_recompute | block_fault | 0.16 | −0.050 [−0.100, 1.000] | 0.750 | 48.0 | 32.0 | 1.50 | 0.500 |",
        "| detect_recompute | block_fault | 0.32 | −0.050 [−0.100, 1.000] | 1.000 | 64.0 | 32.0 | 2.00 | — |"]
    assert "blocks of 16 positions; a full recomputation forwards 224.0 tokens" in text
    with pytest.raises(ConfigError, match="no recompute cost"):
        publish.recompute_table({"name": "plain", "task_metrics": {}})


def test_a_heldout_table_spans_the_records_a_pattern_matches(tmp_path):
    """`heldout` over `NAME_*`: each leave-one-type-out record's clean row and its held-out type's ε > 0 rows,
    in name order; a pattern that matches nothing, or one given to a one-record table, is refused."""
    out = tmp_path / "out"
    out.mkdir()
    for t in ("quant_noise", "gaussian"):
        shutil.copyfile(ROOT / "docs" / "results" / f"recompute_loto_{t}.json", out / f"loto_{t}.json")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- published:loto_*:heldout -->\n<!-- /published -->\n")
    assert publish.render_docs([doc], out) == [doc]
    rows = [r.split(" | ") for r in doc.read_text().splitlines() if r.startswith("| detect_recompute")]
    assert [(r[1], r[2]) for r in rows] == [("gaussian", "clean"), ("gaussian", "0.16"), ("gaussian", "0.64"),
                                            ("quant_noise", "clean"), ("quant_noise", "0.16"), ("quant_noise", "0.64")]
    rec = json.loads((out / "loto_gaussian.json").read_text())
    cell = next(c for c in rec["task_metrics"]["detect_recompute_cost"]["by_cell"]
                if c["corruption_type"] == "gaussian" and c["epsilon"] == 0.16)
    assert rows[1][-1] == f"{cell['block_recall']:.3f} |"
    assert "records `recompute_loto_gaussian`, `recompute_loto_quant_noise`" in doc.read_text()  # their names
    doc.write_text("<!-- published:nothing_*:heldout -->\n<!-- /published -->\n")
    with pytest.raises(ConfigError, match="no published record matches"):
        publish.render_docs([doc], out)
    doc.write_text("<!-- published:loto_*:recompute -->\n<!-- /published -->\n")
    with pytest.raises(ConfigError, match="name pattern"):
        publish.render_docs([doc], out)
    # a record named like a pattern is refused at publishing, and skipped if one lies there anyway
    with pytest.raises(ConfigError, match="has no"):
        publish.publish(tmp_path / "any_run", out, "loto_*")
    shutil.copyfile(out / "loto_gaussian.json", out / "loto_*.json")
    doc.write_text("<!-- published:loto_*:heldout -->\n<!-- /published -->\n")
    publish.render_docs([doc], out)
    assert "records `recompute_loto_gaussian`, `recompute_loto_quant_noise`" in doc.read_text()


def test_the_by_type_table_shows_each_types_recovery_and_the_clean_cost():
    ci = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    rec = {"name": "bt", "task_metrics": {
        "robustness_auc": {"no_defense": 0.2, "calibrated_repair": 0.3, "oracle_drop": 0.25},
        "damage_by_type": {"gaussian": {"diff": 0.2, "ci_low": 0.1, "ci_high": 0.3, "n": 12},
                           "quant_noise": {"diff": 0.001, "ci_low": -0.01, "ci_high": 0.01, "n": 12}},
        "recovered_fraction_by_type": {"gaussian": {"calibrated_repair": ci(0.85, 0.7, 0.95),
                                                    "oracle_drop": ci(-0.1, -0.3, 0.05)},
                                       "quant_noise": {"calibrated_repair": ci(-20.0, -90.0, 50.0)}},
        "clean_metrics": {"wikitext2_ppl": {"no_defense": 20.0, "calibrated_repair": 20.1, "oracle_drop": 20.0},
                          "sst2_prompted": {"no_defense": 0.5, "calibrated_repair": 0.5, "oracle_drop": 0.5}},
        "clean_regression": {"no_defense": 0.6, "calibrated_repair": 0.59, "oracle_drop": 0.6}}}
    text = publish.render_doc("<!-- published:bt:by_type -->\n<!-- /published -->\n", lambda name: rec)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| type | damage (clean − no defense, AUC), 95% CI | calibrated_repair | oracle_drop |"
    assert rows[1] == "| gaussian | 0.200 [0.100, 0.300] | 0.850 [0.700, 0.950] | −0.100 [−0.300, 0.050] |"
    assert rows[2] == "| quant_noise | 0.001 [−0.010, 0.010] | — | — |"  # no measurable damage: no fraction of it
    assert rows[3] == "| clean wikitext2_ppl | 20.000 (no defense) | 20.100 (+0.50 %) | 20.000 (+0.00 %) |"
    assert rows[5] == "| clean score (mean normalised) | 0.6000 (no defense) | 0.5900 | 0.6000 |"
    assert "paired bootstrap over 12 test examples" in text
