"""The corruption types, registered by name: each type is one `CorruptionType` (its severity map, its
transform, the donor it reads, the parameters it checks), so a new type is one module that registers it.

A type's transform sees one layer of one corruption through a `Site` (the Corruptor, the layer, the
severity, the region's mask, the draw keys) and returns the corrupted K or V; the Corruptor keeps the
input wherever the site's mask is off, so a transform may compute its result everywhere.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from cachemedicpp.schema import ConfigError, lookup, section_defaults
from cachemedicpp.seeding import torch_rng as rng

# statistical: the default mixture's types and the leave-one-type-out splits' (configs/corruption/
# default_mix.yaml); fault: the fault models, mixed in by faults_mix.yaml after them, so the default
# mixture's results stay as they were; other: a type outside both shipped mixtures; wrapper: a type that
# applies another one (targeted)
FAMILIES = ("statistical", "fault", "other", "wrapper")


@dataclass(frozen=True)
class Site:
    """One layer of one corruption: what a type's transform and restriction read."""

    corruptor: Any  # the Corruptor: seed, params, donors
    layer: int
    ctype: str  # the type as named (a wrapper's name, not its base's): part of every draw's key
    eps: float
    sev: dict  # the type's parameters at eps (`severity`)
    region: Any  # the Region of this corruption (all layers, the whole context)
    T: int  # positions of the context the region spans (the layer holds its last mask.shape[2])
    phase: str
    example_id: Any
    draw: int
    mask: Tensor  # bool [1, H, L, 1]: where the corruption acts on this layer
    extra: dict = field(default_factory=dict)  # what a restriction computed for the transform

    def gen(self, tag: str):
        """The generator of this layer's draws for K or V (`tag`): rng(seed, phase, example, type, eps, layer,
        draw, tag)."""
        return rng(self.corruptor.seed, self.phase, self.example_id, self.ctype, self.eps, self.layer, self.draw, tag)


@dataclass(frozen=True)
class CorruptionType:
    """One corruption type. Only `wrapper` types (with `base`) leave severity and transform unset: they
    apply their base type's, named by the params."""

    name: str
    family: str  # one of FAMILIES
    # (eps, s = eps / eps_ref, params) -> the type's parameters at eps; must be the identity at eps = 0
    severity: Callable[[float, float, Mapping], dict] | None = None
    # (site, "K" | "V", x) -> the corrupted x in x's dtype (kept only where site.mask holds)
    transform: Callable[[Site, str, Tensor], Tensor] | None = None
    # site -> the site narrowed before K and V are corrupted (a smaller mask, `extra` for the transform)
    restrict: Callable[[Site], Site] | None = None
    # params -> (Corruptor keyword, donor prompt) of the clean KV the transform reads, or None
    donor: Callable[[Mapping], tuple[str, str] | None] | None = None
    # (params, cache dtype name) -> None, or ConfigError naming the bad key
    check: Callable[[Mapping, str], None] | None = None
    # (params, cache dtype) -> entries the report's severity adds (e.g. the storage format a bit flips in)
    describe: Callable[[Mapping, Any], dict] | None = None
    # wrapper: the corruption.params key naming the type it applies
    base: str | None = None
    # layer and head masks forced to corruption.axes.layers / axes.heads
    targeted: bool = False


_REGISTRY: dict[str, CorruptionType] = {}


def register_corruption(kind: CorruptionType) -> CorruptionType:
    """Add a type to the registry (a second type of the same name is a programming error)."""
    lookup("corruption family", kind.family, FAMILIES, key=f"corruption type {kind.name}")
    if kind.name in _REGISTRY:
        raise ValueError(f"corruption type {kind.name!r} is registered twice")
    if (kind.base is None) != (kind.family != "wrapper"):
        raise ValueError(f"corruption type {kind.name!r}: a wrapper names its base (and only a wrapper does)")
    if kind.base is None and (kind.severity is None or kind.transform is None):
        raise ValueError(f"corruption type {kind.name!r}: needs a severity and a transform (or a base)")
    _REGISTRY[kind.name] = kind
    return kind


def unregister_corruption(name: str) -> None:
    """Remove a type (a plug-in's tests register and remove theirs)."""
    _REGISTRY.pop(name, None)


def get(name: str, key: str = "") -> CorruptionType:
    """The registered type of `name`; an unknown name is bad input listing the known ones."""
    return lookup("corruption type", name, _REGISTRY, key=key)


def names(*families: str) -> tuple[str, ...]:
    """Registered type names in registration order, of the given families (default: all)."""
    return tuple(n for n, k in _REGISTRY.items() if not families or k.family in families)


def corruption_types() -> tuple[str, ...]:
    """The types a mixture, an eval grid or a wrapper may name: every registered type but the wrappers."""
    return tuple(n for n, k in _REGISTRY.items() if k.family != "wrapper")


def applied(name: str, params: Mapping) -> CorruptionType:
    """The type whose severity and transform act for `name`: a wrapper's base, else the type itself."""
    kind = get(name)
    if kind.base is None:
        return kind
    base, known = param(params, kind.base), corruption_types()
    if base not in known:
        raise ConfigError(f"corruption.params.{kind.base}: unknown type {base!r}; known: {list(known)}")
    return _REGISTRY[base]


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@functools.lru_cache(maxsize=1)
def _param_defaults() -> dict:
    return section_defaults("corruption")["params"]


def param(params: Mapping, key: str):
    """A corruption parameter, the schema default when a partial params mapping lacks it."""
    return params[key] if key in params else _param_defaults()[key]


def severity(ctype: str, eps: float, params: Mapping, eps_ref: float) -> dict:
    """The type's parameters at severity eps (see the package docstring). eps = 0 gives the identity; a
    wrapper's are its base's, with the base named."""
    kind = get(ctype)
    eps, eps_ref = float(eps), float(eps_ref)
    if eps < 0 or not math.isfinite(eps):
        raise ConfigError(f"corruption epsilon must be a finite number >= 0, got {eps}")
    if eps_ref <= 0:
        raise ConfigError(f"corruption.eps_ref must be > 0, got {eps_ref}")
    if kind.base is not None:
        base = applied(ctype, params)
        return {"base": base.name, **severity(base.name, eps, params, eps_ref)}
    return kind.severity(eps, eps / eps_ref, params)


def check_params(params: Mapping, dtype: str = "float32") -> None:
    """Every registered type's parameters (bad input -> ConfigError naming the key), for a cache of `dtype`."""
    for kind in _REGISTRY.values():
        if kind.check is not None:
            kind.check(params, dtype)


def draw(fn: Callable, x: Tensor, gen) -> Tensor:
    """One draw of `fn` (torch.rand, torch.randn) for all batch rows of x (they are copies of one example);
    drawn on the CPU first so that devices agree."""
    return fn((1,) + tuple(x.shape[1:]), generator=gen, dtype=torch.float32).to(x.device)


def float_transform(fn: Callable[[Tensor, dict, Any, Tensor], Tensor]) -> Callable[[Site, str, Tensor], Tensor]:
    """A transform computing fn(x in fp32, severity, the tag's generator, mask) and casting back to x's dtype:
    the shape of every type that edits values rather than stored words or positions."""

    def transform(site: Site, tag: str, x: Tensor) -> Tensor:
        return fn(x.float(), site.sev, site.gen(tag), site.mask).to(x.dtype)

    return transform
