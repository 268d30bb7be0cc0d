"""Calibrated baselines: statistics from training text only, identity inside the band, refusal of foreign files."""

from __future__ import annotations

import pytest
import torch

from cachemedicpp import calibration, data, hf, tasks
from cachemedicpp.config import ConfigError, load_config

SMALL = {"baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
         "baseline.calibration.window_len": 32, "baseline.calibration.cont_len": 8,
         "baseline.calibration.sink_tokens": 2}


def _cfg(tiny_cfg, arch="llama", **kw):
    return load_config(data=tiny_cfg(arch, **{**SMALL, **kw}))


@pytest.fixture
def built(tiny_cfg, tiny_lm, one_thread, monkeypatch):
    """A calibration of the tiny Llama, and every text source it asked for."""
    asked = []
    real = data.load_text

    def spy(data_cfg, key, max_chars=None):
        asked.append(key)
        return real(data_cfg, key, max_chars)

    monkeypatch.setattr(data, "load_text", spy)
    cfg = _cfg(tiny_cfg)
    lm = tiny_lm("llama")
    return cfg, lm, calibration.build(cfg, lm), asked


def test_calibration_reads_training_text_only(tiny_cfg, tiny_lm, one_thread, monkeypatch):
    """The statistics read training text only; the levels' held-in caches read the tasks' selection split only,
    and nothing at all of the evaluation text with level_examples 0."""
    asked, splits = [], []
    real_text, real_get = data.load_text, tasks.get_task
    monkeypatch.setattr(data, "load_text",
                        lambda d, key, max_chars=None: asked.append(key) or real_text(d, key, max_chars))

    class Spy:
        def __init__(self, name):
            self.task = real_get(name)

        def build(self, lm, cfg, spec, src):
            splits.append(spec["split"])
            return self.task.build(lm, cfg, spec, src)

    monkeypatch.setattr(tasks, "get_task", Spy)
    lm = tiny_lm("llama")
    alone = calibration.build(_cfg(tiny_cfg, **{"baseline.calibration.level_examples": 0}), lm)
    assert asked and set(asked) == {"train_corpus"} and not splits  # never the evaluation text
    cfg = _cfg(tiny_cfg, **{"baseline.calibration.level_examples": 2})
    cal = calibration.build(cfg, lm)
    assert len(splits) == len(cfg.eval.tasks) and set(splits) == {"selection"}  # each task's selection split
    for l in cal.layers:  # the same model of the clean cache; levels over a superset of held-in caches
        for a, b in ((alone.kprior[l], cal.kprior[l]), (alone.vprior[l], cal.vprior[l])):
            for key in ("mean", "evec", "eval", "lo", "hi"):
                assert torch.equal(a[key], b[key]), key
            assert bool((b["range_level"] >= a["range_level"]).all())
            assert bool((b["noise_level"] >= a["noise_level"]).all())
    assert cal.record["prior"]["level_examples"] == 2 and cal.record["hash"] != alone.record["hash"]


def test_calibration_statistics(built):
    cfg, lm, cal, asked = built
    assert asked and "train_corpus" in asked
    assert cal.record["data_source"].startswith("offline:") and "train_corpus" in cal.record["data_source"]
    assert cal.record["tokens"] == 3 * 32 and cal.layers == (0, 1)
    assert cal.rotary and cal.key_hi[0].shape == (4, lm.arch.num_kv_heads, lm.arch.head_dim // 2)
    sel = cal.record["selection"]
    assert sel["ppl_no_defense"] > 1 and set(sel["tried"]) == {calibration.CLAMP, calibration.DROP}
    assert all(t["cost"] <= cfg.baseline.calibration.max_clean_cost for t in sel["tried"][calibration.CLAMP][-1:]) \
        or cal.q[cal.chosen[calibration.CLAMP]] == min(cal.q)


def _clean_cache(lm, window):
    with torch.no_grad():
        _, cache = hf.forward(lm.model, window[None], logits_to_keep=1)
    return cache


def test_inside_the_band_nothing_changes_and_outside_it_does(built):
    cfg, lm, cal, _ = built
    cal.chosen = {calibration.CLAMP: 0, calibration.DROP: 0}  # q = 0: the calibration's own min / max
    win = calibration._windows(cfg, lm)[0][1]  # a calibration window: inside its own min / max by definition
    cache = _clean_cache(lm, win)
    pos = torch.arange(win.numel())
    for layer in cal.layers:
        k, v = hf.get_kv(cache, layer)
        k2, v2 = cal.clamp(layer, k, v, pos)
        assert torch.allclose(k2, k, atol=1e-5) and torch.equal(v2, v)
        assert not cal.outliers(layer, k, v, pos).any()
        # a spike outside the calibrated range is pulled in (values per channel, keys by rotary-pair norm)
        ks, vs = k.clone(), v.clone()
        ks[0, 0, 10] *= 1000
        vs[0, 1, 12, 3] = 1e4
        k3, v3 = cal.clamp(layer, ks, vs, pos)
        assert v3[0, 1, 12, 3] == cal.val_hi[layer][0, 1, 3]
        half = k.shape[-1] // 2
        pair = torch.sqrt(k3[0, 0, 10, :half] ** 2 + k3[0, 0, 10, half:] ** 2)
        assert torch.all(pair <= cal.key_hi[layer][0, 0] * (1 + 1e-5))
        assert torch.equal(k3[0, 0, 11], k[0, 0, 11])  # other entries untouched
        drop = cal.outliers(layer, ks, vs, pos)
        assert drop[0, 0, 10] and drop[0, 1, 12] and int(drop.sum()) == 2
        # the sinks are never clamped or dropped
        ks[0, 0, 0] *= 1000
        assert torch.equal(cal.clamp(layer, ks, vs, pos)[0][0, 0, 0], ks[0, 0, 0])
        assert not cal.outliers(layer, ks, vs, pos)[..., :cal.sink].any()


def test_clean_logits_unchanged_when_nothing_is_outside(built):
    cfg, lm, cal, _ = built
    cal.chosen = {calibration.CLAMP: 0, calibration.DROP: 0}
    win = calibration._windows(cfg, lm)[0][0]
    plain = calibration.window_nll(lm, win, 8, cal.layers)
    both = calibration.window_nll(lm, win, 8, cal.layers, lambda l, k, v, p: (
        *cal.clamp(l, k, v, p), cal.outliers(l, k, v, p)))
    assert both == pytest.approx(plain, abs=1e-6)


def test_stored_calibration_is_reused_and_foreign_files_refused(tiny_cfg, tiny_lm, tmp_path, one_thread):
    cfg, lm = _cfg(tiny_cfg), tiny_lm("llama")
    path = tmp_path / "calibration.pt"
    cal = calibration.obtain(cfg, lm, path)
    before = path.read_bytes()
    again = calibration.obtain(cfg, lm, path)
    assert again.chosen == cal.chosen and torch.equal(again.val_hi[0], cal.val_hi[0])
    # another layer set, another calibration setting: refused, the file left as it was
    for other in (_cfg(tiny_cfg, **{"repair.protect_layers": [1, 2]}),
                  _cfg(tiny_cfg, **{"baseline.calibration.sink_tokens": 3})):
        with pytest.raises(ConfigError, match="calibration file .*calibration.pt"):
            calibration.obtain(other, lm, path)
    assert path.read_bytes() == before
    path.write_bytes(before[: len(before) // 2])  # truncated
    with pytest.raises(ConfigError, match="calibration file .*calibration.pt"):
        calibration.obtain(cfg, lm, path)


def test_gpt2_keys_are_bounded_per_channel(tiny_cfg, tiny_lm, one_thread):
    cfg, lm = _cfg(tiny_cfg, "gpt2"), tiny_lm("gpt2")
    cal = calibration.build(cfg, lm)
    assert not cal.rotary and cal.key_hi[0].shape == cal.key_lo[0].shape


def test_a_short_selection_split_gives_the_levels_what_it_holds(tiny_cfg, tiny_lm, one_thread):
    """level_examples is an upper bound: a split holding fewer examples gives them all; asked for exactly, the
    same split is refused as bad input naming the task."""
    cfg = _cfg(tiny_cfg, **{"eval.max_seq_len": 200, "eval.tasks": [{"name": "wikitext2_ppl"}]})
    lm = tiny_lm("llama")
    with pytest.raises(ConfigError, match="wikitext2_ppl: the selection split .* fewer than the 400 asked for"):
        tasks.selection_caches(cfg, lm, [0], 400)
    got = tasks.selection_caches(cfg, lm, [0], 400, up_to=True)
    assert 1 <= len(got) < 400
    assert all(kv[0][0].shape[2] == 200 - 8 - 1 for kv in got)  # contexts of max_seq_len less cont_len + 1
