"""The model of the clean cache and the calibrated repairs: keys before RoPE are the projected keys, each repair
leaves what it does not flag bit-identical, denoise is the Wiener estimate, impute restores lost elements, and
the repairs run through the eval grid by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cachemedicpp import calibration, defenses, hf, prior, results
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
         "baseline.calibration.window_len": 64, "baseline.calibration.cont_len": 8,
         "baseline.calibration.sink_tokens": 2}
REPAIRS = ("calibrated_repair", "denoise", "impute", "prerope_clamp")


def _cfg(tiny_cfg, arch="llama", **kw):
    return load_config(data=tiny_cfg(arch, **{**SMALL, **kw}))


@pytest.fixture(scope="module")
def llama_cal(tiny_model_dir, tiny_lm):
    from conftest import calibrated_tiny

    return calibrated_tiny(tiny_model_dir("llama"), tiny_lm("llama"), **SMALL)


def _apply(name: str, cfg, cal, layer: int, k, v, positions, **params):
    dfn = defenses.make(name, {**cfg.baseline.to_dict(), **params})
    got = dfn.apply(k, v, defenses.LayerInput(layer, positions, cal=cal))
    return got.k, got.v


def _held_in(cfg, lm):
    """The held-in clean caches the levels come from ({layer: (K, V)}, context length): the selection windows'
    and those of the first level_examples selection-split examples of each task."""
    c = cfg.baseline.calibration
    sel = calibration._windows(cfg, lm)[1]
    out = [({l: hf.get_kv(cache, l) for l in cfg.repair.protect_layers}, w.numel() - int(c.cont_len) - 1)
           for w, cache in ((w, calibration.prefill(lm, w, int(c.cont_len))) for w in sel)]
    task, lengths = calibration.selection_held_in(cfg, lm, cfg.repair.protect_layers, int(c.level_examples))
    assert task  # the tiny config's level_examples default (12) reads some
    return out + list(zip(task, lengths))


# --------------------------------------------------------------------------------------------------
# keys before RoPE


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rope_round_trip_and_the_models_own_cos_sin(tiny_lm, arch):
    lm = tiny_lm(arch)
    pos = torch.arange(0, 300, 7)
    g = torch.Generator().manual_seed(0)
    for layer in range(lm.arch.num_layers):
        inv_freq, scaling = hf.rotary_frequencies(lm.model, layer)
        cos, sin = prior.rope_cos_sin(inv_freq, scaling, pos)
        ref_cos, ref_sin = hf.rotary_cos_sin(lm.model, layer, pos)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)  # the model's own numbers, bit for bit
        x = torch.randn(2, lm.arch.num_kv_heads, pos.numel(), lm.arch.head_dim, generator=g)
        assert torch.allclose(prior.rotate(prior.unrotate(x, cos, sin), cos, sin), x, atol=1e-6)
        assert torch.allclose(prior.unrotate(prior.rotate(x, cos, sin), cos, sin), x, atol=1e-6)
    if arch == "gemma3":  # sliding and full-attention layers rotate with their own bases
        assert lm.arch.sliding_layers == (0, 1)
        assert not torch.equal(hf.rotary_frequencies(lm.model, 0)[0], hf.rotary_frequencies(lm.model, 2)[0])


def _projected_keys(lm, arch: str, ids: torch.Tensor) -> tuple[dict, object]:
    """{layer: keys before RoPE [1, H, T, d]} read off the projection (Gemma: after its key norm), and the cache."""
    seen, hooks = {}, []
    for i, layer in enumerate(lm.model.model.layers):
        attn = layer.self_attn
        if arch == "gemma3":
            hooks.append(attn.k_norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))
        else:
            def keep(m, a, out, i=i):
                B, T, _ = out.shape
                seen[i] = out.view(B, T, -1, lm.arch.head_dim).transpose(1, 2)
            hooks.append(attn.k_proj.register_forward_hook(keep))
    try:
        with torch.no_grad():
            _, cache = hf.forward(lm.model, ids[None])
    finally:
        for h in hooks:
            h.remove()
    return seen, cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cached_keys_unrotate_to_the_projected_keys(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = torch.arange(3, 43)  # 40 positions: Gemma's sliding layers (window 16) hold only the last ones
    projected, cache = _projected_keys(lm, arch, ids)
    T = ids.numel()
    for layer in range(lm.arch.num_layers):
        k, _ = hf.get_kv(cache, layer)
        pos = torch.arange(T - k.shape[2], T)
        key_frame, value_frame = calibration.frames({layer: hf.rotary_frequencies(lm.model, layer)}, layer, pos)
        assert value_frame.cos is None
        assert torch.allclose(key_frame.model(k), projected[layer][:, :, T - k.shape[2]:], atol=1e-5), layer
    if arch == "gemma3":
        assert hf.held_length(cache, 0) < T == hf.held_length(cache, 2)


def test_gpt2_keys_are_modelled_as_stored(tiny_cfg, tiny_lm):
    cfg, lm = _cfg(tiny_cfg, "gpt2"), tiny_lm("gpt2")
    assert hf.rotary_frequencies(lm.model, 0) is None
    cal = calibration.build(cfg, lm)
    assert cal.rope == {} and cal.record["prior"]["keys"].startswith("as projected")
    k = torch.randn(1, lm.arch.num_kv_heads, 5, lm.arch.head_dim)
    assert calibration.frames(cal.rope, 0, torch.arange(5))[0].model(k) is k


def test_the_clean_model_is_stored_and_an_old_format_refused(llama_cal, tmp_path):
    cfg, lm, cal = llama_cal
    H, d = lm.arch.num_kv_heads, lm.arch.head_dim
    for l in cal.layers:
        for st in (cal.kprior[l], cal.vprior[l]):
            assert st["mean"].shape == st["lo"].shape == st["hi"].shape == st["eval"].shape == (H, d)
            assert st["evec"].shape == (H, d, d) and bool((st["lo"] <= st["hi"]).all())
            assert st["range_level"].shape == st["noise_level"].shape == (H,)
            eye = st["evec"].transpose(-1, -2) @ st["evec"]  # an orthonormal eigenbasis
            assert torch.allclose(eye, torch.eye(d).expand_as(eye), atol=1e-5)
    assert set(cal.rope) == set(cal.layers) and cal.block == 16
    path = tmp_path / "calibration.pt"
    torch.save({**calibration._payload(cal), "format": "cachemedicpp.calibration/1"}, path)
    with pytest.raises(ConfigError, match="calibration file .* has format cachemedicpp.calibration/1"):
        calibration.load(path, cal.record["hash"], cal.layers)


# --------------------------------------------------------------------------------------------------
# identity where nothing is flagged


def test_calibrated_repair_leaves_held_in_clean_caches_bit_identical(llama_cal):
    cfg, lm, cal = llama_cal
    for cache, T in _held_in(cfg, lm):
        for l in cal.layers:
            k, v = cache[l]
            pos = torch.arange(T - k.shape[2], T)
            for name in ("calibrated_repair", "impute"):  # nothing beyond the held-in levels, no zero anywhere
                k2, v2 = _apply(name, cfg, cal, l, k, v, pos)
                assert torch.equal(k2, k) and torch.equal(v2, v), (name, l)


def test_prerope_clamp_is_the_identity_inside_the_range(tiny_cfg, tiny_lm):
    cfg, lm = _cfg(tiny_cfg, **{"baseline.calibration.prior_q": 0.0}), tiny_lm("llama")  # min / max
    cal = calibration.build(cfg, lm)
    win = calibration._windows(cfg, lm)[0][1]  # a calibration window: inside its own min / max by definition
    with torch.no_grad():
        _, cache = hf.forward(lm.model, win[None])
    pos = torch.arange(win.numel())
    for l in cal.layers:
        k, v = hf.get_kv(cache, l)
        k2, v2 = _apply("prerope_clamp", cfg, cal, l, k, v, pos)
        assert torch.equal(k2, k) and torch.equal(v2, v)
        # an element far outside (before RoPE) is pulled in; its entry alone changes, the sinks never
        ks = k.clone()
        ks[0, 1, 20] *= 50
        ks[0, 1, 0] *= 50
        k3, _ = _apply("prerope_clamp", cfg, cal, l, ks, v, pos)
        changed = (k3 != ks).any(-1)[0]
        assert changed[1, 20] and int(changed.sum()) == 1
        key_frame = calibration.frames(cal.rope, l, pos)[0]
        pre = key_frame.model(k3)[0, 1, 20]
        st = cal.kprior[l]
        assert bool((pre <= st["hi"][1] + 1e-5).all() and (pre >= st["lo"][1] - 1e-5).all())


def test_denoise_leaves_noise_free_blocks_bit_identical():
    st = _synthetic_model(d=8, heads=2, seed=1)
    T = 40
    pos = torch.arange(T)
    live = pos >= 4
    x = st["mean"][None, :, None].expand(1, 2, T, 8).clone()  # the clean mean: no energy, no noise
    x[0, 0, 20:36] += 3.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(0))  # one noisy block
    out, changed = prior.denoise(x, st, prior.Frame(), live, pos, 16)
    assert torch.equal(out[:, 1], x[:, 1]) and torch.equal(out[0, 0, :20], x[0, 0, :20])
    assert bool(changed[0, 0, 20:].all()) and not bool(changed[0, 1].any())
    assert (out[0, 0, 20:36] - st["mean"][0]).norm() < (x[0, 0, 20:36] - st["mean"][0]).norm()


# --------------------------------------------------------------------------------------------------
# the closed forms


def _synthetic_model(d: int, heads: int, seed: int, rank: int | None = None) -> dict:
    """A clean Gaussian per head (random eigenbasis, decaying eigenvalues; `rank` of them non-negligible)."""
    g = torch.Generator().manual_seed(seed)
    evec = torch.linalg.qr(torch.randn(heads, d, d, generator=g))[0]
    evals = torch.logspace(0, -2, d).flip(0).expand(heads, d).clone()
    if rank is not None:
        evals[:, :d - rank] = 1e-6
    mean = torch.randn(heads, d, generator=g)
    return {"mean": mean, "evec": evec, "eval": evals, "lo": mean - 10, "hi": mean + 10}


def _draw(st: dict, n: int, seed: int) -> torch.Tensor:
    """n samples per head of the clean Gaussian, [1, H, n, d]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(st["mean"].shape[0], n, st["mean"].shape[1], generator=g)
    return (st["mean"][:, None] + (z * st["eval"].sqrt()[:, None]) @ st["evec"].transpose(-1, -2))[None]


def test_denoise_matches_the_analytic_wiener_estimate():
    st = _synthetic_model(d=16, heads=2, seed=0)
    T, s2 = 2048, 0.05
    clean = _draw(st, T, seed=1)
    noisy = clean + math.sqrt(s2) * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T)
    live = torch.ones(T, dtype=torch.bool)
    est = prior.relative_noise(noisy, st, live, pos, T) * st["eval"].mean(-1)[None, :, None]  # one block
    assert torch.allclose(est, torch.full_like(est, s2), rtol=0.1)  # the noise level, from the cache alone
    out, changed = prior.denoise(noisy, st, prior.Frame(), live, pos, T)
    assert bool(changed.all())
    for h in range(2):  # x̂ = μ + C (C + ŝ² I)⁻¹ (x̃ − μ), with the block's own ŝ²
        C = st["evec"][h] @ torch.diag(st["eval"][h]) @ st["evec"][h].T
        s = float(est[0, h, 0])
        want = st["mean"][h] + (noisy[0, h] - st["mean"][h]) @ torch.linalg.solve(C + s * torch.eye(16), C).T
        assert torch.allclose(out[0, h], want, atol=1e-4)
    # and it is the estimate it claims to be: its error is the Wiener error, far below the noise's
    mmse = float((st["eval"] * s2 / (st["eval"] + s2)).sum(-1).mean())
    err = float((out - clean).pow(2).sum(-1).mean())
    assert err == pytest.approx(mmse, rel=0.15) and err < 0.65 * 16 * s2  # the noise: 16 s²


@pytest.mark.parametrize("rotated", [False, True])
def test_impute_restores_a_low_rank_caches_lost_elements(rotated):
    d, heads, T = 16, 2, 64
    st = _synthetic_model(d=d, heads=heads, seed=3, rank=4)
    pre = _draw(st, T, seed=4)
    pos = torch.arange(100, 100 + T)
    frame = prior.Frame(*prior.rope_cos_sin(1.0 / 100 ** (torch.arange(0, d, 2) / d), 1.0, pos)) if rotated \
        else prior.Frame()
    clean = frame.stored(pre)
    g = torch.Generator().manual_seed(5)
    lose = torch.rand(clean.shape, generator=g) < 0.15
    bad = clean.masked_fill(lose, 0.0)
    bad[0, 0, 3, 2], bad[0, 1, 7, 5] = float("nan"), float("inf")
    lose[0, 0, 3, 2] = lose[0, 1, 7, 5] = True
    live = torch.ones(T, dtype=torch.bool)
    out, changed = prior.impute(bad, st, frame, live)
    assert torch.isfinite(out).all() and torch.equal(changed, lose.any(-1))
    assert torch.equal(out[~lose], bad[~lose])  # observed elements untouched
    err = (out - clean)[lose].norm() / clean[lose].norm()
    assert err < 0.02  # vs 1.0 for leaving the zeros


# --------------------------------------------------------------------------------------------------
# on a real cache, and through the grid


@pytest.mark.parametrize("rotary", ["full", "partial", "none"])
def test_impute_unit_rows_are_the_unrotated_one_hot_rows_bit_for_bit(rotary):
    # conditional_mean writes T⁻¹ e_i straight into its two elements instead of un-rotating one-hot rows: the same
    # bits, so the repair's numbers do not move
    g = torch.Generator().manual_seed(3)
    d, N = 16, 40
    r = {"full": d, "partial": d // 2, "none": 0}[rotary]
    frame = prior.Frame()
    if r:
        inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
        frame = prior.Frame(*prior.rope_cos_sin(inv, 1.25, torch.randint(0, 5000, (N,), generator=g)))
    for m in (1, 5, d):
        order = torch.stack([torch.randperm(d, generator=g)[:m] for _ in range(N)])
        valid = torch.arange(m)[None] < torch.randint(0, m + 1, (N, 1), generator=g)
        ref = frame.expand().model(torch.nn.functional.one_hot(order, d).float() * valid[..., None])
        got = prior.unit_rows(order, valid, frame, d, torch.float32)
        assert torch.equal(got, ref)
        assert int((got != 0).sum()) <= 2 * int(valid.sum())


def test_calibrated_repair_acts_where_the_cache_shows_a_fault(llama_cal):
    cfg, lm, cal = llama_cal
    cache, T = _held_in(cfg, lm)[0]
    l = cal.layers[-1]
    k, v = cache[l]
    pos = torch.arange(T)
    kb, vb = k.clone(), v.clone()
    vb[0, 0, 5, 3] = float("nan")
    vb[0, 1, 9, :3] = 0.0
    kb[0, 1, 12, 2] = 1e3
    noise = torch.randn(k[0, 0, 34:].shape, generator=torch.Generator().manual_seed(0))
    vb[0, 0, 34:] += 2.0 * v[0, 0, 34:].pow(2).mean().sqrt() * noise  # heavy noise on the last block
    k2, v2 = _apply("calibrated_repair", cfg, cal, l, kb, vb, pos)
    assert torch.isfinite(k2).all() and torch.isfinite(v2).all()
    changed_k, changed_v = (k2 != kb).any(-1)[0], (v2 != vb).any(-1)[0]
    assert changed_v[0, 5] and changed_v[1, 9] and changed_k[1, 12] and bool(changed_v[0, 34:].all())
    # what shows nothing is left alone: the other head's noise-free blocks, the sinks
    assert not changed_v[0, 10:34].any() and not changed_k[0].any() and not changed_v[:, :cal.sink].any()
    assert (k2[0, 1, 12] - k[0, 1, 12]).norm() < 0.01 * (kb[0, 1, 12] - k[0, 1, 12]).norm()
    assert (v2[0, 0, 34:] - v[0, 0, 34:]).norm() < (vb[0, 0, 34:] - v[0, 0, 34:]).norm()


def test_the_repairs_run_through_the_eval_grid(tiny_cfg, tmp_path):
    names = ["no_defense", *REPAIRS]
    data = tiny_cfg("llama", **{**SMALL, "eval.defenses": names, "eval.allow_missing_checkpoint": True,
                                "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2},
                                               {"name": "sst2_prompted", "num_examples": 2}],
                                "eval.corruption_eval.types": ["gaussian", "dropout_zero"],
                                "eval.validation.num_examples": 1})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp_path / "run"
    assert ev.main(["--config", str(cfg_path), "--run_dir", str(rd)]) == EXIT_OK
    doc = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    assert results.validate(doc, results.TASK_METRICS_SCHEMA) == []
    m = doc["metrics"]
    assert all(m["defense_groups"][n] == results.GROUP_CALIBRATED_REPAIR for n in REPAIRS)
    assert all(math.isfinite(m["robustness_auc"][n]) for n in names)
    assert all(math.isfinite(per[n]) for per in m["clean_scores"].values() for n in names)
    rows = [r for r in m["task_curves"] if r["defense"] in REPAIRS]
    assert rows and all(math.isfinite(r["value"]) for r in rows)
    # calibrated_repair is the candidate (chosen on validation: the only one), its ingredients are not
    assert m["best_baseline_choice"]["chosen"] == "calibrated_repair"
    assert set(m["best_baseline_choice"]["validation_auc"]) == {"calibrated_repair"}
    assert defenses.candidates().count("calibrated_repair") == 1
    assert not any(defenses.get(n).candidate for n in ("denoise", "impute", "prerope_clamp"))
    assert (rd / "checkpoints" / "calibration.pt").is_file()
