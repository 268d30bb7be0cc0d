"""Where a corruption acts: the layers, KV heads and positions of one draw (`Region`), and the time masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from cachemedicpp.schema import ConfigError

LAYER_MODES = ("all", "bernoulli", "targeted")
TIME_MODES = ("all_past", "old_only", "window")


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
