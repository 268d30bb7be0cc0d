"""The value-level types of the default mixture: gaussian, dropout_zero, orthogonal_rotation,
bitflipish_sparse, quant_noise (registered in this order, the registry's order)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from cachemedicpp.corruption.registry import (CorruptionType, Site, draw, float_transform, register_corruption,
                                              round_half_up)
from cachemedicpp.seeding import torch_rng as rng


def _gaussian(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    return x + sev["sigma"] * _rms(x) * draw(torch.randn, x, gen)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def _dropout_zero(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    drop = draw(torch.rand, x, gen) < sev["p"]
    return torch.where(drop, torch.zeros_like(x), x)


def _bitflipish_sparse(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    selected = draw(torch.rand, x, gen) < sev["p"]
    flip = draw(torch.rand, x, gen) < 0.5
    sign = torch.where(draw(torch.rand, x, gen) < 0.5, -1.0, 1.0)
    jumped = x + sign * sev["jump"] * x.abs().clamp_min(1e-3)
    return torch.where(selected, torch.where(flip, -x, jumped), x)


def _quant_noise(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    qmax = 2 ** (sev["bits"] - 1) - 1
    # scale per (batch, head) from the masked entries only, so the region alone sets the grid
    amax = torch.where(mask, x.abs(), torch.zeros_like(x)).amax(dim=(2, 3), keepdim=True)
    scale = amax / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / safe), -qmax, qmax) * safe
    return torch.where(scale > 0, q, x)


def _quant_bits(eps: float, s: float, params) -> dict:
    if eps == 0:
        return {"bits": None}  # no quantization at all: the identity
    return {"bits": min(16, max(2, round_half_up(int(params["quant_bits"]) - math.log2(s))))}


@functools.lru_cache(maxsize=16)
def _haar_rotation(d: int, rotation_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A Haar-random rotation in SO(d) (float64) with its eigendecomposition."""
    g = rng(rotation_seed, "orthogonal_rotation", d)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # Haar on O(d)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # onto SO(d), still Haar
    lam, vec = torch.linalg.eig(q)
    return q, torch.angle(lam), vec, torch.linalg.inv(vec)


@functools.lru_cache(maxsize=64)
def rotation_power(d: int, s: float, rotation_seed: int) -> Tensor:
    """R^s (float32 [d, d]): every rotation plane's angle theta becomes sign(theta)·min(|theta|·s, pi).

    For s <= 1 this is the principal fractional power of R (R^0 = I exactly, R^1 = R). Saturating at
    pi keeps |x R^s - x| non-decreasing in s, where a plain power would rotate back towards x.
    """
    if s == 0:
        return torch.eye(d, dtype=torch.float32)
    _, theta, vec, vinv = _haar_rotation(d, rotation_seed)
    angle = torch.sign(theta) * torch.clamp(theta.abs() * s, max=math.pi)
    m = ((vec * torch.polar(torch.ones_like(angle), angle)) @ vinv).real
    u, _, vh = torch.linalg.svd(m)  # polar factor: removes the eigensolver's round-off
    return (u @ vh).to(torch.float32)


def _rotation(site: Site, tag: str, x: Tensor) -> Tensor:
    # no draw: the rotation is fixed by rotation_seed, its power by eps
    r = rotation_power(x.shape[-1], float(site.sev["power"]), int(site.corruptor.params["rotation_seed"]))
    return (x.float() @ r.to(x.device)).to(x.dtype)


register_corruption(CorruptionType(
    "gaussian", "statistical", severity=lambda eps, s, params: {"sigma": eps}, transform=float_transform(_gaussian)))
register_corruption(CorruptionType(
    "dropout_zero", "statistical", severity=lambda eps, s, params: {"p": min(1.0, float(params["dropout_p"]) * s)},
    transform=float_transform(_dropout_zero)))
register_corruption(CorruptionType(
    "orthogonal_rotation", "statistical", severity=lambda eps, s, params: {"power": s}, transform=_rotation))
register_corruption(CorruptionType(
    "bitflipish_sparse", "statistical",
    severity=lambda eps, s, params: {"p": min(1.0, float(params["bitflip_p"]) * s),
                                     "jump": float(params["bitflip_eps_jump"])},
    transform=float_transform(_bitflipish_sparse)))
register_corruption(CorruptionType(
    "quant_noise", "statistical", severity=_quant_bits, transform=float_transform(_quant_noise)))
