"""Corruption family C: seeded, severity-scaled edits of per-layer K/V tensors `[B, H_kv, T, d]`.

A corruption acts only inside a region: a layer mask over the protected layers (all | bernoulli
p_layer | targeted axes.layers), a head mask over KV heads (all | bernoulli p_head | targeted
axes.heads) and a time mask (all_past | old_only t < T - N_recent | window [a, b)). Entries outside
the region are returned bit-identical; everything is computed in fp32 and cast back.

Severity at eps (s = eps / eps_ref; eps = 0 is exactly the identity for every type, and the
severity never decreases as eps grows; eps = eps_ref reproduces the configured parameter):

    gaussian             x + sigma * rms(x) * N(0, 1)          sigma = eps
    dropout_zero         zero each element with prob p         p = min(1, dropout_p * s)
    orthogonal_rotation  x @ R^s on the head dim               R Haar-random in SO(d) from rotation_seed;
                                                               each rotation plane's angle is scaled by
                                                               s and saturates at pi, so the displacement
                                                               |x R^s - x| never shrinks once s > 1
    bitflipish_sparse    select with prob p; half sign-flip,   p = min(1, bitflip_p * s)
                         half jump by +-jump * max(|x|, 1e-3)
    quant_noise          symmetric per-(batch, head)           bits = clip(round(quant_bits - log2 s), 2, 16)
                         quantize/dequantize
    contiguous_overwrite donor's clean K/V at the same         block [w0, w0 + round((w1 - w0) * s)),
                         positions                             clipped to the time mask and donor length
    targeted             params.targeted_base with layer/head masks forced to axes.layers / axes.heads
    bitflip              flip real bits of the stored word      p = min(1, bitflip_rate * s) per element
                         (see "fault models" below)
    block_fault          whole cache blocks zeroed, stale or    fraction of the old region's blocks hit
                         swapped (see "fault models" below)     = min(1, block_fault_frac * s)

`rms` is the per-vector RMS over d of the original x; `round` rounds half up.

Determinism: every draw comes from `rng(seed, phase, example_id, type, eps, layer, draw, tag)` with
tag "K" or "V", drawn on the CPU and moved to the tensor's device. One draw of shape `[1, H, T, d]` is
shared by every batch row: rows of one call are copies of one example (one per defense or grid cell)
and must see the same corruption. The region's layer and head draws do not depend on T, so an on-read
corruption keeps its layers and heads while the sequence grows.

Fault models. `bitflip` flips bits of the word the cache is stored in (`bitflip_format`: float32 |
float16 | bfloat16, auto = the cache's own dtype). A format other than the cache dtype is simulated:
the hit element is cast to the format, flipped through an integer view, and cast back (the report says
so). A hit word gets one bit drawn uniformly from `bitflip_bits` (a class or explicit indices) plus the
`bitflip_burst` - 1 bits below it. Inf and NaN produced by a flip are part of the fault. `block_fault`
hits whole blocks of `block_size` positions: the candidates are the blocks that meet the time mask, a
seeded permutation (without eps, so the blocks hit at a smaller eps stay hit at a larger one) picks
round(frac * candidates) of them, and only their positions inside the region change. `zero` clears them,
`stale` writes the stale donor's entries at the same positions (an earlier prompt), `swap` writes a
seeded block of the swap donor's (another sequence, so its positions differ too). At the page scope
(default) K, V and every layer lose the same blocks; at the layer scope each layer draws its own.

Why one long module: the types, their severity map, the region and the seeded draws are one
definition (the family C of SPEC §4) that a reader checks against the spec in one place.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from cachemedicpp import config
from cachemedicpp.config import ConfigError
from cachemedicpp.seeding import torch_rng as rng

TYPES = config.CORRUPTION_TYPES + ("targeted",)
LAYER_MODES = ("all", "bernoulli", "targeted")
TIME_MODES = ("all_past", "old_only", "window")

# IEEE-754 storage formats: (float dtype, integer view, bits per word, mantissa bits, exponent bits)
FORMATS = {
    "float32": (torch.float32, torch.int32, 32, 23, 8),
    "float16": (torch.float16, torch.int16, 16, 10, 5),
    "bfloat16": (torch.bfloat16, torch.int16, 16, 7, 8),
}
BIT_CLASSES = ("sign", "exponent", "exponent_high", "mantissa", "all")
BLOCK_MODES = ("zero", "stale", "swap")
BLOCK_SCOPES = ("page", "layer")
BLOCK_DONOR_PROMPTS = {"stale": "block_stale_prompt", "swap": "block_swap_prompt"}


def _check_type(ctype: str) -> None:
    config.lookup("corruption type", ctype, TYPES)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@functools.lru_cache(maxsize=1)
def _param_defaults() -> dict:
    return config.section_defaults("corruption")["params"]


def _param(params: Mapping, key: str):
    """A corruption parameter, the schema default when a partial params mapping lacks it."""
    return params[key] if key in params else _param_defaults()[key]


def format_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def storage_format(params: Mapping, dtype: torch.dtype | str) -> tuple[str, bool]:
    """(bitflip storage format, simulated?) for a cache of `dtype`: simulated when the format is not the
    cache's own, so a hit word is cast to it, flipped and cast back."""
    cache = dtype if isinstance(dtype, str) else format_name(dtype)
    fmt = _param(params, "bitflip_format")
    fmt = cache if fmt == "auto" else fmt
    config.lookup("storage format", fmt, FORMATS, key="corruption.params.bitflip_format")
    return fmt, fmt != cache


def bit_positions(fmt: str, bits) -> tuple[int, ...]:
    """Bit indices (0 = least significant) a bit class or an explicit list names in a `fmt` word."""
    _, _, width, man, exp = config.lookup("storage format", fmt, FORMATS, key="corruption.params.bitflip_format")
    if isinstance(bits, str):
        cls = config.lookup("bit class", bits, BIT_CLASSES, key="corruption.params.bitflip_bits")
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


def check_params(params: Mapping, dtype: str = "float32") -> None:
    """The fault models' parameters (bad input -> ConfigError naming the key), for a cache of `dtype`."""
    fmt, _ = storage_format(params, dtype)
    bit_positions(fmt, _param(params, "bitflip_bits"))
    for key in ("bitflip_burst", "block_size"):
        if int(_param(params, key)) < 1:
            raise ConfigError(f"corruption.params.{key}: must be >= 1, got {_param(params, key)}")
    config.lookup("block fault mode", _param(params, "block_fault_mode"), BLOCK_MODES,
                  key="corruption.params.block_fault_mode")
    config.lookup("block fault scope", _param(params, "block_fault_scope"), BLOCK_SCOPES,
                  key="corruption.params.block_fault_scope")


def severity(ctype: str, eps: float, params: Mapping, eps_ref: float) -> dict:
    """The type's parameters at severity eps (see the module docstring). eps = 0 gives the identity."""
    _check_type(ctype)
    eps, eps_ref = float(eps), float(eps_ref)
    if eps < 0 or not math.isfinite(eps):
        raise ConfigError(f"corruption epsilon must be a finite number >= 0, got {eps}")
    if eps_ref <= 0:
        raise ConfigError(f"corruption.eps_ref must be > 0, got {eps_ref}")
    if ctype == "targeted":
        base = params["targeted_base"]
        if base not in config.CORRUPTION_TYPES:
            raise ConfigError(f"corruption.params.targeted_base: unknown type {base!r}; "
                              f"known: {list(config.CORRUPTION_TYPES)}")
        return {"base": base, **severity(base, eps, params, eps_ref)}
    s = eps / eps_ref
    if ctype == "gaussian":
        return {"sigma": eps}
    if ctype == "dropout_zero":
        return {"p": min(1.0, float(params["dropout_p"]) * s)}
    if ctype == "orthogonal_rotation":
        return {"power": s}
    if ctype == "bitflipish_sparse":
        return {"p": min(1.0, float(params["bitflip_p"]) * s), "jump": float(params["bitflip_eps_jump"])}
    if ctype == "bitflip":
        bits = _param(params, "bitflip_bits")
        return {"p": min(1.0, float(_param(params, "bitflip_rate")) * s), "format": _param(params, "bitflip_format"),
                "bits": bits if isinstance(bits, str) else [int(b) for b in bits],
                "burst": int(_param(params, "bitflip_burst"))}
    if ctype == "block_fault":
        return {"frac": min(1.0, float(_param(params, "block_fault_frac")) * s),
                "block_size": int(_param(params, "block_size")), "mode": _param(params, "block_fault_mode"),
                "scope": _param(params, "block_fault_scope")}
    if ctype == "quant_noise":
        if eps == 0:
            return {"bits": None}  # no quantization at all: the identity
        return {"bits": min(16, max(2, _round_half_up(int(params["quant_bits"]) - math.log2(s))))}
    w0, w1 = (int(x) for x in params["overwrite_window"])
    return {"start": w0, "block_len": max(0, _round_half_up((w1 - w0) * s))}


# --------------------------------------------------------------------------------------------------
# region and report


@dataclass(frozen=True)
class Region:
    layers: tuple[int, ...]
    heads: dict[int, Tensor]  # layer -> bool [H_kv]
    time: Tensor  # bool [T]

    def held(self, length: int | None = None) -> Tensor:
        """bool [length]: the time mask over the last `length` positions of the context (what a layer that
        holds only those keeps, e.g. a sliding-window layer); the whole context when None."""
        T = self.time.numel()
        if length is None:
            return self.time
        if int(length) > T:
            raise ValueError(f"region over {T} positions: a layer cannot hold {int(length)} of them")
        return self.time[T - int(length):]

    def mask(self, layer: int, length: int | None = None) -> Tensor:
        """bool [1, H_kv, length, 1] over the last `length` positions (default: all T); all False for a layer
        outside the region."""
        time = self.held(length)
        if layer not in self.layers:
            h = next(iter(self.heads.values())).numel() if self.heads else 1
            return torch.zeros(1, h, time.numel(), 1, dtype=torch.bool)
        return self.heads[layer].view(1, -1, 1, 1) & time.view(1, 1, -1, 1)

    def fraction(self, layer: int, length: int | None = None) -> float:
        """Fraction of the layer's context K/V entries (all T positions) the region covers and the layer
        holds (its last `length`, default all): positions a sliding-window layer no longer holds count as
        not exposed."""
        if layer not in self.layers or self.time.numel() == 0:
            return 0.0
        return float(self.heads[layer].float().mean() * self.held(length).float().sum() / self.time.numel())

    def evicted(self, layer: int, length: int | None = None) -> float:
        """Fraction of the layer's context K/V entries the region covers but the layer no longer holds (the
        positions before its last `length`; 0 when it holds them all)."""
        return self.fraction(layer) - self.fraction(layer, length)


@dataclass
class Report:
    ctype: str
    eps: float
    severity: dict
    per_layer: dict[int, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        layers = self.per_layer.values()
        n = max(1, len(self.per_layer))
        return {
            "type": self.ctype,
            "epsilon": self.eps,
            "severity": dict(self.severity),
            "dK": math.sqrt(sum(r["dK"] ** 2 for r in layers)),
            "dV": math.sqrt(sum(r["dV"] ** 2 for r in layers)),
            "frac_changed": sum(r["frac_changed"] for r in layers) / n,
            "exposure": sum(r["exposure"] for r in layers) / n,
            # region entries of positions a sliding-window layer no longer holds (over the whole context)
            "evicted": sum(r.get("evicted", 0.0) for r in layers) / n,
            "nonfinite": sum(r["nonfinite"] for r in layers) / n,  # fraction of entries a fault made Inf/NaN
            "per_layer": {str(layer): dict(r) for layer, r in sorted(self.per_layer.items())},
        }


# --------------------------------------------------------------------------------------------------
# the transforms: x is fp32 [B, H, T, d]; they return the corrupted tensor everywhere and the caller
# keeps the input outside the mask


def _draw(fn: Callable, x: Tensor, gen: torch.Generator) -> Tensor:
    # one draw for all batch rows (they are copies of one example); CPU first so devices agree
    return fn((1,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float32).to(x.device)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def _gaussian(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    return x + sev["sigma"] * _rms(x) * _draw(torch.randn, x, gen)


def _dropout_zero(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    drop = _draw(torch.rand, x, gen) < sev["p"]
    return torch.where(drop, torch.zeros_like(x), x)


def _bitflipish_sparse(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor) -> Tensor:
    selected = _draw(torch.rand, x, gen) < sev["p"]
    flip = _draw(torch.rand, x, gen) < 0.5
    sign = torch.where(_draw(torch.rand, x, gen) < 0.5, -1.0, 1.0)
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
    hit = _draw(torch.rand, x, gen) < sev["p"]
    which = (_draw(torch.rand, x, gen) * len(positions)).long().clamp_max(len(positions) - 1)
    flipped = flip_bits(x, fmt, positions[which.cpu()].to(x.device), sev["burst"])
    return torch.where(hit, flipped, x)


def _rotation(x: Tensor, sev: dict, gen: torch.Generator, mask: Tensor, rotation_seed: int) -> Tensor:
    return x @ rotation_power(x.shape[-1], float(sev["power"]), int(rotation_seed)).to(x.device)


_TRANSFORMS = {
    "gaussian": _gaussian,
    "dropout_zero": _dropout_zero,
    "bitflipish_sparse": _bitflipish_sparse,
    "quant_noise": _quant_noise,
}


def time_mask(T: int, mode: str, N_recent: int, window: Sequence[int]) -> Tensor:
    """bool [T]: the positions a time mode selects (all, all but the last N_recent, or [a, b))."""
    t = torch.arange(T)
    if mode == "all_past":
        return torch.ones(T, dtype=torch.bool)
    if mode == "old_only":
        return t < T - int(N_recent)
    if mode == "window":
        a, b = (int(x) for x in window)
        return (t >= a) & (t < b)
    raise ConfigError(f"corruption time_mode: unknown mode {mode!r}; known: {list(TIME_MODES)}")


# --------------------------------------------------------------------------------------------------
# the corruptor


class Corruptor:
    """Applies corruption family C for one run: fixed config, seed, protected layers and donor KV."""

    def __init__(self, corruption: Mapping, protect_layers: Sequence[int], num_kv_heads: int, seed: int,
                 donor_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
                 block_donor: dict[int, tuple[Tensor, Tensor]] | None = None):
        cfg = config.section_defaults("corruption", corruption)
        self.eps_ref = float(cfg["eps_ref"])
        self.persistence = cfg["persistence"]
        self.axes = dict(cfg["axes"])
        self.params = dict(cfg["params"])
        self.protect_layers = tuple(int(x) for x in protect_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.seed = int(seed)
        self.donor = donor_kv
        self.block_donor = block_donor  # block_fault stale / swap: block_donor_kv(lm, params, ...)
        mixture = cfg["mixture"]
        if isinstance(mixture, str):
            mixture = config.load_mixture(mixture)[0]
        self.mixture = config.normalise_weights(mixture)
        bad = [t for t in self.mixture if t not in config.CORRUPTION_TYPES]
        if bad:
            raise ConfigError(f"corruption.mixture: unknown type(s) {bad}; known: {list(config.CORRUPTION_TYPES)}")
        bad_heads = [h for h in self.axes["heads"] if not 0 <= int(h) < self.num_kv_heads]
        if bad_heads:
            raise ConfigError(f"corruption.axes.heads: {bad_heads} out of range for {self.num_kv_heads} KV heads")
        self._check_modes()
        severity("targeted", 0.0, self.params, self.eps_ref)  # validates targeted_base and eps_ref
        check_params(self.params)

    def with_params(self, **overrides) -> "Corruptor":
        """The same corruptor (seed, region, donors) with some parameters replaced, checked like the config's
        (e.g. one bit class for figure E's cells). Its draws are those of this corruptor for the same type and
        eps: a bitflip variant hits the very same elements, only the bit flipped differs."""
        other = copy.copy(self)
        other.params = {**self.params, **overrides}
        check_params(other.params)
        return other

    def _check_modes(self) -> None:
        for key, known in (("layer_mode", LAYER_MODES), ("head_mode", LAYER_MODES), ("time_mode", TIME_MODES)):
            config.lookup("mode", self.axes[key], known, key=f"corruption.axes.{key}")

    # ---- region

    def _layers(self, mode: str, ctype: str, eps: float, phase: str, example_id) -> list[int]:
        if mode == "targeted":
            layers = sorted({int(x) for x in self.axes["layers"]})
            if not layers:
                raise ConfigError(f"corruption type {ctype} with targeted layers needs corruption.axes.layers")
            return layers
        if not self.protect_layers:
            raise ConfigError("corruption: no layer to corrupt (repair.protect_layers is empty)")
        if mode == "all":
            return list(self.protect_layers)
        g = rng(self.seed, phase, example_id, ctype, eps, "region", 0, "layers")
        u = torch.rand(len(self.protect_layers), generator=g, dtype=torch.float64)
        kept = [layer for layer, x in zip(self.protect_layers, u.tolist()) if x < self.axes["p_layer"]]
        if not kept:  # never a silent no-op: keep one seeded layer
            kept = [self.protect_layers[int(torch.randint(len(self.protect_layers), (1,), generator=g))]]
        return kept

    def _heads(self, mode: str, layer: int, ctype: str, eps: float, phase: str, example_id) -> Tensor:
        h = self.num_kv_heads
        if mode == "all":
            return torch.ones(h, dtype=torch.bool)
        if mode == "targeted":
            if not self.axes["heads"]:
                raise ConfigError(f"corruption type {ctype} with targeted heads needs corruption.axes.heads")
            m = torch.zeros(h, dtype=torch.bool)
            m[[int(x) for x in self.axes["heads"]]] = True
            return m
        g = rng(self.seed, phase, example_id, ctype, eps, layer, 0, "heads")
        m = torch.rand(h, generator=g, dtype=torch.float64) < self.axes["p_head"]
        if not m.any():
            m[int(torch.randint(h, (1,), generator=g))] = True
        return m

    def time_mask(self, T: int, time_mode: str | None = None, N_recent: int | None = None,
                  window: Sequence[int] | None = None) -> Tensor:
        return time_mask(T, time_mode if time_mode is not None else self.axes["time_mode"],
                         N_recent if N_recent is not None else self.axes["N_recent"],
                         window if window is not None else self.axes["window"])

    def region(self, ctype: str, eps: float, T: int, phase: str, example_id, *, time_mode=None,
               N_recent=None, window=None) -> Region:
        _check_type(ctype)
        eps = float(eps)
        forced = ctype == "targeted"
        layer_mode = "targeted" if forced else self.axes["layer_mode"]
        head_mode = "targeted" if forced else self.axes["head_mode"]
        layers = self._layers(layer_mode, ctype, eps, phase, example_id)
        heads = {layer: self._heads(head_mode, layer, ctype, eps, phase, example_id) for layer in layers}
        return Region(tuple(layers), heads, self.time_mask(int(T), time_mode, N_recent, window))

    # ---- application

    def _donor(self, layer: int, tag: str, x: Tensor, T: int) -> Tensor:
        """The donor's K or V laid out like x ([1, H, L, d], x holding the last L of T positions; the donor's
        positions are absolute, zero past the donor's length)."""
        if self.donor is None:
            raise ValueError("contiguous_overwrite needs donor KV: build it with corruption.donor_kv(lm, "
                             "corruption.params.donor_prompt, ...) and pass donor_kv= to Corruptor")
        if layer not in self.donor:
            raise ValueError(f"contiguous_overwrite: no donor KV for layer {layer} (have {sorted(self.donor)})")
        d = self.donor[layer][0 if tag == "K" else 1]
        if d.shape[1] != x.shape[1] or d.shape[3] != x.shape[3]:
            raise ValueError(f"contiguous_overwrite layer {layer}: donor shape {tuple(d.shape)} does not "
                             f"match K/V shape {tuple(x.shape)}")
        n = min(d.shape[2], T)
        out = torch.zeros((d.shape[0], x.shape[1], T, x.shape[3]), dtype=x.dtype, device=x.device)
        out[:, :, :n] = d[:, :, :n].to(device=x.device, dtype=x.dtype)
        return out[:, :, T - x.shape[2]:]

    def _block(self, sev: dict, T: int, donor_len: int) -> Tensor:
        t = torch.arange(T)
        start = sev["start"]
        return (t >= start) & (t < start + sev["block_len"]) & (t < donor_len)

    def block_map(self, sev: dict, time: Tensor, layer: int, phase: str, example_id) -> tuple[Tensor, Tensor]:
        """(bool [T] positions of the blocks hit inside `time`, long [T] donor position each one reads).

        Candidates are the blocks meeting `time`; a seeded permutation (page scope: one for every layer)
        picks round(frac * candidates) of them, nested across eps. stale reads the donor at the same
        position, swap at the same offset of a seeded donor block."""
        T, bs = int(time.numel()), int(sev["block_size"])
        src = torch.arange(T)
        blocks = [j for j in range((T + bs - 1) // bs) if bool(time[j * bs:(j + 1) * bs].any())]
        n_hit = min(len(blocks), _round_half_up(float(sev["frac"]) * len(blocks)))
        hit = torch.zeros(T, dtype=torch.bool)
        if n_hit == 0:
            return hit, src
        key = "page" if sev["scope"] == "page" else int(layer)
        g = rng(self.seed, phase, example_id, "block_fault", "blocks", key)
        order = torch.randperm(len(blocks), generator=g).tolist()
        if sev["mode"] == "swap":
            n_donor = self._block_donor_len(layer) // bs
            if n_donor < 1:
                raise ValueError(f"block_fault swap: the swap donor holds fewer than {bs} positions")
            sources = torch.randint(n_donor, (len(blocks),), generator=g).tolist()
        for i in order[:n_hit]:
            j = blocks[i]
            hit[j * bs:(j + 1) * bs] = True
            if sev["mode"] == "swap":
                src[j * bs:(j + 1) * bs] = torch.arange(j * bs, min(T, (j + 1) * bs)) - j * bs + sources[i] * bs
        return hit & time, src

    def _block_donor_len(self, layer: int) -> int:
        if self.block_donor is None or layer not in self.block_donor:
            raise ValueError("block_fault stale/swap needs donor KV of every corrupted layer: build it with "
                             "corruption.block_donor_kv(lm, corruption.params, ...) and pass block_donor= to Corruptor")
        return int(self.block_donor[layer][0].shape[2])

    def _block_fault(self, layer: int, tag: str, x: Tensor, sev: dict, src: Tensor) -> Tensor:
        """What the hit blocks of x hold: zeros, or the donor's entries at `src` (one absolute donor position
        per position x holds; positions past the donor's length read zeros)."""
        if sev["mode"] == "zero":
            return torch.zeros_like(x)
        n = self._block_donor_len(layer)
        d = self.block_donor[layer][0 if tag == "K" else 1]
        if d.shape[1] != x.shape[1] or d.shape[3] != x.shape[3]:
            raise ValueError(f"block_fault layer {layer}: donor shape {tuple(d.shape)} does not match K/V shape "
                             f"{tuple(x.shape)}")
        padded = torch.cat([d, torch.zeros_like(d[:, :, :1])], dim=2).to(device=x.device, dtype=x.dtype)
        return padded[:, :, src.clamp_max(n).to(x.device)].expand(x.shape[0], -1, -1, -1)

    def apply(self, layer: int, k: Tensor, v: Tensor, ctype: str, eps: float, region: Region, phase: str,
              example_id, draw: int = 0) -> tuple[Tensor, Tensor]:
        """Corrupt one layer's K/V inside the region. Pure; returns the inputs themselves when nothing acts.

        The region spans the whole context (T positions); k and v may hold only its last L (a sliding-window
        layer): positions are absolute, and the layer's entries get what the same positions of a layer
        holding all T would get, save the random draws (drawn for the entries held)."""
        _check_type(ctype)
        eps = float(eps)
        sev = severity(ctype, eps, self.params, self.eps_ref)
        if eps == 0 or layer not in region.layers:
            return k, v
        T, L = int(region.time.numel()), int(k.shape[2])
        mask = region.mask(layer, L)
        base = sev.get("base", ctype)
        if base == "contiguous_overwrite":
            donor_len = min(self.donor[layer][0].shape[2], T) if self.donor and layer in self.donor else 0
            mask = mask & self._block(sev, T, donor_len)[T - L:].view(1, 1, -1, 1)
        if base == "block_fault":
            hit, src = self.block_map(sev, region.time, layer, phase, example_id)
            hit, src = hit[T - L:], src[T - L:]
            mask = mask & hit.view(1, 1, -1, 1)
        mask = mask.to(k.device)
        out = []
        for tag, x in (("K", k), ("V", v)):
            if base == "contiguous_overwrite":
                y = self._donor(layer, tag, x, T)
            elif base == "block_fault":
                y = self._block_fault(layer, tag, x, sev, src)
            elif base == "bitflip":  # on the stored words themselves, not an fp32 copy
                y = _bitflip(x, sev, rng(self.seed, phase, example_id, ctype, eps, layer, draw, tag))
            else:
                gen = rng(self.seed, phase, example_id, ctype, eps, layer, draw, tag)
                xf = x.float()
                if base == "orthogonal_rotation":
                    y = _rotation(xf, sev, gen, mask, self.params["rotation_seed"])
                else:
                    y = _TRANSFORMS[base](xf, sev, gen, mask)
                y = y.to(x.dtype)
            out.append(torch.where(mask, y, x))
        return out[0], out[1]

    def apply_cache(self, kv: dict[int, tuple[Tensor, Tensor]], ctype: str, eps: float, phase: str, example_id,
                    draw: int = 0, region: Region | None = None,
                    T: int | None = None) -> tuple[dict[int, tuple[Tensor, Tensor]], Report]:
        """Corrupt every layer of `kv` in the region; the report gives ‖ΔK‖_F, ‖ΔV‖_F per layer. Without a
        region, one is drawn over the context's `T` positions (default: the longest layer's; a sliding-window
        layer holds only its last ones). Each layer's exposure counts the positions it no longer holds as not
        exposed, and `evicted` the region's entries it no longer holds."""
        _check_type(ctype)
        eps = float(eps)
        report = Report(ctype, eps, severity(ctype, eps, self.params, self.eps_ref))
        if not kv:
            return {}, report
        if report.severity.get("base", ctype) == "bitflip":
            fmt, simulated = storage_format(self.params, next(iter(kv.values()))[0].dtype)
            report.severity.update(storage_format=fmt, storage_simulated=simulated)
        if region is None:
            T = int(T) if T is not None else max(int(k.shape[2]) for k, _ in kv.values())
            region = self.region(ctype, eps, T, phase, example_id)
        out = {}
        for layer, (k, v) in kv.items():
            k2, v2 = self.apply(layer, k, v, ctype, eps, region, phase, example_id, draw)
            out[layer] = (k2, v2)
            report.per_layer[layer] = _change(k, v, k2, v2, region.fraction(layer, k.shape[2]),
                                              region.evicted(layer, k.shape[2]))
        return out, report

    def on_read(self, ctype: str, eps: float, phase: str,
                example_id) -> Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(layer, k, v[, length]) -> (k, v) corrupting what attention reads, with the region of the current
        length T: `length` when given (the sequence's positions, of which k holds the last k.shape[2], as on a
        sliding-window layer), else k.shape[2].

        A key at position t is corrupted for every query once t < T - N_recent ("absolute" semantics);
        draws are seeded by T too, so each forward is deterministic.
        """
        _check_type(ctype)
        eps = float(eps)
        last: dict[int, Region] = {}

        def fn(layer: int, k: Tensor, v: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
            T = int(k.shape[2]) if length is None else int(length)
            if T not in last:
                last.clear()
                last[T] = self.region(ctype, eps, T, phase, example_id)
            return self.apply(layer, k, v, ctype, eps, last[T], phase, example_id, draw=T)

        return fn

    def sample(self, phase: str, step: int, eps_grid: Sequence[float],
               clean_prob: float) -> tuple[str | None, float]:
        """A training draw: (None, 0.0) for a clean step, else (type from the mixture, eps from the grid)."""
        g = rng(self.seed, phase, step, "sample")
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        grid = [float(e) for e in eps_grid if float(e) > 0]
        if u[0] < clean_prob or not grid:
            return None, 0.0
        types = [t for t, w in self.mixture.items() if w > 0]
        cum, total = [], 0.0
        for t in types:
            total += self.mixture[t]
            cum.append(total)
        x = u[1] * total
        ctype = next((t for t, c in zip(types, cum) if x < c), types[-1])
        return ctype, grid[min(int(u[2] * len(grid)), len(grid) - 1)]


def _finite_norm(a: Tensor, b: Tensor) -> float:
    # a bit flip may leave Inf/NaN: the norm covers the finite changes, `nonfinite` counts the others
    d = b.float() - a.float()
    return float(torch.where(torch.isfinite(d), d, torch.zeros_like(d)).norm())


def _change(k: Tensor, v: Tensor, k2: Tensor, v2: Tensor, exposure: float, evicted: float = 0.0) -> dict:
    if k2 is k and v2 is v:
        return {"dK": 0.0, "dV": 0.0, "frac_changed": 0.0, "exposure": exposure, "evicted": evicted,
                "nonfinite": 0.0}
    changed = (k2 != k).sum() + (v2 != v).sum()
    n = max(1, k.numel() + v.numel())
    nonfinite = (~torch.isfinite(k2) & torch.isfinite(k)).sum() + (~torch.isfinite(v2) & torch.isfinite(v)).sum()
    return {
        "dK": _finite_norm(k, k2),
        "dV": _finite_norm(v, v2),
        "frac_changed": float(changed) / n,
        "exposure": exposure,
        "evicted": evicted,
        "nonfinite": float(nonfinite) / n,
    }


# --------------------------------------------------------------------------------------------------
# donor KV for contiguous_overwrite


def block_donor_kv(lm, params: Mapping, min_len: int, layers) -> dict[int, tuple[Tensor, Tensor]] | None:
    """The donor of block_fault's mode (stale: block_stale_prompt, swap: block_swap_prompt; each its own
    prompt, distinct from contiguous_overwrite's); None for zero."""
    mode = _param(params, "block_fault_mode")
    if mode not in BLOCK_DONOR_PROMPTS:
        return None
    return donor_kv(lm, _param(params, BLOCK_DONOR_PROMPTS[mode]), min_len, layers)


def donor_kv(lm, prompt: str, min_len: int, layers) -> dict[int, tuple[Tensor, Tensor]]:
    """Clean KV of the donor prompt, its tokens repeated until at least `min_len` positions (batch 1), every
    position on every layer (also on sliding-window layers: what attention reads in the prefill)."""
    from cachemedicpp import hf

    ids = list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError("corruption.params.donor_prompt: tokenises to nothing")
    n = max(int(min_len), len(ids))
    ids = (ids * math.ceil(n / len(ids)))[:n]
    max_pos = lm.arch.max_positions
    if n > max_pos:
        raise ConfigError(f"donor KV: {n} positions exceed the model's {max_pos} positions")
    input_ids = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        return hf.prefill_kv(lm.model, input_ids, [int(layer) for layer in layers])
