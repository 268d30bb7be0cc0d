"""Donor KV: the clean cache of a donor prompt that a type writes into the corrupted one (history swapping,
stale or swapped pages). Which donors a run needs is the types' business: `donors` asks each type in play."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

from cachemedicpp import hf
from cachemedicpp.corruption.registry import applied
from cachemedicpp.schema import ConfigError


def donors(params: Mapping, lm, types: Iterable[str], min_len: int, layers) -> dict[str, dict]:
    """The Corruptor's donor keyword arguments for the types in play (a wrapper's base included): the clean KV
    of each donor prompt they read, at least `min_len` positions on `layers`. {} when none reads one."""
    params = params.to_dict() if hasattr(params, "to_dict") else dict(params)
    out: dict[str, dict] = {}
    for name in types:
        kind = applied(name, params)
        spec = kind.donor(params) if kind.donor is not None else None
        if spec is not None and spec[0] not in out:
            keyword, prompt = spec
            out[keyword] = donor_kv(lm, prompt, min_len, layers)
    return out


def donor_kv(lm, prompt: str, min_len: int, layers) -> dict[int, tuple[Tensor, Tensor]]:
    """Clean KV of the donor prompt, its tokens repeated until at least `min_len` positions (batch 1), every
    position on every layer (also on sliding-window layers: what attention reads in the prefill)."""
    ids = list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError("corruption.params.donor_prompt: tokenises to nothing")
    n = max(int(min_len), len(ids))
    ids = (ids * math.ceil(n / len(ids)))[:n]
    max_pos = lm.arch.max_positions
    if n > max_pos:
        raise ConfigError(f"donor KV: {n} positions exceed the model's {max_pos} positions")
    input_ids = torch.tensor([ids], device=lm.device)
    with torch.no_grad():
        return hf.prefill_kv(lm.model, input_ids, [int(layer) for layer in layers])
