"""Heuristic defenses (no training), applied to a layer's K/V `[B, H_kv, T, d]` inside a region mask.

They act on the region the corruption's masks select (`Region.mask`), which is an oracle advantage the
learned operator does not get; results say so with `ORACLE_NOTE`. They act on clean inputs as well (a
clean cell gets the same region), so a defense that costs clean accuracy shows it. Entries outside the
mask are returned bit-identical; the arithmetic is fp32, cast back to the input dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import torch
from torch import Tensor

from cachemedicpp import config
from cachemedicpp.config import lookup

ORACLE_NOTE = "heuristics act on the region the corruption's masks select (an oracle advantage)"
DEFAULT_DROPOUT_SEED = 0


@functools.lru_cache(maxsize=1)
def _baseline_defaults() -> dict:
    return config.section_defaults("baseline")


def _baseline(baseline: Mapping | None) -> dict:
    return {**_baseline_defaults(), **dict(baseline or {})}


def _write(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.to(x.device), y.to(x.dtype), x)


def no_defense(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    return k, v


def reset_clear(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    return _write(k, torch.zeros_like(k), mask), _write(v, torch.zeros_like(v), mask)


def ema_weights(T: int, beta: float, device=None) -> Tensor:
    """[T, T] lower-triangular W with (W x)_t = y_t for y_0 = x_0, y_t = beta·y_{t-1} + (1 - beta)·x_t."""
    t = torch.arange(T, dtype=torch.float64)
    lag = (t.view(-1, 1) - t.view(1, -1)).clamp_min(0)
    w = torch.pow(torch.tensor(float(beta), dtype=torch.float64), lag) * (1.0 - beta)
    w = torch.tril(w)
    if T:
        w[:, 0] = torch.pow(torch.tensor(float(beta), dtype=torch.float64), t)  # y_0 = x_0 carries beta^t
    return w.to(device=device, dtype=torch.float32)


def smoothing(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    beta = float(_baseline(baseline)["smoothing_beta"])
    w = ema_weights(k.shape[2], beta, k.device)
    out = []
    for x in (k, v):
        y = torch.einsum("ts,bhsd->bhtd", w, x.float())
        out.append(_write(x, y, mask))
    return out[0], out[1]


def masking_dropout(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    p = float(_baseline(baseline)["dropout_p"])
    if gen is None:
        gen = torch.Generator(device="cpu").manual_seed(DEFAULT_DROPOUT_SEED)
    out = []
    for x in (k, v):
        drop = torch.rand(tuple(x.shape), generator=gen, dtype=torch.float32).to(x.device) < p
        out.append(_write(x, torch.where(drop, torch.zeros_like(x), x), mask))
    return out[0], out[1]


def clipping_renorm(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    b = _baseline(baseline)
    clip, target = float(b["clip_val"]), float(b["target_rms"])
    out = []
    for x in (k, v):
        c = x.float().clamp(-clip, clip)
        rms = c.pow(2).mean(dim=-1, keepdim=True).sqrt()
        y = c * (target / rms.clamp_min(1e-12))  # an all-zero vector stays zero
        out.append(_write(x, y, mask))
    return out[0], out[1]


DEFENSES: dict[str, Callable] = {
    "no_defense": no_defense,
    "reset_clear": reset_clear,
    "smoothing": smoothing,
    "masking_dropout": masking_dropout,
    "clipping_renorm": clipping_renorm,
}


def get_defense(name: str) -> Callable:
    return lookup("defense", name, DEFENSES, known="known heuristic defenses",
                  note=" (cachemedic is the learned repair operator, not a heuristic)")


def apply_defense(name: str, k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping,
                  gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Defend one layer's K/V inside `mask` (bool [1, H, T, 1]). Pure; no_defense returns the inputs."""
    return get_defense(name)(k, v, mask, baseline, gen)
