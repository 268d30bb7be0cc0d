"""detect_recompute, for caches that carry no checksums (offloaded, transferred, written by another system):
the detector of a trained operator that has one (family D) is the alarm. A block of positions holding at
least `alarm` gated entries (every protected layer and KV head pooled; a level set on clean training
windows) raises it, and its entries are replaced by recomputed ones in every protected layer; what raises no
alarm stays as stored. At rest only.

Recomputation (`baseline.recompute_mode`): selective (default) recomputes the alarmed blocks only, in position
order, each through the cache as stored before it: a block the detector missed stays in that prefix, so an
alarmed block after it is recomputed as the model computes it from what is stored; full recomputes the whole
context (the clean entries, whatever was missed before)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cachemedicpp import data, repair, results
from cachemedicpp.config import ConfigError
from cachemedicpp.defenses.base import (PROTECTED, Cost, Defended, Defense, LayerInput, Needs, baseline_param,
                                        register_defense, replace_rows)
from cachemedicpp.palette import ORANGE
from cachemedicpp.repair_detect import alarm_level, gated_per_block, training_caches


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
    alarm: int | None = None  # gated entries that make a block an alarm (set by `setup`)

    def check(self, cfg, op) -> None:
        if op is None or not repair.detects(op):
            raise ConfigError("eval.defenses: detect_recompute raises its alarm with a family-D operator's detector; "
                              "set repair.family: D (and train it) or remove detect_recompute")

    def setup(self, cfg, lm, op) -> list[str]:
        """The alarm level, set on clean training windows (never on evaluation text)."""
        text, _ = data.load_text(cfg.data.to_dict(), "train_corpus")
        caches = training_caches(cfg, lm, op.to(lm.device), data.tokenize_stream(lm.tokenizer, text), "detector-alarm")
        self.alarm = alarm_level(op, caches, int(self.checksum_block_size))
        return [f"detect_recompute: a block raises the alarm at {self.alarm} gated entries (set on clean training "
                "windows: one more than any of their blocks holds)"]

    def cost_settings(self) -> dict:
        return {"alarm_min_gated": int(self.alarm)} if self.alarm is not None else {}

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
