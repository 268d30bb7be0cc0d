"""Corruption family C: identity at eps = 0, severity grows with eps, masks honoured, seeded draws."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cachemedicpp import config
from cachemedicpp import corruption as C
from cachemedicpp.config import ConfigError

SHAPE = (2, 3, 40, 16)  # [B, H_kv, T, d], GQA-like
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRID = (0.02, 0.04, 0.08, 0.16, 0.32)
BASE_TYPES = config.CORRUPTION_TYPES


def kv_pair(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g) * 2.0
    v = torch.randn(shape, generator=g)
    return k.to(dtype), v.to(dtype)


def donor(layers=(0, 1, 2, 3), T=64, shape=SHAPE, seed=123):
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(1, shape[1], T, shape[3], generator=g),
                    torch.randn(1, shape[1], T, shape[3], generator=g)) for layer in layers}


def make(axes=None, params=None, protect=(0, 1, 2, 3), seed=0, eps_ref=0.08, mixture=None, with_donor=True):
    corr = {"eps_ref": eps_ref, "axes": {"time_mode": "all_past", **(axes or {})},
            "params": {"targeted_base": "gaussian", **(params or {})}}
    if mixture is not None:
        corr["mixture"] = mixture
    return C.Corruptor(corr, protect, SHAPE[1], seed, donor_kv=donor() if with_donor else None)


def delta(k, v, k2, v2):
    return float((k2.float() - k.float()).norm() + (v2.float() - v.float()).norm())


# --------------------------------------------------------------------------------------------------
# identity and severity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctype", C.TYPES)
def test_eps_zero_is_identity(ctype, dtype):
    cor = make(axes={"layers": [1], "heads": [0, 2]})
    k, v = kv_pair(dtype=dtype)
    region = cor.region(ctype, 0.0, SHAPE[2], "eval", 7)
    k2, v2 = cor.apply(1, k, v, ctype, 0.0, region, "eval", 7)
    assert k2 is k and v2 is v
    out, report = cor.apply_cache({1: (k, v)}, ctype, 0, "eval", 7)
    assert out[1][0] is k and out[1][1] is v
    assert report.per_layer[1]["dK"] == 0.0 and report.per_layer[1]["frac_changed"] == 0.0


# kv_quant's bits saturate at 8 below eps_ref and at 2 from 8 eps_ref, so no eps_ref makes this grid strict:
# test_kv_quant_error_grows_as_bits_fall covers it
@pytest.mark.parametrize("ctype", [t for t in BASE_TYPES if t != "kv_quant"])
def test_severity_strictly_increases_with_eps(ctype):
    # eps_ref = 0.32 keeps every cap away from the grid (p <= 0.5, rotation power <= 1, bits 12..8)
    # (bitflip: a flip may give Inf/NaN, so its size is the number of words changed; block_fault: 20 blocks)
    cor = make(params={"dropout_p": 0.5, "bitflip_p": 0.2, "overwrite_window": [0, 40], "bitflip_rate": 0.2,
                       "block_size": 2, "block_fault_frac": 1.0}, eps_ref=0.32)
    k, v = kv_pair()
    sizes = []
    for eps in GRID:
        region = cor.region(ctype, eps, SHAPE[2], "eval", 3)
        k2, v2 = cor.apply(0, k, v, ctype, eps, region, "eval", 3)
        sizes.append(int((k2 != k).sum() + (v2 != v).sum()) if ctype == "bitflip" else delta(k, v, k2, v2))
    assert sizes[0] > 0
    assert all(b > a for a, b in zip(sizes, sizes[1:])), (ctype, sizes)


def test_severity_mapping_is_monotone_and_reproduces_config_at_eps_ref():
    params = {"dropout_p": 0.02, "bitflip_p": 5e-4, "bitflip_eps_jump": 8.0, "quant_bits": 8,
              "overwrite_window": [16, 48], "targeted_base": "dropout_zero"}
    at_ref = {t: C.severity(t, 0.08, params, 0.08) for t in C.TYPES}
    assert at_ref["gaussian"] == {"sigma": 0.08}
    assert at_ref["dropout_zero"]["p"] == pytest.approx(0.02)
    assert at_ref["bitflipish_sparse"]["p"] == pytest.approx(5e-4)
    assert at_ref["bitflipish_sparse"]["jump"] == 8.0
    assert at_ref["quant_noise"]["bits"] == 8
    assert at_ref["orthogonal_rotation"]["power"] == 1.0
    assert at_ref["contiguous_overwrite"] == {"start": 16, "block_len": 32}
    assert at_ref["targeted"] == {"base": "dropout_zero", "p": pytest.approx(0.02)}
    # a different eps_ref moves where the configured value sits
    assert C.severity("quant_noise", 0.16, params, 0.16)["bits"] == 8
    eps = [0.0, 0.01, 0.04, 0.08, 0.16, 0.5, 1.0, 10.0]
    for key, t in (("p", "dropout_zero"), ("p", "bitflipish_sparse"), ("power", "orthogonal_rotation"),
                   ("block_len", "contiguous_overwrite"), ("sigma", "gaussian")):
        vals = [C.severity(t, e, params, 0.08)[key] for e in eps]
        assert vals[0] == 0 and all(b >= a for a, b in zip(vals, vals[1:])), (t, vals)
    assert C.severity("dropout_zero", 10.0, params, 0.08)["p"] == 1.0  # capped
    bits = [C.severity("quant_noise", e, params, 0.08)["bits"] for e in eps[1:]]
    assert C.severity("quant_noise", 0.0, params, 0.08)["bits"] is None
    assert all(b <= a for a, b in zip(bits, bits[1:])) and 2 <= min(bits) and max(bits) <= 16
    with pytest.raises(ConfigError):
        C.severity("gaussian", -0.1, params, 0.08)


def test_rotation_power_is_a_rotation_and_saturates_monotonically():
    d = 16
    r1 = C.rotation_power(d, 1.0, 999)
    assert torch.equal(C.rotation_power(d, 0.0, 999), torch.eye(d))
    assert torch.allclose(r1 @ r1.T, torch.eye(d), atol=1e-5)
    assert torch.linalg.det(r1.double()).item() == pytest.approx(1.0, abs=1e-5)
    half = C.rotation_power(d, 0.5, 999)
    assert torch.allclose(half @ half, r1, atol=1e-5)
    assert not torch.allclose(C.rotation_power(d, 1.0, 1000), r1)  # rotation_seed matters
    # past s = 1 the plane angles saturate at pi: the displacement never shrinks
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(1))
    dist = [float((x @ C.rotation_power(d, s, 999) - x).norm()) for s in (0.5, 1, 2, 4, 8, 16, 64)]
    assert all(b >= a - 1e-4 for a, b in zip(dist, dist[1:])), dist


# --------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("ctype", BASE_TYPES)
@pytest.mark.parametrize("axes", [
    {"time_mode": "all_past"},
    {"time_mode": "old_only", "N_recent": 12},
    {"time_mode": "window", "window": [5, 17]},
    {"layer_mode": "bernoulli", "p_layer": 0.5, "head_mode": "bernoulli", "p_head": 0.5},
    {"layer_mode": "targeted", "layers": [2], "head_mode": "targeted", "heads": [1], "time_mode": "old_only",
     "N_recent": 30},
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_honoured_exactly(ctype, axes, dtype):
    cor = make(axes=axes, params={"dropout_p": 0.5, "bitflip_p": 0.3, "overwrite_window": [0, 40],
                                  "bitflip_rate": 0.3, "block_size": 4, "block_fault_frac": 0.5}, protect=(1, 2, 3))
    kv = {layer: kv_pair(seed=layer, dtype=dtype) for layer in range(4)}
    before = {layer: (k.clone(), v.clone()) for layer, (k, v) in kv.items()}
    out, report = cor.apply_cache(kv, ctype, 0.16, "eval", 11)
    region = cor.region(ctype, 0.16, SHAPE[2], "eval", 11)
    assert region.layers and set(region.layers) <= {1, 2, 3}
    for layer, (k, v) in kv.items():
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])  # inputs untouched
        k2, v2 = out[layer]
        if layer not in region.layers:
            assert k2 is k and v2 is v
            continue
        m = region.mask(layer).expand(SHAPE)
        assert torch.equal(k2[~m], k[~m]) and torch.equal(v2[~m], v[~m])
        assert k2.dtype == dtype and k2.shape == k.shape
        assert bool((k2[m] != k[m]).any() | (v2[m] != v[m]).any())  # the corruption really acted (NaN counts)
        assert report.per_layer[layer]["exposure"] == pytest.approx(region.fraction(layer))
        assert report.per_layer[layer]["dK"] > 0
    json.dumps(report.to_dict())


def test_region_masks_and_fraction():
    cor = make(axes={"time_mode": "old_only", "N_recent": 8})
    region = cor.region("gaussian", 0.08, 20, "eval", 0)
    assert region.layers == (0, 1, 2, 3)
    assert region.time.tolist() == [True] * 12 + [False] * 8
    assert region.mask(1).shape == (1, SHAPE[1], 20, 1)
    assert region.fraction(1) == pytest.approx(12 / 20)
    assert not region.mask(9).any() and region.fraction(9) == 0.0
    assert not cor.region("gaussian", 0.08, 8, "eval", 0).time.any()  # T <= N_recent: nothing old
    w = cor.region("gaussian", 0.08, 10, "eval", 0, time_mode="window", window=[4, 30]).time
    assert w.tolist() == [False] * 4 + [True] * 6  # clipped to T
    # bernoulli with p = 0 still keeps one seeded layer and head
    none = make(axes={"layer_mode": "bernoulli", "p_layer": 0.0, "head_mode": "bernoulli", "p_head": 0.0})
    r = none.region("gaussian", 0.08, 20, "eval", 5)
    assert len(r.layers) == 1 and int(r.heads[r.layers[0]].sum()) == 1
    assert none.region("gaussian", 0.08, 20, "eval", 5).layers == r.layers


def test_targeted_honours_axes_and_base_type():
    cor = make(axes={"layers": [3], "heads": [0, 2]}, params={"targeted_base": "dropout_zero", "dropout_p": 0.5},
               protect=(0, 1))
    kv = {layer: kv_pair(seed=layer) for layer in range(4)}
    out, _ = cor.apply_cache(kv, "targeted", 0.08, "eval", 1)
    for layer in (0, 1, 2):
        assert out[layer][0] is kv[layer][0]
    k, k2 = kv[3][0], out[3][0]
    changed = (k2 != k).any(dim=(0, 2, 3))
    assert changed.tolist() == [True, False, True]
    assert torch.all((k2 == k) | (k2 == 0))  # dropout_zero as the base type
    with pytest.raises(ConfigError, match="axes.layers"):
        make().region("targeted", 0.08, 40, "eval", 0)
    with pytest.raises(ConfigError, match="axes.heads"):
        make(axes={"layers": [0]}).region("targeted", 0.08, 40, "eval", 0)
    with pytest.raises(ConfigError, match="out of range"):
        make(axes={"layers": [0], "heads": [5]})


# --------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("ctype", ["gaussian", "dropout_zero", "bitflipish_sparse"])
def test_draws_are_seeded_by_example(ctype):
    axes = {"layer_mode": "bernoulli", "head_mode": "bernoulli"}
    params = {"dropout_p": 0.5, "bitflip_p": 0.3}
    kv = {layer: kv_pair(seed=layer) for layer in range(4)}
    a, _ = make(axes=axes, params=params).apply_cache(kv, ctype, 0.16, "eval", 42)
    b, _ = make(axes=axes, params=params).apply_cache(kv, ctype, 0.16, "eval", 42)  # a fresh run: resume
    for layer in kv:
        assert torch.equal(a[layer][0], b[layer][0]) and torch.equal(a[layer][1], b[layer][1])
    flat = lambda d: torch.cat([torch.cat([x.flatten(), y.flatten()]) for x, y in d.values()])  # noqa: E731
    for other in (make(axes=axes, params=params).apply_cache(kv, ctype, 0.16, "eval", 43)[0],
                  make(axes=axes, params=params, seed=1).apply_cache(kv, ctype, 0.16, "eval", 42)[0],
                  make(axes=axes, params=params).apply_cache(kv, ctype, 0.16, "train", 42)[0]):
        assert not torch.equal(flat(a), flat(other))


def test_k_and_v_get_separate_draws():
    cor = make()
    x = torch.ones(SHAPE)
    region = cor.region("gaussian", 0.1, SHAPE[2], "eval", 0)
    k2, v2 = cor.apply(0, x, x.clone(), "gaussian", 0.1, region, "eval", 0)
    assert not torch.equal(k2, v2)
    assert torch.equal(k2[0], k2[1])  # batch rows are copies of one example: same corruption


def test_rng_canonicalises_numbers():
    a = torch.rand(4, generator=C.rng(0, "eval", 3, 0.16))
    b = torch.rand(4, generator=C.rng(np.int64(0), "eval", np.int64(3), np.float64(0.16)))
    c = torch.rand(4, generator=C.rng(0, "eval", 4, 0.16))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_on_read_is_deterministic_and_absolute():
    cor = make(axes={"time_mode": "old_only", "N_recent": 8})
    f1, f2 = (cor.on_read("gaussian", 0.16, "eval", 5) for _ in range(2))
    k, v = kv_pair()
    a, b = f1(1, k, v), f2(1, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, :, 32:], k[:, :, 32:])  # the most recent N_recent keys are read clean
    assert not torch.equal(a[0][:, :, :32], k[:, :, :32])
    short = f1(1, k[:, :, :20], v[:, :, :20])[0]  # an earlier forward: shorter T, its own old region
    assert torch.equal(short[:, :, 12:], k[:, :, 12:20]) and not torch.equal(short[:, :, :12], k[:, :, :12])
    assert f1(7, k, v)[0] is k  # layer outside the region


# --------------------------------------------------------------------------------------------------
# contiguous overwrite and the donor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwrite_copies_donor_block_exactly(dtype):
    cor = make(axes={"time_mode": "old_only", "N_recent": 8}, params={"overwrite_window": [16, 48]})
    k, v = kv_pair(dtype=dtype)
    region = cor.region("contiguous_overwrite", 0.02, SHAPE[2], "eval", 0)
    k2, v2 = cor.apply(2, k, v, "contiguous_overwrite", 0.02, region, "eval", 0)
    dk, dv = cor.donor[2]
    block = slice(16, 24)  # round(32 * 0.02 / 0.08) = 8 positions from the window start
    for x, x2, d in ((k, k2, dk), (v, v2, dv)):
        assert torch.equal(x2[:, :, block], d[:, :, block].to(dtype).expand(2, -1, -1, -1))
        assert torch.equal(x2[:, :, :16], x[:, :, :16]) and torch.equal(x2[:, :, 24:], x[:, :, 24:])
    # a larger eps grows the block, clipped to the time mask (t < 40 - 8) and the donor's length
    big = cor.region("contiguous_overwrite", 0.16, 40, "eval", 0)
    k3, _ = cor.apply(2, k, v, "contiguous_overwrite", 0.16, big, "eval", 0)
    assert torch.equal(k3[:, :, 16:32], dk[:, :, 16:32].to(dtype).expand(2, -1, -1, -1))
    assert torch.equal(k3[:, :, 32:], k[:, :, 32:]) and torch.equal(k3[:, :, :16], k[:, :, :16])
    short = make(params={"overwrite_window": [16, 48]})
    short.donor = {2: (dk[:, :, :20], dv[:, :, :20])}
    k4, _ = short.apply(2, k, v, "contiguous_overwrite", 0.16, big, "eval", 0)
    assert torch.equal(k4[:, :, 16:20], dk[:, :, 16:20].to(dtype).expand(2, -1, -1, -1))
    assert torch.equal(k4[:, :, 20:], k[:, :, 20:])


def test_overwrite_without_donor_is_a_clear_error():
    cor = make(with_donor=False)
    k, v = kv_pair()
    with pytest.raises(ValueError, match="donor"):
        cor.apply_cache({0: (k, v)}, "contiguous_overwrite", 0.08, "eval", 0)


def test_donor_kv_from_tiny_model(tiny_lm):
    from cachemedicpp import hf

    lm = tiny_lm("llama")
    d = C.donor_kv(lm, "a short donor text", 40, [0, 2])
    assert sorted(d) == [0, 2]
    k, v = d[2]
    assert k.shape[0] == 1 and k.shape[1] == lm.arch.num_kv_heads and k.shape[2] >= 40
    assert k.shape[3] == lm.arch.head_dim and v.shape == k.shape
    ids = lm.tokenizer("a short donor text", add_special_tokens=False)["input_ids"]
    rep = torch.tensor([(ids * 100)[: k.shape[2]]])
    with torch.no_grad():
        _, cache = hf.forward(lm.model, rep)
    assert torch.equal(hf.get_kv(cache, 2)[0], k)
    d2 = C.donor_kv(lm, "a short donor text", 40, [2])
    assert torch.equal(d2[2][1], v)
    # end to end with a real cache layout
    cor = C.Corruptor({"axes": {"time_mode": "all_past"}, "params": {"overwrite_window": [4, 20]}}, [0, 1, 2],
                      lm.arch.num_kv_heads, 0, donor_kv=C.donor_kv(lm, "donor", 48, [0, 1, 2]))
    with torch.no_grad():
        _, clean = hf.forward(lm.model, torch.tensor([list(range(3, 43))]))
    kv = {layer: hf.get_kv(clean, layer) for layer in range(3)}
    out, report = cor.apply_cache(kv, "contiguous_overwrite", 0.08, "eval", 0)
    assert torch.equal(out[1][0][:, :, 4:20], cor.donor[1][0][:, :, 4:20])
    assert torch.equal(out[1][0][:, :, 20:], kv[1][0][:, :, 20:])
    assert report.to_dict()["dK"] > 0


# --------------------------------------------------------------------------------------------------
# type-specific behaviour


def test_bitflip_changes_are_flips_or_jumps():
    cor = make(params={"bitflip_p": 0.3, "bitflip_eps_jump": 8.0})
    k, v = kv_pair()
    k2, _ = cor.apply(0, k, v, "bitflipish_sparse", 0.08, cor.region("bitflipish_sparse", 0.08, 40, "eval", 0),
                      "eval", 0)
    changed = k2 != k
    frac = changed.float().mean().item()
    assert 0.2 < frac < 0.4
    x, y = k[changed], k2[changed]
    jump = 8.0 * x.abs().clamp_min(1e-3)
    flip = y == -x
    ok = flip | torch.isclose(y, x + jump) | torch.isclose(y, x - jump)
    assert ok.all()
    assert 0.3 < flip.float().mean().item() < 0.7


def test_quant_noise_uses_the_configured_grid():
    cor = make(params={"quant_bits": 4}, axes={"time_mode": "window", "window": [0, 20]})
    k, v = kv_pair()
    region = cor.region("quant_noise", 0.08, 40, "eval", 0)
    k2, _ = cor.apply(0, k, v, "quant_noise", 0.08, region, "eval", 0)
    inside = k2[0, 1, :20]
    scale = k[0, 1, :20].abs().max() / 7  # scale from the masked entries only
    levels = inside / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().unique().numel() <= 15
    assert torch.equal(k2[:, :, 20:], k[:, :, 20:])


# kv_quant: keys per channel over groups of positions, values per token over groups of channels

KVQ_EPS_BITS = {0.08: 8, 0.16: 6, 0.32: 4, 0.64: 2}


def kv_quant(k, v, eps, axes=None, group=8, layer=0, seed=0):
    cor = make(axes={"time_mode": "window", "window": [3, 30], **(axes or {})}, params={"kv_quant_group": group},
               seed=seed)
    region = cor.region("kv_quant", eps, SHAPE[2], "eval", 0)
    return cor.apply(layer, k, v, "kv_quant", eps, region, "eval", 0), region


def reference_quantise(x, bits):
    """x (fp32, one group) through its own min-max grid of 2**bits levels."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2 ** bits - 1)
    return torch.round((x - lo) / step) * step + lo


def test_kv_quant_bits_fall_with_eps():
    params = {"kv_quant_group": 32}
    assert C.severity("kv_quant", 0.0, params, 0.08) == {"bits": None, "group": 32}
    assert {e: C.severity("kv_quant", e, params, 0.08)["bits"] for e in KVQ_EPS_BITS} == KVQ_EPS_BITS
    eps = [0.001, 0.02, 0.08, 0.1, 0.12, 0.16, 0.2, 0.32, 0.5, 0.64, 1.0, 10.0]
    bits = [C.severity("kv_quant", e, params, 0.08)["bits"] for e in eps]
    assert all(b <= a for a, b in zip(bits, bits[1:])) and bits[0] == 8 and bits[-1] == 2, bits
    assert C.severity("kv_quant", 0.32, params, 0.32)["bits"] == 8  # eps_ref moves the 8-bit point
    assert C.severity("kv_quant", 0.08, {}, 0.08)["group"] == 32  # the schema default (KIVI's group size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_quant_acts_inside_the_region_only_and_keeps_the_dtype(dtype):
    k, v = kv_pair(dtype=dtype)
    (k0, v0), _ = kv_quant(k, v, 0.0)
    assert torch.equal(k0, k) and torch.equal(v0, v)  # eps = 0: the identity
    axes = {"layer_mode": "targeted", "layers": [0], "head_mode": "targeted", "heads": [0, 2]}
    (k2, v2), region = kv_quant(k, v, 0.32, axes=axes)
    m = region.mask(0).expand(SHAPE)
    assert int(m.sum()) == 2 * 2 * 27 * SHAPE[3]
    assert k2.dtype == dtype and v2.dtype == dtype
    assert torch.equal(k2[~m], k[~m]) and torch.equal(v2[~m], v[~m])  # outside: bit-identical
    assert (k2[m] != k[m]).float().mean() > 0.5 and (v2[m] != v[m]).float().mean() > 0.5


@pytest.mark.parametrize("eps", list(KVQ_EPS_BITS))
def test_kv_quant_grids_per_key_channel_and_value_token(eps):
    bits = KVQ_EPS_BITS[eps]
    k, v = kv_pair()
    (k2, v2), _ = kv_quant(k, v, eps, group=8)  # region positions 3..29: key groups 3-10, 11-18, 19-26, 27-29
    for a, b in ((3, 11), (11, 19), (19, 27), (27, 30)):
        for row, h, c in itertools.product(range(SHAPE[0]), range(SHAPE[1]), range(SHAPE[3])):
            got = k2[row, h, a:b, c]
            assert got.unique().numel() <= 2 ** bits
            assert torch.allclose(got, reference_quantise(k[row, h, a:b, c], bits), atol=1e-5)
    for a, b in ((0, 8), (8, 16)):  # values: channels 0-7 and 8-15 of each token
        for row, h, t in itertools.product(range(SHAPE[0]), range(SHAPE[1]), range(3, 30)):
            got = v2[row, h, t, a:b]
            assert got.unique().numel() <= 2 ** bits
            assert torch.allclose(got, reference_quantise(v[row, h, t, a:b], bits), atol=1e-5)


def test_kv_quant_value_groups_need_not_divide_the_head_dim():
    k, v = kv_pair()
    (_, v2), _ = kv_quant(k, v, 0.64, group=6)  # channels 0-5, 6-11, 12-15
    for a, b in ((0, 6), (6, 12), (12, 16)):
        got = v2[1, 2, 10, a:b]
        assert got.unique().numel() <= 4
        assert torch.allclose(got, reference_quantise(v[1, 2, 10, a:b], 2), atol=1e-5)


def test_kv_quant_treats_keys_per_channel_and_values_per_token():
    # one outlier channel (as keys have): per channel it costs the other channels nothing, per token it
    # stretches every token's grid
    x, _ = kv_pair()
    x[..., 0] *= 100.0
    (k2, v2), _ = kv_quant(x, x.clone(), 0.32, group=16)
    inside, rest = slice(3, 30), slice(1, None)
    err_k = (k2[:, :, inside, rest] - x[:, :, inside, rest]).abs().mean()
    err_v = (v2[:, :, inside, rest] - x[:, :, inside, rest]).abs().mean()
    assert err_v > 10 * err_k


def test_kv_quant_error_grows_as_bits_fall():
    k, v = kv_pair()
    errs = []
    for eps in KVQ_EPS_BITS:  # 8, 6, 4, 2 bits
        (k2, v2), _ = kv_quant(k, v, eps, group=32)
        errs.append((float((k2 - k).norm()), float((v2 - v).norm())))
    for (ka, va), (kb, vb) in zip(errs, errs[1:]):
        assert kb > 2 * ka and vb > 2 * va, errs  # two bits fewer: about four times the step


def test_kv_quant_is_deterministic_and_draws_nothing():
    k, v = kv_pair(dtype=torch.bfloat16)
    (a, b), _ = kv_quant(k, v, 0.16, seed=0)
    (a2, b2), _ = kv_quant(k, v, 0.16, seed=0)
    (a3, b3), _ = kv_quant(k, v, 0.16, seed=5)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(a, a3) and torch.equal(b, b3)  # no draw: the seed does not enter


def test_kv_quant_groups_of_a_sliding_window_layer_line_up():
    # region positions 3..29 in key groups 3-10, 11-18, 19-26, 27-29; a layer holding the last 24 of the 40
    # positions (16..39) lost 13 of them: its groups 19-26 and 27-29 are whole and match the full layer's
    k, v = kv_pair()
    (k2, v2), region = kv_quant(k, v, 0.32, group=8)
    cor = make(axes={"time_mode": "window", "window": [3, 30]}, params={"kv_quant_group": 8})
    k3, v3 = cor.apply(0, k[:, :, 16:], v[:, :, 16:], "kv_quant", 0.32, region, "eval", 0)
    assert torch.equal(k3[:, :, 19 - 16:], k2[:, :, 19:]) and torch.equal(v3, v2[:, :, 16:])
    assert not torch.equal(k3[:, :, :19 - 16], k2[:, :, 16:19])  # group 11-18 is held in part only


def test_kv_quant_group_is_checked():
    with pytest.raises(ConfigError, match="kv_quant_group"):
        make(params={"kv_quant_group": 0})


def test_report_is_serialisable_and_measures_the_change():
    cor = make()
    kv = {0: kv_pair(), 1: kv_pair(seed=1)}
    out, report = cor.apply_cache(kv, "gaussian", 0.08, "eval", 0)
    d = report.to_dict()
    assert json.loads(json.dumps(d))["type"] == "gaussian" and d["epsilon"] == 0.08
    assert d["severity"] == {"sigma": 0.08}
    dk0 = float((out[0][0] - kv[0][0]).norm())
    assert d["per_layer"]["0"]["dK"] == pytest.approx(dk0)
    assert d["dK"] == pytest.approx(math.hypot(d["per_layer"]["0"]["dK"], d["per_layer"]["1"]["dK"]))
    assert d["per_layer"]["0"]["frac_changed"] == 1.0 and d["exposure"] == 1.0


def test_unknown_type_lists_known_ones():
    cor = make()
    with pytest.raises(ConfigError, match="known: .*gaussian.*targeted"):
        cor.region("salt", 0.08, 40, "eval", 0)
    with pytest.raises(ConfigError, match="orthogonal_rotation"):
        C.severity("salt", 0.08, {}, 0.08)


# --------------------------------------------------------------------------------------------------
# training draws


def test_sample_is_deterministic_and_respects_mixture_and_clean_prob():
    mixture = {"gaussian": 0.5, "dropout_zero": 0.0, "quant_noise": 0.5}
    cor = make(mixture=mixture)
    draws = [cor.sample("train", s, [0.0, 0.08, 0.16], 0.2) for s in range(400)]
    assert draws == [make(mixture=mixture).sample("train", s, [0.0, 0.08, 0.16], 0.2) for s in range(400)]
    clean = [d for d in draws if d[0] is None]
    assert all(d == (None, 0.0) for d in clean)
    assert 0.12 < len(clean) / len(draws) < 0.28
    corrupt = [d for d in draws if d[0] is not None]
    assert {t for t, _ in corrupt} == {"gaussian", "quant_noise"}  # weight 0 never drawn
    assert {e for _, e in corrupt} == {0.08, 0.16}  # a 0 in the grid is ignored
    assert all(cor.sample("train", s, [0.08], 0.0)[0] is not None for s in range(50))
    assert all(cor.sample("train", s, [0.08], 1.0) == (None, 0.0) for s in range(50))
    assert all(cor.sample("train", s, [0.0], 0.0) == (None, 0.0) for s in range(20))
    default = make()  # the canonical mixture by name: every type can come up
    assert {default.sample("train", s, [0.08], 0.0)[0] for s in range(300)} == set(config.STATISTICAL_TYPES)
    faults = make(mixture="faults_mix")  # the second mixture adds the fault models (kv_quant is in neither)
    assert {faults.sample("train", s, [0.08], 0.0)[0] for s in range(300)} == {*config.STATISTICAL_TYPES,
                                                                                *config.FAULT_TYPES}
