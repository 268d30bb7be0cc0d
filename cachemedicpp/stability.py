"""stability: how far the output logits move per unit of KV-cache perturbation, with and without repair.

    python -m cachemedicpp.stability --config <YAML> --run_dir <DIR> [--resume|--no-resume]
                                     [--paired_run_dir <DIR>]

Definitions (all in fp32; the model is loaded in float32 whatever `dtype` says):
- Prompts: the LAST `num_prompts` consecutive windows of `prompt_len` tokens of the evaluation text, so they
  do not coincide with the first windows the wikitext task scores. The clean state S is the KV cache of a
  clean prefill of prompt[:-1]; z(S) is the logit vector of the last prompt token processed with S.
- Perturbation at severity delta: a Gaussian direction on K and on V of every perturbed layer, inside the
  segment (KV heads or `head_subset`, time mask from `time_mode`/`N_recent`), rescaled per layer and per
  tensor so that ||Delta||_F = delta * delta_scale * rms(S_l) * sqrt(#masked entries), with rms(S_l) the
  RMS of that layer's whole K (or V). delta * delta_scale is thus a per-entry size relative to the layer.
- drift = ||z(S + Delta) - z_ref||_2 over the top-k logits of the clean, undefended z(S).
- Sensitivity(delta) = mean over prompts x directions of drift for: no defense; the best heuristic applied
  to the perturbed cache on the perturbed region (an oracle advantage); cachemedic (repair active in
  attention) against the clean undefended logits and against its own clean logits; and the operator of a
  paired run trained with train.lambda_contr = 0, when one is named.
- Amplification map gamma(l, h) = median over prompts x directions of drift / ||Delta_{l,h}||_F for a
  perturbation confined to layer l, KV head h and the segment, at delta = 1 (or the largest nonzero
  delta <= 1 measured). The repaired map measures drift against the repaired clean logits (the
  perturbation's own effect); the map against the undefended clean logits is stored beside it.

One unit of work is one prompt. Results are kept per unit in `metrics/stability_progress.json`, so a
paused or killed run resumes where it stopped and produces bit-identical metrics: every direction is drawn
from `seeding.torch_rng(seed, "stability", ...)`, never from a shared stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cachemedicpp import config as config_mod
from cachemedicpp import data, defenses, hf, repair, seeding
from cachemedicpp.cli import run_phase
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.cli import EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import atomic_write_json, read_json
from cachemedicpp.phase import PhaseSession
from cachemedicpp.rundir import RunDir

log = logging.getLogger("cachemedicpp")

PHASE = "stability"
PROGRESS_FORMAT = "cachemedicpp.stability_progress/1"
MAP_CHUNK = 24  # rows per batched forward of the amplification map (bounds memory on long prompts)
# keys a paired lambda_contr = 0 run may differ in: where things live, and the ablated weight itself
PAIRING_IGNORED = tuple(config_mod.HASH_EXCLUDE) + ("train.lambda_contr",)
MAP_DEFENSES = ("baseline", "cachemedic", "cachemedic_vs_clean_no_defense")


# --------------------------------------------------------------------------------------------------
# settings that do not need the model


def measured_deltas(delta_norms: Sequence[float]) -> list[float]:
    """The deltas measured: the configured ones, de-duplicated, ascending, with 0 always included."""
    return sorted({float(x) for x in delta_norms} | {0.0})


def map_delta(deltas: Sequence[float]) -> tuple[float, str]:
    """The delta of the amplification map: 1, else the largest nonzero delta <= 1, else the smallest one."""
    nonzero = [d for d in deltas if d > 0]
    if not nonzero:
        raise ConfigError("stability.delta_norms: needs a nonzero value for the amplification map")
    if 1.0 in nonzero:
        return 1.0, "delta = 1"
    below = [d for d in nonzero if d < 1.0]
    if below:
        return max(below), "largest nonzero delta <= 1 (1 not in stability.delta_norms)"
    return min(nonzero), "smallest nonzero delta (none <= 1 in stability.delta_norms)"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in PAIRING_IGNORED)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_paired_run(cfg: Config, paired_run_dir: str | None) -> dict | None:
    """Validate the paired lambda_contr = 0 run: same resolved config except PAIRING_IGNORED, its
    train.lambda_contr == 0, and a repair checkpoint present. Anything else is bad input (exit 2)."""
    if not paired_run_dir:
        return None
    path = Path(paired_run_dir).expanduser().resolve()
    what = f"stability.paired_run_dir / --paired_run_dir: paired run {path}"
    if not path.is_dir():
        raise ConfigError(f"{what} not found")
    stored = RunDir(path).stored_config()
    if stored is None:
        raise ConfigError(f"{what} has no config_resolved.yaml (train it first)")
    ours, theirs = _flat(cfg.to_dict()), _flat(stored)
    missing = object()
    diffs = [k for k in sorted(set(ours) | set(theirs))
             if not _ignored(k) and ours.get(k, missing) != theirs.get(k, missing)]
    if diffs:
        shown = "; ".join(f"{k}: {ours.get(k, '<absent>')!r} here vs {theirs.get(k, '<absent>')!r} there"
                          for k in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise ConfigError(f"{what} does not match this run's config except train.lambda_contr; differing "
                          f"keys: {shown}{more}")
    lam = theirs.get("train.lambda_contr")
    if lam != 0:
        raise ConfigError(f"{what} has train.lambda_contr = {lam!r}; the paired run must have lambda_contr = 0")
    ckpt = RunDir(path).latest_repair_checkpoint()
    if ckpt is None:
        raise ConfigError(f"{what} has no checkpoints/repair_step_*.pt")
    return {"run_dir": str(path), "config_hash": config_mod.config_hash(stored), "lambda_contr": lam,
            "this_lambda_contr": ours.get("train.lambda_contr"), "ignored_keys": list(PAIRING_IGNORED),
            "check": "config matches except ignored keys; paired lambda_contr == 0",
            "checkpoint": str(ckpt), "checkpoint_step": _ckpt_step(ckpt), "checkpoint_sha256": _file_sha256(ckpt)}


def _ckpt_step(p: Path) -> int:
    return int(p.stem.rsplit("_", 1)[1])


def best_heuristic(rd: RunDir, fallback: str) -> tuple[str, str]:
    """(name, origin): the eval's best heuristic when task metrics name one, else the configured fallback."""
    if fallback not in defenses.DEFENSES or fallback == "no_defense":
        known = [d for d in defenses.DEFENSES if d != "no_defense"]
        raise ConfigError(f"stability.heuristic_fallback: {fallback!r} is not a heuristic defense; known: {known}")
    path = rd.metrics / "task_metrics.json"
    if not path.is_file():
        return fallback, "stability.heuristic_fallback (no metrics/task_metrics.json)"
    doc = read_json(path, "task metrics")
    metrics = doc.get("metrics", {}) if isinstance(doc, dict) else {}
    name = None
    for where in (metrics, doc if isinstance(doc, dict) else {}):
        for key, value in (where.items() if isinstance(where, dict) else ()):
            if key == "best_heuristic_name" or key.endswith(".best_heuristic_name"):
                name = value.get("name") if isinstance(value, dict) else value
                break
        if name:
            break
    if not name:
        return fallback, "stability.heuristic_fallback (metrics/task_metrics.json names no best_heuristic_name)"
    if name not in defenses.DEFENSES or name == "no_defense":
        raise ConfigError(f"{path}: best_heuristic_name {name!r} is not a heuristic defense")
    return str(name), "metrics/task_metrics.json best_heuristic_name"


def repair_checkpoint(rd: RunDir, allow_missing: bool) -> dict:
    ckpt = rd.latest_repair_checkpoint()
    if ckpt is None:
        if not allow_missing:
            raise ConfigError(f"no repair checkpoint in {rd.checkpoints} (run train first, or set "
                              "eval.allow_missing_checkpoint: true to measure the untrained identity operator)")
        return {"checkpoint": None, "checkpoint_step": None, "checkpoint_sha256": None, "identity_operator": True,
                "note": "no checkpoint: untrained identity operator (eval.allow_missing_checkpoint)"}
    return {"checkpoint": str(ckpt.relative_to(rd.path)), "checkpoint_step": _ckpt_step(ckpt),
            "checkpoint_sha256": _file_sha256(ckpt), "identity_operator": False}


# --------------------------------------------------------------------------------------------------
# settings that need the architecture


@dataclass
class Setup:
    seed: int
    deltas: list[float]
    map_delta: float
    num_directions: int
    delta_scale: float
    topk: int
    layers: list[int]  # stability layers (amplification map)
    sens_layers: list[int]  # stability layers inside the protected set (sensitivity perturbation)
    heads: list[int]
    time_mode: str
    n_recent: int
    window: list[int]
    heuristic: str
    baseline_cfg: dict

    def time_mask(self, T: int, layer_len: int) -> torch.Tensor:
        """bool [layer_len]: the segment over the last `layer_len` of T positions (sliding layers keep fewer)."""
        t = torch.arange(T)
        if self.time_mode == "all_past":
            m = torch.ones(T, dtype=torch.bool)
        elif self.time_mode == "old_only":
            m = t < T - self.n_recent
        else:
            m = (t >= self.window[0]) & (t < self.window[1])
        return m[T - layer_len:]


def build_setup(cfg: Config, arch: hf.ArchInfo, vocab: int, heuristic: str) -> Setup:
    st = cfg.stability
    protect = sorted({int(x) for x in cfg.repair.protect_layers})
    layers = sorted({int(x) for x in (st.layers if st.layers is not None else protect)})
    problems = []
    bad = [l for l in layers if l >= arch.num_layers]
    if bad:
        problems.append(f"stability.layers: {bad} out of range for a {arch.num_layers}-layer model")
    if not layers:
        problems.append("stability.layers: empty")
    sens = [l for l in layers if l in protect]
    if layers and not sens:
        problems.append(f"stability.layers {layers}: none is in repair.protect_layers {protect}, so nothing is "
                        "left to perturb for the sensitivity curves")
    heads = sorted({int(h) for h in (st.head_subset if st.head_subset is not None else range(arch.num_kv_heads))})
    bad_h = [h for h in heads if h >= arch.num_kv_heads]
    if bad_h:
        problems.append(f"stability.head_subset: {bad_h} out of range for {arch.num_kv_heads} KV heads")
    if not heads:
        problems.append("stability.head_subset: empty")
    if st.prompt_len > arch.max_positions:
        problems.append(f"stability.prompt_len: {st.prompt_len} exceeds the model's {arch.max_positions} positions")
    if problems:
        raise ConfigError(problems)
    s = Setup(seed=int(cfg.seed), deltas=measured_deltas(st.delta_norms), map_delta=0.0,
              num_directions=int(st.num_directions), delta_scale=float(st.delta_scale),
              topk=min(int(st.topk_logits), vocab), layers=layers, sens_layers=sens, heads=heads,
              time_mode=st.time_mode, n_recent=int(st.N_recent), window=[int(x) for x in cfg.corruption.axes.window],
              heuristic=heuristic, baseline_cfg=cfg.baseline.to_dict())
    s.map_delta = map_delta(s.deltas)[0]
    T = st.prompt_len - 1
    if not bool(s.time_mask(T, T).any()):
        key = "stability.N_recent" if s.time_mode == "old_only" else "corruption.axes.window"
        raise ConfigError(f"{key}: the time segment ({s.time_mode}) of a {T}-token clean state is empty; "
                          "lower it or raise stability.prompt_len")
    return s


def load_prompts(cfg: Config, tokenizer) -> tuple[list[tuple[int, torch.Tensor]], dict]:
    """The last `num_prompts` consecutive windows of `prompt_len` tokens of the evaluation text."""
    st = cfg.stability
    text, source = data.load_text(cfg.data.to_dict(), "wikitext2")
    tokens = data.tokenize_stream(tokenizer, text)
    n, L = tokens.numel(), int(st.prompt_len)
    if n < L * st.num_prompts:
        raise ConfigError(f"stability.num_prompts: the evaluation text ({source}) has {n} tokens, fewer than "
                          f"{st.num_prompts} windows of stability.prompt_len = {L}")
    starts = [n - (st.num_prompts - i) * L for i in range(st.num_prompts)]
    eval_tokens = sum(int(t["num_examples"]) for t in cfg.eval.tasks if t["name"] == "wikitext2_ppl") \
        * int(cfg.eval.max_seq_len)
    info = {"source": source, "stream_tokens": n, "windows": "last consecutive windows of the token stream",
            "token_starts": starts, "prompt_len": L,
            "overlaps_wikitext2_eval_windows": bool(eval_tokens > starts[0])}
    return [(s, tokens[s:s + L]) for s in starts], info


# --------------------------------------------------------------------------------------------------
# one unit of work: one prompt


def _direction(gen: torch.Generator, shape, mask: torch.Tensor, target: float) -> torch.Tensor:
    """Gaussian noise inside `mask`, rescaled to Frobenius norm `target` exactly (fp32, CPU); zero when
    the mask is empty (a sliding-window layer may no longer hold the segment)."""
    n = torch.randn(shape, generator=gen, dtype=torch.float32) * mask
    norm = float(n.norm())
    return n * (target / norm) if norm > 0 else torch.zeros(shape)


def _last_logits(lm: hf.LoadedModel, token: torch.Tensor, cache, plan: hf.HookPlan | None) -> torch.Tensor:
    n = hf.get_kv(cache, 0)[0].shape[0]
    ids = token.view(1, 1).expand(n, 1).to(lm.device)
    logits, _ = hf.forward(lm.model, ids, cache, plan=plan, logits_to_keep=1)
    return logits[:, -1].float()


def _drift(z: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor) -> list[float]:
    return (z[:, idx] - ref[idx]).norm(dim=-1).tolist()


def measure_prompt(lm: hf.LoadedModel, s: Setup, op, op_paired, p_idx: int, ids: torch.Tensor) -> dict:
    """Sensitivity (every delta x direction x defense) and map drifts of one prompt."""
    dev, seed, D = lm.device, s.seed, s.num_directions
    T = ids.numel() - 1
    token = ids[-1]
    _, clean = hf.forward(lm.model, ids[:-1].view(1, -1).to(dev), logits_to_keep=1)
    masks, rms = {}, {}
    head_mask = torch.zeros(lm.arch.num_kv_heads, dtype=torch.bool)
    head_mask[s.heads] = True
    for l in s.layers:
        k, v = hf.get_kv(clean, l)
        time_l = s.time_mask(T, k.shape[2])
        masks[l] = (head_mask.view(1, -1, 1, 1) & time_l.view(1, 1, -1, 1), time_l)
        rms[l] = (float(k.float().pow(2).mean().sqrt()), float(v.float().pow(2).mean().sqrt()))

    # --- sensitivity: row 0 is the clean state, then every (delta, direction); all defenses see these rows
    rows = [(dl, j) for dl in s.deltas for j in range(D)]
    n = 1 + len(rows)
    base = hf.repeat_cache(clean, n)
    for l in s.sens_layers:
        k, v = (x.clone() for x in hf.get_kv(base, l))
        mask = masks[l][0]
        count = int(mask.sum()) * k.shape[-1]
        for r, (dl, j) in enumerate(rows, start=1):
            if dl == 0:
                continue
            for x, tag, size in ((k, "K", rms[l][0]), (v, "V", rms[l][1])):
                gen = seeding.torch_rng(seed, PHASE, p_idx, dl, j, l, tag)
                target = dl * s.delta_scale * size * math.sqrt(count)
                x[r] += _direction(gen, (1,) + tuple(x.shape[1:]), mask, target)[0].to(dev, x.dtype)
        hf.set_kv(base, l, k, v)

    z_b = _last_logits(lm, token, hf.clone_cache(base), None)
    z_ref = z_b[0]
    idx = torch.topk(z_ref, s.topk).indices
    z_c = _last_logits(lm, token, hf.clone_cache(base), hf.HookPlan(repair=op))
    z_p = None
    if op_paired is not None:
        z_p = _last_logits(lm, token, hf.clone_cache(base), hf.HookPlan(repair=op_paired))
    heur = hf.clone_cache(base)
    for l in s.sens_layers:
        k, v = hf.get_kv(heur, l)
        # row by row with one seed: a random defense (masking_dropout) is the same fixed map for every
        # row, so the rows differ only by their perturbation
        out = [defenses.apply_defense(s.heuristic, k[r:r + 1], v[r:r + 1], masks[l][0].to(dev), s.baseline_cfg,
                                      gen=seeding.torch_rng(seed, PHASE, p_idx, "heuristic", s.heuristic, l))
               for r in range(n)]
        hf.set_kv(heur, l, torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]))
    z_h = _last_logits(lm, token, heur, None)

    per = {
        "baseline": _drift(z_b[1:], z_ref, idx),
        "heuristic": _drift(z_h[1:], z_ref, idx),
        "heuristic_vs_defended_clean": _drift(z_h[1:], z_h[0], idx),
        "cachemedic": _drift(z_c[1:], z_ref, idx),
        "cachemedic_vs_repaired_clean": _drift(z_c[1:], z_c[0], idx),
        "cachemedic_no_contr": _drift(z_p[1:], z_ref, idx) if z_p is not None else None,
    }
    sens = {}
    for i, dl in enumerate(s.deltas):
        sl = slice(i * D, (i + 1) * D)
        sens[repr(dl)] = {name: (vals[sl] if vals is not None else None) for name, vals in per.items()}

    # --- amplification map: a perturbation confined to (layer, head, segment), one row each
    cells = [(l, h, j) for l in s.layers for h in s.heads for j in range(D)]
    gam = {name: [] for name in MAP_DEFENSES}
    for c0 in range(0, len(cells), MAP_CHUNK):
        chunk = cells[c0:c0 + MAP_CHUNK]
        cache = hf.repeat_cache(clean, len(chunk))
        norms = []
        for l in sorted({c[0] for c in chunk}):
            k, v = (x.clone() for x in hf.get_kv(cache, l))
            time_l = masks[l][1]
            for r, (cl, h, j) in enumerate(chunk):
                if cl != l:
                    continue
                hm = torch.zeros(lm.arch.num_kv_heads, dtype=torch.bool)
                hm[h] = True
                mask = hm.view(1, -1, 1, 1) & time_l.view(1, 1, -1, 1)
                count = int(mask.sum()) * k.shape[-1]
                targets = []
                for x, tag, size in ((k, "K", rms[l][0]), (v, "V", rms[l][1])):
                    gen = seeding.torch_rng(seed, PHASE, "map", p_idx, s.map_delta, j, l, h, tag)
                    target = s.map_delta * s.delta_scale * size * math.sqrt(count)
                    x[r] += _direction(gen, (1,) + tuple(x.shape[1:]), mask, target)[0].to(dev, x.dtype)
                    targets.append(target)
                norms.append((r, math.sqrt(targets[0] ** 2 + targets[1] ** 2) if count else 0.0))
            hf.set_kv(cache, l, k, v)
        dnorm = [d for _, d in sorted(norms)]
        zb = _last_logits(lm, token, hf.clone_cache(cache), None)
        zc = _last_logits(lm, token, cache, hf.HookPlan(repair=op))
        for name, vals in (("baseline", _drift(zb, z_ref, idx)), ("cachemedic", _drift(zc, z_c[0], idx)),
                           ("cachemedic_vs_clean_no_defense", _drift(zc, z_ref, idx))):
            gam[name] += [x / d if d > 0 else None for x, d in zip(vals, dnorm)]
    H = len(s.heads)
    amp = {name: [[vals[(li * H + hi) * D:(li * H + hi + 1) * D] for hi in range(H)] for li in range(len(s.layers))]
           for name, vals in gam.items()}
    return {"prompt_index": p_idx, "sensitivity": sens, "amplification": amp,
            "repair_clean_drift": _drift(z_c[:1], z_ref, idx)[0],
            "segment_positions": {str(l): int(masks[l][1].sum()) for l in s.layers}}


# --------------------------------------------------------------------------------------------------
# aggregation


def _mean(vals: list[float]) -> float:
    return math.fsum(vals) / len(vals)


def aggregate(units: list[dict], s: Setup, paired: bool, heuristic: str) -> dict:
    points = []
    for dl in s.deltas:
        key = repr(dl)

        def pooled(name: str) -> list[float]:
            return [x for u in units for x in u["sensitivity"][key][name]]

        points.append({
            "delta_norm": dl,
            "baseline": _mean(pooled("baseline")),
            "heuristics": {heuristic: _mean(pooled("heuristic"))},
            "heuristics_vs_defended_clean": {heuristic: _mean(pooled("heuristic_vs_defended_clean"))},
            "cachemedic": _mean(pooled("cachemedic")),
            "cachemedic_vs_repaired_clean": _mean(pooled("cachemedic_vs_repaired_clean")),
            "cachemedic_no_contr": _mean(pooled("cachemedic_no_contr")) if paired else None,
            "n": len(pooled("baseline")),
        })

    def median_map(name: str) -> list[list[float | None]]:
        out = []
        for li in range(len(s.layers)):
            row = []
            for hi in range(len(s.heads)):
                vals = [x for u in units for x in u["amplification"][name][li][hi] if x is not None]
                row.append(statistics.median(vals) if vals else None)
            out.append(row)
        return out

    return {"points": points, "maps": {name: median_map(name) for name in MAP_DEFENSES},
            "repair_clean_drift": _mean([u["repair_clean_drift"] for u in units])}


# --------------------------------------------------------------------------------------------------
# the phase


def _progress_doc(status: str, chash: str, total: int, units: dict, fingerprint: dict, elapsed: float) -> dict:
    return {"format": PROGRESS_FORMAT, "status": status, "config_hash": chash, "total_units": total,
            "completed_units": len(units), "fingerprint": fingerprint, "elapsed_wall_sec": round(elapsed, 3),
            "units": units}


def _load_progress(path: Path, chash: str, fingerprint: dict, total: int) -> tuple[dict, float]:
    if not path.is_file():
        return {}, 0.0
    doc = read_json(path, "stability progress")
    if not isinstance(doc, dict) or doc.get("format") != PROGRESS_FORMAT or doc.get("config_hash") != chash:
        log.warning("stability: %s belongs to another config or format; recomputing", path)
        return {}, 0.0
    if doc.get("fingerprint") != fingerprint:
        log.warning("stability: checkpoint, paired run, heuristic or prompts changed since %s; recomputing", path)
        return {}, 0.0
    units = doc.get("units") or {}
    return {k: v for k, v in units.items() if k in {_unit_key(i) for i in range(total)}}, float(
        doc.get("elapsed_wall_sec") or 0.0)


def _unit_key(i: int) -> str:
    return f"prompt_{i:04d}"


def _load_operator(cfg: Config, lm: hf.LoadedModel, path: str | None, expected_hash: str):
    """The repair operator of a checkpoint, or the untrained identity operator when `path` is None."""
    if path is None:
        op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    else:
        op, payload = repair.load_repair_checkpoint(path, cfg.repair.to_dict(), lm.arch, cfg.seed)
        if payload.get("config_hash") not in (None, expected_hash):
            log.warning("stability: checkpoint %s was written under config %s, its run dir is %s",
                        path, payload.get("config_hash"), expected_hash)
    op.requires_grad_(False)
    return op.to(lm.device).eval()


def run(cfg: Config, run_dir: str | Path, *, resume: bool = True, config_path: str | None = None,
        sweep_pause: Path | None = None, paired_run_dir: str | None = None, command: str | None = None) -> int:
    st = cfg.stability
    deltas = measured_deltas(st.delta_norms)
    m_delta, m_choice = map_delta(deltas)
    paired = check_paired_run(cfg, paired_run_dir if paired_run_dir is not None else st.paired_run_dir)
    with PhaseSession(cfg, run_dir, PHASE, config_path, command, sweep_pause) as session, torch.no_grad():
        rd = session.rd
        total = int(st.num_prompts)
        hb = session.heartbeat(total)  # from here on, a crash leaves a `failed` heartbeat
        ckpt = repair_checkpoint(rd, bool(cfg.eval.allow_missing_checkpoint))
        heuristic, h_origin = best_heuristic(rd, st.heuristic_fallback)
        lm = hf.load_model(cfg.model.to_dict(), cfg.device, "float32")
        s = build_setup(cfg, lm.arch, int(lm.model.get_output_embeddings().weight.shape[0]), heuristic)
        prompts, prompt_info = load_prompts(cfg, lm.tokenizer)
        op = _load_operator(cfg, lm, str(rd.path / ckpt["checkpoint"]) if ckpt["checkpoint"] else None, cfg.hash)
        # the paired config equals this one except train.lambda_contr, so this repair section builds it
        op_paired = _load_operator(cfg, lm, paired["checkpoint"], paired["config_hash"]) if paired else None

        protect = sorted({int(x) for x in cfg.repair.protect_layers})
        flagged = [l for l in s.layers if l not in protect]
        settings = {
            "delta_norms": s.deltas, "delta_norms_configured": list(st.delta_norms), "delta_scale": s.delta_scale,
            "perturbation_size": "||Delta_l||_F = delta * delta_scale * rms(S_l) * sqrt(#masked entries), per layer "
                                 "and per K/V tensor; rms over the layer's whole K (or V)",
            "topk": s.topk, "topk_configured": int(st.topk_logits), "num_prompts": int(st.num_prompts),
            "num_directions": s.num_directions, "time_mode": s.time_mode, "N_recent": s.n_recent,
            "window": s.window if s.time_mode == "window" else None,
            "layers": s.layers, "sensitivity_layers": s.sens_layers, "protect_layers": protect,
            "flagged_layers": flagged, "heads": s.heads, "num_kv_heads": lm.arch.num_kv_heads,
            "sliding_layers": list(lm.arch.sliding_layers),
            "heuristic": heuristic, "heuristic_origin": h_origin, "heuristic_note": defenses.ORACLE_NOTE,
            "reference": "drift is measured against the clean undefended logits unless a key says otherwise",
            "map_delta_norm": s.map_delta, "map_delta_choice": m_choice,
            "map_cachemedic_reference": "repaired clean logits (cachemedic_vs_clean_no_defense: undefended clean)",
            "paired_run": paired, "repair": {**ckpt, "family": cfg.repair.family, "rank": cfg.repair.rank},
            "prompts": prompt_info, "model": cfg.model.name, "compute_dtype": "float32",
            "config_dtype": cfg.dtype, "seed": s.seed, "rng": "seeding.torch_rng(seed, 'stability', ...)",
        }
        # what the units depend on beyond the config hash: a change discards saved progress
        fingerprint = {"repair": ckpt,
                       "paired": paired and {k: paired[k] for k in ("config_hash", "checkpoint_sha256")},
                       "heuristic": heuristic, "prompts": prompt_info["token_starts"], "source": prompt_info["source"],
                       "deltas": s.deltas, "layers": s.layers, "heads": s.heads, "topk": s.topk}

        progress_path = rd.metrics / "stability_progress.json"
        metrics_path = rd.metrics / "stability_metrics.json"
        units, elapsed = _load_progress(progress_path, cfg.hash, fingerprint, total) if resume else ({}, 0.0)
        if not units and metrics_path.is_file():
            metrics_path.unlink()  # stale results of a discarded computation
        hb.elapsed_before = elapsed
        hb.latest = {"checkpoint": ckpt["checkpoint"], "state": str(progress_path)}
        done = len(units)
        session.step = done
        hb.beat("resumed" if done else "running", done, reason="resume" if done else "start", force=True)
        log.info("stability: %d/%d prompts done; layers %s, heads %s, deltas %s, heuristic %s (%s)",
                 done, total, s.layers, s.heads, s.deltas, heuristic, h_origin)

        def save(status: str) -> None:
            ordered = {_unit_key(i): units[_unit_key(i)] for i in range(total) if _unit_key(i) in units}
            atomic_write_json(progress_path, _progress_doc(status, cfg.hash, total, ordered, fingerprint, hb.elapsed()))

        bar = _bar(total, done)
        for i, (start, ids) in enumerate(prompts):
            key = _unit_key(i)
            if key in units:
                continue
            reason = session.pause.requested()
            if reason:
                save("paused")
                session.pause.acknowledge(session.run_id, done, reason, str(progress_path))
                hb.beat("paused", done, reason=reason, unit=key, force=True)
                bar.close()
                log.info("stability: paused after %d/%d prompts (%s)", done, total, reason)
                return EXIT_PAUSED
            hb.beat("running", done, unit=key)
            units[key] = measure_prompt(lm, s, op, op_paired, i, ids)
            done += 1
            session.step = done
            save("running")
            hb.beat("running", done, unit=key, force=True)
            bar.update(1)
        bar.close()

        ordered = [units[_unit_key(i)] for i in range(total)]
        agg = aggregate(ordered, s, paired is not None, heuristic)
        # positions of the segment held in each layer's cache (fewer in sliding-window layers)
        settings["segment_positions"] = ordered[0]["segment_positions"]
        metrics = {
            "stability.logit_sensitivity": {"points": agg["points"], "heuristic": heuristic,
                                            "repair_clean_drift": agg["repair_clean_drift"]},
            "stability.amplification_map": {"layers": s.layers, "heads": s.heads, **agg["maps"],
                                             "delta_norm": s.map_delta, "delta_choice": m_choice,
                                             "flagged_layers": flagged,
                                             "protected": [l in protect for l in s.layers]},
            "stability.settings": settings,
        }
        atomic_write_json(metrics_path, {"run_id": session.run_id, "config_hash": cfg.hash, "metrics": metrics,
                                         "settings": settings})
        save("completed")
        hb.beat("completed", total, reason="done", force=True)
        _summary(agg, s, heuristic, paired is not None, hb.elapsed())
        return EXIT_OK


def _bar(total: int, done: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="stability", unit="prompt", file=sys.stderr,
                disable=not sys.stderr.isatty())


def _summary(agg: dict, s: Setup, heuristic: str, paired: bool, seconds: float) -> None:
    log.info("stability: done in %.1fs; logit sensitivity (mean top-%d drift):", seconds, s.topk)
    for p in agg["points"]:
        extra = f"  no_contr {p['cachemedic_no_contr']:.4g}" if paired else ""
        log.info("  delta %-5g baseline %.4g  %s %.4g  cachemedic %.4g (vs repaired clean %.4g)%s", p["delta_norm"],
                 p["baseline"], heuristic, p["heuristics"][heuristic], p["cachemedic"],
                 p["cachemedic_vs_repaired_clean"], extra)


def main(argv: Sequence[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--paired_run_dir", default=None,
                       help="run dir of the same config trained with train.lambda_contr = 0 "
                            "(overrides stability.paired_run_dir)")

    def body(cfg: Config, run_dir: str, a) -> int:
        cmd = "python -m cachemedicpp.stability " + " ".join(sys.argv[1:] if argv is None else argv)
        return run(cfg, run_dir, resume=a.resume, config_path=a.config, paired_run_dir=a.paired_run_dir,
                   command=cmd.strip())

    return run_phase(PHASE, "Logit sensitivity curves and amplification maps of the KV cache.", argv, body,
                     extra_args=extra)


if __name__ == "__main__":
    raise SystemExit(main())
