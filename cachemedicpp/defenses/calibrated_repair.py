"""Calibrated repairs: restore cached entries from the model of clean caches (`calibration.py`, `prior.py`).

Like the calibrated baselines they see no corruption mask, no ε and no recomputation, so they treat every
protected layer, corrupted or not; unlike them they estimate what the entry was rather than only bounding
or hiding it. The sinks (the first `baseline.calibration.sink_tokens` positions) are never touched.

    impute             exact zeros and non-finite elements -> their conditional mean given the rest of the
                       vector under the clean Gaussian (assumes a clean float cache holds no exact zeros)
    prerope_clamp      every element pulled into its calibrated per-channel range, keys before RoPE (a sign
                       flip of an outlier channel lands far outside it; the rotary-pair norm cannot see it)
    denoise            Wiener shrinkage in the clean covariance's eigenbasis, with the white-noise variance
                       estimated per block of positions from the block's own excess energy (assumes noise
                       independent of the entry and white in the head dimension)
    calibrated_repair  each of the three only where the cache itself shows its fault beyond a level set on
                       held-in clean caches; entries none of them flags are left bit-identical

The three ingredients act wherever they see anything (any zero, any element out of range, any excess
energy) and are evaluated as ablations; only `calibrated_repair` is a candidate for the best baseline (its
gates make it the one meant to be run on every cache).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import (PROTECTED, Defended, Defense, LayerInput, Needs, baseline_param,
                                        register_defense)
from cachemedicpp.palette import BROWN, GREEN, SKY, VERMILLION


class _CalibratedRepair(Defense):
    group = results.GROUP_CALIBRATED_REPAIR
    needs = Needs(calibration=True)
    acts_on = PROTECTED


@register_defense
@dataclass
class Impute(_CalibratedRepair):
    """Lost elements (exact zeros, non-finite) replaced by their conditional mean under the clean Gaussian."""

    name = "impute"
    style = (GREEN, "<")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(*inp.cal.impute(inp.layer, k, v, inp.positions))


@register_defense
@dataclass
class PreRopeClamp(_CalibratedRepair):
    """Every element clamped to its calibrated per-channel quantiles, keys before RoPE, then rotated back."""

    name = "prerope_clamp"
    style = (SKY, "v")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(*inp.cal.prerope_clamp(inp.layer, k, v, inp.positions))


@register_defense
@dataclass
class Denoise(_CalibratedRepair):
    """Wiener shrinkage of every block of positions whose energy shows white noise over the clean model."""

    name = "denoise"
    style = (VERMILLION, ">")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(*inp.cal.denoise(inp.layer, k, v, inp.positions))


@register_defense
@dataclass
class CalibratedRepair(_CalibratedRepair):
    """Per (layer, KV head, position), the repair the cache shows a fault for: lost elements imputed, elements
    beyond their calibrated range by more than `range_margin` times the farthest a held-in clean element lay
    clamped, blocks whose noise estimate exceeds `noise_margin` times the largest a held-in clean block showed
    denoised. The levels come from clean training-corpus caches the statistics were not gathered on; the
    margins' defaults from a rule on further clean training-corpus caches (schemas/config.schema.json)."""

    name = "calibrated_repair"
    style = (BROWN, "*")
    candidate = True
    range_margin: float = baseline_param("repair_range_margin")
    noise_margin: float = baseline_param("repair_noise_margin")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(*inp.cal.repair(inp.layer, k, v, inp.positions, float(self.range_margin),
                                        float(self.noise_margin)))
