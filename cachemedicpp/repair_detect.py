"""Family D: a repair operator that finds what is corrupted before it repairs it.

Per protected layer, a detector reads every cached entry (layer, KV head, position) once and scores it
from features of the stored key and value against statistics of clean caches of training windows:

    per X in {K, V}:  log(1 + mean z²)      dense noise           z = (x − μ) / σ per channel
                      log(1 + max |z|)      spikes, flipped bits
                      standardised log ‖x‖  scaled or shrunk entries
                      fraction of exact zeros (lost channels)
                      fraction of non-finite values
                      log(1 + mean r²)      disagreement with the reference layer (below)

The reference layer (threat-model assumption, stated in the README): the cache of one unprotected
layer below the protected ones is intact. A ridge map fitted on clean caches predicts each protected
layer's K and V from the reference layer's K and V at the same position; r is the standardised
residual. An entry that belongs to another prompt (an overwrite, a stale or swapped block) looks
plausible on its own but disagrees with what the reference layer says is at that position.

From the score s = MLP(standardised features) the operator derives a gate

    g = clamp((s − τ) / ramp, 0, 1)              exactly 0 below the threshold τ

and, per entry,
    - an additive attention-logit bias −softplus(β) · g ≤ 0 (attention turns away; through the mask,
      so every base kernel honours it);
    - a correction X̂ = X + g · (−sigmoid(a) ⊙ (X − c) + ((X − c) W) Uᵀ): a per-channel shrink towards
      c plus a rank-r map (U is zero at initialisation), where c is the reference layer's prediction of
      the entry (the clean mean μ without a reference layer).
Lost values are replaced by c first: non-finite ones (a flipped exponent bit) always, and the entry is
gated on; exact zeros (a lost channel) where the entry is gated. This is a design rule, not learned.

τ is 0 while training; after training it is set on clean training windows to the highest clean score
plus a margin, so no clean entry of those windows is gated: on a clean cache the operator then leaves
K, V and the mask untouched and the layer's output is the bare kernel's, bit for bit.

The detector's output depends on the entry alone, so it is causal and computed once per entry: the
hook plan's memo keeps it beside the cache. A forward of several tokens (a prefill, a scored
continuation, a training step) scores every entry it has not scored yet; one-token decode steps score the
entries they append in blocks of `score_block` (one batched call per block instead of some fifty small
kernels per layer and token): until its block is full, an entry the model has just written, which has not
been at rest, counts as clean (gate 0). `score_block: 1` scores every entry at its first read.

Sliding-window layers hold only their last positions: with a reference layer (always full attention) the
absolute position of a held entry is known (the reference holds every position), so the sinks and the
agreement feature line up, and when the window slides the memo drops the entries that left it; without
one, positions count from the first held entry, and a slide makes the held entries scored again (bounded
by the window).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from cachemedicpp import config, hf
from cachemedicpp.seeding import torch_rng

_DETECTOR = config.section_defaults("repair")["detector"]  # the schema's defaults, written there once
_REPAIR = config.section_defaults("repair")

N_FEATURES = 12
FEATURES = tuple(f"{x}_{n}" for x in "kv" for n in ("mean_z2", "max_z", "log_norm", "zeros", "nonfinite", "agree"))


class DetectingOperator(nn.Module):
    """Family D (see the module docstring). `layers` are the protected layers; `reference_layer` (or
    None) is the unprotected layer whose cache the agreement feature reads."""

    family = "D"  # repair.FAMILIES["D"] says what the family has
    uses_memo = True
    # the longest cache the operator was trained on (set by `protect` from the run's config; None: no warning).
    # Beyond it the detector reads clean entries as corrupted: attending to a longer cache warns once.
    trained_positions: int | None = None
    _warned_length = False

    def __init__(self, layers: Sequence[int], head_dim: int, num_heads: int, num_kv_heads: int, *,
                 rank: int = _REPAIR["rank"], apply_to: str = _REPAIR["apply_to"],
                 hidden: int = _DETECTOR["hidden"], reference_layer: int | None = None,
                 sink_tokens: int = _DETECTOR["sink_tokens"], ramp: float = _DETECTOR["ramp"],
                 suppress: bool = _DETECTOR["suppress"], correct: bool = _DETECTOR["correct"],
                 score_block: int = _DETECTOR["score_block"], seed: int = 0):
        super().__init__()
        self.layers = tuple(sorted(set(int(l) for l in layers)))
        self.d, self.rank, self.apply_to = head_dim, rank, apply_to
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.reference_layer = reference_layer
        self.observes = (reference_layer,) if reference_layer is not None else ()
        self.sink, self.ramp = int(sink_tokens), float(ramp)
        self.suppress, self.correct = bool(suppress), bool(correct)
        self.score_block = max(1, int(score_block))
        self.entries_scored = 0  # entries the detector has scored (tests count them)
        L, H, d = len(self.layers), num_kv_heads, head_dim
        g = torch.Generator().manual_seed(seed)
        # clean statistics (buffers: filled by `fit`, saved with the operator)
        self.register_buffer("mu", torch.zeros(L, 2, H, d))
        self.register_buffer("sd", torch.ones(L, 2, H, d))
        self.register_buffer("lnorm", torch.zeros(L, 2, H, 2))  # mean, std of log ‖x‖
        self.register_buffer("feat", torch.zeros(L, 2, N_FEATURES))  # mean, std of the raw features
        self.feat[:, 1] = 1.0
        p = 2 * H * d
        self.register_buffer("pred", torch.zeros(L, p + 1, p) if reference_layer is not None else torch.zeros(0))
        self.register_buffer("rsd", torch.ones(L, 2, H, d))
        self.register_buffer("tau", torch.zeros(L))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # detector: per layer, F -> hidden -> 1; the last layer starts at zero, so s = -4 everywhere
        self.w1 = nn.Parameter(torch.randn(L, N_FEATURES, hidden, generator=g) / math.sqrt(N_FEATURES))
        self.b1 = nn.Parameter(torch.zeros(L, hidden))
        self.w2 = nn.Parameter(torch.zeros(L, hidden))
        self.b2 = nn.Parameter(torch.full((L,), -4.0))
        self.beta = nn.Parameter(torch.full((L, H), 2.0))  # suppression strength softplus(beta)
        n = len(apply_to)
        self.shrink = nn.Parameter(torch.full((L, n, H, d), -4.0))  # sigmoid -> 0.018 where gated
        self.w = nn.Parameter(torch.randn(L, n, d, rank, generator=g) / math.sqrt(d))
        self.u = nn.Parameter(torch.zeros(L, n, d, rank))
        self.float()

    # -- statistics ------------------------------------------------------------------------------
    def _i(self, layer: int) -> int:
        return self.layers.index(layer)

    @torch.no_grad()
    def fit(self, caches: Sequence[Mapping[int, tuple[torch.Tensor, torch.Tensor]]], ridge: float = 1.0) -> None:
        """Clean statistics from batch-1 caches {layer: (k, v)} of training windows (sinks excluded):
        channel means and stds, log-norm band, the reference ridge map and its residual scale, and the
        mean and std of every raw feature (the detector's inputs are standardised)."""
        s = self.sink
        rows = lambda l: [torch.stack([c[l][0][0, :, s:], c[l][1][0, :, s:]]).float() for c in caches]  # noqa: E731
        ref = None
        if self.reference_layer is not None:
            ref = torch.cat([self._flat(c[self.reference_layer][0][..., s:, :], c[self.reference_layer][1][..., s:, :])[0]
                             for c in caches])  # [N, 2Hd]
            ref = torch.cat([ref, torch.ones(ref.shape[0], 1, device=ref.device)], 1)
        for i, l in enumerate(self.layers):
            x = torch.cat(rows(l), dim=2)  # [2, H, N, d]
            self.mu[i] = x.mean(2)
            self.sd[i] = x.std(2).clamp_min(1e-6)
            ln = x.norm(dim=-1).clamp_min(1e-12).log()
            self.lnorm[i] = torch.stack([ln.mean(-1), ln.std(-1).clamp_min(1e-6)], -1)
            if ref is not None:
                y = torch.cat([self._flat(c[l][0][..., s:, :], c[l][1][..., s:, :])[0] for c in caches])
                a = ref.double()
                self.pred[i] = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype,
                                                                                device=a.device), a.T @ y.double()).float()
                res = (y - ref @ self.pred[i]).reshape(-1, 2, self.num_kv_heads, self.d)
                self.rsd[i] = res.std(0).clamp_min(1e-6)
            raw = torch.cat([self._raw(i, c[l][0][..., s:, :].float(), c[l][1][..., s:, :].float(),
                                       None if ref is None else (c[self.reference_layer][0][..., s:, :],
                                                                 c[self.reference_layer][1][..., s:, :]))
                             for c in caches], dim=2)  # [1, H, N, F]
            f = raw.reshape(-1, N_FEATURES)
            self.feat[i, 0] = f.mean(0)
            self.feat[i, 1] = f.std(0).clamp_min(1e-3)
        self.fitted.fill_(True)

    def _flat(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] twice -> [B, T, 2·H·d] (K heads then V heads)."""
        b, h, t, d = k.shape
        return torch.cat([k, v], 1).float().permute(0, 2, 1, 3).reshape(b, t, 2 * h * d)

    def _raw(self, i: int, k: torch.Tensor, v: torch.Tensor, ref: tuple | None,
             with_prediction: bool = False):
        """Raw features [B, H, T, F] of entries k, v [B, H, T, d]; with `with_prediction` also the
        reference layer's prediction of k and v ([2, B, H, T, d], None without a reference)."""
        x = torch.stack([k, v])  # [2, B, H, T, d]
        bad = ~torch.isfinite(x)
        mu = self.mu[i][:, None, :, None, :]
        x = torch.where(bad, mu.expand_as(x), x)
        z = (x - mu) / self.sd[i][:, None, :, None, :]
        ln = x.norm(dim=-1).clamp_min(1e-12).log()
        lstat = self.lnorm[i][:, None, :, None, :]
        feats = [z.pow(2).mean(-1).log1p(), z.abs().amax(-1).log1p(), (ln - lstat[..., 0]) / lstat[..., 1],
                 (x == 0).float().mean(-1), bad.float().mean(-1)]
        pr = None
        if ref is not None and self.pred.numel():
            rk, rv = ref
            a = self._flat(rk, rv)
            a = torch.cat([torch.where(torch.isfinite(a), a, torch.zeros_like(a)), torch.ones_like(a[..., :1])], -1)
            b, h, t, d = k.shape
            pr = (a @ self.pred[i]).reshape(b, t, 2, h, d).permute(2, 0, 3, 1, 4)  # [2, B, H, T, d]
            r = (x - pr) / self.rsd[i][:, None, :, None, :]
            feats.append(r.pow(2).mean(-1).log1p())
        else:
            feats.append(torch.zeros_like(feats[0]))
        f = torch.stack(feats, -1)  # [2, B, H, T, 6]
        f = torch.cat([f[0], f[1]], -1)  # [B, H, T, 12]
        return (f, pr) if with_prediction else f

    # -- per-entry outputs -----------------------------------------------------------------------
    def score(self, layer: int, k: torch.Tensor, v: torch.Tensor, ref: tuple | None = None,
              with_prediction: bool = False):
        """Detector logits s [B, H, T] of entries k, v [B, H, T, d] (and the reference prediction)."""
        i = self._i(layer)
        raw, pr = self._raw(i, k.float(), v.float(), ref, with_prediction=True)
        f = (raw - self.feat[i, 0]) / self.feat[i, 1]
        h = torch.nn.functional.gelu(f @ self.w1[i] + self.b1[i])
        self.entries_scored += int(k.shape[0] * k.shape[1] * k.shape[2])
        s = h @ self.w2[i] + self.b2[i]
        return (s, pr) if with_prediction else s

    def gate(self, layer: int, s: torch.Tensor, positions: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
        g = ((s - self.tau[self._i(layer)]) / self.ramp).clamp(0.0, 1.0)
        g = torch.where(nonfinite, torch.ones_like(g), g)
        return g * (positions >= self.sink).to(g.dtype)  # attention sinks are never gated

    def entries(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, ref: tuple | None) -> dict:
        """Detector output and corrections for entries k, v [B, H, T, d] at cache positions start..:
        {"score", "gate", "bias", "dk", "dv", "nonfinite"}. dk/dv (None where apply_to omits it) are what
        to add to K/V once their non-finite values are zeroed. The correction's centre c is the reference
        layer's prediction of the entry (the clean mean μ without a reference layer); lost values (non-finite
        always, exact zeros where gated) are replaced by c before the gated correction."""
        i = self._i(layer)
        s, pr = self.score(layer, k, v, ref, with_prediction=True)
        x = torch.stack([k, v]).float()
        nonfinite = (~torch.isfinite(x)).any(-1).any(0)  # [B, H, T]
        pos = torch.arange(start, start + k.shape[2], device=k.device)
        g = self.gate(layer, s, pos, nonfinite)
        out = {"score": s, "gate": g, "bias": -torch.nn.functional.softplus(self.beta[i])[None, :, None] * g
               if self.suppress else None, "dk": None, "dv": None, "nonfinite": bool(nonfinite.any())}
        on = (g > 0)[..., None]
        if not out["nonfinite"] and not torch.is_grad_enabled() and not bool(on.any()):
            return out  # nothing gated, nothing lost: no correction (None = zeros)
        for j, w in enumerate(self.apply_to):
            t = 0 if w == "K" else 1
            xw = x[t]
            c = pr[t] if pr is not None else self.mu[i, t][None, :, None, :].expand_as(xw)
            fin = torch.isfinite(xw)
            read = torch.where(fin, xw, torch.zeros_like(xw))  # what attention reads before the correction
            lost = ~fin | ((xw == 0) & on)
            xf = torch.where(lost, c, xw)
            delta = torch.zeros_like(xw) if not self.correct else (
                -torch.sigmoid(self.shrink[i, j])[None, :, None, :] * (xf - c) + ((xf - c) @ self.w[i, j]) @ self.u[i, j].T)
            out["dk" if w == "K" else "dv"] = (xf - read) + g[..., None] * delta
        return out

    # -- the hook --------------------------------------------------------------------------------
    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor, memo: dict) -> None:
        """The reference layer's entries of this forward (read by the protected layers after it)."""
        memo["reference"] = (k, v)

    _KEYS = ("score", "gate", "bias", "dk", "dv")

    @staticmethod
    def _cat(prev: torch.Tensor | None, new: torch.Tensor | None, n_prev: int, n_new: int) -> torch.Tensor | None:
        """Two per-entry outputs joined along the cache axis; None stands for zeros (nothing gated)."""
        if prev is None and new is None:
            return None

        def zeros(x, n):
            return torch.zeros(*x.shape[:2], n, *x.shape[3:], dtype=x.dtype, device=x.device)

        other = prev if prev is not None else new
        prev = zeros(other, n_prev) if prev is None else prev
        new = zeros(other, n_new) if new is None else new
        return torch.cat([prev, new], 2)

    @staticmethod
    def _buffer(x: torch.Tensor, keep: int, total: int) -> torch.Tensor:
        """A buffer shaped like x along the cache axis with room for `total` entries and more to grow into, its
        first `keep` entries x's (the rest unwritten)."""
        buf = x.new_empty(*x.shape[:2], total + max(256, total // 4), *x.shape[3:])
        buf[:, :, :keep] = x[:, :, :keep]
        return buf

    @classmethod
    def _append(cls, store: dict, key: str, prev: torch.Tensor | None, new: torch.Tensor | None, n_prev: int,
                n_new: int) -> torch.Tensor | None:
        """`_cat` without gradients, in amortised O(n_new): `prev` and `new` joined in a buffer that grows
        with the cache (store[key] = [buffer, entries written]), so a decode step that scores a block writes
        only that block instead of copying every earlier entry. The same values bit for bit. A buffer is
        extended in place only by the memo holding its last written entries (a memo reused from an earlier
        state, e.g. a decode run again from the same primed memo, copies into a buffer of its own); `store` is
        the new memo's own dict."""
        if prev is None and new is None:
            return None
        other = prev if prev is not None else new
        total = n_prev + n_new
        held = store.get(key)
        if held is None or held[1] != n_prev or prev is None or held[0].shape[2] < total \
                or held[0].data_ptr() != prev.data_ptr() or held[0].shape[:2] != other.shape[:2]:
            buf = cls._buffer(other, n_prev if prev is not None else 0, total)
            if prev is None:
                buf[:, :, :n_prev] = 0
            held = [buf, n_prev]
        buf = held[0]
        if new is None:
            buf[:, :, n_prev:total] = 0
        else:
            buf[:, :, n_prev:total] = new
        held[1] = total  # the buffer's written length, seen by every memo sharing it
        store[key] = held
        return buf[:, :, :total]

    def _kept(self, old: dict | None, k: torch.Tensor, off: int) -> tuple[dict | None, int]:
        """The part of the memo `old` still valid for the held entries k (cache positions off..): the
        batch matches and the entry `old` scored last is where it should be; a sliding window that moved on
        drops the entries that left it (absolute positions come from the reference layer)."""
        if old is None or old["batch"] != k.shape[0] or old["n"] <= 0:
            return None, 0
        shift = off - old.get("off", 0)
        n = old["n"] - shift
        if shift < 0 or n <= 0 or n > k.shape[2] or not torch.equal(old["last"], k[:, :, n - 1]):
            return None, 0
        if shift:
            old = {**{key: val for key, val in old.items() if key not in ("read", "store")},
                   **{key: (None if old[key] is None else old[key][:, :, shift:]) for key in self._KEYS}}
            old["any"] = bool((old["gate"] > 0).any())
        return old, n

    def _memo(self, layer: int, k: torch.Tensor, v: torch.Tensor, memo: dict | None, q_len: int = 0) -> dict:
        """This layer's per-entry outputs of its first `n` entries (the dict's "n"), scoring only the new ones:
        all k.shape[2] of them, except on a one-token decode step, which scores them only once `score_block`
        have accumulated (until then the entries after the first n are pending and count as clean). The memo
        is valid while the batch and the stored prefix are unchanged (checked on the last scored key).
        Corrections are kept only once some entry is gated (until then nothing is copied)."""
        T = k.shape[2]
        ref, off = None, 0
        if self.reference_layer is not None and memo is not None and "reference" in memo:
            rk, rv = memo["reference"]
            if rk.shape[0] == k.shape[0] and rk.shape[2] >= T:
                # the reference layer (full attention) holds every position: a sliding layer holds the last T
                off = rk.shape[2] - T
                ref = (rk[:, :, off:], rv[:, :, off:])
        old, n = self._kept(memo.get(layer) if memo is not None else None, k, off)
        if n == T:
            return old
        if old is not None and q_len == 1 and T - n < self.score_block and not torch.is_grad_enabled() \
                and bool(torch.isfinite(k[:, :, n:].sum() + v[:, :, n:].sum())):
            # a decode step: the block of appended entries is not full yet; they are read as clean
            # (a non-finite value is always replaced, so such an entry is scored at once)
            if old is not memo[layer]:
                memo[layer] = old = {**old, "off": off, "n": n}
            return old
        new = self.entries(layer, k[:, :, n:], v[:, :, n:], off + n,
                           None if ref is None else (ref[0][:, :, n:], ref[1][:, :, n:]))
        new["any"] = bool((new["gate"] > 0).any())
        if n:
            new["any"] = new["any"] or old["any"]
            new["nonfinite"] = new["nonfinite"] or old["nonfinite"]
            if torch.is_grad_enabled():
                for key in self._KEYS:
                    new[key] = self._cat(old[key], new[key], n, T - n)
            else:
                new["store"] = store = dict(old.get("store") or {})
                for key in self._KEYS:
                    new[key] = self._append(store, key, old[key], new[key], n, T - n)
            if old.get("read") is not None and old["read"]["n"] == n:
                new["read"] = old["read"]  # what attention reads, extended by `_read` (no other memo extends it)
        if not new["any"] and not torch.is_grad_enabled():
            new["dk"] = new["dv"] = new["bias"] = None  # all zero: keep nothing
        new.update(n=T, off=off, batch=k.shape[0], last=k[:, :, T - 1].detach().clone())
        if memo is not None:
            memo[layer] = new
        return new

    @torch.no_grad()
    def prime(self, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """A memo holding the detector's output for every stored entry of `kv` ({layer: (k, v)}, the
        protected layers and the reference layer): what a prefill run with the operator leaves behind."""
        memo: dict = {}
        if self.reference_layer is not None:
            memo["reference"] = kv[self.reference_layer]
        for l in self.layers:
            self._memo(l, *kv[l], memo)
        return memo

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Callable,
               memo: dict | None = None) -> torch.Tensor:
        if self.trained_positions is not None and not self._warned_length and k.shape[2] > self.trained_positions:
            self._warned_length = True
            warnings.warn(f"cachemedicpp: the cache holds {k.shape[2]} positions, but this operator was trained on "
                          f"windows of {self.trained_positions}; beyond them its detector gates clean entries "
                          "(README, 'A defense in your own code')", RuntimeWarning, stacklevel=2)
        m = self._memo(layer, k, v, memo, q_len=q.shape[2])
        if not m["any"] and not m["nonfinite"]:
            return kernel(q, k, v)
        if memo is not None and q.shape[2] == 1 and not torch.is_grad_enabled():
            k, v, bias = self._read(m, k, v)  # a decode step
        else:
            k, v, bias = self._corrected(m, k, v, 0, k.shape[2])
        return kernel(q, k, v, bias=bias)

    def _corrected(self, m: dict, k: torch.Tensor, v: torch.Tensor, a: int, b: int) -> tuple:
        """(K, V, bias) attention reads at cache positions a..b (k, v: the whole held cache): non-finite
        values zeroed and the corrections of `m` added; an entry after m's first m["n"] (pending) adds zeros."""
        n = m["n"]

        def part(x):
            if x is None or b <= n:
                return None if x is None else x[:, :, a:b]
            zeros = x.new_zeros(*x.shape[:2], b - max(a, n), *x.shape[3:])
            return zeros if a >= n else torch.cat([x[:, :, a:n], zeros], 2)

        k, v = k[:, :, a:b], v[:, :, a:b]
        if m["nonfinite"]:
            k = torch.where(torch.isfinite(k), k, torch.zeros_like(k))
            v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        dk, dv = part(m["dk"]), part(m["dv"])
        if dk is not None:
            k = (k.float() + dk).to(k.dtype)
        if dv is not None:
            v = (v.float() + dv).to(v.dtype)
        return k, v, part(m["bias"])

    def _read(self, m: dict, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """`_corrected` over the whole cache, without gradients, kept in buffers beside the memo (m["read"])
        that grow with the cache: a decode step writes only its pending entries instead of adding the
        corrections to every entry again, and a newly scored block writes its own. The same values bit for
        bit, since the memo's entries are those of the stored prefix (its validity rule). The buffers belong
        to the memo that extended them last; another one holding them (an earlier state of the same decode,
        reused from its start) builds its own."""
        T, n = k.shape[2], m["n"]
        r = m.get("read")
        if r is None or r["n"] > n or (r["bufs"][2] is None) != (m["bias"] is None):
            r = m["read"] = {"n": 0, "bufs": [k, v, m["bias"]]}
        if r["bufs"][0].shape[2] < T or r["n"] == 0:  # (re)allocate: the written entries move over (the rest up
            # to T is written below)
            r["bufs"] = [None if x is None else self._buffer(x, r["n"], T) for x in r["bufs"]]
        if n > r["n"]:  # the newly scored entries
            for buf, x in zip(r["bufs"], self._corrected(m, k, v, r["n"], n)):
                if buf is not None:
                    buf[:, :, r["n"]:n] = x
        if T > n:  # the pending ones: finite (`_memo` scores a non-finite one at once) and uncorrected, so
            # attention reads them as stored (what `_corrected` gives, with a zero bias)
            r["bufs"][0][:, :, n:T] = k[:, :, n:T]
            r["bufs"][1][:, :, n:T] = v[:, :, n:T]
            if r["bufs"][2] is not None:
                r["bufs"][2][:, :, n:T] = 0
        r["n"] = n
        return tuple(None if x is None else x[:, :, :T] for x in r["bufs"])

    def is_identity(self, layer: int) -> bool:
        """True when the gate cannot open (the detector's score is the constant b2 below τ)."""
        i = self._i(layer)
        return not bool(self.w2[i].detach().any()) and float(self.b2[i].detach()) < float(self.tau[i])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def reference_layer(protect: Sequence[int], arch, requested) -> int | None:
    """The unprotected layer the agreement feature reads: `requested` when an int, none when null, else
    (auto) the highest full-attention layer below the first protected layer (None when there is none)."""
    if requested is None:
        return None
    if requested != "auto":
        return int(requested)
    cands = [l for l in range(min(protect)) if l not in set(arch.sliding_layers)]
    return max(cands) if cands else None


def clean_caches(lm, tokens: torch.Tensor, windows: int, length: int, layers: Sequence[int], seed: int,
                 stream: str = "detector-fit") -> list[dict]:
    """Batch-1 clean {layer: (k, v)} of `windows` training windows drawn from (seed, stream, i): the entries
    attention reads in the prefill (all positions, also on sliding-window layers, whose stored cache keeps
    only the window)."""
    hi = tokens.numel() - length
    out = []
    for i in range(windows):
        start = int(torch.randint(0, hi + 1, (1,), generator=torch_rng(seed, stream, i)))
        with torch.no_grad():
            out.append(hf.prefill_kv(lm.model, tokens[start:start + length][None].to(lm.device), layers))
    return out


def training_caches(cfg, lm, op: DetectingOperator, tokens: torch.Tensor, stream: str) -> list[dict]:
    """`repair.detector.fit_windows` clean caches of training windows drawn from (seed, `stream`), as long as the
    longest context the run reads (`fit_len`, default: max of the training window and eval.max_seq_len):
    positions the statistics never saw look anomalous (RoPE keys)."""
    det, t = cfg.repair.detector, cfg.train
    want = int(det.fit_len) if det.fit_len is not None else max(int(t.prefix_len + t.cont_len),
                                                                  int(cfg.eval.max_seq_len))
    length = min(want, tokens.numel() - 1, lm.arch.max_positions)
    layers = list(op.layers) + list(op.observes)
    return clean_caches(lm, tokens, int(det.fit_windows), length, layers, cfg.seed, stream)


def gated_per_block(op: DetectingOperator, memo: Mapping, T: int, block_size: int) -> torch.Tensor:
    """long [ceil(T / block_size)]: per block of absolute positions, the entries the detector gates in it,
    pooled over the protected layers and KV heads (a sliding layer counts the positions it holds)."""
    total = torch.zeros(-(-T // int(block_size)), dtype=torch.long)
    for l in op.layers:
        g = (memo[l]["gate"][0] > 0).sum(0).cpu()  # [held]
        pos = torch.arange(T - g.numel(), T)
        total.index_add_(0, pos // int(block_size), g.long())
    return total


@torch.no_grad()
def cache_maxima(op: DetectingOperator, caches: Sequence[Mapping], block_size: int) -> list[int]:
    """Per clean cache, the most gated entries any of its blocks holds (it alarms at a level at or below)."""
    out = []
    for c in caches:
        T = next(iter(c.values()))[0].shape[2]
        out.append(int(gated_per_block(op, op.prime(c), T, block_size).max()))
    return out


def budget_level(maxima: Sequence[int], budget: float) -> int:
    """The alarm level that lets at most a `budget` fraction of clean caches alarm, by the split-conformal
    rule: one more than the ceil((n + 1)(1 − budget))-th smallest of the n clean caches' maxima, so that a new
    clean cache exchangeable with them alarms with probability at most `budget`. With too few caches for the
    budget (that rank above n) it is one more than the largest: no clean cache alarms."""
    m = sorted(int(x) for x in maxima)
    if not m:
        raise ValueError("budget_level needs at least one clean cache")
    rank = math.ceil((len(m) + 1) * (1.0 - float(budget)))
    return (m[min(rank, len(m)) - 1] if rank >= 1 else 0) + 1


def alarm_level(op: DetectingOperator, caches: Sequence[Mapping], block_size: int) -> int:
    """The max rule: one more than any block of the clean `caches` holds (budget_level with budget 0)."""
    return budget_level(cache_maxima(op, caches, block_size), 0.0)


@torch.no_grad()
def set_threshold(op: DetectingOperator, caches: Sequence[Mapping], margin: float) -> dict:
    """τ per layer = max(0, highest clean score + margin) over the non-sink entries of clean caches."""
    out = {}
    for i, l in enumerate(op.layers):
        best = -math.inf
        for c in caches:
            ref = (c[op.reference_layer] if op.reference_layer is not None else None)
            s = op.score(l, c[l][0], c[l][1], ref)[..., op.sink:]
            if s.numel():
                best = max(best, float(s.max()))
        op.tau[i] = max(0.0, best + margin)
        out[l] = {"max_clean_score": best, "tau": float(op.tau[i])}
    return out
