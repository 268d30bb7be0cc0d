"""bitflip: flip real bits of the stored word (a fault model).

`bitflip_format` (float32 | float16 | bfloat16, auto = the cache's own dtype) is the word the cache is
stored in. A format other than the cache dtype is simulated: the hit element is cast to the format,
flipped through an integer view, and cast back (the report says so). A hit word gets one bit drawn
uniformly from `bitflip_bits` (a class or explicit indices) plus the `bitflip_burst` - 1 bits below it.
Inf and NaN produced by a flip are part of the fault.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from cachemedicpp.corruption.registry import CorruptionType, Site, draw, param, register_corruption
from cachemedicpp.schema import ConfigError, lookup

# IEEE-754 storage formats: (float dtype, integer view, bits per word, mantissa bits, exponent bits)
FORMATS = {
    "float32": (torch.float32, torch.int32, 32, 23, 8),
    "float16": (torch.float16, torch.int16, 16, 10, 5),
    "bfloat16": (torch.bfloat16, torch.int16, 16, 7, 8),
}
BIT_CLASSES = ("sign", "exponent", "exponent_high", "mantissa", "all")


def format_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def storage_format(params: Mapping, dtype: torch.dtype | str) -> tuple[str, bool]:
    """(bitflip storage format, simulated?) for a cache of `dtype`: simulated when the format is not the
    cache's own, so a hit word is cast to it, flipped and cast back."""
    cache = dtype if isinstance(dtype, str) else format_name(dtype)
    fmt = param(params, "bitflip_format")
    fmt = cache if fmt == "auto" else fmt
    lookup("storage format", fmt, FORMATS, key="corruption.params.bitflip_format")
    return fmt, fmt != cache


def bit_positions(fmt: str, bits) -> tuple[int, ...]:
    """Bit indices (0 = least significant) a bit class or an explicit list names in a `fmt` word."""
    _, _, width, man, exp = lookup("storage format", fmt, FORMATS, key="corruption.params.bitflip_format")
    if isinstance(bits, str):
        cls = lookup("bit class", bits, BIT_CLASSES, key="corruption.params.bitflip_bits")
        return {"sign": (width - 1,), "exponent": tuple(range(man, man + exp)), "exponent_high": (man + exp - 1,),
                "mantissa": tuple(range(man)), "all": tuple(range(width))}[cls]
    bits = list(bits)
    if not bits:
        raise ConfigError("corruption.params.bitflip_bits: an empty list of bits")
    bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < width]
    if bad:
        raise ConfigError(f"corruption.params.bitflip_bits: bit(s) {bad} outside the {fmt} word "
                          f"(bits 0..{width - 1})")
    return tuple(sorted(set(bits)))


def flip_bits(x: Tensor, fmt: str, position: Tensor | int, burst: int = 1) -> Tensor:
    """x with bit `position` of its `fmt` word flipped, and the burst - 1 bits below it (clipped at bit 0);
    returned in x's dtype (cast to the format, flipped through an integer view, cast back)."""
    fdt, idt, width, _, _ = FORMATS[fmt]
    pos = torch.as_tensor(position, dtype=torch.int64, device=x.device)
    lo = (pos - (int(burst) - 1)).clamp_min(0)
    one = torch.ones_like(pos)
    mask = torch.bitwise_left_shift(torch.bitwise_left_shift(one, pos - lo + 1) - 1, lo)
    mask = torch.where(mask >= 2 ** (width - 1), mask - 2 ** width, mask).to(idt)  # the signed integer view
    word = x.to(fdt).view(idt)
    return torch.bitwise_xor(word, mask).view(fdt).to(x.dtype)


def _bitflip(x: Tensor, sev: dict, gen: torch.Generator) -> Tensor:
    """x (the cache's own values, its own dtype) with each selected element's stored word flipped."""
    fmt, _ = storage_format({"bitflip_format": sev["format"]}, x.dtype)
    positions = torch.tensor(bit_positions(fmt, sev["bits"]), dtype=torch.int64)
    hit = draw(torch.rand, x, gen) < sev["p"]
    which = (draw(torch.rand, x, gen) * len(positions)).long().clamp_max(len(positions) - 1)
    flipped = flip_bits(x, fmt, positions[which.cpu()].to(x.device), sev["burst"])
    return torch.where(hit, flipped, x)


def _severity(eps: float, s: float, params: Mapping) -> dict:
    bits = param(params, "bitflip_bits")
    return {"p": min(1.0, float(param(params, "bitflip_rate")) * s), "format": param(params, "bitflip_format"),
            "bits": bits if isinstance(bits, str) else [int(b) for b in bits],
            "burst": int(param(params, "bitflip_burst"))}


def _check(params: Mapping, dtype: str) -> None:
    fmt, _ = storage_format(params, dtype)
    bit_positions(fmt, param(params, "bitflip_bits"))
    if int(param(params, "bitflip_burst")) < 1:
        raise ConfigError(f"corruption.params.bitflip_burst: must be >= 1, got {param(params, 'bitflip_burst')}")


def _describe(params: Mapping, dtype: torch.dtype) -> dict:
    fmt, simulated = storage_format(params, dtype)
    return {"storage_format": fmt, "storage_simulated": simulated}


def _transform(site: Site, tag: str, x: Tensor) -> Tensor:
    return _bitflip(x, site.sev, site.gen(tag))  # on the stored words themselves, not an fp32 copy


register_corruption(CorruptionType("bitflip", "fault", severity=_severity, transform=_transform, check=_check,
                                   describe=_describe))
