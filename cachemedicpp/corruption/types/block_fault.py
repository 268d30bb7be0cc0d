"""block_fault: paged-cache faults that hit whole blocks of `block_size` positions (a fault model).

The candidates are the blocks that meet the time mask; a seeded permutation (without eps, so the blocks
hit at a smaller eps stay hit at a larger one) picks round(frac * candidates) of them, and only their
positions inside the region change. `zero` clears them, `stale` writes the stale donor's entries at the
same positions (an earlier prompt), `swap` writes a seeded block of the swap donor's (another sequence, so
its positions differ too). At the page scope (default) K, V and every layer lose the same blocks; at the
layer scope each layer draws its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from torch import Tensor

from cachemedicpp.corruption.registry import CorruptionType, Site, param, register_corruption, round_half_up
from cachemedicpp.schema import ConfigError, lookup
from cachemedicpp.seeding import torch_rng as rng

BLOCK_MODES = ("zero", "stale", "swap")
BLOCK_SCOPES = ("page", "layer")
BLOCK_DONOR_PROMPTS = {"stale": "block_stale_prompt", "swap": "block_swap_prompt"}
DONOR = "block_donor"  # the Corruptor keyword (and donors key) of its donor


def _severity(eps: float, s: float, params: Mapping) -> dict:
    return {"frac": min(1.0, float(param(params, "block_fault_frac")) * s),
            "block_size": int(param(params, "block_size")), "mode": param(params, "block_fault_mode"),
            "scope": param(params, "block_fault_scope")}


def _check(params: Mapping, dtype: str) -> None:
    if int(param(params, "block_size")) < 1:
        raise ConfigError(f"corruption.params.block_size: must be >= 1, got {param(params, 'block_size')}")
    lookup("block fault mode", param(params, "block_fault_mode"), BLOCK_MODES, key="corruption.params.block_fault_mode")
    lookup("block fault scope", param(params, "block_fault_scope"), BLOCK_SCOPES,
           key="corruption.params.block_fault_scope")


def donor_prompt(params: Mapping) -> tuple[str, str] | None:
    """(Corruptor keyword, prompt) of the mode's donor (stale: block_stale_prompt, swap: block_swap_prompt;
    each its own prompt, distinct from contiguous_overwrite's); None for zero."""
    mode = param(params, "block_fault_mode")
    if mode not in BLOCK_DONOR_PROMPTS:
        return None
    return DONOR, param(params, BLOCK_DONOR_PROMPTS[mode])


def block_map(corruptor, sev: dict, time: Tensor, layer: int, phase: str, example_id) -> tuple[Tensor, Tensor]:
    """(bool [T] positions of the blocks hit inside `time`, long [T] donor position each one reads).

    Candidates are the blocks meeting `time`; a seeded permutation (page scope: one for every layer)
    picks round(frac * candidates) of them, nested across eps. stale reads the donor at the same
    position, swap at the same offset of a seeded donor block."""
    T, bs = int(time.numel()), int(sev["block_size"])
    src = torch.arange(T)
    blocks = [j for j in range((T + bs - 1) // bs) if bool(time[j * bs:(j + 1) * bs].any())]
    n_hit = min(len(blocks), round_half_up(float(sev["frac"]) * len(blocks)))
    hit = torch.zeros(T, dtype=torch.bool)
    if n_hit == 0:
        return hit, src
    key = "page" if sev["scope"] == "page" else int(layer)
    g = rng(corruptor.seed, phase, example_id, "block_fault", "blocks", key)
    order = torch.randperm(len(blocks), generator=g).tolist()
    if sev["mode"] == "swap":
        n_donor = _donor_len(corruptor, layer) // bs
        if n_donor < 1:
            raise ValueError(f"block_fault swap: the swap donor holds fewer than {bs} positions")
        sources = torch.randint(n_donor, (len(blocks),), generator=g).tolist()
    for i in order[:n_hit]:
        j = blocks[i]
        hit[j * bs:(j + 1) * bs] = True
        if sev["mode"] == "swap":
            src[j * bs:(j + 1) * bs] = torch.arange(j * bs, min(T, (j + 1) * bs)) - j * bs + sources[i] * bs
    return hit & time, src


def _donor_len(corruptor, layer: int) -> int:
    donor = corruptor.donors.get(DONOR)
    if donor is None or layer not in donor:
        raise ValueError("block_fault stale/swap needs donor KV of every corrupted layer: build it with "
                         "corruption.donors(corruption.params, lm, types, ...) and pass it to Corruptor")
    return int(donor[layer][0].shape[2])


def _restrict(site: Site) -> Site:
    """Only the hit blocks; `src` the donor position each position the layer holds reads."""
    T, L = site.T, int(site.mask.shape[2])
    hit, src = block_map(site.corruptor, site.sev, site.region.time, site.layer, site.phase, site.example_id)
    hit, src = hit[T - L:], src[T - L:]
    return replace(site, mask=site.mask & hit.view(1, 1, -1, 1), extra={"src": src})


def _transform(site: Site, tag: str, x: Tensor) -> Tensor:
    """What the hit blocks of x hold: zeros, or the donor's entries at `src` (one absolute donor position
    per position x holds; positions past the donor's length read zeros)."""
    sev, layer, src = site.sev, site.layer, site.extra["src"]
    if sev["mode"] == "zero":
        return torch.zeros_like(x)
    n = _donor_len(site.corruptor, layer)
    d = site.corruptor.donors[DONOR][layer][0 if tag == "K" else 1]
    if d.shape[1] != x.shape[1] or d.shape[3] != x.shape[3]:
        raise ValueError(f"block_fault layer {layer}: donor shape {tuple(d.shape)} does not match K/V shape "
                         f"{tuple(x.shape)}")
    padded = torch.cat([d, torch.zeros_like(d[:, :, :1])], dim=2).to(device=x.device, dtype=x.dtype)
    return padded[:, :, src.clamp_max(n).to(x.device)].expand(x.shape[0], -1, -1, -1)


register_corruption(CorruptionType("block_fault", "fault", severity=_severity, transform=_transform,
                                   restrict=_restrict, donor=donor_prompt, check=_check))
