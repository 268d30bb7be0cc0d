"""Defenses other than the learned operator, applied to a layer's K/V `[B, H_kv, T, d]`. Four groups:

- `no_defense`, the baseline.
- Reference heuristics (`DEFENSES` minus no_defense): the reference's four, kept for comparison. They act
  on the region the corruption's masks select (`Region.mask`), an oracle advantage the learned operator
  does not get (`ORACLE_NOTE`); entries outside the mask are returned bit-identical.
- Calibrated baselines (`CALIBRATED`): `range_clamp` and `norm_outlier_drop`, the fault-tolerance
  literature's range restriction and outlier filtering, calibrated on clean training-text caches
  (`calibration.py`). They see no corruption mask: they act on every cached entry of the protected layers.
- Ceilings (`CEILINGS`): `oracle_drop`, attention ignores exactly the entries the corruption changed. Never
  a candidate for the best baseline.
- Exact recovery (`RECOMPUTE`): `checksum_recompute`, the systems answer to faults: a checksum per block of
  `baseline.checksum_block_size` positions and layer (over K and V) recorded when the clean cache is
  written, verified when it is read; a failing block is replaced by its entries recomputed from the tokens
  (`recompute.py`, bit-identical to the clean cache). It pays a forward of the context whenever a block
  fails; never a candidate for the best baseline. `detect_recompute`, for caches that carry no checksums
  (offloaded, transferred, written by another system): the detector of a trained family-D operator is the
  alarm (a block holding enough gated entries, a level set on clean training windows), and the alarmed blocks
  are replaced by recomputed entries; what raises no alarm stays corrupted. Evaluated at rest
  (eval/grid.py), with the run's family-D operator.

All act on clean inputs as well (a clean cell gets the same treatment), so a defense that costs clean
accuracy shows it. The arithmetic is fp32, cast back to the input dtype. `defend` is the one entry point
eval and stability use: it returns the defended K/V and, for the dropping defenses, which entries
attention must ignore (they leave through the attention mask, `hf.HookPlan.drop`).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import torch
from torch import Tensor

from cachemedicpp import config, results
from cachemedicpp.config import lookup

ORACLE_NOTE = "heuristics act on the region the corruption's masks select (an oracle advantage)"
DEFAULT_DROPOUT_SEED = 0


@functools.lru_cache(maxsize=1)
def _baseline_defaults() -> dict:
    return config.section_defaults("baseline")


def _baseline(baseline: Mapping | None) -> dict:
    return {**_baseline_defaults(), **dict(baseline or {})}


def _write(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.to(x.device), y.to(x.dtype), x)


def no_defense(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    return k, v


def reset_clear(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    return _write(k, torch.zeros_like(k), mask), _write(v, torch.zeros_like(v), mask)


def ema_weights(T: int, beta: float, device=None) -> Tensor:
    """[T, T] lower-triangular W with (W x)_t = y_t for y_0 = x_0, y_t = beta·y_{t-1} + (1 - beta)·x_t."""
    t = torch.arange(T, dtype=torch.float64)
    lag = (t.view(-1, 1) - t.view(1, -1)).clamp_min(0)
    w = torch.pow(torch.tensor(float(beta), dtype=torch.float64), lag) * (1.0 - beta)
    w = torch.tril(w)
    if T:
        w[:, 0] = torch.pow(torch.tensor(float(beta), dtype=torch.float64), t)  # y_0 = x_0 carries beta^t
    return w.to(device=device, dtype=torch.float32)


def smoothing(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    beta = float(_baseline(baseline)["smoothing_beta"])
    w = ema_weights(k.shape[2], beta, k.device)
    out = []
    for x in (k, v):
        y = torch.einsum("ts,bhsd->bhtd", w, x.float())
        out.append(_write(x, y, mask))
    return out[0], out[1]


def masking_dropout(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    p = float(_baseline(baseline)["dropout_p"])
    if gen is None:
        gen = torch.Generator(device="cpu").manual_seed(DEFAULT_DROPOUT_SEED)
    out = []
    for x in (k, v):
        drop = torch.rand(tuple(x.shape), generator=gen, dtype=torch.float32).to(x.device) < p
        out.append(_write(x, torch.where(drop, torch.zeros_like(x), x), mask))
    return out[0], out[1]


def clipping_renorm(k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping, gen: torch.Generator | None = None):
    b = _baseline(baseline)
    clip, target = float(b["clip_val"]), float(b["target_rms"])
    out = []
    for x in (k, v):
        c = x.float().clamp(-clip, clip)
        rms = c.pow(2).mean(dim=-1, keepdim=True).sqrt()
        y = c * (target / rms.clamp_min(1e-12))  # an all-zero vector stays zero
        out.append(_write(x, y, mask))
    return out[0], out[1]


DEFENSES: dict[str, Callable] = {
    "no_defense": no_defense,
    "reset_clear": reset_clear,
    "smoothing": smoothing,
    "masking_dropout": masking_dropout,
    "clipping_renorm": clipping_renorm,
}


CALIBRATED = ("range_clamp", "norm_outlier_drop")
CEILINGS = ("oracle_drop",)
RECOMPUTE = (results.CHECKSUM_RECOMPUTE, results.DETECT_RECOMPUTE)
REFERENCE = tuple(d for d in DEFENSES if d != "no_defense")
GROUPS = {"no_defense": results.GROUP_BASELINE, **{d: results.GROUP_REFERENCE for d in REFERENCE},
          **{d: results.GROUP_CALIBRATED for d in CALIBRATED}, **{d: results.GROUP_CEILING for d in CEILINGS},
          results.CHECKSUM_RECOMPUTE: results.GROUP_RECOMPUTE, results.DETECT_RECOMPUTE: results.GROUP_DETECT_RECOMPUTE,
          results.CACHEMEDIC: results.GROUP_LEARNED}
# candidates for "the best baseline": never the ceilings, never the learned operator
CANDIDATES = REFERENCE + CALIBRATED


def check_name(name: str) -> str:
    """A defense name eval or stability may use (unknown -> bad input listing the known ones)."""
    return lookup("defense", name, GROUPS)


def get_defense(name: str) -> Callable:
    return lookup("defense", name, DEFENSES, known="known heuristic defenses",
                  note=" (cachemedic is the learned repair operator, not a heuristic)")


def changed_entries(k0: Tensor, v0: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """bool [B, H, T]: the entries whose key or value differs from the clean cache's (NaN counts as changed)."""
    return (k != k0.to(k.device)).any(-1) | (v != v0.to(v.device)).any(-1)


def fit_drop(drop: Tensor, k_len: int) -> Tensor:
    """An at-rest drop mask fitted to the keys a later forward reads: entries appended since are kept
    (False), and a sliding layer that moved on keeps only its last `k_len`."""
    if drop.shape[-1] < k_len:
        drop = torch.cat([drop, drop.new_zeros(*drop.shape[:-1], k_len - drop.shape[-1])], dim=-1)
    return drop[..., drop.shape[-1] - k_len:]


# checksums: a weighted sum of the raw words modulo a prime, per block. A change of one word by any bit
# pattern changes the sum (the weights and 2^k are units modulo P); several changes collide with
# probability about 2^-31.
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


def checksum_recompute(k: Tensor, v: Tensor, recorded: Tensor, positions: Tensor, block_size: int,
                       fresh: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, int]:
    """(k, v, blocks failed): the blocks whose checksum differs from the `recorded` one replaced by the
    recomputed entries `fresh()` returns (called only when a block fails; [1, H, T, d] like k)."""
    failed = block_checksums(k, v, positions, block_size) != recorded
    n_failed = int(failed.sum())
    if not n_failed:
        return k, v, 0
    k, v = _replace(k, v, failed[:, positions.to(torch.int64).to(failed.device) // int(block_size)], fresh)
    return k, v, n_failed


def recompute_blocks(k: Tensor, v: Tensor, alarmed: Tensor, positions: Tensor, block_size: int,
                     fresh: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(k, v) with the held entries of every `alarmed` block (bool [n_blocks] over blocks of `block_size`
    absolute positions) replaced by the recomputed entries `fresh()` returns (called only then)."""
    bad = alarmed.cpu()[positions.to(torch.int64) // int(block_size)]
    return _replace(k, v, bad[None], fresh) if bool(bad.any()) else (k, v)


def _replace(k: Tensor, v: Tensor, bad: Tensor, fresh: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """k, v [B, H, T, d] with the positions `bad` (bool [B, T]) read from `fresh()` ([1, H, T, d] like k)."""
    m = bad[:, None, :, None]
    fk, fv = fresh()
    return (torch.where(m.to(k.device), fk.to(device=k.device, dtype=k.dtype), k),
            torch.where(m.to(v.device), fv.to(device=v.device, dtype=v.dtype), v))


def defend(name: str, layer: int, k: Tensor, v: Tensor, *, mask: Tensor | None = None, baseline: Mapping | None = None,
           gen: torch.Generator | None = None, cal=None, positions: Tensor | None = None,
           clean: tuple[Tensor, Tensor] | None = None, fresh: Callable[[], tuple[Tensor, Tensor]] | None = None,
           report: dict | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(k, v, drop): one layer's K/V defended by `name`, and the entries attention must ignore (or None).

    Reference heuristics need the region `mask`; calibrated baselines the calibration `cal` and the
    absolute `positions` of the cached entries; oracle_drop the `clean` K/V of the same entries;
    checksum_recompute the `clean` K/V (its checksums are recorded on them), the `positions`, and `fresh`,
    the recomputation of the layer's entries (default: `clean`, which `recompute.recompute` reproduces bit
    for bit); it adds the blocks that failed to `report["blocks_failed"]`."""
    if name == results.DETECT_RECOMPUTE:
        raise ValueError("detect_recompute needs the run's family-D operator: eval/grid.py applies it")
    if name in RECOMPUTE:
        bs = int(_baseline(baseline)["checksum_block_size"])
        pos = positions if positions is not None else torch.arange(k.shape[2])
        k, v, n = checksum_recompute(k, v, block_checksums(*clean, pos, bs), pos, bs, fresh or (lambda: clean))
        if report is not None:
            report["blocks_failed"] = report.get("blocks_failed", 0) + n
        return k, v, None
    if name in CALIBRATED:
        if name == "range_clamp":
            k, v = cal.clamp(layer, k, v, positions)
            return k, v, None
        return k, v, cal.outliers(layer, k, v, positions)
    if name in CEILINGS:
        return k, v, changed_entries(*clean, k, v)
    k, v = apply_defense(name, k, v, mask, baseline or {}, gen)
    return k, v, None


def apply_defense(name: str, k: Tensor, v: Tensor, mask: Tensor, baseline: Mapping,
                  gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Defend one layer's K/V inside `mask` (bool [1, H, T, 1]). Pure; no_defense returns the inputs. A mask
    over more positions than the layer holds (a sliding-window layer keeps the last k.shape[2] of the
    context) is cut to its last k.shape[2]."""
    if mask is not None and mask.shape[2] > k.shape[2]:
        mask = mask[:, :, mask.shape[2] - k.shape[2]:]
    return get_defense(name)(k, v, mask, baseline, gen)
