"""Recomputing cache entries from their tokens: the K/V the model stores for a context, rebuilt by forwards
of the model, for checksum_recompute and detect_recompute (and any operator that needs exact entries back).

Two ways, one module:

- `recompute`: the whole context, one clean forward from position 0. It runs the very forward that wrote
  the cache (the same tokens, model and kernel), so it returns the stored K/V bit for bit
  (tests/test_faults.py checks it on every tiny architecture and kernel). Cost: the context's tokens.
- `recompute_blocks`: only the failing blocks (block j = positions [j·b, (j+1)·b)), in position order. Each
  run of consecutive failing blocks is forwarded through a cache holding the entries before it, as stored
  (verified) or already recomputed, with its absolute position ids; the new entries are written in place and
  the positions after a block are not recomputed (at rest they were computed from clean entries). Cost: the
  failing blocks' tokens.

Exactness of `recompute_blocks`: the same arithmetic as the full forward, on other kernel shapes (a block's
queries against the cached prefix instead of the whole context at once), so the entries agree with the full
recomputation up to float32 kernel rounding. Measured (torch 2.13 CPU, transformers 5.24, float32, 1 and 2
threads; several failing blocks, garbage and NaN in them, against `recompute`): on the tiny GPT-2, GQA Llama
and Gemma-3 models, eager and sdpa, max |ΔK|, |ΔV| and max |Δ logit| of 16 continuation tokens after the
repaired cache ≤ 9e-8 (mostly bit-identical); on SmolLM2-135M (embedded; a 201-token context, blocks of 16,
four failing), max |ΔK|, |ΔV| ≤ 1.6e-5 (layer K/V RMS up to 2.7), max |Δ logit| ≤ 4.8e-5, and the perplexity
of 32 continuation tokens equal to 4 digits (26.8456, ±1 in the last digit). `TOLERANCE` (1e-4, absolute, on
K/V and logits) is what the tests hold it to; longer contexts and larger models accumulate more rounding.
Entries of positions that are not recomputed come back bit for bit as given.

Sliding-window layers (window W) keep only their last W - 1 positions. A layer no longer holding a block's
positions needs no entries there (none are written), but the block's queries still read the W - 1 positions
of that layer before the block. Where a sliding layer no longer holds them, the only exact standard forward
starts at position 0 (a forward from any later position would read sliding entries before it, gone as well):
the context up to the end of the last such failing block is forwarded from position 0 in one forward, its
failing blocks are written from it (the positions between them stay as stored), and the later blocks are
recomputed as above. A stored cache longer than W - 1 holds only what the next query reads, so there every
failing block is in that case: the cost is the tokens up to the last failing block's end (less than the
whole context's whenever the last block is not). A context of at most W - 1 positions is held whole and
recomputed block by block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

from cachemedicpp import hf

TOLERANCE = 1e-4  # max |Δ| of K/V and of the next-token logits, selective vs full recomputation (float32)


@dataclass
class Recomputed:
    kv: dict[int, tuple[Tensor, Tensor]]  # layer -> its stored (K, V) of the context, [1, H_kv, T_layer, d]
    tokens: int  # forward tokens the recomputation processed
    seconds: float  # its wall time
    length: int  # positions of the context (a sliding layer holds its last T_layer)

    def entries(self, layer: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """K, V of `layer` at absolute `positions` ([1, H_kv, n, d]); a sliding layer holds its last T_layer."""
        k, v = self.kv[layer]
        first = self.length - k.shape[2]
        idx = positions.to(torch.int64) - first
        if bool((idx < 0).any()):
            raise ValueError(f"layer {layer} no longer holds positions before {first} (sliding window)")
        return k[:, :, idx.to(k.device)], v[:, :, idx.to(v.device)]


def recompute(lm: hf.LoadedModel, input_ids: Tensor, layers: Iterable[int]) -> Recomputed:
    """The K/V `lm` stores for the context `input_ids` (1-D, or [1, T]) in `layers`, from one clean
    forward of the whole context (no hook). Bit-identical to the stored cache."""
    ids = input_ids.reshape(1, -1).to(lm.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids, logits_to_keep=1)
    kv = {int(l): hf.get_kv(cache, int(l)) for l in layers}
    _sync(lm)
    T = int(ids.shape[1])
    return Recomputed(kv, T, time.perf_counter() - t0, T)


# --------------------------------------------------------------------------------------------------
# block-selective recomputation


@dataclass(frozen=True)
class Segment:
    """One forward of a block-selective recomputation: positions [start, end) are forwarded through a cache
    holding the positions before `start`; the entries of `blocks` are written from it."""

    start: int
    end: int
    blocks: tuple[int, ...]


def block_span(block: int, block_size: int, length: int) -> tuple[int, int]:
    """[start, end) of block `block` in a context of `length` positions (the last block may be short)."""
    return block * block_size, min((block + 1) * block_size, length)


def prefix_held(arch: hf.ArchInfo, held: Mapping[int, int], length: int, start: int) -> bool:
    """Whether every layer still holds what a forward starting at `start` reads before it: all of [0, start)
    on a full-attention layer, the W - 1 positions before `start` on a sliding-window layer; `held` gives
    the positions each layer holds (its last ones)."""
    if start == 0:
        return True
    for l, n in held.items():
        need = max(0, start - int(arch.sliding_window) + 1) if l in arch.sliding_layers else 0
        if need < length - int(n):
            return False
    return True


def plan(blocks: Iterable[int], block_size: int, length: int, arch: hf.ArchInfo,
         held: Mapping[int, int]) -> list[Segment]:
    """The forwards that recompute the failing `blocks` of a context of `length` positions, in position
    order: a run of consecutive blocks is one forward; when a sliding layer no longer holds the window
    before a block, one forward from position 0 covers every failing block up to it (see the module's
    docstring). Blocks past the context are bad input."""
    blocks = sorted({int(j) for j in blocks})
    if blocks and (blocks[0] < 0 or blocks[-1] * block_size >= length):
        raise ValueError(f"blocks {blocks} of {block_size} positions: outside a context of {length} positions")
    gone = [j for j in blocks if not prefix_held(arch, held, length, j * block_size)]
    segments = []
    if gone:
        first = [j for j in blocks if j <= gone[-1]]
        segments.append(Segment(0, block_span(gone[-1], block_size, length)[1], tuple(first)))
        blocks = blocks[len(first):]
    for j in blocks:
        s, e = block_span(j, block_size, length)
        last = segments[-1] if segments else None
        if last is not None and last.end == s and last.start > 0:
            segments[-1] = Segment(last.start, e, last.blocks + (j,))
        else:
            segments.append(Segment(s, e, (j,)))
    return segments


def plan_tokens(segments: Iterable[Segment]) -> int:
    """Forward tokens of a plan."""
    return sum(s.end - s.start for s in segments)


def recompute_blocks(lm: hf.LoadedModel, input_ids: Tensor, stored: Mapping[int, tuple[Tensor, Tensor]],
                     blocks: Iterable[int], block_size: int) -> Recomputed:
    """The cache `stored` (every layer's K/V as stored, [1, H_kv, T_layer, d], a sliding layer its last
    T_layer positions) of the context `input_ids`, with the entries of the failing `blocks` recomputed in
    every layer (see `plan`). Every position outside `blocks` comes back bit for bit; the blocks agree with
    `recompute` within `TOLERANCE`. The entries before each block must be clean (verified, or recomputed
    earlier in the plan): the block's entries are the model's given them."""
    ids = input_ids.reshape(-1).to(lm.device)
    T = int(ids.numel())
    missing = [l for l in range(lm.arch.num_layers) if l not in stored]
    if missing:
        raise ValueError(f"recompute_blocks: the stored entries of every layer are needed (missing: {missing})")
    kv = {int(l): (k.clone(), v.clone()) for l, (k, v) in stored.items()}
    segments = plan(blocks, block_size, T, lm.arch, {l: k.shape[2] for l, (k, _) in kv.items()})
    t0 = time.perf_counter()
    with torch.no_grad():
        for seg in segments:
            cache = hf.prefix_cache(lm.model, kv, T, seg.start)
            _, cache = hf.forward(lm.model, ids[None, seg.start:seg.end], cache, logits_to_keep=1, start=seg.start)
            for l in kv:
                _write(kv[l], hf.get_kv(cache, l), seg, block_size, T)
    _sync(lm)
    return Recomputed(kv, plan_tokens(segments), time.perf_counter() - t0, T)


def _write(dst: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], seg: Segment, block_size: int, T: int) -> None:
    """Copy the entries of `seg.blocks` that `dst` holds (its last positions of T) from `new` (its last
    positions before seg.end), in place."""
    first, new_first = T - dst[0].shape[2], seg.end - new[0].shape[2]
    for j in seg.blocks:
        s, e = block_span(j, block_size, T)
        s = max(s, first)
        if s >= e:
            continue  # a sliding layer that no longer holds the block needs nothing there
        if s < new_first:
            raise ValueError(f"recompute_blocks: the forward no longer holds positions {s}..{e} (window)")
        for d, n in zip(dst, new):
            d[:, :, s - first:e - first] = n[:, :, s - new_first:e - new_first].to(d.dtype)


def _sync(lm: hf.LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
