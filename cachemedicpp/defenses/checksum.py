"""checksum_recompute, exact recovery: a checksum per block of `baseline.checksum_block_size` positions and
layer (over K and V) is recorded when the clean cache is written and verified when it is read; a failing
block is replaced by its entries recomputed from the tokens (`recompute.py`, bit-identical to the clean
cache). It pays a forward of the context whenever a block fails; never a candidate for the best baseline.

The checksum: a weighted sum of the raw words modulo a prime, per block. A change of one word by any bit
pattern changes the sum (the weights and 2^k are units modulo P); several changes collide with
probability about 2^-31.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cachemedicpp import results
from cachemedicpp.defenses.base import (Cost, Defended, Defense, LayerInput, Needs, baseline_param, register_defense,
                                        replace_rows)
from cachemedicpp.palette import YELLOW

_P = 2 ** 31 - 1
_INT_VIEWS = {2: torch.int16, 4: torch.int32}


def _weights(shape: tuple, positions: Tensor, salt: int, device) -> Tensor:
    """int64 [H, T, d] weights in [1, P): a fixed function of (head, absolute position, channel, K|V)."""
    H, _, d = shape
    h = torch.arange(H, dtype=torch.int64).view(-1, 1, 1)
    t = positions.to(torch.int64).view(1, -1, 1)
    j = torch.arange(d, dtype=torch.int64).view(1, 1, -1)
    base = (h * 1_000_003 + t * 7_919 + j * 104_729 + salt * 15_485_863) % _P
    return ((base * 2_654_435_761) % (_P - 1) + 1).to(device)


def block_checksums(k: Tensor, v: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """int64 [B, n_blocks]: one checksum per block of `block_size` absolute positions (block j holds
    positions [j·b, (j+1)·b)), over K and V, on their raw bits (NaN payloads and -0.0 included)."""
    blocks = positions.to(torch.int64) // int(block_size)
    n = int(blocks.max()) + 1 if blocks.numel() else 0
    total = torch.zeros(k.shape[0], n, dtype=torch.int64, device=k.device)
    for salt, x in enumerate((k, v)):
        bits = 8 * x.element_size()
        words = x.contiguous().view(_INT_VIEWS[x.element_size()]).to(torch.int64) & ((1 << bits) - 1)
        prod = (words % _P) * _weights(tuple(x.shape[1:]), positions, salt, x.device) % _P
        total.index_add_(1, blocks.to(x.device), prod.sum(dim=(1, 3)) % _P)
    return total % _P


@register_defense
@dataclass
class ChecksumRecompute(Defense):
    name = results.CHECKSUM_RECOMPUTE
    group = results.GROUP_RECOMPUTE
    style = (YELLOW, "h")
    needs = Needs(clean=True, recompute=True)  # the checksums are recorded on the clean cache
    cost_key = results.RECOMPUTE_COST
    checksum_block_size: int = baseline_param("checksum_block_size")

    def apply(self, k: Tensor, v: Tensor, inp: LayerInput) -> Defended:
        """The blocks whose checksum differs from the recorded one read from `inp.fresh()` (called only when a
        block fails; without it, the clean entries, which the recomputation reproduces bit for bit)."""
        bs = int(self.checksum_block_size)
        failed = block_checksums(k, v, inp.positions, bs) != block_checksums(*inp.clean, inp.positions, bs)
        if not bool(failed.any()):
            return Defended(k, v, cost=Cost())
        bad = failed[:, inp.positions.to(torch.int64).to(failed.device) // bs]
        k, v = replace_rows(k, v, bad, inp.fresh or (lambda: inp.clean))
        hit = frozenset((inp.layer, int(b), int(j)) for b, j in failed.nonzero().tolist())
        return Defended(k, v, cost=Cost(hit))
