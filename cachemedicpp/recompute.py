"""Recomputing cache entries from their tokens: the K/V the model stores for a context, rebuilt by a
clean forward, for any layer and position (checksum_recompute today; any operator that needs the
exact entries back can reuse it).

Exactness: the recomputation runs the very forward that wrote the cache (the same tokens from position
0, the same model and kernel), so it returns the stored K/V bit for bit (tests/test_faults.py checks it
on every tiny architecture). A shorter forward (only the tokens up to the last block needed) would be
cheaper but is not exact: with sdpa and with sliding-window layers a different length changes the last
bits (measured on the tiny test models), so the cost reported here is the whole context's forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from cachemedicpp import hf


@dataclass
class Recomputed:
    kv: dict[int, tuple[Tensor, Tensor]]  # layer -> stored (K, V) of the context, [1, H_kv, T_layer, d]
    tokens: int  # forward tokens the recomputation processed
    seconds: float  # its wall time

    def entries(self, layer: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """K, V of `layer` at absolute `positions` ([1, H_kv, n, d]); a sliding layer holds its last T_layer."""
        k, v = self.kv[layer]
        first = self.tokens - k.shape[2]
        idx = positions.to(torch.int64) - first
        if bool((idx < 0).any()):
            raise ValueError(f"layer {layer} no longer holds positions before {first} (sliding window)")
        return k[:, :, idx.to(k.device)], v[:, :, idx.to(v.device)]


def recompute(lm: hf.LoadedModel, input_ids: Tensor, layers: Iterable[int]) -> Recomputed:
    """The K/V `lm` stores for the context `input_ids` (1-D, or [1, T]) in `layers`, from one clean
    forward of the whole context (no hook)."""
    ids = input_ids.reshape(1, -1).to(lm.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids, logits_to_keep=1)
    kv = {int(l): hf.get_kv(cache, int(l)) for l in layers}
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    return Recomputed(kv, int(ids.shape[1]), time.perf_counter() - t0)
