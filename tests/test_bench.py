"""bench: the results file's structure on a tiny model with minimal settings, the repair variants the
decode benchmark compares (they must compute the same attention), and the memory probe. No timing
assertions: benchmarks are not tests."""

from __future__ import annotations

import json

import pytest
import torch

from cachemedicpp import bench
from cachemedicpp.bench.memory_probe import probe_subprocess
from cachemedicpp.bench.workloads import bare_train_step, perturbed_operator
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK
from cachemedicpp.config import load_config
from cachemedicpp.repair_reference import AugmentedRepair, NaiveRepair, causal_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_settings(model_dir, **kw) -> bench.Settings:
    s = bench.Settings(model=str(model_dir), reps=1, lengths=[16], decode_tokens=2, memory="inprocess",
                       memory_lengths=[16], eval_eps=[0.0, 0.16], eval_end_to_end=False, threads=1)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def _quickstart_with(tmp_path, **repair) -> str:
    """configs/quickstart.yaml with some repair keys replaced, written to a temp file."""
    import yaml

    from cachemedicpp import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["repair"].update(repair)
    path = tmp_path / "quickstart_variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_results_json_structure(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "res.json"
    # full-mode code paths (every memory workload, eval.run end to end) at minimal sizes; family A, whose
    # decode is compared with the naive and augmented forms (the quickstart's family D: the test below)
    rc = bench.main(["--config", _quickstart_with(tmp_path, family="A"), "--model", str(tiny_model_dir("llama")),
                     "--reps", "1", "--lengths", "16",
                     "--decode-tokens", "2", "--memory", "inprocess", "--device", "cpu", "--threads", "1",
                     "--out", str(out)])
    assert rc == EXIT_OK
    r = json.loads(out.read_text())
    assert r["format"] == bench.FORMAT
    for key in ("machine", "settings", "targets", "train_step", "eval_grid", "decode", "memory", "summary"):
        assert key in r, key
    for key in ("cpu_model", "nproc", "torch_threads", "torch", "transformers", "loadavg_start", "loadavg_end",
                "omp_wait_policy"):
        assert key in r["machine"], key
    assert r["machine"]["torch_threads"] == 1

    tr = r["train_step"]["cpu"]
    assert len(tr["train_step_sec"]) == len(tr["bare_step_sec"]) == 1
    assert tr["ratio"] > 0 and tr["cpu_time_ratio"] > 0
    assert tr["shapes"]["protect_layers"] == [0, 1, 2]  # the tiny model has 3 layers: quickstart's don't fit
    assert len(tr["shapes"]["step_corruption_types"]) == 1

    ev = r["eval_grid"]["cpu"]
    assert "skipped" not in ev
    assert ev["ratio"] > 0 and ev["ratio_vs_computed_cells"] > 0
    assert ev["grid"]["examples"] == len(ev["grid"]["tasks"]) == 4  # one example per quickstart task
    assert ev["cells"] == ev["grid"]["examples"] * ev["grid"]["cells_per_example"]
    assert all(0 < n <= ev["grid"]["cells_per_example"] for n in ev["grid"]["computed_cells_per_example"])
    assert "cachemedic" in ev["grid"]["defenses"]
    assert ev["end_to_end"]["exit_code"] == EXIT_OK and ev["end_to_end"]["wall_sec"] > 0

    dec = r["decode"]["cpu"]
    assert dec["rank"] == 8 and dec["apply_to"] == "KV"
    row = dec["lengths"]["16"]
    assert set(row["tokens_per_sec"]) == set(bench.DECODE_VARIANTS)
    assert set(row["ratios"]) == {"repair", "naive", "augmented", "stock", "stock_tagged"}
    # one ABBA block per variant and repetition: two runs of each variant, two of no defense per block
    assert all(len(row["sec_per_run"][v]) == 2 for v in ("repair", "naive", "augmented", "stock", "stock_tagged"))
    assert len(row["sec_per_run"]["none"]) == 10
    assert all(len(row["per_rep_ratios"][v]) == 1 for v in ("repair", "naive", "augmented", "stock"))
    tags = row["tags"]  # verifying the prefilled cache's tags, against the prefill they spare
    assert tags["block_size"] == 16 and tags["tags"] == 3 and tags["verify_sec"] > 0 and tags["prefill_sec"] > 0
    agree = dec["agreement_max_abs_logit_diff"]
    assert agree["repair_vs_none"] > 1e-6  # the perturbed operator really changes the output
    assert agree["naive_vs_repair"] < 1e-4 and agree["augmented_vs_repair"] < 1e-4
    assert agree["stock_vs_none"] < 1e-4  # the stock model (no hook) computes what the hook without a plan does

    mem = r["memory"]["cpu"]
    expected = {"train_step", "train_bare", "eval_grid", "eval_bare"} | {f"decode_{v}_16" for v in bench.DECODE_VARIANTS}
    assert set(mem) == expected
    for name, m in mem.items():
        assert m["peak_delta_mib"] >= 0 and m["peak_mib"] > 0 and m["method"], name
    assert "extra_vs_none_mib" in mem["decode_naive_16"]

    summ = r["summary"]["cpu"]
    assert {"train_step", "eval_grid", "decode_repair@16", "decode_repair_vs_stock@16", "decode_tags_vs_stock@16",
            "tags_verify_vs_prefill@16", "meets_target"} <= set(summ)
    assert {"decode_repair_vs_stock@16", "decode_tags_vs_stock@16"} <= set(summ["meets_target"])
    printed = capsys.readouterr().out
    assert "train step" in printed and "decode tokens/s" in printed and str(out) in printed


def test_defense_overhead_reports_checksum_recompute(tmp_path, tiny_model_dir, capsys):
    """checksum_recompute's overhead beside every other defense: structure only (no timing assertions)."""
    out = tmp_path / "res.json"
    rc = bench.main(["--model", str(tiny_model_dir("llama")), "--reps", "1", "--only", "defense_overhead",
                     "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert rc == EXIT_OK
    r = json.loads(out.read_text())
    assert set(r) >= {"defense_overhead", "summary"} and not r["decode"] and not r["train_step"]
    block = r["defense_overhead"]["cpu"]
    rows = block["defenses"]
    # the base config's defenses (quickstart: its calibrated candidates, oracle_drop, cachemedic) plus checksum_recompute
    assert {"no_defense", "range_clamp", "oracle_drop", "cachemedic", "checksum_recompute"} <= set(rows)
    assert block["reps"] == 1 and len(block["examples"]) == 4 and block["cell"]["epsilon"] > 0
    for d, row in rows.items():
        assert row["wall_sec"] > 0 and row["tokens"] > 0 and row["wall_ratio_vs_no_defense"] > 0, d
        assert row["group"], d
    assert rows["no_defense"]["wall_ratio_vs_no_defense"] == 1.0
    re = rows["checksum_recompute"]
    assert re["group"] == "exact recovery (checksum + recompute)"
    # the timed cell is corrupted: every run recomputes its whole context, for real
    assert re["recompute_tokens"] > 0 and re["recompute_sec"] > 0
    assert re["recompute_tokens_per_run"] * 4 == re["recompute_tokens"]
    assert 0 < re["recompute_share_of_wall"] <= 1
    assert all("recompute_tokens" not in row for d, row in rows.items() if d != "checksum_recompute")
    assert r["summary"]["cpu"]["checksum_recompute_wall_ratio"] == re["wall_ratio_vs_no_defense"]
    printed = capsys.readouterr().out
    assert "defense overhead" in printed and "checksum_recompute" in printed and "recomputed" in printed


def test_quick_settings():
    s = bench.settings_from_args(bench.parse_args(["--quick", "--device", "cpu"]))
    assert (s.reps, s.lengths, s.memory_lengths, s.memory_of) == (2, [256], [256], ["decode"])
    assert not s.eval_end_to_end and s.eval_reps == 1
    s = bench.settings_from_args(bench.parse_args(["--lengths", "256,1024,2048", "--reps", "3", "--device", "cpu"]))
    assert (s.reps, s.lengths, s.memory_lengths, s.devices) == (3, [256, 1024, 2048], [2048], ["cpu"])
    assert s.prefill == "prose"  # decode after the offline evaluation prose unless told otherwise
    assert bench.settings_from_args(bench.parse_args(["--prefill", "random", "--device", "cpu"])).prefill == "random"


def test_prose_prefill_is_the_evaluation_texts_tokens(tiny_lm):
    from cachemedicpp.bench.settings import PROSE
    from cachemedicpp.bench.workloads import prefill_ids

    lm = tiny_lm("llama")
    text = lm.tokenizer(PROSE.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ids = prefill_ids(lm, 300, seed=0, kind="prose")
    assert ids.shape == (1, 300) and torch.equal(ids, prefill_ids(lm, 300, seed=0, kind="prose"))
    assert any(torch.equal(text[i:i + 300], ids[0]) for i in range(1000))  # a window of the text
    assert not torch.equal(ids, prefill_ids(lm, 300, seed=0, kind="random"))


def test_repair_variants_compute_the_same_attention(tmp_path, tiny_lm):
    lm = tiny_lm("llama")
    cfg = bench.bench_config(tiny_settings(lm.source, config=_quickstart_with(tmp_path, family="A")), "cpu", lm.arch)
    op = perturbed_operator(cfg, lm)
    layer = op.layers[0]
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = lm.arch.num_heads, lm.arch.num_kv_heads, lm.arch.head_dim
    q = torch.randn(1, hq, 5, d, generator=g)
    k = torch.randn(1, hkv, 12, d, generator=g)
    v = torch.randn(1, hkv, 12, d, generator=g)
    scaling = d ** -0.5
    kernel = causal_attention(scaling)  # like the model's eager kernel; the queries are the last 5 positions

    with torch.no_grad():
        factored = op.attend(layer, q, k, v, kernel)
        augmented = AugmentedRepair(op).attend(layer, q, k, v, kernel)
        naive = NaiveRepair(op, scaling).attend(layer, q, k, v, kernel)
        plain = kernel(q, k, v)
    assert factored.shape == augmented.shape == naive.shape == (1, 5, hq, d)
    assert not torch.allclose(factored, plain, atol=1e-4)
    torch.testing.assert_close(augmented, factored, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(naive, factored, atol=1e-5, rtol=1e-4)


def test_memory_probe_in_a_subprocess(tmp_path, tiny_model_dir):
    s = tiny_settings(tiny_model_dir("llama"), config=_quickstart_with(tmp_path, family="A"))  # the naive form: A
    res = probe_subprocess({"kind": "decode", "variant": "naive", "length": 16}, s, "cpu")
    assert "error" not in res, res
    assert res["peak_mib"] >= res["before_mib"] > 0
    assert res["peak_delta_mib"] >= 0
    assert "clear_refs" in res["method"] or "maxrss" in res["method"]


def test_bench_config_uses_the_settings_layers(tiny_lm):
    lm = tiny_lm("llama")
    n = lm.arch.num_layers
    cfg = bench.bench_config(tiny_settings(lm.source, protect_layers=[n - 1]), "cpu", lm.arch)
    assert list(cfg.repair.protect_layers) == [n - 1]
    cfg = bench.bench_config(tiny_settings(lm.source, protect_layers=[n, n + 1]), "cpu", lm.arch)
    assert list(cfg.repair.protect_layers) == list(range(min(4, n)))  # beyond the model: the first layers


def test_bare_train_step_backpropagates_through_the_model(tiny_lm):
    lm = tiny_lm("llama")
    cfg = bench.bench_config(tiny_settings(lm.source), "cpu", lm.arch)
    ids = torch.randint(0, 500, (cfg.train.batch_size, cfg.train.prefix_len + cfg.train.cont_len),
                        generator=torch.Generator().manual_seed(0))
    scale = torch.ones((), requires_grad=True)
    loss = bare_train_step(lm, cfg, list(cfg.repair.protect_layers), ids, scale)
    assert loss == 0.0 or loss > 0  # KL of identical forwards: zero up to rounding
    assert scale.grad is not None and torch.isfinite(scale.grad)
    with torch.no_grad():
        scale.fill_(50.0)  # a student that differs from the teacher: a real loss with a nonzero gradient
    assert bare_train_step(lm, cfg, list(cfg.repair.protect_layers), ids, scale) > 1e-6
    assert float(scale.grad.abs()) > 0


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "0,16"], "--lengths"),
    (["--lengths", "abc"], "--lengths"),
    (["--reps", "0"], "--reps"),
    (["--layers", "-1"], "--layers"),
    (["--only", "train_step,bogus"], "--only"),
    (["--config", "/nonexistent.yaml"], "--config"),
    (["--run_dir", "/nonexistent/run"], "--run_dir"),
])
def test_bad_arguments_exit_2(tmp_path, args, needle, capsys):
    rc = bench.main(args + ["--out", str(tmp_path / "r.json")])
    assert rc == EXIT_BAD_INPUT
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_decode_length_beyond_the_model_window_is_bad_input(tmp_path, tiny_model_dir, capsys):
    rc = bench.main(["--model", str(tiny_model_dir("llama")), "--only", "decode", "--lengths", "600",
                     "--memory", "off", "--device", "cpu", "--reps", "1", "--out", str(tmp_path / "r.json")])
    assert rc == EXIT_BAD_INPUT
    assert "--lengths" in capsys.readouterr().err


def test_detecting_operator_decode_variants(tmp_path, tiny_model_dir):
    """Family D is measured on a clean cache (threshold set: nothing gated, each new entry scored once)
    and with every entry gated; the prefilled entries' detector output is primed untimed."""
    import yaml

    from cachemedicpp import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["repair"].update(family="D", detector={"suppress": True})  # the bias moves an untrained operator's output
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "res.json"
    rc = bench.main(["--config", str(path), "--model", str(tiny_model_dir("llama")), "--reps", "1", "--lengths",
                     "16", "--decode-tokens", "2", "--memory", "inprocess", "--device", "cpu", "--threads", "1",
                     "--only", "decode,memory", "--layers", "1,2", "--out", str(out)])
    assert rc == EXIT_OK
    dec = json.loads(out.read_text())["decode"]["cpu"]
    assert dec["family"] == "D"
    row = dec["lengths"]["16"]
    assert set(row["ratios"]) == {"repair", "repair_all_gated", "stock", "stock_tagged"}
    agree = dec["agreement_max_abs_logit_diff"]
    assert agree["repair_vs_none"] < 1e-5  # a clean cache: nothing is gated
    assert agree["repair_all_gated_vs_repair"] > 1e-4  # every entry gated: the output really changes
    mem = json.loads(out.read_text())["memory"]["cpu"]
    assert {"decode_none_16", "decode_repair_16", "decode_repair_all_gated_16", "decode_stock_16"} <= set(mem)


def test_calibrated_operator_decode_variants(tmp_path, tiny_model_dir):
    """Family E (the quickstart's) decodes with the config's calibration attached and a gate that varies with the
    entry; it has no naive or augmented form."""
    out = tmp_path / "res.json"
    rc = bench.main(["--config", _quickstart_with(tmp_path, family="E"), "--model", str(tiny_model_dir("llama")),
                     "--reps", "1", "--lengths", "16", "--decode-tokens", "2", "--memory", "off", "--device", "cpu",
                     "--threads", "1", "--only", "decode,train_step", "--layers", "1,2", "--out", str(out)])
    assert rc == EXIT_OK
    res = json.loads(out.read_text())
    dec = res["decode"]["cpu"]
    assert dec["family"] == "E" and set(dec["lengths"]["16"]["ratios"]) == {"repair", "stock", "stock_tagged"}
    assert dec["prefill"] == "prose"
    assert set(dec["agreement_max_abs_logit_diff"]) == {"repair_vs_none", "stock_vs_none"}


def test_default_layers_are_the_configs(tmp_path, tiny_model_dir, tiny_lm):
    """Without --layers the workloads protect what the base config protects (the configuration users run)."""
    import yaml

    from cachemedicpp import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["repair"]["protect_layers"] = [1, 2]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = bench.settings_from_args(bench.parse_args(["--config", str(path), "--model", str(tiny_model_dir("llama")),
                                                   "--device", "cpu"]))
    assert s.protect_layers is None
    assert list(bench.bench_config(s, "cpu", tiny_lm("llama").arch).repair.protect_layers) == [1, 2]


def test_decode_with_a_trained_run_dirs_operator(tmp_path, tiny_cfg, tiny_model_dir):
    """--run_dir: decode times the run dir's trained operator, loaded as `protect` loads it (a foreign model is
    refused, exit 2)."""
    from test_protect import _trained_run

    run = _trained_run(tiny_cfg, "llama", tmp_path)
    model = load_config(data=tiny_cfg("llama")).model.name
    out = tmp_path / "res.json"
    common = ["--reps", "1", "--lengths", "16", "--decode-tokens", "2", "--memory", "off", "--device", "cpu",
              "--threads", "1", "--only", "decode", "--run_dir", str(run), "--out", str(out)]
    assert bench.main(["--model", model] + common) == EXIT_OK
    dec = json.loads(out.read_text())["decode"]["cpu"]
    assert dec["operator"] == f"trained ({run})"
    assert dec["agreement_max_abs_logit_diff"]["repair_vs_none"] > 1e-4  # the trained correction acts
    out.unlink()
    assert bench.main(["--model", str(tiny_model_dir("gpt2"))] + common) == EXIT_BAD_INPUT
    assert not out.exists()
