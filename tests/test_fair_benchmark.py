"""The fair benchmark: calibrated baselines and the oracle_drop ceiling in the eval grid, the best baseline
chosen on validation data only, the damage and the recovered fractions, refusal of foreign calibrations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cachemedicpp import calibration, defenses, hf
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK
from cachemedicpp.config import load_config

from cachemedicpp.eval import stage

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["no_defense", "range_clamp", "norm_outlier_drop", "smoothing", "oracle_drop", "cachemedic"]


def _data(tiny_cfg, **over):
    return tiny_cfg("llama", **{
        "eval.defenses": NAMES, "eval.allow_missing_checkpoint": True,
        "eval.corruption_eval.types": ["gaussian", "bitflipish_sparse"],
        "eval.validation.num_examples": 1,
        "baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
        "baseline.calibration.window_len": 40, "baseline.calibration.cont_len": 8,
        "baseline.calibration.sink_tokens": 2, **over})


def _run(tmp_path: Path, data: dict, name: str = "run") -> tuple[int, Path]:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp_path / name
    return ev.main(["--config", str(cfg_path), "--run_dir", str(rd)]), rd


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model_dir):
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("fair")
    data = _data(lambda arch, **o: tiny_config(tiny_model_dir(arch), **o))
    code, rd = _run(tmp, data)
    assert code == EXIT_OK
    return data, rd, json.loads((rd / "metrics" / "task_metrics.json").read_text())


def test_ceilings_and_identity_differences(done):
    _, rd, doc = done
    m = doc["metrics"]
    # oracle_drop on a clean cache drops nothing: exactly no_defense's clean score
    for t, per in m["clean_scores"].items():
        assert per["oracle_drop"] == per["no_defense"], t
    # an untrained (identity) operator: cachemedic − no_defense is exactly [0, 0]
    pb = m["paired_bootstrap"]["cachemedic_minus_no_defense"]
    assert pb["diff"] == pb["ci_low"] == pb["ci_high"] == 0.0
    rf = m["recovered_fraction"]["cachemedic"]
    assert rf["value"] == 0.0 and rf["ci_low"] == rf["ci_high"] == 0.0
    # the damage is clean − no defense on the AUC scale, with a paired CI around it
    d = m["damage"]
    assert d["diff"] == pytest.approx(d["auc_clean"] - d["auc_no_defense"])
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert set(m["recovered_fraction"]) == set(NAMES) - {"no_defense"}
    assert set(m["damage_by_type"]) == {"gaussian", "bitflipish_sparse"}
    assert m["defense_groups"]["oracle_drop"] == "ceiling" and m["defense_groups"]["range_clamp"] == "calibrated baseline"
    assert (rd / "checkpoints" / "calibration.pt").is_file()
    assert doc["settings"]["calibration"]["data_source"].startswith("offline:")


def test_best_baseline_is_chosen_on_validation_only(done):
    data, rd, doc = done
    m = doc["metrics"]
    choice = m["best_baseline_choice"]
    # candidates: calibrated baselines and reference heuristics, never the ceiling or the learned operator
    assert set(choice["validation_auc"]) == {"range_clamp", "norm_outlier_drop", "smoothing"}
    assert m["best_heuristic_name"] == choice["chosen"] == max(choice["validation_auc"], key=choice["validation_auc"].get)
    # the pick is a function of the validation units alone: changing every test result leaves it as it was
    prog = json.loads((rd / "metrics" / "eval_progress.json").read_text())
    cfg = load_config(data=data)
    lm = hf.load_model(cfg.model.to_dict(), "cpu", "float32")
    cal = calibration.obtain(cfg, lm, rd / "checkpoints" / "calibration.pt")
    vctx = ev.build_context(stage.validation_config(cfg), lm, hf_identity(cfg, lm), cal)
    best, _ = stage.choose_best(vctx, prog["validation_units"])
    assert best == choice["chosen"]
    # the learned operator is scored on the validation grid too (to choose an operator family), never chosen
    assert "cachemedic" in vctx.defense_names and "validation_auc_cachemedic" in choice
    ctx = ev.build_context(cfg, lm, hf_identity(cfg, lm), cal)
    values, expo = ev.unit_matrices(ctx, prog["units"])
    flipped = {t: -v for t, v in values.items()}  # every test result changed
    for vals in (values, flipped):
        out = ev.aggregate(ctx.task_info, vals, expo, ctx.cells, ctx.defense_names, ctx.types, ctx.eps, 20, 0,
                            best=best)
        assert out["best_heuristic_name"] == best
    # validation examples are other examples than the test ones
    assert not {e.key for e in vctx.examples} & {e.key for e in ctx.examples}
    assert vctx.types == ["gaussian", "bitflipish_sparse"] and "oracle_drop" not in vctx.defense_names


def hf_identity(cfg, lm):
    from cachemedicpp import repair

    return repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)


def test_dropping_defenses_use_the_attention_mask(tiny_cfg, tiny_lm):
    cfg = load_config(data=_data(tiny_cfg, **{"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 1}]}))
    lm = tiny_lm("llama")
    ex = ev.build_context(cfg, lm, hf_identity(cfg, lm), _cal(cfg, lm)).examples[0]
    ctx = ev.build_context(cfg, lm, hf_identity(cfg, lm), _cal(cfg, lm))
    with torch.no_grad():
        _, clean = hf.forward(lm.model, ex.prefix[None])
    rows = {(r.cell.ctype, r.cell.eps, r.cell.defense): r for r in ev.cell_rows(ctx, ex, clean, dedupe=False)}
    oracle = rows[("bitflipish_sparse", 0.16, "oracle_drop")]
    nd = rows[("bitflipish_sparse", 0.16, "no_defense")]
    # oracle_drop drops exactly the changed entries and leaves the corrupted cache as it is
    for l, d in oracle.drops.items():
        k0, v0 = hf.get_kv(clean, l)
        k, v = nd.overrides[l]
        assert torch.equal(d, defenses.changed_entries(k0, v0, k, v)) and d.any()
        assert torch.equal(oracle.overrides[l][0], k)
    assert rows[("clean", 0.0, "oracle_drop")].drops is None
    # and scoring with the drop differs from reading the corrupted entries
    a = ev.run_batch(ctx, ex, clean, [oracle], False)[0]
    b = ev.run_batch(ctx, ex, clean, [nd], False)[0]
    assert a != b


def _cal(cfg, lm):
    return calibration.build(cfg, lm)


def test_on_read_persistence_with_dropping_defenses(tmp_path, tiny_cfg):
    data = _data(tiny_cfg, **{"corruption.persistence": "on_read",
                              "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2},
                                             {"name": "needle_long_context", "num_examples": 1}]})
    code, rd = _run(tmp_path, data)
    assert code == EXIT_OK
    m = json.loads((rd / "metrics" / "task_metrics.json").read_text())["metrics"]
    for per in m["clean_scores"].values():
        assert per["oracle_drop"] == per["no_defense"]
    assert np.isfinite(m["robustness_auc"]["norm_outlier_drop"])


def test_foreign_calibration_file_is_refused_and_nothing_touched(tmp_path, tiny_cfg, done):
    _, rd_done, _ = done
    data = _data(tiny_cfg, **{"repair.protect_layers": [1, 2]})
    rd = tmp_path / "run"
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "checkpoints" / "calibration.pt").write_bytes((rd_done / "checkpoints" / "calibration.pt").read_bytes())
    before = {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    code, _ = _run(tmp_path, data)
    assert code == EXIT_BAD_INPUT
    assert {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()} == before
    # a truncated one too
    blob = before[rd / "checkpoints" / "calibration.pt"]
    (rd / "checkpoints" / "calibration.pt").write_bytes(blob[: len(blob) // 3])
    code, _ = _run(tmp_path, _data(tiny_cfg))
    assert code == EXIT_BAD_INPUT


@pytest.mark.parametrize("best", ["range_clamp", "norm_outlier_drop"])
def test_stability_measures_a_calibrated_best_baseline(tmp_path, tiny_cfg, best):
    from cachemedicpp import fileio, stability

    data = _data(tiny_cfg)
    cfg = load_config(data=data)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp_path / "run"
    fileio.atomic_write_json(rd / "metrics" / "task_metrics.json", {
        "run_id": "x", "config_hash": cfg.hash, "settings": {}, "metrics": {"best_heuristic_name": best}})
    assert stability.main(["--config", str(cfg_path), "--run_dir", str(rd)]) == EXIT_OK
    doc = json.loads((rd / "metrics" / "stability_metrics.json").read_text())
    pts = doc["metrics"]["stability.logit_sensitivity"]["points"]
    assert doc["settings"]["heuristic"] == best and (rd / "checkpoints" / "calibration.pt").is_file()
    assert all(np.isfinite(p["heuristics"][best]) for p in pts)
    # the calibrated baseline acts on the undisturbed cache only where its calibration says so: at delta 0
    # its drift from its own clean logits is exactly 0
    assert pts[0]["heuristics_vs_defended_clean"][best] == 0.0


def test_test_grid_narrowed_to_the_validation_pick(tmp_path, tiny_cfg, done, monkeypatch):
    """eval.validation.test_candidates: chosen scores on the test grid only the candidate the validation grid
    chose (beside the non-candidates): its numbers are those of the full grid, and a pause after the first
    test unit resumes to the same file."""
    from cachemedicpp.cli import EXIT_PAUSED

    _, _, full = done
    data = _data(tiny_cfg, **{"eval.validation.test_candidates": "chosen"})
    code, ref = _run(tmp_path, data, "ref")
    assert code == EXIT_OK
    doc = json.loads((ref / "metrics" / "task_metrics.json").read_text())
    m, fm = doc["metrics"], full["metrics"]
    best = fm["best_heuristic_name"]
    assert m["best_baseline_choice"] == fm["best_baseline_choice"]
    assert doc["settings"]["defenses"] == [d for d in NAMES if d not in defenses.candidates() or d == best]
    assert set(m["robustness_auc"]) == set(doc["settings"]["defenses"]) | {"best_heuristic"}
    for d in doc["settings"]["defenses"]:  # the same draws and examples: the same numbers
        assert m["robustness_auc"][d] == fm["robustness_auc"][d], d
    prog = json.loads((ref / "metrics" / "eval_progress.json").read_text())
    assert prog["status"] == "completed"
    assert all(not any(k.split("|")[2] in set(defenses.candidates()) - {best} for k in u["cells"])
               for u in prog["units"].values())

    real, calls = ev.score_example, []
    n_val = len(prog["validation_units"])

    def pause_after_first_test_unit(ctx, ex, dedupe=True):
        out = real(ctx, ex, dedupe)
        calls.append(ex.key)
        if len(calls) == n_val + 1:
            (tmp_path / "run" / "control").mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / "control" / "pause.request").write_text("")
        return out

    monkeypatch.setattr(ev, "score_example", pause_after_first_test_unit)
    code, rd = _run(tmp_path, data, "run")
    assert code == EXIT_PAUSED
    code, rd = _run(tmp_path, data, "run")
    assert code == EXIT_OK
    assert len(calls) == n_val + len(prog["units"])  # nothing scored twice after the resume
    again = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    assert again["metrics"] == m and again["settings"]["defenses"] == doc["settings"]["defenses"]
