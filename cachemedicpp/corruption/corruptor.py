"""The Corruptor: corruption family C applied for one run (config, seed, protected layers, donor KV), and
the report of what one application changed.

It owns what every type shares: the region (seeded layer and head draws, the time mask), the severity
checks, the keep-outside-the-mask rule and the report; the registered type supplies its severity, its
transform and, where it needs one, its restriction of the mask and its donor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from cachemedicpp.corruption import registry
from cachemedicpp.corruption.mixture import check_types, load_mixture, normalise_weights
from cachemedicpp.corruption.region import LAYER_MODES, TIME_MODES, Region, time_mask
from cachemedicpp.corruption.registry import Site, check_params, severity
from cachemedicpp.schema import ConfigError, lookup, section_defaults
from cachemedicpp.seeding import torch_rng as rng


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


class Corruptor:
    """Applies corruption family C for one run: fixed config, seed, protected layers and donor KV."""

    def __init__(self, corruption: Mapping, protect_layers: Sequence[int], num_kv_heads: int, seed: int,
                 donor_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
                 block_donor: dict[int, tuple[Tensor, Tensor]] | None = None, **donors):
        cfg = section_defaults("corruption", corruption)
        self.eps_ref = float(cfg["eps_ref"])
        self.persistence = cfg["persistence"]
        self.axes = dict(cfg["axes"])
        self.params = dict(cfg["params"])
        self.protect_layers = tuple(int(x) for x in protect_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.seed = int(seed)
        # the clean KV a type writes in, by the keyword its type names (corruption.donors builds them all)
        self.donors = {"donor_kv": donor_kv, "block_donor": block_donor, **donors}
        mixture = cfg["mixture"]
        if isinstance(mixture, str):
            mixture = load_mixture(mixture)[0]
        self.mixture = normalise_weights(mixture)
        check_types(self.mixture)
        bad_heads = [h for h in self.axes["heads"] if not 0 <= int(h) < self.num_kv_heads]
        if bad_heads:
            raise ConfigError(f"corruption.axes.heads: {bad_heads} out of range for {self.num_kv_heads} KV heads")
        self._check_modes()
        severity("targeted", 0.0, self.params, self.eps_ref)  # validates targeted_base and eps_ref
        check_params(self.params)

    @property
    def donor(self) -> dict[int, tuple[Tensor, Tensor]] | None:
        """contiguous_overwrite's donor KV."""
        return self.donors.get("donor_kv")

    @donor.setter
    def donor(self, kv: dict[int, tuple[Tensor, Tensor]] | None) -> None:
        self.donors["donor_kv"] = kv

    @property
    def block_donor(self) -> dict[int, tuple[Tensor, Tensor]] | None:
        """block_fault's donor KV (the stale or the swap prompt's, by mode)."""
        return self.donors.get("block_donor")

    def with_params(self, **overrides) -> "Corruptor":
        """The same corruptor (seed, region, donors) with some parameters replaced, checked like the config's
        (e.g. one bit class for figure E's cells). Its draws are those of this corruptor for the same type and
        eps: a bitflip variant hits the very same elements, only the bit flipped differs."""
        other = copy.copy(self)
        other.params = {**self.params, **overrides}
        other.donors = dict(self.donors)
        check_params(other.params)
        return other

    def _check_modes(self) -> None:
        for key, known in (("layer_mode", LAYER_MODES), ("head_mode", LAYER_MODES), ("time_mode", TIME_MODES)):
            lookup("mode", self.axes[key], known, key=f"corruption.axes.{key}")

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
        forced = registry.get(ctype).targeted
        eps = float(eps)
        layer_mode = "targeted" if forced else self.axes["layer_mode"]
        head_mode = "targeted" if forced else self.axes["head_mode"]
        layers = self._layers(layer_mode, ctype, eps, phase, example_id)
        heads = {layer: self._heads(head_mode, layer, ctype, eps, phase, example_id) for layer in layers}
        return Region(tuple(layers), heads, self.time_mask(int(T), time_mode, N_recent, window))

    # ---- application

    def apply(self, layer: int, k: Tensor, v: Tensor, ctype: str, eps: float, region: Region, phase: str,
              example_id, draw: int = 0) -> tuple[Tensor, Tensor]:
        """Corrupt one layer's K/V inside the region. Pure; returns the inputs themselves when nothing acts.

        The region spans the whole context (T positions); k and v may hold only its last L (a sliding-window
        layer): positions are absolute, and the layer's entries get what the same positions of a layer
        holding all T would get, save the random draws (drawn for the entries held)."""
        eps = float(eps)
        sev = severity(ctype, eps, self.params, self.eps_ref)
        if eps == 0 or layer not in region.layers:
            return k, v
        kind = registry.applied(ctype, self.params)
        T, L = int(region.time.numel()), int(k.shape[2])
        site = Site(self, layer, ctype, eps, sev, region, T, phase, example_id, draw, region.mask(layer, L))
        if kind.restrict is not None:
            site = kind.restrict(site)
        site = replace(site, mask=site.mask.to(k.device))
        return tuple(torch.where(site.mask, kind.transform(site, tag, x), x) for tag, x in (("K", k), ("V", v)))

    def apply_cache(self, kv: dict[int, tuple[Tensor, Tensor]], ctype: str, eps: float, phase: str, example_id,
                    draw: int = 0, region: Region | None = None,
                    T: int | None = None) -> tuple[dict[int, tuple[Tensor, Tensor]], Report]:
        """Corrupt every layer of `kv` in the region; the report gives ‖ΔK‖_F, ‖ΔV‖_F per layer. Without a
        region, one is drawn over the context's `T` positions (default: the longest layer's; a sliding-window
        layer holds only its last ones). Each layer's exposure counts the positions it no longer holds as not
        exposed, and `evicted` the region's entries it no longer holds."""
        eps = float(eps)
        report = Report(ctype, eps, severity(ctype, eps, self.params, self.eps_ref))
        if not kv:
            return {}, report
        kind = registry.applied(ctype, self.params)
        if kind.describe is not None:
            report.severity.update(kind.describe(self.params, next(iter(kv.values()))[0].dtype))
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
        registry.get(ctype)
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


