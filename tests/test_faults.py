"""Fault models: IEEE bit flips in the storage format, paged-block faults, and checksum_recompute."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from cachemedicpp import config
from cachemedicpp import corruption as C
from cachemedicpp.config import ConfigError

SHAPE = (1, 2, 40, 8)  # [B, H_kv, T, d]


def kv_pair(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.0).to(dtype), torch.randn(shape, generator=g).to(dtype)


def make(params=None, axes=None, protect=(0, 1), seed=0, block_donor=None):
    corr = {"axes": {"time_mode": "all_past", **(axes or {})}, "params": dict(params or {})}
    return C.Corruptor(corr, protect, SHAPE[1], seed, block_donor=block_donor)


def _np_flip(value: float, fmt: str, bit: int) -> float:
    """The IEEE-754 reference: numpy / struct bit views of the stored word."""
    if fmt == "float32":
        word = struct.unpack("<I", struct.pack("<f", value))[0] ^ (1 << bit)
        return struct.unpack("<f", struct.pack("<I", word))[0]
    if fmt == "float16":
        word = np.array([value], dtype=np.float16).view(np.uint16)[0] ^ np.uint16(1 << bit)
        return float(np.array([word], dtype=np.uint16).view(np.float16)[0])
    # bfloat16: the top half of the float32 word (value already representable in bfloat16)
    word = (struct.unpack("<I", struct.pack("<f", value))[0] >> 16) ^ (1 << bit)
    return struct.unpack("<f", struct.pack("<I", word << 16))[0]


# --------------------------------------------------------------------------------------------------
# bitflip


@pytest.mark.parametrize("fmt", list(C.FORMATS))
def test_flipping_bit_k_gives_the_ieee_result(fmt):
    fdt, _, width, man, exp = C.FORMATS[fmt]
    values = torch.tensor([1.5, -0.3, 3.0e-3, 100.0, 0.0, -7.25], dtype=fdt)
    for bit in range(width):
        got = C.flip_bits(values, fmt, bit)
        assert got.dtype == fdt
        for x, y in zip(values.tolist(), got.tolist()):
            want = _np_flip(float(x), fmt, bit)
            assert (np.isnan(want) and np.isnan(y)) or y == want, (fmt, bit, x, y, want)
    # the classes name the IEEE fields
    assert C.bit_positions(fmt, "sign") == (width - 1,)
    assert C.bit_positions(fmt, "exponent_high") == (man + exp - 1,)
    assert C.bit_positions(fmt, "exponent") == tuple(range(man, man + exp))
    assert C.bit_positions(fmt, "mantissa") == tuple(range(man))
    # a burst flips the chosen bit and the ones below it
    burst = C.flip_bits(values, fmt, man + 1, burst=3)
    step = C.flip_bits(C.flip_bits(C.flip_bits(values, fmt, man + 1), fmt, man), fmt, man - 1)
    assert torch.equal(burst.view(C.FORMATS[fmt][1]), step.view(C.FORMATS[fmt][1]))


def test_simulated_storage_is_cast_flip_cast():
    x = torch.tensor([1.2345678, -3.3333333], dtype=torch.float32)
    got = C.flip_bits(x, "bfloat16", 0)
    assert got.dtype == torch.float32
    assert torch.equal(got, C.flip_bits(x.to(torch.bfloat16), "bfloat16", 0).float())
    fmt, simulated = C.storage_format({"bitflip_format": "bfloat16"}, torch.float32)
    assert (fmt, simulated) == ("bfloat16", True)
    assert C.storage_format({"bitflip_format": "auto"}, torch.float16) == ("float16", False)
    cor = make({"bitflip_format": "float16", "bitflip_rate": 0.5})
    _, report = cor.apply_cache({0: kv_pair()}, "bitflip", 0.08, "eval", 1)
    assert report.to_dict()["severity"]["storage_format"] == "float16"
    assert report.to_dict()["severity"]["storage_simulated"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitflip_identity_masks_draws_and_only_bit_changes(dtype):
    cor = make({"bitflip_rate": 0.3, "bitflip_bits": "sign", "bitflip_burst": 1},
               axes={"time_mode": "window", "window": [5, 21], "head_mode": "targeted", "heads": [1]})
    k, v = kv_pair(dtype=dtype)
    region = cor.region("bitflip", 0.0, SHAPE[2], "eval", 3)
    k0, v0 = cor.apply(0, k, v, "bitflip", 0.0, region, "eval", 3)
    assert k0 is k and v0 is v  # eps 0: bit-identical (the very tensors)
    region = cor.region("bitflip", 0.08, SHAPE[2], "eval", 3)
    k2, v2 = cor.apply(0, k, v, "bitflip", 0.08, region, "eval", 3)
    m = region.mask(0).expand(SHAPE)
    assert torch.equal(k2[~m], k[~m]) and torch.equal(v2[~m], v[~m])
    changed = k2 != k
    assert changed.any() and torch.equal(k2[changed], -k[changed])  # a sign flip is exactly -x
    again = cor.apply(0, k, v, "bitflip", 0.08, region, "eval", 3)  # paired: the same draws every call
    assert torch.equal(again[0], k2) and torch.equal(again[1], v2)
    other = cor.apply(0, k, v, "bitflip", 0.08, region, "eval", 4)
    assert not torch.equal(other[0], k2)


def test_bitflip_rate_grows_with_eps_and_exponent_flips_give_inf_nan():
    cor = make({"bitflip_rate": 0.05, "bitflip_bits": "exponent_high"})
    k = torch.full(SHAPE, 1.5)  # exponent 127: flipping its top bit gives the all-ones exponent
    rates = []
    for eps in (0.04, 0.08, 0.16, 0.32):
        k2, _ = cor.apply(0, k, k.clone(), "bitflip", eps, cor.region("bitflip", eps, SHAPE[2], "eval", 0), "eval", 0)
        rates.append(float((k2 != k).float().mean()))
        assert bool(torch.isnan(k2).any())  # 1.5 has a non-zero mantissa: NaN, part of the fault
    assert all(b > a for a, b in zip(rates, rates[1:])), rates
    _, report = cor.apply_cache({0: (k, k.clone())}, "bitflip", 0.16, "eval", 0)
    d = report.to_dict()
    assert d["nonfinite"] > 0 and np.isfinite(d["dK"])


@pytest.mark.parametrize("params,key", [
    ({"bitflip_bits": "exponnent"}, "corruption.params.bitflip_bits"),
    ({"bitflip_bits": [3, 40]}, "corruption.params.bitflip_bits"),
    ({"bitflip_bits": [16], "bitflip_format": "bfloat16"}, "corruption.params.bitflip_bits"),
    ({"block_size": 0}, "corruption.params.block_size"),
    ({"bitflip_burst": 0}, "corruption.params.bitflip_burst"),
    ({"block_fault_mode": "stael"}, "corruption.params.block_fault_mode"),
    ({"block_fault_scope": "pages"}, "corruption.params.block_fault_scope"),
])
def test_bad_fault_parameters_name_their_key(params, key):
    with pytest.raises(ConfigError, match=key):
        config.load_config(data={"corruption": {"params": params}})
    with pytest.raises(ConfigError, match=key):
        make(params)
    if params.get("bitflip_bits") == "exponnent":
        with pytest.raises(ConfigError, match="did you mean exponent"):
            make(params)


# --------------------------------------------------------------------------------------------------
# block_fault


def _donor(T=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(1, SHAPE[1], T, SHAPE[3], generator=g), torch.randn(1, SHAPE[1], T, SHAPE[3], generator=g))
            for layer in (0, 1)}


@pytest.mark.parametrize("mode", C.BLOCK_MODES)
def test_block_faults_hit_whole_blocks_with_the_donors_entries(mode):
    donor = _donor()
    params = {"block_size": 8, "block_fault_mode": mode, "block_fault_frac": 0.5}
    cor = make(params, axes={"time_mode": "old_only", "N_recent": 12}, block_donor=donor)
    kv = {layer: kv_pair(seed=layer) for layer in (0, 1)}
    out, _ = cor.apply_cache(kv, "block_fault", 0.08, "eval", 2)
    region = cor.region("block_fault", 0.08, SHAPE[2], "eval", 2)
    sev = C.severity("block_fault", 0.08, cor.params, cor.eps_ref)
    hits = []
    for layer in (0, 1):
        hit, src = cor.block_map(sev, region.time, layer, "eval", 2)
        hits.append(hit)
        k, v = kv[layer]
        k2, v2 = out[layer]
        assert torch.equal(k2[:, :, ~hit], k[:, :, ~hit]) and torch.equal(v2[:, :, ~hit], v[:, :, ~hit])
        assert not bool(hit[~region.time].any())  # the recent positions are never hit
        # 28 old positions = blocks 0..3 (the last one partly old): half of them hit
        blocks = sorted({int(t) // 8 for t in torch.nonzero(hit).flatten()})
        assert len(blocks) == 2
        for tag, x2 in (("K", k2), ("V", v2)):
            d = donor[layer][0 if tag == "K" else 1]
            if mode == "zero":
                want = torch.zeros_like(x2[:, :, hit])
            else:
                want = d[:, :, src[hit]]
                if mode == "stale":
                    assert torch.equal(src[hit], torch.nonzero(hit).flatten())  # the same positions
            assert torch.equal(x2[:, :, hit], want)
    assert torch.equal(hits[0], hits[1])  # page scope: the same blocks in every layer


def test_block_fault_severity_is_nested_and_layer_scope_draws_per_layer():
    cor = make({"block_size": 4, "block_fault_frac": 0.125}, axes={"time_mode": "all_past"})
    time = torch.ones(SHAPE[2], dtype=torch.bool)
    prev = None
    for eps in (0.0, 0.08, 0.16, 0.32, 0.64):
        hit, _ = cor.block_map(C.severity("block_fault", eps, cor.params, cor.eps_ref), time, 0, "eval", 1)
        assert int(hit.sum()) == 4 * C._round_half_up(min(1.0, 0.125 * eps / 0.08) * 10)
        if prev is not None:
            assert bool((hit | ~prev).all())  # blocks hit at a smaller eps stay hit
        prev = hit
    per_layer = make({"block_size": 4, "block_fault_frac": 0.5, "block_fault_scope": "layer"})
    sev = C.severity("block_fault", 0.08, per_layer.params, 0.08)
    maps = [per_layer.block_map(sev, time, layer, "eval", 1)[0] for layer in range(6)]
    assert any(not torch.equal(maps[0], m) for m in maps[1:])
