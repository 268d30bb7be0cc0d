"""Amplification map gamma(l, h): the drift per unit of perturbation norm of a perturbation confined to
layer l, KV head h and the segment, at the map's delta."""

from __future__ import annotations

import statistics
from typing import Any

from cachemedicpp import hf
from cachemedicpp.results import MAP_DEFENSES
from cachemedicpp.stability.perturb import CleanState, Reference, drift, last_logits, perturb_row, segment
from cachemedicpp.stability.setup import Setup

MAP_CHUNK = 24  # rows per batched forward of the amplification map (bounds memory on long prompts)


def _perturbed(lm: hf.LoadedModel, s: Setup, clean: CleanState, chunk: list[tuple[int, int, int]],
               p_idx: int) -> tuple[Any, list[float]]:
    """A batched cache with one row per (layer, head, direction) of `chunk`, each perturbed in that cell
    only; and the norm of each row's perturbation."""
    cache = hf.repeat_cache(clean.cache, len(chunk))
    norms = [0.0] * len(chunk)
    for l in sorted({c[0] for c in chunk}):
        k, v = (x.clone() for x in hf.get_kv(cache, l))
        for r, (cl, h, j) in enumerate(chunk):
            if cl == l:
                mask = segment(lm.arch.num_kv_heads, [h], clean.time[l])
                key = ("map", p_idx, s.map_delta, j, l, h)
                norms[r] = perturb_row(s, k, v, r, mask, clean.rms[l], s.map_delta, key)
        hf.set_kv(cache, l, k, v)
    return cache, norms


def measure(lm: hf.LoadedModel, s: Setup, clean: CleanState, op, ref: Reference, p_idx: int) -> dict:
    """{map name: [layer][head] -> [gamma per direction] (None where the layer no longer holds the
    segment)} of one prompt. The cachemedic map is against the repaired clean logits (the perturbation's
    own effect), cachemedic_vs_clean_no_defense against the undefended ones."""
    D = s.num_directions
    cells = [(l, h, j) for l in s.layers for h in s.heads for j in range(D)]
    gam = {name: [] for name in MAP_DEFENSES}
    for c0 in range(0, len(cells), MAP_CHUNK):
        cache, norms = _perturbed(lm, s, clean, cells[c0:c0 + MAP_CHUNK], p_idx)
        zb = last_logits(lm, clean.token, hf.clone_cache(cache), None)
        zc = last_logits(lm, clean.token, cache, hf.HookPlan(repair=op))
        for name, vals in (("baseline", drift(zb, ref.clean, ref.topk)),
                           ("cachemedic", drift(zc, ref.repaired, ref.topk)),
                           ("cachemedic_vs_clean_no_defense", drift(zc, ref.clean, ref.topk))):
            gam[name] += [x / d if d > 0 else None for x, d in zip(vals, norms)]
    H = len(s.heads)
    return {name: [[vals[(li * H + hi) * D:(li * H + hi + 1) * D] for hi in range(H)] for li in range(len(s.layers))]
            for name, vals in gam.items()}


def block(units: list[dict], s: Setup) -> dict:
    """`stability.amplification_map` (results.AmplificationMap): per map, the median gamma over prompts x
    directions of each (layer, head)."""

    def median_map(name: str) -> list[list[float | None]]:
        out = []
        for li in range(len(s.layers)):
            row = []
            for hi in range(len(s.heads)):
                vals = [x for u in units for x in u["amplification"][name][li][hi] if x is not None]
                row.append(statistics.median(vals) if vals else None)
            out.append(row)
        return out

    return {"layers": s.layers, "heads": s.heads, **{name: median_map(name) for name in MAP_DEFENSES},
            "delta_norm": s.map_delta, "delta_choice": s.map_choice, "flagged_layers": s.flagged,
            "protected": [l in s.protect for l in s.layers]}
