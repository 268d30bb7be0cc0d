"""A model of clean KV caches and the closed-form repairs it gives (no model, no corruption mask, no ε).

The model (built by `calibration.py` from clean caches of training text, per layer and KV head): keys
*before RoPE* and values are each a Gaussian, mean μ and covariance C = U diag(λ) Uᵀ, with per-channel
quantiles (lo, hi). Keys are modelled before RoPE because after it a channel mixes with its rotary partner by
a position-dependent angle: a channel's range and the covariance only make sense in the frame the projection
wrote them in. A stored key at position t is a R_t x (R_t the rotation, a the attention scaling); a `Frame`
moves between the two with the known absolute positions (`rotate` / `unrotate`).

The closed forms:

- `wiener`: the posterior mean of x under x̃ = x + n, x ~ N(μ, C), n ~ N(0, s² I):
  x̂ = μ + U diag(λ / (λ + s²)) Uᵀ (x̃ - μ). It assumes white noise, independent of the entry.
- `noise_variance`: s² per block of positions, from the block's own energy in the clean eigenbasis. Under the
  model the coordinates y_j = u_jᵀ(x̃ - μ) are N(0, λ_j + s²); s² is their maximum-likelihood fit (Fisher
  scoring from the plain excess energy mean_j(y_j² - λ_j)), so directions where clean caches have little
  variance, and where white noise stands out most, weigh most.
- `conditional_mean`: lost elements replaced by their mean given the observed elements of the same vector
  under the clean Gaussian: x̂_m = μ_m - P_mm⁻¹ P_mo (x_o - μ_o), P = C⁻¹ (for stored keys, the Gaussian
  moved to the entry's position: mean a R_t μ, precision R_t P R_tᵀ / a²).
- `outside`: per-element distance beyond the calibrated per-channel range, in units of the range's width.

The repairs of one layer's stored keys or values `[B, H, T, d]` (`impute`, `clamp`, `denoise`, and `repair`,
which applies each only where the cache shows its fault beyond held-in levels) return the repaired tensor and
the entries they changed; every other entry is returned bit-identical, and positions that are not `live` (the
attention sinks) are never touched. `impute` assumes a clean cache holds no exact zeros (true of float caches;
a quantised cache would hold many).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

# ---- rotary position embedding (rotate-half layout; hf.rotary_frequencies says which models)


def rope_cos_sin(inv_freq: Tensor, scaling: float, positions: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) `[T, r]` of absolute `positions`, computed as transformers' rotary modules compute them."""
    freqs = positions.to(inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Keys before RoPE -> as stored: x cos + rotate_half(x) sin on the first r channels (the rest pass)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Stored keys -> before RoPE: the inverse of `rotate` (a rotation scaled by a: its transpose over a²)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    a2 = (cos[..., :1] ** 2 + sin[..., :1] ** 2)  # the attention scaling squared, per position
    return torch.cat([(rot * cos - _rotate_half(rot) * sin) / a2, rest], dim=-1)


# ---- the Gaussian model


def precision(evec: Tensor, evals: Tensor, ridge: float = 1e-3) -> Tensor:
    """C⁻¹ `[H, d, d]` with a ridge of `ridge` times the mean eigenvalue (a clean covariance may be nearly
    singular; the ridge keeps the conditional mean from trusting directions the calibration barely saw)."""
    lam = evals + ridge * evals.mean(-1, keepdim=True)
    return (evec / lam[..., None, :]) @ evec.transpose(-1, -2)


def wiener(x: Tensor, mean: Tensor, evec: Tensor, evals: Tensor, s2: Tensor) -> Tensor:
    """The posterior mean of clean x given x = clean + white noise of variance s2 (`[B, H, T, 1]`), with
    mean `[H, d]`, eigenvectors `[H, d, d]` (columns) and eigenvalues `[H, d]` of the clean Gaussian."""
    U = evec[None]
    y = (x - mean[None, :, None]) @ U  # [B, H, T, d] coordinates in the eigenbasis
    gain = evals[None, :, None] / (evals[None, :, None] + s2)
    return mean[None, :, None] + (y * gain) @ U.transpose(-1, -2)


def blocks(positions: Tensor, live: Tensor, block: int) -> Tensor:
    """Block id `[T]` of every position: runs of `block` live positions from the first live one, a remainder
    shorter than a block joined to the block before it (a block of a few tokens estimates nothing); -1 for
    positions that are not live."""
    first = int(positions[live][0]) if bool(live.any()) else 0
    n = int(live.sum())
    ids = ((positions - first) // block).clamp(max=max(n // block, 1) - 1)
    return torch.where(live, ids, torch.full_like(ids, -1))


def noise_variance(x: Tensor, live: Tensor, mean: Tensor, evec: Tensor, evals: Tensor, block: int,
                   positions: Tensor, steps: int = 4) -> Tensor:
    """s² `[B, H, T]`: the white-noise variance each position's block shows over the clean Gaussian (0 where
    it shows none; 0 at positions that are not `live`). Non-finite entries are left out of the estimate."""
    ids = blocks(positions.cpu(), live.cpu(), block).to(x.device)
    nb = int(ids.max()) + 1
    if nb <= 0:
        return x.new_zeros(x.shape[:-1])
    y2 = ((x - mean[None, :, None]) @ evec[None]) ** 2  # [B, H, T, d]
    ok = torch.isfinite(y2).all(-1) & (ids >= 0)[None, None]  # [B, H, T]
    y2 = torch.where(ok[..., None], y2, torch.zeros_like(y2))
    idx = ids.clamp_min(0)
    sums = y2.new_zeros(*y2.shape[:2], nb, y2.shape[-1]).index_add_(2, idx, y2)
    counts = ok.float().new_zeros(*ok.shape[:2], nb).index_add_(2, idx, ok.float())
    m = sums / counts.clamp_min(1)[..., None]  # [B, H, nb, d] mean squared coordinate per block
    lam = evals[None, :, None]
    s2 = (m - lam).mean(-1).clamp_min(0)  # plain excess energy per direction
    for _ in range(steps):  # Fisher scoring of the Gaussian likelihood of the coordinates
        w = 1.0 / (lam + s2[..., None]) ** 2
        s2 = ((w * (m - lam)).sum(-1) / w.sum(-1)).clamp_min(0)
    per_position = s2.gather(2, idx.expand(*s2.shape[:2], -1))
    return torch.where((ids >= 0)[None, None], per_position, torch.zeros_like(per_position))


def lost(x: Tensor) -> Tensor:
    """bool, like x: elements that carry nothing (exactly zero, or not finite)."""
    return (x == 0) | ~torch.isfinite(x)


def conditional_mean(x: Tensor, missing: Tensor, mean: Tensor, prec: Tensor, heads: Tensor,
                     frame: "Frame") -> Tensor:
    """Rows x `[N, d]` (stored entries of KV heads `heads`, `frame` at their positions) with their `missing`
    elements replaced by their conditional mean given the rest under the clean Gaussian of mean `mean` (`[N, d]`,
    stored frame) and precision `prec` (`[H, d, d]`, modelled frame); observed elements are returned as given.

    With stored = T x (T the rotation and scaling of RoPE, or I), the precision of stored entries is
    T⁻ᵀ P T⁻¹, so its block on the m missing elements is G P Gᵀ with G's rows T⁻¹ e_i: a small m × m system per
    row instead of a d × d matrix per position."""
    N, d = x.shape
    count = missing.sum(-1)
    m = max(int(count.max()), 1)
    order = torch.argsort((~missing).to(torch.int8), dim=-1, stable=True)[:, :m]  # missing elements first
    valid = torch.arange(m, device=x.device)[None] < count[:, None]  # [N, m]: slots that are missing elements
    dev = torch.where(missing, torch.zeros_like(x), x - mean)  # observed deviations (NaN-free)
    g = unit_rows(order, valid, frame, d, x.dtype)  # [N, m, d]
    u = frame.model(dev)  # T⁻¹ (x_o - μ_o), modelled frame
    a = torch.empty(N, m, m, dtype=x.dtype, device=x.device)
    pu = torch.empty_like(u)
    for h in heads.unique().tolist():  # per KV head: its precision is shared by its rows
        rows = heads == h
        gh = g[rows]
        a[rows] = gh @ prec[h] @ gh.transpose(-1, -2)
        pu[rows] = u[rows] @ prec[h]
    rhs = -(g @ pu[..., None])[..., 0]  # -(T⁻ᵀ P T⁻¹ dev) on the missing elements
    z = torch.linalg.solve(a + torch.diag_embed((~valid).to(x.dtype)), torch.where(valid, rhs, torch.zeros_like(rhs)))
    filled = torch.where(valid, mean.gather(1, order) + z, x.gather(1, order))
    return x.scatter(1, order, filled)


def unit_rows(order: Tensor, valid: Tensor, frame: "Frame", d: int, dtype: torch.dtype) -> Tensor:
    """`[N, m, d]`: row (n, j) is T⁻¹ e_i in the modelled frame of row n (i = order[n, j]; zero where not
    `valid`), i.e. `frame.expand().model(one_hot(order, d) * valid)` with the same values bit for bit, written
    straight into its two non-zero elements: cos_i / a² at i and ∓sin / a² at i's rotary partner (1 at i for a
    channel RoPE does not rotate, or without RoPE)."""
    N, m = order.shape
    g = torch.zeros(N, m, d, dtype=dtype, device=order.device)
    on = valid.to(dtype)
    if frame.cos is None:
        return g.scatter_(2, order[..., None], on[..., None])
    cos, sin = frame.cos.to(dtype), frame.sin.to(dtype)  # [N, r]
    r = cos.shape[-1]
    half = r // 2
    a2 = cos[:, :1] ** 2 + sin[:, :1] ** 2  # [N, 1], as `unrotate` computes it
    rot = order < r
    at = order.clamp(max=r - 1)
    own = torch.where(rot, cos.gather(1, at) / a2, torch.ones_like(on))
    partner = torch.where(at < half, at + half, at - half)
    sj = sin.gather(1, partner)
    other = torch.where(at < half, -sj, sj) / a2  # rotate_half moves e_i to the partner with sign -1 or +1
    g.scatter_(2, order[..., None], (own * on)[..., None])
    # a channel RoPE does not rotate has no partner: its second write lands on itself with its own value
    g.scatter_(2, torch.where(rot, partner, order)[..., None], torch.where(rot, other * on, own * on)[..., None])
    return g


def outside(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """How far each element lies beyond its calibrated range [lo, hi] (`[H, d]`), in units of the range's width
    (0 inside; inf for a non-finite element)."""
    width = (hi - lo).clamp_min(1e-12)[None, :, None]
    over = torch.maximum(x - hi[None, :, None], lo[None, :, None] - x) / width
    return torch.where(torch.isfinite(x), over.clamp_min(0), torch.full_like(x, float("inf")))


# ---- the repairs of one layer's stored keys or values


@dataclass
class Frame:
    """Where stored entries are modelled: keys un-rotated with their positions' (cos, sin) `[T, r]`, values (and
    keys of a model without RoPE) as stored."""

    cos: Tensor | None = None
    sin: Tensor | None = None

    def model(self, x: Tensor) -> Tensor:
        return x if self.cos is None else unrotate(x, self.cos, self.sin)

    def stored(self, x: Tensor) -> Tensor:
        return x if self.cos is None else rotate(x, self.cos, self.sin)

    def at(self, t: Tensor) -> "Frame":
        """The frame of the rows at time indices `t` (one position per row)."""
        return self if self.cos is None else Frame(self.cos[t], self.sin[t])

    def expand(self) -> "Frame":
        """The frame of rows `[N, m, d]` sharing their row's position (from a frame of `[N, r]`)."""
        return self if self.cos is None else Frame(self.cos[:, None], self.sin[:, None])


def _live(live: Tensor) -> Tensor:
    return live.view(1, 1, -1)


def impute(x: Tensor, st: Mapping[str, Tensor], frame: Frame, live: Tensor) -> tuple[Tensor, Tensor]:
    """Lost elements (exact zeros, non-finite) of live positions replaced by their conditional mean given the
    rest of their vector under the clean Gaussian; every other element returned bit-identical. Returns (x,
    bool [B, H, T] of the entries changed)."""
    gone = lost(x) & _live(live)[..., None]
    touched = gone.any(-1)
    if not bool(touched.any()):
        return x, touched
    b, h, t = touched.nonzero(as_tuple=True)
    here = frame.at(t)
    rows = conditional_mean(x[b, h, t].float(), gone[b, h, t], here.stored(st["mean"][h]),
                            precision(st["evec"], st["eval"]), h, here)
    out = x.clone()
    out[b, h, t] = rows.to(x.dtype)
    return out, touched


def clamp(x: Tensor, st: Mapping[str, Tensor], frame: Frame, live: Tensor,
          limit: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Elements lying beyond the calibrated per-channel range (keys before RoPE) by more than `limit` range
    widths (`[H]`; None: by anything) clamped into it, keys rotated back; non-finite stored elements count as
    0 and mark their entry. Entries with nothing beyond are returned bit-identical. Returns (x, changed)."""
    finite = torch.isfinite(x)
    xf = frame.model(torch.where(finite, x, torch.zeros_like(x)).float())
    over = outside(xf, st["lo"], st["hi"])
    hit = over > (0.0 if limit is None else limit.view(1, -1, 1, 1))
    touched = (hit.any(-1) | ~finite.all(-1)) & _live(live)
    if not bool(touched.any()):
        return x, touched
    fixed = torch.where(hit, torch.maximum(torch.minimum(xf, st["hi"][None, :, None]), st["lo"][None, :, None]), xf)
    return torch.where(touched[..., None], frame.stored(fixed).to(x.dtype), x), touched


def relative_noise(x: Tensor, st: Mapping[str, Tensor], live: Tensor, positions: Tensor, block: int) -> Tensor:
    """s² `[B, H, T]` of each position's block (x in the modelled frame), over the mean clean eigenvalue."""
    s2 = noise_variance(x, live, st["mean"], st["evec"], st["eval"], block, positions)
    return s2 / st["eval"].mean(-1).clamp_min(1e-30)[None, :, None]


def denoise(x: Tensor, st: Mapping[str, Tensor], frame: Frame, live: Tensor, positions: Tensor, block: int,
            limit: Tensor | None = None, floor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Wiener shrinkage of the blocks whose estimated white-noise variance, over the mean clean eigenvalue,
    exceeds `limit` (`[H]`; None: any noise at all), each with its block's own s² less `floor` (`[H]`, relative:
    what clean blocks show without any noise, so only the excess over it is taken for noise); keys are
    un-rotated first and rotated back. Entries with non-finite elements are left to `impute`; the others of
    unflagged blocks are returned bit-identical. Returns (x, changed)."""
    xf = frame.model(x.float())
    rel = relative_noise(xf, st, live, positions, block)
    hit = (rel > (0.0 if limit is None else limit.view(1, -1, 1))) & _live(live) & torch.isfinite(xf).all(-1)
    if not bool(hit.any()):
        return x, hit
    if floor is not None:
        rel = (rel - floor.view(1, -1, 1)).clamp_min(0)
    s2 = rel * st["eval"].mean(-1)[None, :, None]
    fixed = wiener(xf, st["mean"], st["evec"], st["eval"], s2[..., None])
    return torch.where(hit[..., None], frame.stored(fixed).to(x.dtype), x), hit


# ---- the screen: whether `repair` may flag anything in the last blocks of a cache, on the host (numpy, float32)
# (a decode step screens a few hundred numbers per layer, where each torch call would cost more than its arithmetic)


def screen_levels(st: Mapping[str, Tensor], range_margin: float, noise_margin: float,
                  slack: float = 1e-3) -> dict[str, np.ndarray]:
    """What the screens (`entries_may_flag`, `noise_may_flag`) compare against, from statistics stacked on a
    leading axis of kinds (`[n, H, ...]`), as float32 arrays shaped to broadcast over `[n, B, H, T, d]`: the
    range test's limits moved in by `slack` range widths and the noise test's by a relative `slack`, far more
    than the rounding that separates the screens' arithmetic from `repair`'s, so a screen never misses a flag;
    and `bound`, the weights of an upper bound of the noise estimate (`noise_may_flag`)."""
    st = {k: v.detach().double().cpu().numpy() for k, v in st.items()}  # derived in float64, kept in float32
    lam = st["eval"]
    # c_j = 1 / (sum over i with lam_i > lam_j of (lam_j / lam_i)^2 + #{i: lam_i <= lam_j}) >= w_j(s) / sum_i w_i(s)
    # for every s >= 0, where w_i(s) = (lam_i + s)^-2 are the Fisher weights: (lam_j + s) / (lam_i + s) rises
    # with s towards 1 when lam_i > lam_j and stays >= 1 otherwise
    lj, li = lam[..., :, None], lam[..., None, :]
    denominator = np.where(li > lj, (lj / np.maximum(li, 1e-30)) ** 2, 1.0).sum(-1)
    reach = (range_margin * st["range_level"] - slack)[..., None] * np.maximum(st["hi"] - st["lo"], 1e-12)
    at = (slice(None), None, slice(None), None)  # [n, H, ...] -> [n, 1, H, 1, ...] ([n, 1, H, d, d] for evec)
    out = {"mean": st["mean"][at], "evec": st["evec"][:, None], "eval": lam[at],
           "low": (st["lo"] - reach)[at], "high": (st["hi"] + reach)[at],
           "bound": (1.0 / denominator)[:, None, :, :, None],
           "noise_limit": ((1 - slack) * noise_margin * st["noise_level"] * lam.mean(-1))[at]}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def entries_may_flag(stored: np.ndarray, modelled: np.ndarray, lv: Mapping[str, np.ndarray]) -> bool:
    """Whether `repair`'s tests of single entries may flag one of these (`[n, B, H, T, d]`, as stored and in the
    modelled frame; levels of `screen_levels`): an exact zero, a non-finite element, an element beyond its
    calibrated range by more than the margin."""
    inside = (modelled >= lv["low"]) & (modelled <= lv["high"])  # False for a non-finite element
    return bool((stored == 0).any() or not inside.all())


def energy(modelled: np.ndarray, lv: Mapping[str, np.ndarray]) -> np.ndarray:
    """`[n, B, H, T, d]`: each entry's squared coordinates in the clean eigenbasis (what the noise test averages
    per block)."""
    return ((modelled - lv["mean"]) @ lv["evec"]) ** 2


def noise_may_flag(m: np.ndarray, lv: Mapping[str, np.ndarray]) -> bool:
    """Whether `repair`'s noise test may flag a block whose mean squared coordinates are m (`[n, B, H, nb, d]`),
    by `noise_variance`'s Fisher scoring; the scoring runs only where an upper bound of every one of its
    iterates, sum_j c_j max(excess_j, 0) (c_j from `screen_levels`), does not already clear the limit."""
    excess = m - lv["eval"]
    if not ((np.maximum(excess, 0) @ lv["bound"])[..., 0] > lv["noise_limit"]).any():
        return False
    parts = np.stack([excess, np.ones_like(excess)], -1)  # [..., d, 2]: sum_j w_j excess_j and sum_j w_j in one product
    s2 = np.maximum(excess.mean(-1), 0)
    for _ in range(4):  # noise_variance's Fisher scoring: s2 = sum_j w_j excess_j / sum_j w_j
        nd = ((lv["eval"] + s2[..., None]) ** -2)[..., None, :] @ parts
        s2 = np.maximum(nd[..., 0, 0] / nd[..., 0, 1], 0)
    return bool((s2 > lv["noise_limit"]).any())


def may_flag(stored: np.ndarray, modelled: np.ndarray, lv: Mapping[str, np.ndarray],
             block: int) -> tuple[bool, np.ndarray]:
    """(may flag, `energy`): False only when `repair` flags no entry of a run of live positions that starts at
    a block boundary (the tail of a cache after its stable blocks). Everything carries a leading axis of kinds
    (keys, values), so one call screens both: `stored` and `modelled` (`[n, B, H, T, d]`: as stored, and in the
    modelled frame) and the levels of `screen_levels`. The tests are `repair`'s without repairing anything;
    their limits sit a little inside `repair`'s, so a False is never wrong and a True near a limit only sends
    the caller to `repair`."""
    T = stored.shape[3]
    y2 = energy(modelled, lv)
    nb = max(T // block, 1)  # blocks as `blocks` cuts them: the last takes the remainder
    full = (nb - 1) * block
    m = y2[..., full:, :].mean(-2, keepdims=True)
    if full:
        head = y2[..., :full, :]
        m = np.concatenate([head.reshape(*head.shape[:-2], nb - 1, block, -1).mean(-2), m], -2)
    return entries_may_flag(stored, modelled, lv) or noise_may_flag(m, lv), y2


def repair(x: Tensor, st: Mapping[str, Tensor], frame: Frame, live: Tensor, positions: Tensor, block: int,
           range_margin: float, noise_margin: float) -> tuple[Tensor, Tensor]:
    """The three repairs where the cache itself shows their fault beyond what held-in clean caches showed
    (`st["range_level"]`, `st["noise_level"]`, per head): lost elements imputed; elements beyond the calibrated
    range by more than `range_margin` times the range level clamped; blocks whose relative noise exceeds
    `noise_margin` times the noise level denoised, with the excess over that level taken for the noise (in this
    order: a spike or a NaN would inflate the noise estimate). Entries none of them flags are returned
    bit-identical. Returns (x, changed)."""
    x, a = impute(x, st, frame, live)
    x, b = clamp(x, st, frame, live, range_margin * st["range_level"])
    x, c = denoise(x, st, frame, live, positions, block, noise_margin * st["noise_level"], st["noise_level"])
    return x, a | b | c
