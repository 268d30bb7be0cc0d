"""Sliding-window (mixed-length) caches: on the tiny Gemma-3-style model (window 16; layers 0 and 1 slide,
layer 2 attends to everything) with contexts of 2-4x the window, train, eval with every defense, stability
and the needle task exit 0 with metrics; corruption, defenses and exposure act on the positions each
layer's cache holds (its last ones) and report the positions a sliding layer no longer holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cachemedicpp import corruption, defenses, hf, results, stability, tasks, train
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 16
ALL_DEFENSES = ["no_defense", "reset_clear", "smoothing", "masking_dropout", "clipping_renorm", "range_clamp",
                "norm_outlier_drop", "oracle_drop", "checksum_recompute", "cachemedic"]


def _data(tiny_model_dir, context: int, **over) -> dict:
    from conftest import tiny_config

    return tiny_config(tiny_model_dir("gemma3"), **{
        "data.long_context.context_len": context, "eval.max_seq_len": context + 16, "train.prefix_len": context - 8,
        "eval.defenses": ALL_DEFENSES, "repair.protect_layers": [0, 1, 2],
        "eval.corruption_eval.types": ["gaussian", "contiguous_overwrite", "block_fault"],
        "baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
        "baseline.calibration.window_len": context, "baseline.calibration.cont_len": 8,
        "stability.prompt_len": context, **over})


def _cli(module, data: dict, rd: Path) -> int:
    rd.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = rd.parent / f"{rd.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    return module.main(["--config", str(cfg_path), "--run_dir", str(rd)])


def _doc(rd: Path, name: str) -> dict:
    return json.loads((rd / "metrics" / name).read_text())


@pytest.fixture(scope="module", params=[32, 64], ids=["2x_window", "4x_window"])
def trained_and_evaluated(request, tmp_path_factory, tiny_model_dir):
    """The bar scenario: train 6 steps, then eval every defense, at a context of 2x / 4x the window."""
    context = request.param
    data = _data(tiny_model_dir, context)
    rd = tmp_path_factory.mktemp(f"sliding_{context}") / "run"
    assert _cli(train, data, rd) == EXIT_OK
    assert _cli(ev, data, rd) == EXIT_OK
    return context, data, rd


def test_train_on_contexts_past_the_window(trained_and_evaluated):
    context, data, rd = trained_and_evaluated
    assert (rd / "checkpoints" / "repair_step_6.pt").is_file()
    recs = [json.loads(line) for line in (rd / "logs" / "train.jsonl").read_text().splitlines()]
    changed = [r["corruption"]["changed"] for r in recs if r.get("corruption", {}).get("changed")]
    assert changed, "no corrupted training step was logged"
    for c in changed:  # the sliding layers hold 15 of the prefix's positions: the rest is reported evicted
        assert 0.0 <= c["exposure"] <= 1.0 and 0.0 <= c["evicted"] <= 1.0
        for layer in ("0", "1"):
            assert c["per_layer"][layer]["exposure"] <= (WINDOW - 1) / (context - 8) + 1e-9


def test_eval_every_defense_past_the_window(trained_and_evaluated):
    context, data, rd = trained_and_evaluated
    doc = _doc(rd, "task_metrics.json")
    assert results.validate(doc, results.TASK_METRICS_SCHEMA) == []
    m, s = doc["metrics"], doc["settings"]
    for t in ("wikitext2_ppl", "sst2_prompted", "needle_long_context"):
        assert set(m["clean_scores"][t]) == set(ALL_DEFENSES)
        # exact defenses on a clean cache change nothing
        for d in ("oracle_drop", "checksum_recompute"):
            assert m["clean_scores"][t][d] == m["clean_scores"][t]["no_defense"], (t, d)
        # evicted positions are counted in the context, as not exposed
        assert m["exposure"][t] > 0 and m["exposure_evicted"][t] > 0
        assert m["exposure"][t] + m["exposure_evicted"][t] <= 1.0
    assert s["sliding_window"]["window"] == WINDOW and s["sliding_window"]["layers"] == [0, 1]
    assert s["exposure_evicted"] and "not exposed" in s["exposure"]
    assert set(m["robustness_auc"]) >= set(ALL_DEFENSES)


def test_stability_past_the_window(trained_and_evaluated):
    context, data, rd = trained_and_evaluated
    assert _cli(stability, data, rd) == EXIT_OK  # the trained operator; the eval's best baseline
    doc = _doc(rd, "stability_metrics.json")
    assert results.validate(doc, results.STABILITY_METRICS_SCHEMA) == []
    s = doc["settings"]
    assert s["sliding_layers"] == [0, 1] and s["heuristic_origin"].startswith("metrics/task_metrics.json")
    seg = s["segment_positions"]
    assert seg["0"] < seg["2"]  # the sliding layer holds fewer of the segment's positions


def test_needle_past_the_window(tiny_model_dir, tiny_lm):
    """The needle lies before the sliding layers' window: only the full-attention layer still holds it, and
    the eval scores it under every defense (the needle rows of the grid)."""
    cfg = load_config(data=_data(tiny_model_dir, 64))
    lm = tiny_lm("gemma3")
    tcfg = next(t for t in cfg.eval.tasks if t["name"] == "needle_long_context")
    exs, _ = tasks.get_task("needle_long_context").build(lm, cfg, tcfg, tasks.load_sources(cfg, lm, [tcfg["name"]]))
    for ex in exs:
        (a, b), = ex.meta["needle_spans"]
        _, cache = hf.forward(lm.model, ex.prefix[None], logits_to_keep=1)
        T = ex.prefix.numel()
        assert hf.held_length(cache, 0) == WINDOW - 1 and hf.held_length(cache, 2) == T
        assert b <= T - hf.held_length(cache, 0)  # evicted from the sliding layers


def test_needle_task_eval_on_read(tmp_path, tiny_model_dir):
    """on_read persistence: what attention reads on a sliding layer is the window's last positions of the
    context and the continuation; every defense still runs (checksums, oracle and drops included)."""
    data = _data(tiny_model_dir, 48, **{"corruption.persistence": "on_read", "eval.allow_missing_checkpoint": True,
                                        "eval.tasks": [{"name": "needle_long_context", "num_examples": 2}],
                                        "train.steps": 4, "train.log_every": 1})
    rd = tmp_path / "run"
    assert _cli(train, data, rd) == EXIT_OK
    assert _cli(ev, data, rd) == EXIT_OK
    m = _doc(rd, "task_metrics.json")["metrics"]
    assert set(m["clean_scores"]["needle_long_context"]) == set(ALL_DEFENSES)


# --------------------------------------------------------------------------------------------------
# units: a layer holding the last L positions gets what the same positions of a full layer get


def _sliced(kv: dict, L: int) -> dict:
    return {l: (k[:, :, -L:], v[:, :, -L:]) for l, (k, v) in kv.items()}


@pytest.mark.parametrize("ctype", ["contiguous_overwrite", "block_fault", "dropout_zero"])
def test_corruption_on_a_held_suffix_matches_the_full_layer(tiny_lm, ctype):
    lm = tiny_lm("gemma3")
    T, L = 48, WINDOW - 1
    ids = torch.arange(3, 3 + T)[None]
    full = hf.prefill_kv(lm.model, ids, [0])  # every position, as attention reads them in the prefill
    _, cache = hf.forward(lm.model, ids, logits_to_keep=1)
    assert torch.equal(hf.get_kv(cache, 0)[0], full[0][0][:, :, -L:])
    donor = corruption.donor_kv(lm, "a donor prompt of a few words", T, [0])
    assert donor[0][0].shape[2] >= T  # all positions, also on the sliding layer
    params = {"overwrite_window": [0, 40], "block_fault_frac": 0.5, "block_size": 4, "dropout_p": 1.0}
    cfg = load_config(data={"model": {"name": "x"}, "corruption": {"params": params, "axes": {"N_recent": 4}}})
    cor = corruption.Corruptor(cfg.corruption.to_dict(), [0], lm.arch.num_kv_heads, 0, donor_kv=donor)
    region = cor.region(ctype, 0.16, T, "eval", 1)
    a, rep_a = cor.apply_cache(full, ctype, 0.16, "eval", 1, region=region)
    b, rep_b = cor.apply_cache(_sliced(full, L), ctype, 0.16, "eval", 1, region=region)
    if ctype != "dropout_zero":  # deterministic values: the very same entries
        assert torch.equal(a[0][0][:, :, -L:], b[0][0]) and torch.equal(a[0][1][:, :, -L:], b[0][1])
    changed_a = (a[0][0] != full[0][0]).any(-1)[:, :, -L:]
    changed_b = (b[0][0] != full[0][0][:, :, -L:]).any(-1)
    assert torch.equal(changed_a, changed_b) or ctype == "dropout_zero"
    expo = region.fraction(0)
    assert rep_b.per_layer[0]["exposure"] + rep_b.per_layer[0]["evicted"] == pytest.approx(expo)
    assert rep_a.per_layer[0]["evicted"] == 0.0 and rep_b.per_layer[0]["evicted"] > 0


def test_defenses_cut_a_context_mask_to_the_held_positions():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    mask = torch.zeros(1, 2, 40, 1, dtype=torch.bool)
    mask[:, :, 20:30] = True
    L = 15
    for name in ("reset_clear", "clipping_renorm"):
        dfn = defenses.make(name)
        full_k = dfn.apply(k, v, defenses.LayerInput(0, torch.arange(40), region=mask)).k
        held_k = dfn.apply(k[:, :, -L:], v[:, :, -L:], defenses.LayerInput(0, torch.arange(40 - L, 40), region=mask)).k
        assert torch.equal(full_k[:, :, -L:], held_k), name
