"""Tasks (example building, scoring, exposure) and the evaluation statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachemedicpp import ROOT, corruption, data, eval as ev, seeding, stats, tasks
from cachemedicpp.eval import stage
from cachemedicpp.config import ConfigError, load_config


def _cfg(tiny_cfg, **over):
    return load_config(data=tiny_cfg("llama", **over))


def _build(cfg, lm, name):
    tcfg = next(t for t in cfg.eval.tasks if t["name"] == name)
    src = tasks.load_sources(cfg, lm, [name])
    return tasks.get_task(name).build(lm, cfg, tcfg, src)


# --------------------------------------------------------------------------------------------------
# example building


def test_wikitext_fixed_windows_and_feed(tiny_cfg, tiny_lm):
    cfg = _cfg(tiny_cfg)
    lm = tiny_lm("llama")
    exs, info = _build(cfg, lm, "wikitext2_ppl")
    L, cont = cfg.eval.max_seq_len, cfg.eval.cont_len
    text, _ = data.load_text(cfg.data.to_dict(), "wikitext2")
    stream = data.tokenize_stream(lm.tokenizer, text)
    assert len(exs) == 3 and info["cache_len"] == L - cont - 1
    for i, ex in enumerate(exs):
        window = stream[i * L:(i + 1) * L]  # consecutive, non-overlapping windows of the stream
        assert ex.key == f"wikitext2_ppl/{i:05d}" and ex.example_id == f"wikitext2_ppl:{i}"
        assert torch.equal(ex.prefix, window[:L - cont - 1])
        # the feed re-reads the context's last token, so every target is predicted over the cache
        assert ex.feeds.shape == (1, cont) and int(ex.feeds[0, 0]) == int(window[L - cont - 1])
        assert torch.equal(ex.feeds[0, 1:], window[L - cont:L - 1])
        assert torch.equal(ex.targets[0], window[L - cont:])


def test_sst2_two_label_rows_and_few_shot(tiny_cfg, tiny_lm):
    lm = tiny_lm("llama")
    cfg = _cfg(tiny_cfg)
    exs, info = _build(cfg, lm, "sst2_prompted")
    rows, _ = data.load_sst2(cfg.data.to_dict(), "sst2")
    assert len(exs) == 4 and info["few_shot"] == 0
    lab = [lm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in tasks.SST2_LABELS]
    for ex, (sentence, label) in zip(exs, rows):
        prompt = lm.tokenizer(tasks.sst2_prompt(sentence))["input_ids"]
        assert ex.rows == 2 and ex.label == label
        assert ex.prefix.tolist() == prompt[:-1]
        for r in range(2):
            n = len(lab[r])
            assert ex.feeds[r, 0] == prompt[-1] and ex.targets[r, :n].tolist() == lab[r]
            assert (ex.targets[r, n:] == tasks.IGNORE).all()
    few_cfg = _cfg(tiny_cfg, **{"eval.tasks": [{"name": "sst2_prompted", "num_examples": 4, "few_shot": 2}]})
    few, finfo = _build(few_cfg, lm, "sst2_prompted")
    again, _ = _build(few_cfg, lm, "sst2_prompted")
    assert finfo["few_shot"] == 2 and finfo["demo_source"].endswith("sst2_train.tsv")
    for a, b, z in zip(few, again, exs):
        assert torch.equal(a.prefix, b.prefix)  # demos are seeded, not drawn from a global stream
        assert a.prefix.numel() > z.prefix.numel()
        assert lm.tokenizer.decode(a.prefix.tolist() + [int(a.feeds[0, 0])]).count("Sentiment:") == 3


def test_needle_inside_old_region_and_fits(tiny_cfg, tiny_lm):
    lm = tiny_lm("llama")
    cfg = _cfg(tiny_cfg)
    exs, info = _build(cfg, lm, "needle_long_context")
    cor = corruption.Corruptor(cfg.corruption.to_dict(), [0, 1], lm.arch.num_kv_heads, cfg.seed)
    for ex in exs:
        key, value = ex.meta["key"], ex.meta["value"]
        needle, question, answer = tasks.needle_parts(lm, cfg.data.long_context.to_dict(), key, value)
        (a, b), = ex.meta["needle_spans"]
        assert ex.prefix[a:b].tolist() == needle
        mask = cor.time_mask(ex.prefix.numel())
        assert mask[a:b].all()  # inside the corrupted old region
        assert ex.prefix.numel() + 1 + len(answer) <= lm.arch.max_positions
        assert ex.targets[0].tolist() == answer
        assert lm.tokenizer.decode(ex.prefix.tolist() + [int(ex.feeds[0, 0])]).endswith(
            f"Question: What is {key}? Answer: {key} =")
    tasks.check_needle(exs, cor.time_mask, "test")
    assert exs[0].meta["filler_start"] != exs[1].meta["filler_start"]
    # keys, values and positions are drawn per example (seeded: the same on every build)
    many = _cfg(tiny_cfg, **{"eval.tasks": [{"name": "needle_long_context", "num_examples": 8}]})
    exs8, info8 = _build(many, lm, "needle_long_context")
    assert len({e.meta["key"] for e in exs8}) == 8 and info8["distinct_keys"] == 8
    assert len({e.meta["needle_spans"][0][0] for e in exs8}) > 1
    assert [e.meta["key"] for e in _build(many, lm, "needle_long_context")[0]] == [e.meta["key"] for e in exs8]
    fixed = _cfg(tiny_cfg, **{"data.long_context.needles": "fixed", "data.long_context.position_range": None})
    exs_f, _ = _build(fixed, lm, "needle_long_context")
    assert {e.meta["key"] for e in exs_f} == {"the_key"} and len({e.meta["needle_spans"][0] for e in exs_f}) == 1
    # a recent window that swallows the needle is refused
    far = corruption.Corruptor({"axes": {"N_recent": exs[0].prefix.numel() - 5}}, [0, 1], lm.arch.num_kv_heads, 0)
    with pytest.raises(ConfigError, match="needle line"):
        tasks.check_needle(exs, far.time_mask, "N_recent too large")
    with pytest.raises(ConfigError, match="needle"):
        ev.build_context(_cfg(tiny_cfg, **{"corruption.axes.N_recent": 60,
                                           "eval.tasks": [{"name": "needle_long_context", "num_examples": 1}],
                                           "eval.defenses": ["no_defense"]}), lm)
    too_long = _cfg(tiny_cfg, **{"data.long_context.context_len": 600})
    with pytest.raises(ConfigError, match="positions"):
        _build(too_long, lm, "needle_long_context")


def test_kv_retrieval_rows_ask_each_key(tiny_cfg, tiny_lm):
    lm = tiny_lm("llama")
    cfg = _cfg(tiny_cfg, **{"eval.tasks": [{"name": "kv_retrieval", "num_examples": 3, "pairs": 3}],
                            "data.long_context.context_len": 120})
    exs, info = _build(cfg, lm, "kv_retrieval")
    cor = corruption.Corruptor(cfg.corruption.to_dict(), [0, 1], lm.arch.num_kv_heads, cfg.seed)
    tasks.check_needle(exs, cor.time_mask, "test")
    for ex in exs:
        assert ex.rows == 3 and len(ex.meta["needle_spans"]) == 3 and len({k for k, _ in ex.meta["pairs"]}) == 3
        for r, (key, value) in enumerate(ex.meta["pairs"]):
            scored = ex.targets[r][ex.targets[r] != tasks.IGNORE].tolist()
            assert scored == tasks.needle_parts(lm, cfg.data.long_context.to_dict(), key, value)[2]
            assert key in lm.tokenizer.decode(ex.feeds[r].tolist())
    assert exs[0].meta["pairs"] != exs[1].meta["pairs"]


# --------------------------------------------------------------------------------------------------
# scoring


def test_scorers_match_manual_computation():
    torch.manual_seed(0)
    V = 11
    targets = torch.tensor([[3, 5, 7]])
    ex = tasks.Example("wikitext2_ppl", 0, torch.tensor([1, 2]), torch.tensor([[2, 3, 5]]), targets)
    logits = torch.randn(1, 3, V)
    nll = -torch.log_softmax(logits, -1)[0, torch.arange(3), targets[0]].mean()
    assert tasks.score_wikitext(logits, ex) == pytest.approx(float(nll), rel=1e-6)

    t = torch.tensor([[4, tasks.IGNORE], [6, 8]])
    sst = tasks.Example("sst2_prompted", 0, torch.tensor([1]), torch.tensor([[2, 0], [2, 6]]), t, label=1)
    lg = torch.zeros(2, 2, V)
    lg[0, 0, 4] = 5.0  # label 0: one confident token
    lg[1, 0, 6], lg[1, 1, 8] = 5.0, 5.0  # label 1: two confident tokens -> smaller summed log-prob
    assert tasks.score_sst2(lg, sst) == 0.0
    lg[1, 1, 8] = 50.0
    lg[1, 0, 6] = 50.0
    assert tasks.score_sst2(lg, sst) == 1.0

    nd = tasks.Example("needle_long_context", 0, torch.tensor([1]), torch.tensor([[2, 3]]), torch.tensor([[3, 9]]))
    lg = torch.zeros(1, 2, V)
    lg[0, 0, 3], lg[0, 1, 9] = 1.0, 1.0
    assert tasks.score_needle(lg, nd) == 1.0
    lg[0, 1, 2] = 2.0
    assert tasks.score_needle(lg, nd) == 0.0

    kv = tasks.Example("kv_retrieval", 0, torch.tensor([1]), torch.tensor([[2, 3], [2, 4]]),
                       torch.tensor([[tasks.IGNORE, 9], [tasks.IGNORE, 7]]))
    lg = torch.zeros(2, 2, V)
    lg[0, 1, 9], lg[1, 1, 6] = 1.0, 1.0  # first key recalled, second not
    assert tasks.score_retrieval(lg, kv) == 0.5


def test_value_and_score_conversions():
    m = np.array([[2.0, 2.5]])
    assert tasks.value_from_mean("ppl", m)[0, 1] == pytest.approx(math.exp(2.5))
    assert tasks.score_from_means("ppl", m, m[:, :1])[0, 1] == pytest.approx(math.exp(2.0) / math.exp(2.5))
    assert tasks.score_from_means("accuracy", np.array([0.75]), np.array([1.0]))[0] == 0.75
    with pytest.raises(ConfigError, match="known"):
        tasks.get_task("mmlu")


# --------------------------------------------------------------------------------------------------
# exposure


def test_exposure_fraction_and_short_context(tiny_cfg, tiny_lm):
    lm = tiny_lm("llama")
    cfg = _cfg(tiny_cfg, **{"eval.tasks": [{"name": "sst2_prompted", "num_examples": 2}],
                            "eval.defenses": ["no_defense"]})
    ctx = ev.build_context(cfg, lm)
    ex = ctx.examples[0]
    T = ex.prefix.numel()
    reg = ctx.corruptor.region("gaussian", 0.16, T, "eval", ex.example_id)
    assert ev.exposure(ctx, [reg]) == pytest.approx((T - 8) / T)
    short = ev.build_context(_cfg(tiny_cfg, **{"eval.tasks": [{"name": "sst2_prompted", "num_examples": 2}],
                                               "eval.defenses": ["no_defense"], "corruption.axes.N_recent": 200}), lm)
    unit = ev.score_example(short, short.examples[0])
    assert unit["exposure"] == 0.0  # a prompt shorter than N_recent is not corrupted at all
    clean = unit["cells"][ev.Cell("clean", 0.0, "no_defense").key]
    assert all(v == clean for v in unit["cells"].values())
    full = ev.score_example(ctx, ex)
    assert 0.0 < full["exposure"] <= 1.0


# --------------------------------------------------------------------------------------------------
# statistics


def test_trapezoid_auc():
    assert stats.trapezoid_auc([0.0, 0.08, 0.16], [1.0, 1.0, 1.0]) == pytest.approx(0.16)
    assert stats.trapezoid_auc([0.0, 0.1], [1.0, 0.0]) == pytest.approx(0.05)
    assert stats.trapezoid_auc([0.0], [0.7]) == 0.0
    got = stats.trapezoid_auc([0.0, 1.0, 3.0], np.array([[0.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    assert np.allclose(got, [2.5, 4.0])
    with pytest.raises(ValueError):
        stats.trapezoid_auc([0.1, 0.0], [1.0, 1.0])


def test_bootstrap_is_seeded_and_paired():
    x = np.arange(10, dtype=float)[:, None] * np.array([[1.0, 2.0]])
    a = stats.bootstrap_indices(10, 200, seeding.numpy_rng(3, "t"))
    b = stats.bootstrap_indices(10, 200, seeding.numpy_rng(3, "t"))
    c = stats.bootstrap_indices(10, 200, seeding.numpy_rng(4, "t"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    means = stats.resampled_means(x, a)
    assert means.shape == (200, 2) and np.allclose(means[:, 1], 2 * means[:, 0])
    lo, hi = stats.percentile_ci(means[:, 0])
    assert lo < 4.5 < hi
    same = stats.paired_difference(1.0, 1.0, means[:, 0], means[:, 0], 10)
    assert same["diff"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0 and same["samples"] == 200
    shifted = stats.paired_difference(5.5, 4.5, means[:, 0] + 1.0, means[:, 0], 10)
    # paired: a constant shift has a zero-width interval even though each arm varies a lot
    assert shifted["ci_low"] == pytest.approx(1.0) and shifted["ci_high"] == pytest.approx(1.0)


def test_wilson_ci():
    lo, hi = stats.wilson_ci(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.32
    lo, hi = stats.wilson_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert stats.wilson_ci(0, 0) == (0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# data.source


def test_data_source_modes(tiny_cfg):
    d = lambda **kw: load_config(data=tiny_cfg("llama", data=kw)).data.to_dict()  # noqa: E731
    assert data.source_mode(d()) == "auto"  # today's behaviour by default
    assert data.source_mode(d(use_offline=True)) == "offline"  # the older spelling
    assert data.source_mode(d(source="hub")) == "hub" and data.source_mode(d(source="offline")) == "offline"
    with pytest.raises(ConfigError, match="contradicts data.use_offline"):
        data.source_mode(d(source="hub", use_offline=True))
    with pytest.raises(ConfigError, match="data.source"):
        load_config(data=tiny_cfg("llama", data={"source": "web"}))
    # the hub is unreachable here (HF_DATASETS_OFFLINE): auto falls back and says so, hub refuses
    text, src = data.load_text(d(source="auto"), "wikitext2")
    assert src == "offline:data/offline/wikitext2_eval.txt" and text
    assert data.load_sst2(d(source="offline"), "sst2")[1] == "offline:data/offline/sst2_eval.tsv"
    with pytest.raises(ConfigError, match=r"data.source: hub, but dataset nyu-mll/glue/sst2:validation \(sst2\) "
                                          r"is unreachable"):
        data.load_sst2(d(source="hub"), "sst2")


def test_data_source_hub_unreachable_exits_2_and_sources_are_recorded(tiny_cfg, tmp_path, capsys, monkeypatch):
    import json

    import yaml

    from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    small = {"eval.tasks": [{"name": "sst2_prompted", "num_examples": 2}], "eval.defenses": ["no_defense"],
             "eval.corruption_eval.types": ["gaussian"], "eval.corruption_eval.eps": [0.0, 0.5]}
    for source, code in (("hub", EXIT_BAD_INPUT), ("auto", EXIT_OK)):
        data_cfg = tiny_cfg("llama", data={"source": source}, **small)
        p = tmp_path / f"{source}.yaml"
        p.write_text(yaml.safe_dump(data_cfg))
        rd = tmp_path / source
        assert ev.main(["--config", str(p), "--run_dir", str(rd)]) == code
        if source == "hub":
            assert "nyu-mll/glue/sst2:validation (sst2) is unreachable" in capsys.readouterr().err
        else:
            m = json.loads((rd / "metrics" / "task_metrics.json").read_text())
            assert m["settings"]["data_sources"] == {"sst2": "offline:data/offline/sst2_eval.tsv"}
            assert m["settings"]["tasks"]["sst2_prompted"]["source"] == "offline:data/offline/sst2_eval.tsv"


# --------------------------------------------------------------------------------------------------
# test, validation and selection splits


def _evaluation_text(cfg, lm, split: str) -> dict[str, list[str]]:
    """The evaluation text each task's examples of one split read: wikitext windows, SST-2 sentences and
    needle / kv_retrieval filler (not the needle lines or SST-2 demos, which are no evaluation text)."""
    names = [t["name"] for t in cfg.eval.tasks]
    src = tasks.load_sources(cfg, lm, names)
    stream = src["wikitext2_ids"]
    out: dict[str, list[str]] = {}
    for tcfg in cfg.eval.tasks:
        exs, info = tasks.get_task(tcfg["name"]).build(lm, cfg, {**tcfg, "split": split}, src)
        assert len(exs) == tcfg["num_examples"] and info["split"] == split
        if tcfg["name"] == "wikitext2_ppl":
            texts = [lm.tokenizer.decode(ex.prefix.tolist() + ex.feeds[0].tolist() + ex.targets[0, -1:].tolist())
                     for ex in exs]
        elif tcfg["name"] == "sst2_prompted":
            texts = [src["sst2"][i][0] for i in range(*info["rows"])]
        else:
            texts = [lm.tokenizer.decode(stream[ex.meta["filler_start"]:ex.meta["filler_start"]
                                                + ex.meta["filler_len"]].tolist()) for ex in exs]
        out[tcfg["name"]] = texts
    return out


def _grams(texts: dict[str, list[str]], n: int = 8) -> set[tuple[str, ...]]:
    grams = set()
    for group in texts.values():
        for t in group:
            w = t.split()
            grams |= {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    return grams


def test_test_validation_and_selection_share_no_8gram_of_evaluation_text(tiny_cfg, tiny_lm):
    """The quickstart's tasks at its test sizes, built from each split: no 8-word sequence of evaluation text
    is shared between splits (word 8-grams: independent of the tokenizer)."""
    import yaml

    qs = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    lm = tiny_lm("llama")
    cfg = _cfg(tiny_cfg, **{"eval.tasks": qs["eval"]["tasks"], "eval.max_seq_len": qs["eval"]["max_seq_len"],
                            "eval.cont_len": qs["eval"]["cont_len"],
                            "data.long_context.context_len": qs["data"]["long_context"]["context_len"]})
    texts = {s: _evaluation_text(cfg, lm, s) for s in data.SPLITS}
    grams = {s: _grams(t) for s, t in texts.items()}
    assert all(len(g) > 1000 for g in grams.values())
    for a, b in (("test", "validation"), ("test", "selection"), ("validation", "selection")):
        assert not grams[a] & grams[b], (a, b)
    # the check sees an overlap where there is one: test windows built again, shifted by one window
    shifted = _cfg(tiny_cfg, **{"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 4, "start": 1}]})
    assert _grams(_evaluation_text(shifted, lm, "test")) & grams["test"]
    # the splits own disjoint ranges in order, and the test grid refuses another split
    n = 1000
    ranges = [data.split_range(n, s) for s in ("test", "validation", "selection")]
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ConfigError, match="split"):
        data.split_range(n, "train")


def test_test_grid_refuses_a_validation_split(tiny_cfg):
    cfg = load_config(data=tiny_cfg("llama", **{"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2,
                                                                "split": "selection"}]}))
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].split"):
        stage.check_test_split(cfg)


def test_validation_grid_reads_its_split(tiny_cfg):
    for split in ("validation", "selection"):
        cfg = load_config(data=tiny_cfg("llama", **{"eval.defenses": ["no_defense", "range_clamp"],
                                                    "eval.validation.split": split}))
        vcfg = stage.validation_config(cfg)
        assert {t["split"] for t in vcfg.eval.tasks} == {split} and {t["start"] for t in vcfg.eval.tasks} == {0}
