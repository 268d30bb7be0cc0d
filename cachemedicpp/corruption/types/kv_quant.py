"""kv_quant: the cache stored at low precision, as KV-cache quantisers store it (KIVI, KVQuant).

Keys are quantised per channel and values per token, each with an asymmetric uniform round-to-nearest
grid whose range is the min and max of its group, then dequantised back to the cache's dtype:

- keys: one range per (head, channel) over groups of `kv_quant_group` consecutive positions of the
  region (the region's positions are counted from its first, so a group never mixes corrupted and clean
  positions, and the groups of a sliding-window layer line up with those of a layer holding the whole
  context);
- values: one range per (head, position) over groups of `kv_quant_group` consecutive channels (the last
  group is shorter when the head dimension is not a multiple).

Keys are quantised as cached, after RoPE, as KIVI does; KVQuant's pre-RoPE key quantisation is not
modelled. A group whose entries are all equal is kept as it is (its grid has no step).

Bits from the severity, s = eps / eps_ref (eps_ref 0.08 by default), two bits fewer per doubling:

    bits = clip(round(8 - 2 log2 s), 2, 8)      eps 0.08 -> 8, 0.16 -> 6, 0.32 -> 4, 0.64 -> 2

so bits never rise as eps grows; eps = 0 is the identity (no quantisation at all). The quantiser draws
nothing: the result depends on the cache, the region, eps and the group size only.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from cachemedicpp.corruption.registry import CorruptionType, Site, param, register_corruption, round_half_up
from cachemedicpp.schema import ConfigError

MAX_BITS, MIN_BITS = 8, 2
BITS_PER_DOUBLING = 2


def kv_quant_bits(s: float) -> int:
    """Bits of the grid at severity s = eps / eps_ref > 0 (8 at eps_ref, 2 bits fewer per doubling)."""
    return min(MAX_BITS, max(MIN_BITS, round_half_up(MAX_BITS - BITS_PER_DOUBLING * math.log2(s))))


def _severity(eps: float, s: float, params: Mapping) -> dict:
    group = int(param(params, "kv_quant_group"))
    if eps == 0:
        return {"bits": None, "group": group}  # no quantisation at all: the identity
    return {"bits": kv_quant_bits(s), "group": group}


def _check(params: Mapping, dtype: str) -> None:
    group = param(params, "kv_quant_group")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ConfigError(f"corruption.params.kv_quant_group: must be an integer >= 1, got {group!r}")


def fake_quantise(x: Tensor, gid: Tensor, n: int, dim: int, bits: int) -> Tensor:
    """x (fp32) through an asymmetric `bits`-bit round-to-nearest grid and back, one grid per group:
    `gid` (long, broadcastable to x) names each element's group along `dim`, in [0, n). A group's grid
    spans its min to its max, so it holds at most 2**bits values; a group of equal entries is kept."""
    idx = gid.expand_as(x).contiguous()
    shape = list(x.shape)
    shape[dim] = n
    lo = x.new_full(shape, math.inf).scatter_reduce(dim, idx, x, "amin").gather(dim, idx)
    hi = x.new_full(shape, -math.inf).scatter_reduce(dim, idx, x, "amax").gather(dim, idx)
    levels = 2 ** int(bits) - 1
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((x - lo) / safe), 0, levels)
    return torch.where(step > 0, q * safe + lo, x)


def key_groups(mask: Tensor, group: int, offset: int = 0) -> tuple[Tensor, int]:
    """(long [1, H, L, 1] group of each position, number of groups + 1): the region's positions of each head
    (mask [1, H, L, 1]) in groups of `group`, counted from the region's first position (`offset` of them
    precede the first position held); positions outside the region share the last group, which no
    region's position is in."""
    inside = mask.long()
    ordinal = offset + inside.cumsum(dim=2) - 1
    gid = torch.div(ordinal, group, rounding_mode="floor") - offset // group
    n = int(gid.masked_fill(~mask, 0).max()) + 2 if bool(mask.any()) else 1
    return torch.where(mask, gid, torch.full_like(gid, n - 1)), n


def quantise_keys(x: Tensor, mask: Tensor, bits: int, group: int, offset: int = 0) -> Tensor:
    """Keys [B, H, L, d] (fp32) quantised per channel over groups of `group` region positions (mask
    [1, H, L, 1]); entries outside the region are quantised over their own group (the caller drops them)."""
    gid, n = key_groups(mask, group, offset)
    return fake_quantise(x, gid, n, 2, bits)


def quantise_values(x: Tensor, bits: int, group: int) -> Tensor:
    """Values [B, H, L, d] (fp32) quantised per token over groups of `group` consecutive channels."""
    d = x.shape[-1]
    gid = torch.div(torch.arange(d, device=x.device), group, rounding_mode="floor")
    return fake_quantise(x, gid.view(1, 1, 1, d), (d + group - 1) // group, 3, bits)


def _transform(site: Site, tag: str, x: Tensor) -> Tensor:
    """K per channel, V per token, in fp32, back in x's dtype."""
    bits, group = int(site.sev["bits"]), int(site.sev["group"])
    if tag == "V":
        return quantise_values(x.float(), bits, group).to(x.dtype)
    # a sliding-window layer holds the last L of the T positions: count the region's positions it lost
    offset = int(site.region.time[:site.T - int(x.shape[2])].sum())
    return quantise_keys(x.float(), site.mask, bits, group, offset).to(x.dtype)


register_corruption(CorruptionType("kv_quant", "other", severity=_severity, transform=_transform, check=_check))
