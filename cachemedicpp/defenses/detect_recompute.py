"""detect_recompute, for caches that carry no checksums (offloaded, transferred, written by another system):
the detector of a trained operator that has one (family D) is the alarm. A block of positions holding at
least `alarm` gated entries (every protected layer and KV head pooled) raises it, and its entries are replaced by recomputed ones in every protected layer; what raises no
alarm stays as stored. At rest only.

Recomputation (`baseline.recompute_mode`): selective (default) recomputes the alarmed blocks only, in position
order, each through the cache as stored before it: a block the detector missed stays in that prefix, so an
alarmed block after it is recomputed as the model computes it from what is stored; full recomputes the whole
context (the clean entries, whatever was missed before).

The alarm level has a false-alarm budget (`baseline.alarm_budget`): it is set on the clean caches of the
evaluation data's selection split (`baseline.alarm_examples` per configured task; never a test or validation
cache) by the split-conformal rule of `repair_detect.budget_level`, so that at most that fraction of clean
caches like them raises an alarm. A level set on training text (the earlier max rule) alarms on most clean
evaluation caches, whose prose the detector scores higher than the training corpus."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cachemedicpp import repair, results, tasks
from cachemedicpp.config import ConfigError
from cachemedicpp.defenses.base import (PROTECTED, Cost, Defended, Defense, LayerInput, Needs, baseline_param,
                                        register_defense, replace_rows)
from cachemedicpp.palette import ORANGE
from cachemedicpp.repair_detect import budget_level, cache_maxima, gated_per_block


@register_defense
@dataclass
class DetectRecompute(Defense):
    name = results.DETECT_RECOMPUTE
    group = results.GROUP_DETECT_RECOMPUTE
    style = (ORANGE, "<")
    needs = Needs(operator=True, recompute=True)
    acts_on = PROTECTED
    at_rest_only = True
    cost_key = results.DETECT_RECOMPUTE_COST
    cost_how = ("; a block of positions is recomputed (in every protected layer) when it holds at least "
                "alarm_min_gated entries the family-D detector gates; what raises no alarm stays as stored")
    checksum_block_size: int = baseline_param("checksum_block_size")
    recompute_mode: str = baseline_param("recompute_mode")
    alarm_budget: float = baseline_param("alarm_budget")
    alarm_examples: int = baseline_param("alarm_examples")
    alarm: int | None = None  # gated entries that make a block an alarm (set by `setup`)
    alarm_caches: int = 0  # clean selection caches the level was set on

    def check(self, cfg, op) -> None:
        if op is None or not repair.detects(op):
            raise ConfigError("eval.defenses: detect_recompute raises its alarm with a family-D operator's detector; "
                              "set repair.family: D (and train it) or remove detect_recompute")

    def setup(self, cfg, lm, op) -> list[str]:
        """The alarm level, set on clean caches of the selection split within the false-alarm budget."""
        caches = tasks.selection_caches(cfg, lm, list(op.layers) + list(op.observes), int(self.alarm_examples))
        maxima = cache_maxima(op.to(lm.device), caches, int(self.checksum_block_size))
        self.alarm, self.alarm_caches = budget_level(maxima, float(self.alarm_budget)), len(caches)
        over = sum(m >= self.alarm for m in maxima)
        return [f"detect_recompute: a block raises the alarm at {self.alarm} gated entries, set on {len(caches)} clean "
                f"caches of the selection split with a false-alarm budget of {self.alarm_budget:g} ({over} of them "
                "alarm at that level)"]

    def cost_settings(self) -> dict:
        if self.alarm is None:
            return {}
        return {"alarm_min_gated": int(self.alarm), "alarm_budget": float(self.alarm_budget),
                "alarm_caches": int(self.alarm_caches)}

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        op, bs = inp.op, int(self.checksum_block_size)
        if inp.layer not in op.layers:
            return Defended(k, v)
        alarmed = inp.cache.memo.get(self.name)
        if alarmed is None:  # once per cache: the detector reads every protected (and observed) layer as stored
            stored = {l: inp.cache.stored(l) for l in list(op.layers) + list(op.observes)}
            alarmed = gated_per_block(op, op.prime(stored), inp.cache.length, bs) >= int(self.alarm)
            inp.cache.memo[self.name] = alarmed
        if not bool(alarmed.any()):
            return Defended(k, v, cost=Cost())
        blocks = tuple(int(j) for j in alarmed.nonzero().flatten().tolist())
        bad = alarmed.cpu()[inp.positions.to(torch.int64) // bs]
        if bool(bad.any()):
            want = blocks if self.recompute_mode == "selective" else None
            k, v = replace_rows(k, v, bad[None], lambda: inp.fresh(want, bs))
        return Defended(k, v, cost=Cost(frozenset(blocks)))


