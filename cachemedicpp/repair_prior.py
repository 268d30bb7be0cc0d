"""Family E: a learned operator that builds on the model of clean caches.

Per protected layer, the operator first runs `calibrated_repair` (prior.py) on the cache attention reads: lost
elements imputed, elements far out of their calibrated range (keys before RoPE) clamped, blocks with excess
white-noise energy denoised, each only where the cache shows its fault beyond held-in clean levels. That gives,
per entry (layer, KV head, position) and for X in {K, V}, the closed-form estimate R and whether it flagged the
entry. What is learned, by the same self-distillation as the other families, is how far to trust it:

    g = clamp(s, 0, 1) on flagged entries, 0 elsewhere      s = MLP(features), per layer
    X̂ = R + (g − 1)(R − X) + g · ((R − X) W) Uᵀ           = X + g (R − X) + g · (low-rank residual)

The features of an entry, for K and V: whether the repair flagged it, log(1 + ‖R − X‖² / ‖X‖²), and the fraction
of its elements that are lost (exact zeros or non-finite). At initialisation s = 1 and U = 0, so the operator is
`calibrated_repair` exactly; an entry with a non-finite element always takes the repair (g = 1).

The gate is harm-aware: training adds `train.lambda_gate` times the mean gate over flagged entries to the
distillation loss, so a gate stays open only where applying the repair lowers the KD loss by more than that
price, and shuts where the repair changes what was harmless (a requantisation, mild noise the model ignores, a
clean block the repair mistook). Once shut (s ≤ 0) a gate passes no gradient and stays shut.

On a clean cache nothing is flagged (the repair's levels are set on held-in clean caches), and the layer's
output is the bare kernel's, bit for bit. Decoding (`incremental`, what `protect` sets), a step does not repair
a clean cache to find that out: the stable blocks are remembered as unflagged, and the entries after them are
screened (`prior.may_flag` on the host: the repair's own tests, limits a little inside its own, keys and values
at once; a step inside the last block screens only its new entries against a running sum of the block's
energy). Only a screen that may flag sends the step to the repair, so a decode on a clean cache gives the bare
kernel's output with a few host operations per layer and step. A fault written into the stable blocks after
they were screened is not seen by an incremental decode (the memo trusts them while their last entry is
unchanged); eval and training repair the whole cache at every forward.

The statistics and levels are copied from the run's calibration into buffers (`attach`), so a checkpoint
carries everything the operator needs. Positions are counted from the
first cached entry: layers that hold a sliding window are refused (their positions are not known here).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cachemedicpp import prior

STATS = ("mean", "lo", "hi", "evec", "eval", "range_level", "noise_level")
FEATURES = tuple(f"{x}_{n}" for x in "kv" for n in ("flagged", "log_change", "lost"))
HIDDEN = 16  # hidden units of the per-layer gate MLP


def _flags(fixed: dict) -> bool:
    """Whether a repair (`PriorOperator.repair`'s output) flagged any entry: where it did not, `attend` is the bare
    kernel."""
    return any(bool(ch.any()) for _, ch in fixed.values())


class PriorOperator(nn.Module):
    """Family E (see the module docstring). `layers` are the protected layers."""

    family = "E"
    uses_memo = True  # the hook hands `attend` the plan's memo (used only when `incremental`)
    observes = ()  # no unprotected layer is read
    # decode steps repair only the entries after the last stable block, the rest kept in the plan's memo (set
    # by `protect` and the bench; eval and training always repair the whole cache)
    incremental = False

    def __init__(self, layers: Sequence[int], head_dim: int, num_heads: int, num_kv_heads: int, *,
                 rank: int = 8, apply_to: str = "KV", seed: int = 0):
        super().__init__()
        self.layers = tuple(sorted(set(int(l) for l in layers)))
        self.d, self.rank, self.apply_to = head_dim, rank, apply_to
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        L, H, d, F = len(self.layers), num_kv_heads, head_dim, len(FEATURES)
        # the clean-cache model, per layer, for keys (before RoPE) and values: filled by `attach`
        for x in "kv":
            for name, shape in (("mean", (L, H, d)), ("lo", (L, H, d)), ("hi", (L, H, d)), ("evec", (L, H, d, d)),
                                ("eval", (L, H, d)), ("range_level", (L, H)), ("noise_level", (L, H))):
                self.register_buffer(f"{x}_{name}", torch.zeros(shape))
        self.register_buffer("inv_freq", torch.zeros(L, d // 2))
        self.register_buffer("rope_pairs", torch.zeros(L, dtype=torch.long))  # 0: keys cached as projected
        self.register_buffer("rope_scaling", torch.ones(L))
        # sink positions, positions per noise block, range margin, noise margin
        self.register_buffer("settings", torch.zeros(4))
        self.register_buffer("attached", torch.zeros((), dtype=torch.bool))
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(L, F, HIDDEN, generator=g) / math.sqrt(F))
        self.b1 = nn.Parameter(torch.zeros(L, HIDDEN))
        self.w2 = nn.Parameter(torch.zeros(L, HIDDEN))
        self.b2 = nn.Parameter(torch.ones(L))  # s = 1: every flagged entry takes the repair
        n = len(apply_to)
        self.w = nn.Parameter(torch.randn(L, n, d, rank, generator=g) / math.sqrt(d))
        self.u = nn.Parameter(torch.zeros(L, n, d, rank))
        self.gate_terms: list[tuple[torch.Tensor, int]] = []  # (sum of gates, flagged entries) per layer call
        self.entries_repaired = 0  # entries `repair` has been handed (tests count them)
        self._stacked: dict = {}  # `_screen` per layer index, and `_ints`
        self.float()

    def _i(self, layer: int) -> int:
        return self.layers.index(layer)

    # -- the clean-cache model -------------------------------------------------------------------
    @torch.no_grad()
    def attach(self, cal, range_margin: float, noise_margin: float) -> None:
        """Copy the calibration's clean-cache model (`calibration.Calibration`) and the repair's margins."""
        missing = [l for l in self.layers if l not in cal.kprior]
        if missing:
            raise ValueError(f"the calibration has no clean-cache model of layers {missing}")
        for i, l in enumerate(self.layers):
            for x, st in (("k", cal.kprior[l]), ("v", cal.vprior[l])):
                for name in STATS:
                    getattr(self, f"{x}_{name}")[i] = st[name].to(self.inv_freq.device, torch.float32)
            if l in cal.rope:
                inv_freq, scaling = cal.rope[l]
                self.inv_freq[i, :inv_freq.numel()] = inv_freq.float()
                self.rope_pairs[i] = inv_freq.numel()
                self.rope_scaling[i] = float(scaling)
        self.settings.copy_(torch.tensor([cal.sink, cal.block, range_margin, noise_margin], dtype=torch.float32))
        self._stacked = {}
        self.attached.fill_(True)

    def _stats(self, i: int, x: str) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{x}_{name}")[i] for name in STATS}

    def _frame(self, i: int, positions: torch.Tensor) -> prior.Frame:
        r = int(self.rope_pairs[i])
        if r == 0:
            return prior.Frame()
        return prior.Frame(*prior.rope_cos_sin(self.inv_freq[i, :r], float(self.rope_scaling[i]), positions))

    @torch.no_grad()
    def repair(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"K"|"V": (R, flagged [B, H, T])}: calibrated_repair of the cached entries at positions start.., for
        the kinds of `apply_to`."""
        i = self._i(layer)
        sink, block, rm, nm = self.settings.tolist()
        self.entries_repaired += int(k.shape[0] * k.shape[1] * k.shape[2])
        pos = torch.arange(start, start + k.shape[2], device=k.device)
        live = pos >= int(sink)
        out = {}
        for which, x, frame in (("K", k, self._frame(i, pos)), ("V", v, prior.Frame())):
            if which in self.apply_to:
                out[which] = prior.repair(x.float(), self._stats(i, which.lower()), frame, live, pos, int(block),
                                          rm, nm)
        return out

    def changes(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether `attend` over the whole cache k, v of `layer` (not incremental) changes anything: an entry the
        repair flags. False means its output is the bare kernel's on k, v, bit for bit (the grid's test of a cell
        it can reuse no_defense's value for)."""
        return bool(self.attached) and _flags(self.repair(layer, k, v))

    # -- the hook --------------------------------------------------------------------------------
    def gates(self, layer: int, k: torch.Tensor, v: torch.Tensor, fixed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, H, T], flagged [B, H, T]) of the entries k, v given their repairs `fixed` (`repair`'s output)."""
        i = self._i(layer)
        feats, flagged = [], torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device)
        for which, x in (("K", k), ("V", v)):
            x = x.float()
            if which not in fixed:
                feats += [torch.zeros(x.shape[:3], device=x.device)] * 3
                continue
            r, ch = fixed[which]
            flagged |= ch
            fin = torch.isfinite(x)
            xs = torch.where(fin, x, torch.zeros_like(x))
            change = ((r - xs).pow(2).sum(-1) / xs.pow(2).sum(-1).clamp_min(1e-12)).log1p()
            lost = ((x == 0) | ~fin).float().mean(-1)
            feats += [ch.float(), torch.where(fin.all(-1), change, torch.full_like(change, 30.0)), lost]
        f = torch.stack(feats, -1)  # [B, H, T, F]
        s = torch.nn.functional.gelu(f @ self.w1[i] + self.b1[i]) @ self.w2[i] + self.b2[i]
        nonfinite = ~torch.isfinite(k.float()).all(-1) | ~torch.isfinite(v.float()).all(-1)
        g = torch.where(nonfinite & flagged, torch.ones_like(s), s.clamp(0.0, 1.0) * flagged)
        return g, flagged & ~nonfinite

    def stable(self, T: int) -> int:
        """How many leading entries of a cache of T positions have their repair fixed for every longer cache: those
        before the last block of the noise estimate (a remainder shorter than a block joins the block before it,
        so the last block can still change; `prior.blocks`)."""
        sink, block = self._ints()
        n = max(T - sink, 0)
        return min(T, sink + (max(n // block, 1) - 1) * block)

    def _screen(self, i: int) -> dict:
        """What `_tail_clean` needs of layer index i, built once (until `attach`, a load or a move), on the host:
        the statistics of the kinds of `apply_to` stacked with their screening levels (`prior.screen_levels`), and
        for keys under RoPE the signed permutation P of rotate-half (x P = rotate_half(x) on the rotary pairs)."""
        if i not in self._stacked:
            kinds = [w.lower() for w in "KV" if w in self.apply_to]
            st = {name: torch.stack([getattr(self, f"{x}_{name}")[i].float() for x in kinds]) for name in STATS}
            _, _, rm, nm = self.settings.tolist()
            lv = prior.screen_levels(st, rm, nm)
            pairs, d = int(self.rope_pairs[i]), self.d
            if pairs:
                P = np.zeros((d, d), dtype=np.float32)
                P[np.arange(pairs) + pairs, np.arange(pairs)] = -1.0
                P[np.arange(pairs), np.arange(pairs) + pairs] = 1.0
                lv["rotate_half"] = P
                lv["table"] = np.zeros((2, 0, d), dtype=np.float32)
            self._stacked[i] = lv
        return self._stacked[i]

    def _ints(self) -> tuple[int, int]:
        """(sink positions, positions per noise block), read once (until `attach`, a load or a move)."""
        if "ints" not in self._stacked:
            self._stacked["ints"] = tuple(int(x) for x in self.settings[:2].tolist())
        return self._stacked["ints"]

    def _unrotation(self, i: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) `[stop - start, d]` of positions start..stop over the attention scaling squared, 1 and 0 on
        channels without rotation: stored keys x are x cos - (x P) sin before RoPE. A table grown by doubling."""
        lv = self._screen(i)
        if lv["table"].shape[1] < stop:
            n, pairs = max(stop, 2 * lv["table"].shape[1], 256), int(self.rope_pairs[i])
            cos, sin = prior.rope_cos_sin(self.inv_freq[i, :pairs].float().cpu(), float(self.rope_scaling[i]),
                                          torch.arange(n))
            cos, sin = cos.double().numpy(), sin.double().numpy()
            a2, r = cos[:, :1] ** 2 + sin[:, :1] ** 2, cos.shape[-1]
            table = np.stack([np.ones((n, self.d)), np.zeros((n, self.d))])
            table[0, :, :r], table[1, :, :r] = cos / a2, sin / a2
            table = table.astype(np.float32)
            lv["table"] = table
        return lv["table"][0, start:stop], lv["table"][1, start:stop]

    def _apply(self, fn, *args, **kwargs):  # a move or cast: the stacked copies are rebuilt on demand
        self._stacked = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._stacked = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _kinds(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(stored, modelled) `[n, B, H, T, d]` float32 on the host: the entries k, v at positions start.. of the
        kinds of `apply_to`, as stored and in the modelled frame (keys un-rotated)."""
        lv = self._screen(i)
        kinds = [x for w, x in (("K", k), ("V", v)) if w in self.apply_to]
        stored = np.empty((len(kinds), *k.shape), dtype=np.float32)
        for j, x in enumerate(kinds):
            stored[j] = x.detach().float().cpu().numpy()
        if self.apply_to[0] != "K" or "rotate_half" not in lv:
            return stored, stored
        modelled = stored.copy()
        cos, sin = self._unrotation(i, start, start + k.shape[2])
        modelled[0] = stored[0] * cos - (stored[0] @ lv["rotate_half"]) * sin
        return stored, modelled

    def _tail_clean(self, layer: int, k: torch.Tensor, v: torch.Tensor, s0: int, end: int,
                    tail: dict | None) -> dict | None:
        """The screen state of a cache k, v whose stable blocks (up to s0, a block boundary past the sinks) are
        unflagged, when `repair` of its entries s0.. flags nothing; None when it may flag (the caller repairs).
        The state holds the sum of the squared coordinates of the entries end.. (the last block) and how far it
        reaches: a step that appends entries inside the same last block (`tail` still describes the cache)
        screens only the new entries and the block's noise from the updated sum; otherwise every entry from s0
        is screened (`prior.may_flag`)."""
        i, T = self._i(layer), k.shape[2]
        lv = self._screen(i)
        known = tail["T"] if tail is not None else 0  # s0 > 0: no tail, no match
        if end == s0 and s0 < known < T and torch.equal(tail["at"], k[:, :, known - 1]):
            stored, modelled = self._kinds(i, k[:, :, known:], v[:, :, known:], known)
            total = tail["sum"] + prior.energy(modelled, lv).sum(-2, keepdims=True)
            flag = prior.entries_may_flag(stored, modelled, lv) or prior.noise_may_flag(total / (T - s0), lv)
        else:
            stored, modelled = self._kinds(i, k[:, :, s0:], v[:, :, s0:], s0)
            flag, y2 = prior.may_flag(stored, modelled, lv, self._ints()[1])
            total = y2[..., end - s0:, :].sum(-2, keepdims=True)
        if flag:
            return None
        return {"T": T, "sum": total, "at": k[:, :, T - 1].clone()}

    def _incremental(self, layer: int, k: torch.Tensor, v: torch.Tensor, memo: dict) -> dict | None:
        """`repair` of the whole cache, the entries of its stable blocks taken from `memo` where they are still the
        stored prefix (same batch, the last stable key unchanged) and only the rest repaired: the same partition
        into blocks, so the same repair to float rounding. None when nothing is flagged: the memo then holds no
        repair of the stable blocks (each is its own), and a step that `_tail_clean` passes repairs nothing at all
        (what a decode on a clean cache does at every step)."""
        T, old = k.shape[2], memo.get(("prior", layer))
        s0 = 0
        if old is not None and old["batch"] == k.shape[0] and 0 < old["end"] <= T \
                and torch.equal(old["last"], k[:, :, old["end"] - 1]):
            s0 = old["end"]
        end, sink = self.stable(T), self._ints()[0]
        head, tail = (old["fixed"], old["tail"]) if s0 else (None, None)
        # stable blocks unflagged: screen the rest (None: it may flag, or there is nothing to screen from)
        tail = self._tail_clean(layer, k, v, s0, end, tail) if s0 >= max(sink, 1) and head is None else None
        fixed = None
        if tail is None:
            fixed = self.repair(layer, k[:, :, s0:], v[:, :, s0:], start=s0)
            if s0:
                if head is None:  # unflagged stable entries: their repair is the stored entry itself
                    head = {w: (x[:, :, :s0].float(), torch.zeros(x.shape[:2] + (s0,), dtype=torch.bool,
                                                                  device=x.device))
                            for w, x in (("K", k), ("V", v)) if w in fixed}
                fixed = {w: tuple(torch.cat([a[:, :, :s0], b], 2) for a, b in zip(head[w], fixed[w]))
                         for w in fixed}
            if not any(bool(ch.any()) for _, ch in fixed.values()):
                fixed = None
        stable = None
        if fixed is not None and any(bool(ch[:, :, :end].any()) for _, ch in fixed.values()):
            stable = {w: (r[:, :, :end], ch[:, :, :end]) for w, (r, ch) in fixed.items()}
        last = old["last"] if s0 and end == s0 else (k[:, :, end - 1].clone() if end else None)
        memo[("prior", layer)] = {"batch": k.shape[0], "end": end, "fixed": stable, "last": last, "tail": tail}
        return fixed

    @torch.no_grad()
    def prime(self, kv) -> dict:
        """A memo holding the repairs of the stable blocks of `kv` ({layer: (k, v)}): what a prefill run with the
        operator leaves behind when `incremental` (empty otherwise)."""
        memo: dict = {}
        if self.incremental:
            for l in self.layers:
                self._incremental(l, *kv[l], memo)
        return memo

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Callable,
               memo: dict | None = None) -> torch.Tensor:
        if not bool(self.attached):
            return kernel(q, k, v)
        if self.incremental and memo is not None and not torch.is_grad_enabled():
            fixed = self._incremental(layer, k, v, memo)
        else:
            fixed = self.repair(layer, k, v)
        if fixed is None or not _flags(fixed):
            return kernel(q, k, v)  # nothing flagged: the bare kernel on the stored cache
        i = self._i(layer)
        g, learnable = self.gates(layer, k, v, fixed)
        if torch.is_grad_enabled():
            self.gate_terms.append(((g * learnable).sum(), int(learnable.sum())))
        out = {"K": k, "V": v}
        for j, which in enumerate(self.apply_to):
            x = out[which]
            r, ch = fixed[which]
            xs = torch.where(torch.isfinite(x), x.float(), r)
            delta = r - xs
            new = r + (g[..., None] - 1) * delta + g[..., None] * ((delta @ self.w[i, j]) @ self.u[i, j].T)
            out[which] = torch.where(ch[..., None], new.to(x.dtype), x)
        return kernel(q, out["K"], out["V"])

    def gate_mean(self) -> torch.Tensor:
        """The mean gate over the flagged entries of the forwards since the last call (0 without any), then cleared:
        the harm-aware gate's price in the training loss."""
        terms, self.gate_terms = self.gate_terms, []
        count = sum(n for _, n in terms)
        if not count:
            return self.w2.new_zeros(())
        return sum(s for s, _ in terms) / count

    def is_identity(self, layer: int) -> bool:
        """True when no entry can change: nothing attached (no clean-cache model to repair from)."""
        return not bool(self.attached)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
