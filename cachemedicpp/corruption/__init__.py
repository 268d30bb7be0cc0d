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
    kv_quant             asymmetric min-max quantize/dequantize bits = clip(round(8 - 2 log2 s), 2, 8)
                         keys per channel over kv_quant_group
                         positions, values per token over
                         kv_quant_group channels (KIVI)

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

Layout: `registry` (what a type is, severity, lookup by name), `types/` (one module per type or tight
family: the table above, row by row), `region` (the masks), `corruptor` (region draws, application, report),
`donors` (the donor KV the types in play read), `mixture` (training weights over the types). A new type is
one module that calls `register_corruption`; nothing here lists the types by name.
"""

from cachemedicpp.corruption import types  # noqa: F401  registers the shipped types, in the registry's order
from cachemedicpp.corruption.corruptor import Corruptor, Report
from cachemedicpp.corruption.donors import donor_kv, donors
from cachemedicpp.corruption.mixture import load_mixture, normalise_weights
from cachemedicpp.corruption.region import LAYER_MODES, TIME_MODES, Region, time_mask
from cachemedicpp.corruption.registry import (FAMILIES, CorruptionType, Site, applied, check_params, corruption_types,
                                              draw, float_transform, get, names, param, register_corruption,
                                              round_half_up, severity, unregister_corruption)
from cachemedicpp.corruption.types.bitflip import (BIT_CLASSES, FORMATS, bit_positions, flip_bits, format_name,
                                                   storage_format)
from cachemedicpp.corruption.types.block_fault import BLOCK_DONOR_PROMPTS, BLOCK_MODES, BLOCK_SCOPES, block_map
from cachemedicpp.corruption.types.statistical import rotation_power
from cachemedicpp.seeding import torch_rng as rng

__all__ = ["BIT_CLASSES", "BLOCK_DONOR_PROMPTS", "BLOCK_MODES", "BLOCK_SCOPES", "FAMILIES", "FORMATS", "LAYER_MODES",
           "TIME_MODES", "CorruptionType", "Corruptor", "Region", "Report", "Site", "applied", "bit_positions",
           "block_map", "check_params", "corruption_types", "donor_kv", "donors", "draw", "flip_bits",
           "float_transform", "format_name", "get", "load_mixture", "names", "normalise_weights", "param",
           "register_corruption", "rng", "rotation_power", "round_half_up", "severity", "storage_format",
           "time_mask", "unregister_corruption"]


def __getattr__(name: str):
    """The registry's name lists, current when read (a type registered later is in them):
    TYPES every type, CORRUPTION_TYPES every type but the wrappers, STATISTICAL_TYPES the default mixture's,
    FAULT_TYPES the fault models'."""
    if name == "TYPES":
        return names()
    if name == "CORRUPTION_TYPES":
        return corruption_types()
    if name == "STATISTICAL_TYPES":
        return names("statistical")
    if name == "FAULT_TYPES":
        return names("fault")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
