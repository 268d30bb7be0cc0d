"""Hash-seeded generators: every random draw in cachemedicpp comes from a generator seeded by sha256 of
(seed, *parts), never from a shared stream, so any draw can be reproduced on its own (a resumed run, a
different order of work, another process) and paired draws (the same corruption for every defense) are
the same by construction.
"""

from __future__ import annotations

import hashlib
import json
import numbers

import numpy as np
import torch


def _canon(p):
    # JSON-native values, so that 3 and numpy.int64(3) (or 0.16 and numpy.float64(0.16)) seed alike
    if isinstance(p, bool) or p is None or isinstance(p, str):
        return p
    if isinstance(p, numbers.Integral):
        return int(p)
    if isinstance(p, numbers.Real):
        return float(p)
    if isinstance(p, (tuple, list)):
        return [_canon(x) for x in p]
    return str(p)


def torch_rng(seed: int, *parts) -> torch.Generator:
    """A CPU torch generator seeded by sha256 of (seed, *parts), reduced to 63 bits."""
    blob = json.dumps([_canon(seed)] + [_canon(p) for p in parts], separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return g


def numpy_rng(seed: int, *parts) -> np.random.Generator:
    """A numpy PCG64 generator seeded by sha256 of (seed, *parts) (the parts taken as strings)."""
    blob = json.dumps([int(seed)] + [str(p) for p in parts], separators=(",", ":"))
    return np.random.default_rng(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))
