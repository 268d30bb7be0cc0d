"""The reference's four heuristics, kept for comparison: reset_clear, smoothing, masking_dropout,
clipping_renorm. They act on the region the corruption's masks select (`Needs.region`), an oracle advantage
the learned operator does not get (`ORACLE_NOTE`); entries outside the region come back bit-identical, and
clean inputs are acted on too (a clean cell gets the same treatment, so a clean cost shows). The arithmetic
is fp32, cast back to the input dtype."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import Defended, Defense, LayerInput, Needs, baseline_param, register_defense
from cachemedicpp.palette import GREEN, ORANGE, PURPLE, VERMILLION

DEFAULT_DROPOUT_SEED = 0


def _write(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.to(x.device), y.to(x.dtype), x)


class _Reference(Defense):
    """A reference heuristic: `transform` maps each of K and V inside the region mask."""

    group = results.GROUP_REFERENCE
    needs = Needs(region=True)
    candidate = True

    def transform(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        # a mask over more positions than the layer holds (a sliding-window layer keeps the last k.shape[2] of
        # the context) is cut to its last k.shape[2]
        mask = inp.region
        if mask.shape[2] > k.shape[2]:
            mask = mask[:, :, mask.shape[2] - k.shape[2]:]
        return Defended(*(_write(x, self.transform(x, inp.gen), mask) for x in (k, v)))


@register_defense
@dataclass
class ResetClear(_Reference):
    name = "reset_clear"
    style = (VERMILLION, "v")

    def transform(self, x, gen):
        return torch.zeros_like(x)


def ema_weights(T: int, beta: float, device=None) -> Tensor:
    """[T, T] lower-triangular W with (W x)_t = y_t for y_0 = x_0, y_t = beta·y_{t-1} + (1 - beta)·x_t."""
    t = torch.arange(T, dtype=torch.float64)
    lag = (t.view(-1, 1) - t.view(1, -1)).clamp_min(0)
    w = torch.pow(torch.tensor(float(beta), dtype=torch.float64), lag) * (1.0 - beta)
    w = torch.tril(w)
    if T:
        w[:, 0] = torch.pow(torch.tensor(float(beta), dtype=torch.float64), t)  # y_0 = x_0 carries beta^t
    return w.to(device=device, dtype=torch.float32)


@register_defense
@dataclass
class Smoothing(_Reference):
    """An exponential moving average along time (vectorised)."""

    name = "smoothing"
    style = (ORANGE, "s")
    smoothing_beta: float = baseline_param("smoothing_beta")

    def transform(self, x, gen):
        w = ema_weights(x.shape[2], float(self.smoothing_beta), x.device)
        return torch.einsum("ts,bhsd->bhtd", w, x.float())


@register_defense
@dataclass
class MaskingDropout(_Reference):
    """Zero each element with probability dropout_p (seeded; K draws before V)."""

    name = "masking_dropout"
    style = (GREEN, "P")
    needs = Needs(region=True, generator=True)
    dropout_p: float = baseline_param("dropout_p")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        if inp.gen is None:  # one generator for K then V: the draws of an uninterrupted call
            inp = dataclasses.replace(inp, gen=torch.Generator(device="cpu").manual_seed(DEFAULT_DROPOUT_SEED))
        return super().apply(k, v, inp)

    def transform(self, x, gen):
        drop = torch.rand(tuple(x.shape), generator=gen, dtype=torch.float32).to(x.device) < float(self.dropout_p)
        return torch.where(drop, torch.zeros_like(x), x)


@register_defense
@dataclass
class ClippingRenorm(_Reference):
    """Clamp to ±clip_val, then rescale each vector to RMS target_rms (an all-zero vector stays zero)."""

    name = "clipping_renorm"
    style = (PURPLE, "X")
    clip_val: float = baseline_param("clip_val")
    target_rms: float = baseline_param("target_rms")

    def transform(self, x, gen):
        c = x.float().clamp(-float(self.clip_val), float(self.clip_val))
        rms = c.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return c * (float(self.target_rms) / rms.clamp_min(1e-12))
