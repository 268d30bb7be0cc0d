"""checksum_recompute, exact recovery: an integrity tag per block of `baseline.checksum_block_size` positions and
layer (over K and V) is recorded when the clean cache is written and verified when it is read; the failing
blocks' entries are recomputed from the tokens (`recompute.py`: by default only those blocks, in position
order, exact up to float32 kernel rounding; `baseline.recompute_mode: full` recomputes the whole context, bit
for bit). Nothing fails on a clean cache, and nothing is recomputed there. Never a candidate for the best
baseline.

The tag of a block binds it to its place: a checksum of its content (a weighted sum of the raw words modulo
2^64, weighted by head, absolute position and channel with odd weights) plus a key of its sequence and
positions (a hash of the sequence's token ids up to the block's end and of the block's span). A change of one
word by any bit pattern changes the checksum (a nonzero difference below 2^32 times an odd weight is nonzero
modulo 2^64); a block that is internally intact but misplaced, carrying the tag it was written with, fails
too: a stale block (an earlier prompt's entries at the same positions), a block of another sequence (swapped
in), or one of the same sequence moved to other positions. Several changes, or two keys, collide with
probability about 2^-64. The arithmetic is int64 with two's-complement wrap-around (what torch's integer
kernels do on CPU and CUDA; tests/test_faults.py checks it), no division: one pass of multiply and sum.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import (Cost, Defended, Defense, LayerInput, Needs, baseline_param, register_defense,
                                        replace_rows)
from cachemedicpp.palette import YELLOW

_INT_VIEWS = {2: torch.int16, 4: torch.int32}
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: the mixing multiplier


def _mix(x: Tensor) -> Tensor:
    """A wrap-around int64 mixing of `x` (splitmix64's finaliser, with arithmetic shifts)."""
    x = x * _GOLDEN
    x = x ^ (x >> 29)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    return x ^ (x >> 32)


@functools.lru_cache(maxsize=16)
def _weights_cached(H: int, first: int, T: int, d: int, salt: int, device: str) -> Tensor:
    return _weights_at(H, torch.arange(first, first + T, dtype=torch.int64), d, salt).to(device)


def _weights_at(H: int, positions: Tensor, d: int, salt: int) -> Tensor:
    h = torch.arange(H, dtype=torch.int64).view(-1, 1, 1)
    t = positions.to(torch.int64).view(1, -1, 1)
    j = torch.arange(d, dtype=torch.int64).view(1, 1, -1)
    return _mix(((h * 1_000_003 + t) * 104_729 + j) * 4 + salt) | 1  # odd: a unit modulo 2^64


def _weights(shape: tuple, positions: Tensor, salt: int, device) -> Tensor:
    """int64 [H, T, d] odd weights: a fixed function of (head, absolute position, channel, K|V); cached for a
    contiguous run of positions (the usual case: a cache's held positions)."""
    H, T, d = shape
    pos = positions.to(device="cpu", dtype=torch.int64)
    if T and int(pos[-1]) - int(pos[0]) == T - 1 and bool((pos.diff() == 1).all()):
        return _weights_cached(H, int(pos[0]), T, d, salt, str(device))
    return _weights_at(H, pos, d, salt).to(device)


def block_checksums(k: Tensor, v: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """int64 [B, n_blocks]: one checksum per block of `block_size` absolute positions (block j holds
    positions [j·b, (j+1)·b)), over K and V, on their raw bits (NaN payloads and -0.0 included); modulo 2^64."""
    blocks = positions.to(torch.int64) // int(block_size)
    n = int(blocks.max()) + 1 if blocks.numel() else 0
    total = torch.zeros(k.shape[0], n, dtype=torch.int64, device=k.device)
    for salt, x in enumerate((k, v)):
        words = x.contiguous().view(_INT_VIEWS[x.element_size()]).to(torch.int64)  # signed: |difference| < 2^32
        prod = words * _weights(tuple(x.shape[1:]), positions, salt, x.device)
        total.index_add_(1, blocks.to(x.device), prod.sum(dim=(1, 3)))
    return total


def place_keys(tokens: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """int64 [n_blocks]: block j's key, a chained hash of the sequence's token ids up to the block's
    end and of every block's span [start, end) up to j. Equal for two blocks only where the same tokens fill the
    same positions up to there (collisions aside)."""
    ids = tokens.reshape(-1).to(device="cpu", dtype=torch.int64)
    bs = int(block_size)
    if n_blocks and (n_blocks - 1) * bs >= ids.numel():
        raise ValueError(f"place_keys: {ids.numel()} token ids do not reach block {n_blocks - 1} of {bs} positions")
    h, keys = hashlib.blake2b(digest_size=16), []
    for j in range(n_blocks):
        s, e = j * bs, min((j + 1) * bs, ids.numel())
        h.update(s.to_bytes(8, "little") + e.to_bytes(8, "little") + ids[s:e].numpy().tobytes())
        keys.append(int.from_bytes(h.copy().digest()[:8], "little", signed=True))
    return torch.tensor(keys, dtype=torch.int64)


def block_tags(k: Tensor, v: Tensor, positions: Tensor, block_size: int, tokens: Tensor | None) -> Tensor:
    """int64 [B, n_blocks]: the integrity tag of every block, its checksum (`block_checksums`) plus its place
    key (`place_keys` of the sequence `tokens`, the context's token ids). Without tokens, the checksum alone
    (content and positions: a misplaced block carrying its tag can pass)."""
    sums = block_checksums(k, v, positions, block_size)
    if tokens is None:
        return sums
    return sums + place_keys(tokens, sums.shape[1], block_size).to(sums.device)


def failing_blocks(k: Tensor, v: Tensor, positions: Tensor, recorded: Tensor, block_size: int,
                   tokens: Tensor | None) -> Tensor:
    """bool [B, n_blocks]: the blocks whose tag, computed on the entries `k`, `v` as read for the sequence
    `tokens`, differs from the `recorded` one."""
    return block_tags(k, v, positions, block_size, tokens) != recorded.to(k.device)


@register_defense
@dataclass
class ChecksumRecompute(Defense):
    name = results.CHECKSUM_RECOMPUTE
    group = results.GROUP_RECOMPUTE
    style = (YELLOW, "h")
    needs = Needs(clean=True, recompute=True)  # the tags are recorded on the clean cache
    cost_key = results.RECOMPUTE_COST
    checksum_block_size: int = baseline_param("checksum_block_size")
    recompute_mode: str = baseline_param("recompute_mode")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        """The blocks whose tag differs from the recorded one read from `inp.fresh` (called only when a block
        fails; without it, the clean entries, which the recomputation reproduces). The failing blocks are
        decided once for every layer of the cache, so each recomputed block reads a verified prefix."""
        failed, union = self._failed(k, v, inp)
        if not bool(failed.any()):
            return Defended(k, v, cost=Cost())
        bs = int(self.checksum_block_size)
        bad = failed[:, inp.positions.to(torch.int64).to(failed.device) // bs]
        want = union if self.recompute_mode == "selective" else None
        fresh = (lambda: inp.fresh(want, bs)) if inp.fresh is not None else (lambda: inp.clean)
        k, v = replace_rows(k, v, bad, fresh)
        hit = frozenset((inp.layer, int(b), int(j)) for b, j in failed.nonzero().tolist())
        return Defended(k, v, cost=Cost(hit))

    def _failed(self, k: Tensor, v: Tensor, inp: LayerInput) -> tuple[Tensor, tuple[int, ...]]:
        """(bool [B, n_blocks] this layer's failing blocks, the failing blocks of every layer of the cache);
        without a whole cache to verify, this layer's alone."""
        bs, cache = int(self.checksum_block_size), inp.cache
        if cache is None or inp.layer not in cache.layers or cache.clean is None:
            failed = failing_blocks(k, v, inp.positions, block_tags(*inp.clean, inp.positions, bs, None), bs, None)
            return failed, _blocks(failed)
        memo = cache.memo.get(self.name)
        if memo is None:  # once per cache: every layer's tags (recorded on the clean cache) verified
            per_layer = {l: self._verify(cache, l) for l in cache.layers}
            union = tuple(sorted(set().union(*(_blocks(f) for f in per_layer.values()))))
            memo = cache.memo[self.name] = (per_layer, union)
        per_layer, union = memo
        return per_layer[inp.layer], union

    def _verify(self, cache, layer: int) -> Tensor:
        bs = int(self.checksum_block_size)
        k, v = cache.stored(layer)
        pos = torch.arange(cache.length - k.shape[2], cache.length)
        recorded = block_tags(*cache.clean(layer), pos, bs, cache.tokens)
        return failing_blocks(k, v, pos, recorded, bs, cache.tokens)


def _blocks(failed: Tensor) -> tuple[int, ...]:
    """The ids of the blocks failing in any batch row."""
    return tuple(int(j) for j in failed.any(0).nonzero().flatten().tolist())
