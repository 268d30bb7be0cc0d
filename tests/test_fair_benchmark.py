"""The fair benchmark: calibrated baselines and the oracle_drop ceiling in the eval grid, the best baseline
chosen on validation data only, the damage and the recovered fractions, refusal of foreign calibrations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cachemedicpp import calibration, defenses, hf, tasks
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


def test_best_baseline_is_chosen_on_validation_only(done, tmp_path):
    data, rd, doc = done
    m = doc["metrics"]
    choice = m["best_baseline_choice"]
    # candidates: calibrated baselines and reference heuristics, never the ceiling or the learned operator
    vauc = choice["validation_auc"]
    assert set(vauc) == {"range_clamp", "norm_outlier_drop", "smoothing"}
    chosen = choice["chosen"]
    assert m["best_heuristic_name"] == chosen == max(vauc, key=vauc.get)
    prog = json.loads((rd / "metrics" / "eval_progress.json").read_text())
    cfg = load_config(data=data)
    lm = hf.load_model(cfg.model.to_dict(), "cpu", "float32")
    cal = calibration.obtain(cfg, lm, rd / "checkpoints" / "calibration.pt")
    vctx = ev.build_context(stage.validation_config(cfg), lm, hf_identity(cfg, lm), cal)
    best, _ = stage.choose_best(vctx, prog["validation_units"])
    assert best == chosen
    # the pick follows the validation units: swap the chosen candidate's results with a weaker one's in every
    # validation unit and the weaker one is picked
    other = min(vauc, key=vauc.get)
    assert vauc[other] < vauc[chosen], "the candidates tie on validation: the swap below proves nothing"
    swapped = {k: _swap_defenses(u, chosen, other) for k, u in prog["validation_units"].items()}
    assert stage.choose_best(vctx, swapped)[0] == other
    # the learned operator is scored on the validation grid too (to choose an operator family), never chosen
    assert "cachemedic" in vctx.defense_names and "validation_auc_cachemedic" in choice
    # ... and never follows the test units: make `other` the best candidate on every test unit, rerun the stage
    # on those results (a resume: nothing is rescored) and the pick is still the validation one
    ctx = ev.build_context(cfg, lm, hf_identity(cfg, lm), cal)
    kinds = {t: info["kind"] for t, info in ctx.task_info.items()}
    prog["units"] = {k: _best_everywhere(u, other, kinds[k.split("/")[0]]) for k, u in prog["units"].items()}
    copy = tmp_path / "rerun"
    shutil.copytree(rd, copy)
    (copy / "metrics" / "eval_progress.json").write_text(json.dumps(prog))
    code, _ = _run(tmp_path, data, "rerun")
    assert code == EXIT_OK
    again = json.loads((copy / "metrics" / "task_metrics.json").read_text())["metrics"]
    test_auc = {d: again["robustness_auc"][d] for d in vauc}
    assert max(test_auc, key=test_auc.get) == other != chosen, "the test units do not favour another candidate"
    assert again["best_heuristic_name"] == again["best_baseline_choice"]["chosen"] == chosen
    assert again["best_baseline_choice"]["validation_auc"] == vauc
    # validation examples are other inputs than the test ones: no prompt is shared, and the validation
    # wikitext windows lie elsewhere in the token stream than the test windows
    for v in vctx.examples:
        assert not any(torch.equal(v.prefix, e.prefix) for e in ctx.examples), v.key
    stream = tasks.load_sources(cfg, lm, ["wikitext2_ppl"])["wikitext2_ids"]
    vspans = _wikitext_spans(vctx.examples, stream)
    tspans = _wikitext_spans(ctx.examples, stream)
    assert len(vspans) == 1 and len(tspans) == 3
    assert all(a1 <= b0 or b1 <= a0 for a0, a1 in vspans for b0, b1 in tspans)
    assert vctx.types == ["gaussian", "bitflipish_sparse"] and "oracle_drop" not in vctx.defense_names


def _swap_defenses(unit: dict, a: str, b: str) -> dict:
    """The unit with the cell results of defenses `a` and `b` exchanged."""
    cells = dict(unit["cells"])
    for key, value in unit["cells"].items():
        ctype, eps, d = key.split("|")
        if d in (a, b):
            cells[f"{ctype}|{eps}|{b if d == a else a}"] = value
    return {**unit, "cells": cells}


def _best_everywhere(unit: dict, name: str, kind: str) -> dict:
    """The unit with every cell of defense `name` better than any cell of the unit (a lower NLL for
    perplexity, the top score for accuracy)."""
    vals = unit["cells"].values()
    top = min(vals) - 1.0 if kind == "ppl" else max(vals)
    return {**unit, "cells": {k: top if k.split("|")[2] == name else v for k, v in unit["cells"].items()}}


def _wikitext_spans(examples, stream: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) in the token stream of every wikitext2_ppl example's window (context + continuation)."""
    spans = []
    for e in examples:
        if e.task != "wikitext2_ppl":
            continue
        window = torch.cat([e.prefix, e.feeds[0, :1], e.targets[0]])
        hits = (stream.unfold(0, window.numel(), 1) == window).all(1).nonzero().flatten().tolist()
        assert hits, e.key  # the window is a slice of the stream
        spans += [(h, h + window.numel()) for h in hits]
    return spans


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


def test_workers_narrow_the_test_grid_as_the_serial_run(tmp_path, tiny_cfg):
    """eval.workers: 2 with the stored calibration and the test grid narrowed to the validation pick (the
    workers narrow theirs from the validation units the phase hands them): the serial run's file."""
    data = _data(tiny_cfg, **{"eval.validation.test_candidates": "chosen"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, ref = _run(tmp_path / "a", data)
    assert code == EXIT_OK
    code, rd = _run(tmp_path / "b", {**data, "eval": {**data["eval"], "workers": 2}})
    assert code == EXIT_OK
    assert (rd / "metrics" / "task_metrics.json").read_bytes() == (ref / "metrics" / "task_metrics.json").read_bytes()
    prog, want = (json.loads((d / "metrics" / "eval_progress.json").read_text()) for d in (rd, ref))
    assert prog["units"] == want["units"]  # the narrowed grid's cells only
    assert prog["validation_units"] == want["validation_units"]
