"""contiguous_overwrite: a contiguous block of past positions overwritten with the donor prompt's clean K/V at
the same positions (history swapping); the block grows with eps from the start of `overwrite_window`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from cachemedicpp.corruption.registry import CorruptionType, Site, register_corruption, round_half_up

DONOR = "donor_kv"  # the Corruptor keyword (and donors key) of its donor


def _severity(eps: float, s: float, params) -> dict:
    w0, w1 = (int(x) for x in params["overwrite_window"])
    return {"start": w0, "block_len": max(0, round_half_up((w1 - w0) * s))}


def _restrict(site: Site) -> Site:
    """Only the block [start, start + block_len), and only where the donor has positions."""
    donor, T, L = site.corruptor.donors.get(DONOR), site.T, int(site.mask.shape[2])
    donor_len = min(donor[site.layer][0].shape[2], T) if donor and site.layer in donor else 0
    t = torch.arange(T)
    start = site.sev["start"]
    block = (t >= start) & (t < start + site.sev["block_len"]) & (t < donor_len)
    return replace(site, mask=site.mask & block[T - L:].view(1, 1, -1, 1))


def _transform(site: Site, tag: str, x: Tensor) -> Tensor:
    """The donor's K or V laid out like x ([1, H, L, d], x holding the last L of T positions; the donor's
    positions are absolute, zero past the donor's length)."""
    donor, layer, T = site.corruptor.donors.get(DONOR), site.layer, site.T
    if donor is None:
        raise ValueError("contiguous_overwrite needs donor KV: build it with corruption.donor_kv(lm, "
                         "corruption.params.donor_prompt, ...) and pass donor_kv= to Corruptor")
    if layer not in donor:
        raise ValueError(f"contiguous_overwrite: no donor KV for layer {layer} (have {sorted(donor)})")
    d = donor[layer][0 if tag == "K" else 1]
    if d.shape[1] != x.shape[1] or d.shape[3] != x.shape[3]:
        raise ValueError(f"contiguous_overwrite layer {layer}: donor shape {tuple(d.shape)} does not "
                         f"match K/V shape {tuple(x.shape)}")
    n = min(d.shape[2], T)
    out = torch.zeros((d.shape[0], x.shape[1], T, x.shape[3]), dtype=x.dtype, device=x.device)
    out[:, :, :n] = d[:, :, :n].to(device=x.device, dtype=x.dtype)
    return out[:, :, T - x.shape[2]:]


register_corruption(CorruptionType(
    "contiguous_overwrite", "statistical", severity=_severity, transform=_transform, restrict=_restrict,
    donor=lambda params: (DONOR, params["donor_prompt"])))
