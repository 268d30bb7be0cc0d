"""Calibrated baselines: the fault-tolerance literature's range restriction and outlier filtering,
calibrated on clean caches of training text (`calibration.py`). They see no corruption mask, so they act on
every cached entry of every protected layer, corrupted or not."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import PROTECTED, Defended, Defense, LayerInput, Needs, register_defense
from cachemedicpp.palette import BROWN, SKY


class _Calibrated(Defense):
    group = results.GROUP_CALIBRATED
    needs = Needs(calibration=True)
    acts_on = PROTECTED
    candidate = True


@register_defense
@dataclass
class RangeClamp(_Calibrated):
    """Clamp every entry to its calibrated per-channel bounds (rotary-pair norms for post-RoPE keys)."""

    name = "range_clamp"
    style = (SKY, "^")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(*inp.cal.clamp(inp.layer, k, v, inp.positions))


@register_defense
@dataclass
class NormOutlierDrop(_Calibrated):
    """Drop (through the attention mask) the entries whose key or value norm leaves the calibrated band."""

    name = "norm_outlier_drop"
    style = (BROWN, "d")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        return Defended(k, v, drop=inp.cal.outliers(inp.layer, k, v, inp.positions))
