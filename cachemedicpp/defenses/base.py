"""What a defense is, and the registry that names them.

A defense is a small dataclass registered with `@register_defense`. Its class says who it is and what it
needs; its fields are its hyper-parameters (`baseline_param` gives each the schema's default, written once
in `schemas/config.schema.json`); `apply` defends one layer's K/V `[B, H_kv, T, d]` and returns a
`Defended` (the new K/V, the entries attention must ignore, and what it recomputed). The grid, stability,
the lm-eval backend and bench build defenses with `make(name, cfg.baseline)` and hand each one only what
its `needs` declare, in a `LayerInput`.

Where a defense acts (`acts_on`): nowhere (no_defense; the learned operator, which acts inside attention
instead), on the layers the corruption touched (`CORRUPTED`: what a defense that reads the corruption's region
or the clean cache can act on), or on every protected layer, corrupted or not (`PROTECTED`: a defense that
sees no mask must treat every cache it reads, clean or not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from cachemedicpp import config
from cachemedicpp.config import lookup
from cachemedicpp.palette import SPARE_STYLES

ORACLE_NOTE = "heuristics act on the region the corruption's masks select (an oracle advantage)"

NOWHERE, CORRUPTED, PROTECTED = "nowhere", "corrupted", "protected"


@dataclass(frozen=True)
class Needs:
    """What a defense reads besides the K/V it defends (the grid provides exactly these)."""

    region: bool = False  # the corruption's region mask (an oracle advantage: the reference heuristics)
    calibration: bool = False  # statistics of clean training-text caches (calibration.Calibration)
    clean: bool = False  # the clean K/V of the same entries (a ceiling; checksums recorded when it was written)
    recompute: bool = False  # the context's entries recomputed from its tokens (recompute.py)
    operator: bool = False  # the run's learned repair operator (trained checkpoint)
    generator: bool = False  # its own seeded randomness, paired across the cells of an example


@dataclass
class CacheInput:
    """The whole cache a defense is defending (one example's context in one grid cell)."""

    length: int  # positions of the context
    stored: Callable[[int], tuple[Tensor, Tensor]]  # layer -> its K/V as stored (corrupted where hit)
    memo: dict = field(default_factory=dict)  # what a defense decides once per cache (e.g. an alarm)
    layers: tuple[int, ...] = ()  # the layers the defense acts on in this cache (a decision over all of them)
    clean: Callable[[int], tuple[Tensor, Tensor]] | None = None  # layer -> its clean K/V (needs.clean)
    tokens: Tensor | None = None  # the context's token ids (tags that bind a block to its sequence)


@dataclass
class LayerInput:
    """One layer's context for `Defense.apply`; the fields a defense does not need may be None."""

    layer: int
    positions: Tensor  # absolute positions of the entries held (a sliding-window layer holds its last ones)
    region: Tensor | None = None  # bool [1, H_kv, T_held, 1]: the corruption's region (needs.region)
    gen: torch.Generator | None = None  # needs.generator
    cal: Any = None  # calibration.Calibration (needs.calibration)
    clean: tuple[Tensor, Tensor] | None = None  # the clean K/V of the held entries (needs.clean)
    # (blocks, block_size) -> the layer's K/V with the entries of those blocks (positions [j·b, (j+1)·b), decided
    # once for every layer of the cache: their prefix must be clean) recomputed; blocks None: the whole context's
    # recomputation (needs.recompute)
    fresh: Callable[[tuple[int, ...] | None, int], tuple[Tensor, Tensor]] | None = None
    op: Any = None  # the learned operator (needs.operator)
    cache: CacheInput | None = None  # the whole cache (defenses that decide over every layer at once)


@dataclass(frozen=True)
class Cost:
    """What a defense recomputed in one layer: the ids of the blocks (a cache's count is the size of the
    union over its layers, so a block decided once for every layer counts once)."""

    blocks: frozenset = frozenset()


@dataclass
class Defended:
    k: Tensor
    v: Tensor
    drop: Tensor | None = None  # bool [B, H_kv, T_held]: entries attention ignores (through the mask)
    cost: Cost | None = None  # recomputing defenses: what they recomputed


class Defense:
    """The base of every defense (subclass it as a dataclass and register it)."""

    name: ClassVar[str]
    group: ClassVar[str]  # results.GROUP_*: how tables and figures group it
    style: ClassVar[tuple[str, str]] = ()  # (colour, marker) in the figures (empty: a stable spare style)
    needs: ClassVar[Needs] = Needs()
    acts_on: ClassVar[str] = CORRUPTED
    candidate: ClassVar[bool] = False  # may be chosen as the best baseline (never a ceiling or a learned one)
    in_attention: ClassVar[bool] = False  # runs inside attention as the learned operator (its rows are apart)
    at_rest_only: ClassVar[bool] = False  # defined for at-rest persistence only
    cost_key: ClassVar[str | None] = None  # recomputing defenses: the metrics key of their cost table
    cost_how: ClassVar[str] = ""  # how that cost is counted (the table's "how")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(k, v)

    def check(self, cfg, op) -> None:
        """Bad input before any work (ConfigError), e.g. an operator that cannot serve this defense."""

    def setup(self, cfg, lm, op) -> list[str]:
        """State the defense sets once per evaluation from training data (e.g. an alarm level); notes."""
        return []

    def cost_settings(self) -> dict:
        """Extra keys of the cost table (e.g. the alarm level)."""
        return {}


@functools.lru_cache(maxsize=1)
def _baseline_defaults() -> dict:
    return config.section_defaults("baseline")


def baseline_param(key: str):
    """A hyper-parameter field read from `baseline.<key>`, defaulting to the schema's default."""
    return field(default=_baseline_defaults()[key], metadata={"baseline": key})


_REGISTRY: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defense to the registry under `cls.name` (registry order breaks ties of the
    best-baseline rule). A name taken by another class is an error; `unregister_defense` frees it."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__}: a defense needs a class attribute `name`")
    if not getattr(cls, "group", None):
        raise ValueError(f"defense {name}: a class attribute `group` is needed (results.GROUP_*)")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"defense {name!r} is registered already ({old.__module__}.{old.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def unregister_defense(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> type[Defense]:
    """The class of a registered defense (unknown -> bad input listing the known ones)."""
    return lookup("defense", name, _REGISTRY)


def check_name(name: str) -> str:
    get(name)
    return name


def make(name: str, baseline: Mapping | None = None) -> Defense:
    """An instance of defense `name` with its hyper-parameters from the `baseline` config section (the
    schema's defaults for keys it lacks)."""
    cls = get(name)
    baseline = dict(baseline or {})
    params = {f.name: baseline[f.metadata["baseline"]] for f in (fields(cls) if is_dataclass(cls) else ())
              if f.metadata.get("baseline") in baseline}
    return cls(**params)


def names() -> list[str]:
    return list(_REGISTRY)


def candidates() -> list[str]:
    """The defenses the best-baseline rule may choose, in registry order."""
    return [n for n, c in _REGISTRY.items() if c.candidate]


def group(name: str) -> str:
    return get(name).group


def style(name: str) -> tuple[str, str]:
    """(colour, marker) of a defense; an unregistered or style-less one still gets the same style on every run
    (a stable hash of its name), so figures of a run whose plug-in is not loaded still draw."""
    cls = _REGISTRY.get(name)
    if cls is not None and cls.style:
        return cls.style
    return SPARE_STYLES[sum(map(ord, name)) % len(SPARE_STYLES)]


def required(defense_names: Sequence[str], need: str) -> bool:
    """Whether any of the defenses `defense_names` has `need` (a field of Needs) set."""
    return any(getattr(get(n).needs, need) for n in defense_names)


def fit_drop(drop: Tensor, k_len: int) -> Tensor:
    """An at-rest drop mask fitted to the keys a later forward reads: entries appended since are kept
    (False), and a sliding layer that moved on keeps only its last `k_len`."""
    if drop.shape[-1] < k_len:
        drop = torch.cat([drop, drop.new_zeros(*drop.shape[:-1], k_len - drop.shape[-1])], dim=-1)
    return drop[..., drop.shape[-1] - k_len:]


def changed_entries(k0: Tensor, v0: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """bool [B, H, T]: the entries whose key or value differs from the clean cache's (NaN counts as changed)."""
    return (k != k0.to(k.device)).any(-1) | (v != v0.to(v.device)).any(-1)


def replace_rows(k: Tensor, v: Tensor, bad: Tensor, fresh: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """k, v [B, H, T, d] with the positions `bad` (bool [B, T]) read from `fresh()` ([1, H, T, d] like k)."""
    m = bad[:, None, :, None]
    fk, fv = fresh()
    return (torch.where(m.to(k.device), fk.to(device=k.device, dtype=k.dtype), k),
            torch.where(m.to(v.device), fv.to(device=v.device, dtype=v.dtype), v))


__all__ = ["ORACLE_NOTE", "NOWHERE", "CORRUPTED", "PROTECTED", "Needs", "CacheInput", "LayerInput", "Cost",
           "Defended", "Defense", "baseline_param", "register_defense", "unregister_defense", "get", "check_name",
           "make", "names", "candidates", "group", "style", "required", "fit_drop", "changed_entries",
           "replace_rows"]
