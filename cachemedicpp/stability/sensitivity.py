"""Logit sensitivity: the drift of the last token's logits per perturbation size delta, for no defense,
the best heuristic, cachemedic and (when named) the operator of a paired lambda_contr = 0 run."""

from __future__ import annotations

import math
from typing import Any

import torch

from cachemedicpp import defenses, hf
from cachemedicpp.stability.perturb import CleanState, Reference, drift, last_logits, perturb_row, segment
from cachemedicpp.stability.setup import Setup


def _perturbed(lm: hf.LoadedModel, s: Setup, clean: CleanState, p_idx: int) -> tuple[Any, dict]:
    """A batched cache whose row 0 is the clean state and whose other rows are every (delta, direction),
    perturbed in every sensitivity layer; and the segment mask of each of those layers."""
    rows = [(dl, j) for dl in s.deltas for j in range(s.num_directions)]
    base = hf.repeat_cache(clean.cache, 1 + len(rows))
    masks = {}
    for l in s.sens_layers:
        k, v = (x.clone() for x in hf.get_kv(base, l))
        masks[l] = segment(lm.arch.num_kv_heads, s.heads, clean.time[l])
        for r, (dl, j) in enumerate(rows, start=1):
            if dl != 0:
                perturb_row(s, k, v, r, masks[l], clean.rms[l], dl, (p_idx, dl, j, l))
        hf.set_kv(base, l, k, v)
    return base, masks


def _heuristic_logits(lm: hf.LoadedModel, s: Setup, base, masks: dict, p_idx: int, token: torch.Tensor,
                      T: int) -> torch.Tensor:
    """The logits over every row of `base` with the best baseline applied: a reference heuristic on the
    perturbed region (its region, as the corruption's in eval), a calibrated baseline on every cached entry of
    the protected layers."""
    heur = hf.clone_cache(base)
    dfn = defenses.make(s.heuristic, s.baseline_cfg)
    drops = {}
    for l in (s.protect if dfn.acts_on == defenses.PROTECTED else s.sens_layers):
        k, v = hf.get_kv(heur, l)
        # row by row with one seed: a random defense (masking_dropout) is the same fixed map for every
        # row, so the rows differ only by their perturbation
        out = [dfn.apply(k[r:r + 1], v[r:r + 1], defenses.LayerInput(
                   l, torch.arange(T - k.shape[2], T), region=masks[l].to(lm.device) if dfn.needs.region else None,
                   gen=s.rng(p_idx, "heuristic", s.heuristic, l) if dfn.needs.generator else None,
                   cal=s.cal if dfn.needs.calibration else None))
               for r in range(k.shape[0])]
        hf.set_kv(heur, l, torch.cat([o.k for o in out]), torch.cat([o.v for o in out]))
        if any(o.drop is not None for o in out):
            drops[l] = torch.cat([o.drop for o in out]).cpu()
    plan = None
    if drops:
        plan = hf.HookPlan(layers=frozenset(drops), drop=lambda l, n: defenses.fit_drop(drops[l], n) if l in drops else None)
    return last_logits(lm, token, heur, plan)


def measure(lm: hf.LoadedModel, s: Setup, clean: CleanState, op, op_paired, p_idx: int) -> tuple[dict, Reference]:
    """{repr(delta): {drift name: [drift per direction] (None without a paired operator)}} of one prompt,
    and its reference logits."""
    base, masks = _perturbed(lm, s, clean, p_idx)
    z_b = last_logits(lm, clean.token, hf.clone_cache(base), None)
    ref = z_b[0]
    idx = torch.topk(ref, s.topk).indices
    z_c = last_logits(lm, clean.token, hf.clone_cache(base), hf.HookPlan(repair=op))
    z_p = None
    if op_paired is not None:
        z_p = last_logits(lm, clean.token, hf.clone_cache(base), hf.HookPlan(repair=op_paired))
    z_h = _heuristic_logits(lm, s, base, masks, p_idx, clean.token, clean.length)
    per = {
        "baseline": drift(z_b[1:], ref, idx),
        "heuristic": drift(z_h[1:], ref, idx),
        "heuristic_vs_defended_clean": drift(z_h[1:], z_h[0], idx),
        "cachemedic": drift(z_c[1:], ref, idx),
        "cachemedic_vs_repaired_clean": drift(z_c[1:], z_c[0], idx),
        "cachemedic_no_contr": drift(z_p[1:], ref, idx) if z_p is not None else None,
    }
    D = s.num_directions
    sens = {repr(dl): {name: (vals[i * D:(i + 1) * D] if vals is not None else None) for name, vals in per.items()}
            for i, dl in enumerate(s.deltas)}
    return sens, Reference(ref, idx, z_c[0])


# --------------------------------------------------------------------------------------------------
# over prompts


def _mean(vals: list[float]) -> float:
    return math.fsum(vals) / len(vals)


def block(units: list[dict], s: Setup, paired: bool) -> dict:
    """`stability.logit_sensitivity` (results.SensitivityBlock): the mean drift over prompts x directions."""
    points = []
    for dl in s.deltas:
        key = repr(dl)

        def pooled(name: str) -> list[float]:
            return [x for u in units for x in u["sensitivity"][key][name]]

        points.append({
            "delta_norm": dl,
            "baseline": _mean(pooled("baseline")),
            "heuristics": {s.heuristic: _mean(pooled("heuristic"))},
            "heuristics_vs_defended_clean": {s.heuristic: _mean(pooled("heuristic_vs_defended_clean"))},
            "cachemedic": _mean(pooled("cachemedic")),
            "cachemedic_vs_repaired_clean": _mean(pooled("cachemedic_vs_repaired_clean")),
            "cachemedic_no_contr": _mean(pooled("cachemedic_no_contr")) if paired else None,
            "n": len(pooled("baseline")),
        })
    return {"points": points, "heuristic": s.heuristic,
            "repair_clean_drift": _mean([u["repair_clean_drift"] for u in units])}
