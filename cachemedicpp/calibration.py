"""Clean-cache calibration: the calibrated baselines `range_clamp` and `norm_outlier_drop`, and the model of
the clean cache the calibrated repairs (`prior.py`) restore entries with.

Statistics of clean K/V are gathered once per run from windows of the *training* corpus (never the
evaluation text), on the protected layers, per KV head:

- values: per channel, the q and 1 - q quantiles;
- keys: stored after RoPE, where a channel's range mixes with its rotary partner's (the pair is rotated
  by a position-dependent angle), so each rotary pair (channels i and i + d/2, the rotate-half layout of
  Llama, Qwen2 and Gemma) is bounded by the 1 - q quantile of its 2-D norm, which the rotation leaves
  unchanged. Models without RoPE (GPT-2) get per-channel bounds like the values;
- tokens: the q and 1 - q quantiles of each token's key norm and value norm (the outlier band).

The model of the clean cache, per protected layer and KV head (`kprior`, `vprior`): keys *before RoPE*
(un-rotated with their known absolute positions: `hf.rotary_frequencies`; GPT-2's are used as projected) and
values, each with per-channel `prior_q` / 1 - `prior_q` quantiles, mean, and the covariance's eigenbasis
(eigenvectors and eigenvalues), from the same calibration windows. Then, on held-in clean caches, the levels
the calibrated repair compares a cache with: the farthest any element lies beyond its range (in range widths)
and the largest relative white-noise variance any block of `repair_block` positions shows
(`prior.relative_noise`). The held-in caches are the selection windows' (training corpus, disjoint from the
calibration windows) and the clean caches of the first `level_examples` examples of each configured task's
*selection* split (data.SPLITS: disjoint from every test and validation example): levels set on training text
alone flag every clean evaluation cache, whose prose shows more block noise than the training corpus (the
model is still fitted on training text only). At margin 1 those held-in caches are left untouched.

The first `sink_tokens` positions (attention sinks) carry extreme entries that later positions do not
cover; they are left out of the statistics and never clamped or dropped (see shared/MEASURED.md:
clamping them costs ~+29 % clean perplexity on SmolLM2).

Which q (and which band) is used is chosen on more training-corpus windows, disjoint from the
calibration windows, by the rule in `baseline.calibration`: the tightest candidate whose clean
perplexity stays within `max_clean_cost` of the undefended model's. Nothing here sees a corruption, its
mask, or an evaluation example.

The result is stored in the run directory (`RunDir.calibration`) with a hash of everything it depends on
(model, layers, calibration settings, data source); a file whose hash, layers or format does not match is
refused as bad input naming the file, and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from cachemedicpp import data, defenses, hf, prior, tasks
from cachemedicpp.defenses import fit_drop
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.fileio import atomic_torch_save, load_checkpoint

log = logging.getLogger("cachemedicpp")

FORMAT = "cachemedicpp.calibration/2"  # 2: the clean-cache model (pre-RoPE keys, covariance, held-in levels)
CLAMP, DROP = "range_clamp", "norm_outlier_drop"


def frames(rope: Mapping[int, tuple[Tensor, float]], layer: int, positions: Tensor,
           device="cpu") -> tuple[prior.Frame, prior.Frame]:
    """Where a layer's keys and values are modelled: keys un-rotated with their positions (when the layer has
    RoPE), values as stored."""
    if layer not in rope:
        return prior.Frame(), prior.Frame()
    inv_freq, scaling = rope[layer]
    return prior.Frame(*prior.rope_cos_sin(inv_freq.to(device), scaling, positions.to(device))), prior.Frame()


@dataclass
class Calibration:
    """Calibrated bounds per protected layer (tensors indexed [candidate, KV head, ...]) and the model of the
    clean cache (per layer, tensors indexed [KV head, ...])."""

    layers: tuple[int, ...]
    sink: int
    rotary: bool  # keys bounded per rotary pair norm (True) or per channel (False)
    q: tuple[float, ...]  # candidate quantiles for the clamp
    band: tuple[float, ...]  # candidate quantiles for the token-norm band
    key_lo: dict[int, Tensor]  # [Q, H, d] (per channel; unused when rotary)
    key_hi: dict[int, Tensor]  # [Q, H, d/2] pair-norm bound when rotary, else [Q, H, d]
    val_lo: dict[int, Tensor]  # [Q, H, d]
    val_hi: dict[int, Tensor]  # [Q, H, d]
    knorm: dict[int, Tensor]  # [B, H, 2] (low, high) token key-norm band
    vnorm: dict[int, Tensor]  # [B, H, 2]
    chosen: dict[str, int]  # defense -> index of the chosen candidate
    record: dict  # hash, sources, sizes, the selection's clean costs (for the metrics)
    # the model of the clean cache (prior.py), per layer: {"mean", "lo", "hi" [H, d], "evec" [H, d, d] (columns),
    # "eval" [H, d], "range_level", "noise_level" [H]}; keys before RoPE
    kprior: dict[int, dict[str, Tensor]]
    vprior: dict[int, dict[str, Tensor]]
    rope: dict[int, tuple[Tensor, float]]  # layer -> (inverse frequencies, attention scaling); empty without RoPE
    block: int  # positions per block of the noise estimate

    # -- the two baselines: pure functions of a layer's cache ------------------------------------
    def clamp(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """range_clamp: every cached entry of `layer` (but the sinks) pulled inside its calibrated bounds."""
        i = self.chosen[CLAMP]
        live = (positions >= self.sink).view(1, 1, -1, 1).to(k.device)
        kf, vf = k.float(), v.float()
        if self.rotary:
            half = kf.shape[-1] // 2
            a, b = kf[..., :half], kf[..., half:]
            norm = torch.sqrt(a * a + b * b)
            hi = self.key_hi[layer][i].to(k.device)[None, :, None, :]
            scale = torch.where(norm > hi, hi / norm.clamp_min(1e-30), torch.ones_like(norm))
            k2 = torch.cat([a * scale, b * scale], dim=-1)
        else:
            k2 = kf.clamp(self.key_lo[layer][i].to(k.device)[None, :, None, :],
                          self.key_hi[layer][i].to(k.device)[None, :, None, :])
        v2 = vf.clamp(self.val_lo[layer][i].to(v.device)[None, :, None, :],
                      self.val_hi[layer][i].to(v.device)[None, :, None, :])
        k2 = torch.where(torch.isnan(k2), torch.zeros_like(k2), k2)  # a NaN entry is outside any range
        v2 = torch.where(torch.isnan(v2), torch.zeros_like(v2), v2)
        return torch.where(live, k2.to(k.dtype), k), torch.where(live, v2.to(v.dtype), v)

    def outliers(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """norm_outlier_drop: bool [B, H, T], tokens whose key or value norm leaves the calibrated band."""
        band_k = self.knorm[layer][self.chosen[DROP]].to(k.device)  # [H, 2]
        band_v = self.vnorm[layer][self.chosen[DROP]].to(v.device)
        kn, vn = k.float().norm(dim=-1), v.float().norm(dim=-1)  # [B, H, T]
        out = ((kn < band_k[None, :, 0, None]) | (kn > band_k[None, :, 1, None])
               | (vn < band_v[None, :, 0, None]) | (vn > band_v[None, :, 1, None]) | ~torch.isfinite(kn + vn))
        return out & (positions >= self.sink).view(1, 1, -1).to(k.device)

    # -- the calibrated repairs (prior.py), on keys and values alike --------------------------------
    def _each(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, fn) -> tuple[Tensor, Tensor]:
        """fn(x, stats, frame, live) -> (x, changed) on the keys, then on the values."""
        kf, vf = frames(self.rope, layer, positions, k.device)
        live = (positions >= self.sink).to(k.device)
        out = []
        for x, st, frame in ((k, self.kprior[layer], kf), (v, self.vprior[layer], vf)):
            out.append(fn(x, {n: t.to(x.device) for n, t in st.items()}, frame, live)[0])
        return out[0], out[1]

    def impute(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """impute: exact zeros and non-finite elements replaced by their conditional mean (sinks left alone)."""
        return self._each(layer, k, v, positions, prior.impute)

    def prerope_clamp(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """prerope_clamp: every element pulled into its calibrated per-channel range, keys before RoPE."""
        return self._each(layer, k, v, positions, prior.clamp)

    def denoise(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """denoise: Wiener shrinkage of every block that shows any white noise over the clean model."""
        return self._each(layer, k, v, positions,
                          lambda x, st, frame, live: prior.denoise(x, st, frame, live, positions, self.block))

    def repair(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, range_margin: float,
               noise_margin: float) -> tuple[Tensor, Tensor]:
        """calibrated_repair: each repair where the cache shows its fault beyond `margin` times the held-in level."""
        return self._each(layer, k, v, positions, lambda x, st, frame, live: prior.repair(
            x, st, frame, live, positions, self.block, range_margin, noise_margin))

    def summary(self) -> dict:
        """What the metrics record about the calibration (JSON)."""
        return {**self.record, "chosen": {d: {"index": i, "q": (self.q if d == CLAMP else self.band)[i]}
                                          for d, i in self.chosen.items()}}


# --------------------------------------------------------------------------------------------------
# gathering statistics


def rotary_keys(lm: hf.LoadedModel) -> bool:
    """Whether the keys are stored after a full rotate-half RoPE (Llama, Qwen2, Gemma), not GPT-2's."""
    c = getattr(lm.model.config, "text_config", None) or lm.model.config
    partial = getattr(c, "partial_rotary_factor", 1.0) or 1.0
    return lm.arch.model_type != "gpt2" and float(partial) == 1.0


def _windows(cfg: Config, lm: hf.LoadedModel) -> tuple[list[Tensor], list[Tensor], str]:
    """Calibration and selection windows of the training corpus (disjoint, consecutive)."""
    c = cfg.baseline.calibration
    text, source = data.load_text(cfg.data.to_dict(), "train_corpus")
    stream = data.tokenize_stream(lm.tokenizer, text)
    need = int(c.windows) + int(c.select_windows)
    wins = data.fixed_windows(stream, int(c.window_len), need)
    if len(wins) < need:
        raise ConfigError(f"baseline.calibration: the training corpus ({source}) has {len(wins)} windows of "
                          f"{c.window_len} tokens, needs {need} (windows + select_windows)")
    return wins[:int(c.windows)], wins[int(c.windows):], source


def _gather(lm: hf.LoadedModel, layers: Sequence[int], windows: Sequence[Tensor], sink: int,
            rope: Mapping[int, tuple[Tensor, float]]) -> dict:
    """{layer: (K, K before RoPE, V)} of clean caches, [H, N, d] over every non-sink position of every window."""
    got: dict[int, list[list[Tensor]]] = {l: [[], [], []] for l in layers}
    with torch.no_grad():
        for w in windows:
            _, cache = hf.forward(lm.model, w[None].to(lm.device), logits_to_keep=1)
            for l in layers:
                k, v = (x.float().cpu() for x in hf.get_kv(cache, l))
                pos = torch.arange(w.numel() - k.shape[2], w.numel())
                keep = pos >= sink
                kpre = frames(rope, l, pos)[0].model(k)
                for i, x in enumerate((k, kpre, v)):
                    got[l][i].append(x[0][:, keep])
    return {l: tuple(torch.cat(xs, dim=1) for xs in got[l]) for l in layers}


def _quantiles(x: Tensor, qs: Sequence[float], dim: int) -> Tensor:
    """The quantiles at every q of `qs` over `dim` ([len(qs), ...]; linear interpolation, exact min/max at 0
    and 1), from one sort."""
    s = x.sort(dim=dim).values
    n = s.shape[dim]
    out = []
    for q in qs:
        pos = min(max(float(q), 0.0), 1.0) * (n - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        a = s.select(dim, lo)
        out.append(a if frac == 0 else a + (s.select(dim, min(lo + 1, n - 1)) - a) * frac)
    return torch.stack(out)


def _bounds(stats: dict, rotary: bool, q: Sequence[float], band: Sequence[float]) -> dict:
    out = {n: {} for n in ("key_lo", "key_hi", "val_lo", "val_hi", "knorm", "vnorm")}
    for l, (k, _, v) in stats.items():  # [H, N, d]
        out["val_lo"][l] = _quantiles(v, q, 1)
        out["val_hi"][l] = _quantiles(v, [1 - x for x in q], 1)
        out["key_lo"][l] = _quantiles(k, q, 1)
        if rotary:
            half = k.shape[-1] // 2
            pair = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)
            out["key_hi"][l] = _quantiles(pair, [1 - x for x in q], 1)
        else:
            out["key_hi"][l] = _quantiles(k, [1 - x for x in q], 1)
        for name, x in (("knorm", k), ("vnorm", v)):
            n = x.norm(dim=-1)  # [H, N]
            out[name][l] = torch.stack([_quantiles(n, band, 1), _quantiles(n, [1 - b for b in band], 1)], dim=-1)
    return out


def _gaussian(x: Tensor, q: float) -> dict[str, Tensor]:
    """The clean model of one kind of entry, x [H, N, d]: per-channel q / 1 - q quantiles, mean, and the
    covariance's eigenvectors (columns) and eigenvalues (ascending, ≥ 0)."""
    mean = x.mean(1)
    xc = (x - mean[:, None]).double()
    evals, evec = torch.linalg.eigh(xc.transpose(1, 2) @ xc / max(x.shape[1] - 1, 1))
    lo, hi = _quantiles(x, [q, 1 - q], 1)
    return {"mean": mean, "lo": lo, "hi": hi, "evec": evec.float(), "eval": evals.float().clamp_min(0)}


def _priors(stats: dict, q: float) -> tuple[dict, dict]:
    """(kprior, vprior) without their held-in levels."""
    return ({l: _gaussian(kpre, q) for l, (_, kpre, _) in stats.items()},
            {l: _gaussian(v, q) for l, (_, _, v) in stats.items()})


def held_in_levels(cal: Calibration, caches: Sequence[Mapping[int, tuple[Tensor, Tensor]]],
                   lengths: Sequence[int]) -> None:
    """Set each (layer, KV head)'s levels from held-in clean caches ({layer: (K, V)} of contexts of `lengths`
    positions): the farthest an element lies beyond its calibrated range (range widths) and the largest relative
    noise variance of a block (`prior.relative_noise`)."""
    for l in cal.layers:
        for which, st in ((0, cal.kprior[l]), (1, cal.vprior[l])):
            far, noise = torch.zeros(st["mean"].shape[0]), torch.zeros(st["mean"].shape[0])
            for cache, T in zip(caches, lengths):
                x = cache[l][which].float().cpu()
                pos = torch.arange(T - x.shape[2], T)  # a sliding-window layer holds the last positions only
                live = pos >= cal.sink
                if not bool(live.any()):
                    continue
                xm = frames(cal.rope, l, pos)[which].model(x)
                far = torch.maximum(far, prior.outside(xm, st["lo"], st["hi"])[..., live, :].amax(dim=(0, 2, 3)))
                noise = torch.maximum(noise, prior.relative_noise(xm, st, live, pos, cal.block).amax(dim=(0, 2)))
            st["range_level"], st["noise_level"] = far, noise


# --------------------------------------------------------------------------------------------------
# choosing q and the band on held-in (training) windows


def prefill(lm: hf.LoadedModel, window: Tensor, cont_len: int):
    """The clean cache of a window's context (all but its last `cont_len` + 1 tokens)."""
    with torch.no_grad():
        return hf.forward(lm.model, window[:-cont_len - 1][None].to(lm.device), logits_to_keep=1)[1]


def window_nll(lm: hf.LoadedModel, window: Tensor, cont_len: int, layers: Sequence[int],
               defend=None, clean_cache=None) -> float:
    """Mean NLL of a window's last `cont_len` tokens from a clean cache of the rest (`clean_cache`, left
    untouched, or prefilled here), optionally defended: `defend(layer, k, v, positions) -> (k, v, drop |
    None)` is applied at rest to each protected layer."""
    ctx, cont = window[:-cont_len], window[-cont_len:]
    feeds = torch.cat([ctx[-1:], cont[:-1]])[None].to(lm.device)
    drops: dict[int, Tensor] = {}
    with torch.no_grad():
        cache = hf.clone_cache(clean_cache) if clean_cache is not None else prefill(lm, window, cont_len)
        if defend is not None:
            T = ctx.numel() - 1
            for l in layers:
                k, v = hf.get_kv(cache, l)
                k2, v2, drop = defend(l, k, v, torch.arange(T - k.shape[2], T))
                hf.set_kv(cache, l, k2, v2)
                if drop is not None:
                    drops[l] = drop
        plan = hf.HookPlan(layers=frozenset(drops), drop=_drop_reader(drops)) if drops else None
        logits, _ = hf.forward(lm.model, feeds, cache=cache, plan=plan)
    lp = torch.log_softmax(logits.float(), dim=-1)[0].gather(-1, cont.to(lm.device)[:, None])
    return float(-lp.mean())


def _drop_reader(drops: Mapping[int, Tensor]):
    """HookPlan.drop for at-rest drop masks: entries appended after them (the continuation) are kept."""
    def fn(layer: int, k_len: int) -> Tensor | None:
        d = drops.get(layer)
        return None if d is None else fit_drop(d, k_len)
    return fn


def choose(cal: Calibration, lm: hf.LoadedModel, select: Sequence[Tensor], cont_len: int,
           max_cost: float, caches: Sequence | None = None) -> dict:
    """Per baseline, the tightest candidate whose clean perplexity over the selection windows is within
    `max_cost` (relative) of no defense's; the loosest candidate when none is. Returns the costs seen.
    `caches`: the windows' clean context caches (`prefill`), when the caller has them."""
    if caches is None:
        caches = [prefill(lm, w, cont_len) for w in select]  # once: every candidate defends a copy

    def ppl(defend=None) -> float:
        return math.exp(sum(window_nll(lm, w, cont_len, cal.layers, defend, c) for w, c in zip(select, caches))
                        / len(select))

    base = ppl()
    costs: dict[str, list[float]] = {}
    for name, cands in ((CLAMP, cal.q), (DROP, cal.band)):
        costs[name] = []
        order = sorted(range(len(cands)), key=lambda i: -cands[i])  # tightest first
        pick = min(range(len(cands)), key=lambda i: cands[i])
        for i in order:
            cal.chosen[name] = i
            p = ppl(_defender(cal, name))
            costs[name].append({"q": cands[i], "ppl": p, "cost": p / base - 1})
            if p / base - 1 <= max_cost:
                pick = i
                break
        cal.chosen[name] = pick
    return {"ppl_no_defense": base, "tried": costs}


def _defender(cal: Calibration, name: str):
    """(layer, k, v, positions) -> (k, v, drop) of the registered calibrated baseline `name` with `cal`."""
    dfn = defenses.make(name)

    def fn(l, k, v, pos):
        got = dfn.apply(k, v, defenses.LayerInput(l, pos, cal=cal))
        return got.k, got.v, got.drop
    return fn


# --------------------------------------------------------------------------------------------------
# the run directory's calibration file


def _level_tasks(cfg: Config) -> dict:
    """What the selection-split caches of the levels depend on: the tasks (less which of their examples the
    grids score), how their examples are cut, and where their data come from."""
    if int(cfg.baseline.calibration.level_examples) == 0:
        return {}
    return {"tasks": [{k: v for k, v in t.items() if k not in ("num_examples", "start", "split")}
                      for t in cfg.eval.tasks],
            "max_seq_len": cfg.eval.max_seq_len, "cont_len": cfg.eval.cont_len, "data": cfg.data.to_dict()}


def calibration_hash(cfg: Config, source: str) -> str:
    """What a calibration depends on: model, dtype, layers, calibration settings, data source, the tasks whose
    selection split sets the levels, format."""
    blob = json.dumps({"format": FORMAT, "model": cfg.model.to_dict(), "dtype": cfg.dtype,
                       "layers": sorted(int(x) for x in cfg.repair.protect_layers),
                       "calibration": cfg.baseline.calibration.to_dict(), "source": source,
                       "levels": _level_tasks(cfg)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(cfg: Config, lm: hf.LoadedModel) -> Calibration:
    """Gather statistics and choose the candidates (minutes on CPU for the embedded model)."""
    c = cfg.baseline.calibration
    cal_w, sel_w, source = _windows(cfg, lm)
    layers = tuple(sorted(int(x) for x in cfg.repair.protect_layers))
    rotary = rotary_keys(lm)
    rope = {l: f for l in layers if (f := hf.rotary_frequencies(lm.model, l)) is not None}
    q, band = tuple(float(x) for x in c.clamp_q), tuple(float(x) for x in c.band_q)
    stats = _gather(lm, layers, cal_w, int(c.sink_tokens), rope)
    kprior, vprior = _priors(stats, float(c.prior_q))
    b = _bounds(stats, rotary, q, band)
    del stats
    cal = Calibration(layers, int(c.sink_tokens), rotary, q, band, chosen={}, **b, kprior=kprior, vprior=vprior,
                      rope=rope, block=int(c.repair_block), record={
        "format": FORMAT, "hash": calibration_hash(cfg, source), "data_source": source,
        "windows": len(cal_w), "select_windows": len(sel_w), "window_len": int(c.window_len),
        "tokens": int(sum(w.numel() for w in cal_w)), "layers": list(layers), "sink_tokens": int(c.sink_tokens),
        "keys": "rotary pair norm (upper bound)" if rotary else "per channel",
        "rule": f"tightest candidate with clean perplexity on the selection windows within "
                f"{float(c.max_clean_cost):g} (relative) of no defense; loosest otherwise",
        "prior": {"keys": "before RoPE (un-rotated with their positions)" if rope else "as projected (no RoPE)",
                  "quantiles": [float(c.prior_q), 1 - float(c.prior_q)], "block": int(c.repair_block),
                  "levels": "maxima over held-in clean caches: the selection windows' and those of the first "
                            f"{int(c.level_examples)} selection-split examples of each configured task",
                  "level_examples": int(c.level_examples)}})  # at most: a short split gives what it holds
    caches = [prefill(lm, w, int(c.cont_len)) for w in sel_w]
    cal.record["selection"] = choose(cal, lm, sel_w, int(c.cont_len), float(c.max_clean_cost), caches)
    held = [{l: hf.get_kv(cache, l) for l in layers} for cache in caches]
    lengths = [w.numel() - int(c.cont_len) - 1 for w in sel_w]
    if int(c.level_examples) > 0:
        task, task_lengths = selection_held_in(cfg, lm, layers, int(c.level_examples))
        held, lengths = held + task, lengths + task_lengths
    held_in_levels(cal, held, lengths)
    return cal


def selection_held_in(cfg: Config, lm: hf.LoadedModel, layers: Sequence[int], per_task: int,
                      start: int = 0) -> tuple[list[dict], list[int]]:
    """`held_in_levels`' input from up to `per_task` selection-split examples of each configured task from the
    `start`-th: their clean caches ({layer: (K, V)}, every position) and context lengths."""
    got = tasks.selection_caches(cfg, lm, layers, per_task, start=start, up_to=True)
    return got, [int(kv[layers[0]][0].shape[2]) for kv in got]


def _payload(cal: Calibration) -> dict:
    return {"format": FORMAT, **{k: v for k, v in cal.__dict__.items()}}


def load(path, expected_hash: str, layers: Sequence[int]) -> Calibration:
    """A stored calibration, checked: a foreign, stale or damaged file is bad input naming the file."""
    p = load_checkpoint(path, "calibration file")
    if isinstance(p, dict) and str(p.get("format", "")).startswith("cachemedicpp.calibration/") \
            and p.get("format") != FORMAT:
        raise ConfigError(f"calibration file {path} has format {p.get('format')}, this version reads {FORMAT}; "
                          "delete it to recompute")
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise ConfigError(f"calibration file {path}: not a cachemedicpp calibration; delete it to recompute")
    rec = p.get("record") or {}
    if rec.get("hash") != expected_hash or tuple(p.get("layers", ())) != tuple(sorted(layers)):
        raise ConfigError(f"calibration file {path} was made for another model, layer set or calibration "
                          f"setting (hash {rec.get('hash')}, layers {list(p.get('layers', ()))}; this run: hash "
                          f"{expected_hash}, layers {sorted(layers)}); delete it to recompute")
    try:
        return Calibration(**{k: v for k, v in p.items() if k != "format"})
    except TypeError as e:
        raise ConfigError(f"calibration file {path} is incomplete ({e}); delete it to recompute") from None


def check_file(cfg: Config, path) -> Calibration | None:
    """The stored calibration when its file exists and matches this run (else bad input naming the file);
    None when there is none yet. Needs no model: call it before a phase touches the run dir."""
    if not Path(path).is_file():
        return None
    _, source = data.load_text(cfg.data.to_dict(), "train_corpus", max_chars=1)
    return load(path, calibration_hash(cfg, source), cfg.repair.protect_layers)


def obtain(cfg: Config, lm: hf.LoadedModel, path) -> Calibration:
    """The run's calibration: loaded when its file exists (and matches), else built and stored."""
    found = check_file(cfg, path)
    if found is not None:
        return found
    log.info("calibrating %s, %s and the clean-cache model on clean training-corpus caches", CLAMP, DROP)
    cal = build(cfg, lm)
    atomic_torch_save(path, _payload(cal))
    return cal
