"""What stability measures, resolved before any unit of work: the deltas, the paired run, the heuristic,
the repair checkpoint, the layers / heads / segment (`Setup`), the prompts, and the settings record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cachemedicpp import config as config_mod
from cachemedicpp import corruption, data, defenses, hf, progress, seeding
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.fileio import file_sha256, read_json
from cachemedicpp.results import BEST_HEURISTIC_NAME, METRICS
from cachemedicpp.rundir import RunDir

PHASE = "stability"


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


def check_paired_run(cfg: Config, paired_run_dir: str | None) -> dict | None:
    """The paired lambda_contr = 0 run, checked: the same resolved config but for
    `config.PAIRING_IGNORED`, its train.lambda_contr == 0, and a repair checkpoint. Anything else is bad
    input (exit 2)."""
    if not paired_run_dir:
        return None
    path = Path(paired_run_dir).expanduser().resolve()
    what = f"stability.paired_run_dir / --paired_run_dir: paired run {path}"
    if not path.is_dir():
        raise ConfigError(f"{what} not found")
    prd = RunDir(path)
    stored = prd.stored_config()
    if stored is None:
        raise ConfigError(f"{what} has no {prd.rel(prd.resolved_config_path)} (train it first)")
    diffs = config_mod.pairing_differences(cfg.to_dict(), stored)
    if diffs:
        shown = "; ".join(f"{k}: {a!r} here vs {b!r} there" for k, a, b in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise ConfigError(f"{what} does not match this run's config except train.lambda_contr; differing "
                          f"keys: {shown}{more}")
    lam = config_mod.flatten(stored).get("train.lambda_contr")
    if lam != 0:
        raise ConfigError(f"{what} has train.lambda_contr = {lam!r}; the paired run must have lambda_contr = 0")
    ckpt = prd.latest_repair_checkpoint()
    if ckpt is None:
        raise ConfigError(f"{what} has no repair checkpoint in {prd.rel(prd.checkpoints)}/")
    return {"run_dir": str(path), "config_hash": config_mod.config_hash(stored), "lambda_contr": lam,
            "this_lambda_contr": cfg.train.lambda_contr, "ignored_keys": list(config_mod.PAIRING_IGNORED),
            "check": "config matches except ignored keys; paired lambda_contr == 0",
            "checkpoint": str(ckpt), "checkpoint_step": RunDir.checkpoint_step(ckpt),
            "checkpoint_sha256": file_sha256(ckpt)}


def best_heuristic(rd: RunDir, fallback: str) -> tuple[str, str]:
    """(name, origin): the eval's best baseline (chosen on its validation grid) when the task metrics name
    one, else the configured fallback."""
    if fallback not in defenses.candidates():
        known = defenses.candidates()
        raise ConfigError(f"stability.heuristic_fallback: {fallback!r} is not a heuristic defense; known: {known}")
    where = rd.rel(rd.task_metrics)
    if not rd.task_metrics.is_file():
        return fallback, f"stability.heuristic_fallback (no {where})"
    doc = read_json(rd.task_metrics, "task metrics")
    metrics = doc.get(METRICS) if isinstance(doc, dict) else None
    name = metrics.get(BEST_HEURISTIC_NAME) if isinstance(metrics, dict) else None
    if not name:
        return fallback, f"stability.heuristic_fallback ({where} names no {BEST_HEURISTIC_NAME})"
    if not isinstance(name, str) or name not in defenses.candidates():
        raise ConfigError(f"{rd.task_metrics}: {BEST_HEURISTIC_NAME} {name!r} is not a heuristic defense")
    return name, f"{where} {BEST_HEURISTIC_NAME}"


def repair_checkpoint(rd: RunDir, allow_missing: bool) -> tuple[dict, dict]:
    """The operator measured, the run's latest repair checkpoint or, when allowed, the untrained identity
    operator: its record (`progress.checkpoint_record`) and its fields as settings.repair states them."""
    ckpt = progress.latest_checkpoint(
        rd, allow_missing=allow_missing,
        missing="no checkpoint: untrained identity operator (eval.allow_missing_checkpoint)",
        remedy="run train first, or set eval.allow_missing_checkpoint: true to measure the untrained identity "
               "operator")
    if ckpt["path"] is None:
        return ckpt, {"checkpoint": None, "checkpoint_step": None, "checkpoint_sha256": None,
                      "identity_operator": True, "note": ckpt["status"]}
    return ckpt, {"checkpoint": ckpt["path"], "checkpoint_step": ckpt["step"], "checkpoint_sha256": ckpt["sha256"],
                  "identity_operator": False}


# --------------------------------------------------------------------------------------------------
# settings that need the architecture


@dataclass
class Setup:
    """What every prompt is measured with, checked against the model's architecture."""

    seed: int
    deltas: list[float]
    map_delta: float
    map_choice: str  # why that delta (stored in the results)
    num_directions: int
    delta_scale: float
    topk: int
    layers: list[int]  # stability layers (amplification map)
    sens_layers: list[int]  # stability layers inside the protected set (sensitivity perturbation)
    protect: list[int]  # repair.protect_layers
    heads: list[int]
    time_mode: str
    n_recent: int
    window: list[int]
    heuristic: str
    baseline_cfg: dict
    cal: Any = None  # calibration.Calibration when the heuristic is a calibrated baseline

    @property
    def flagged(self) -> list[int]:
        """Map layers outside the protected set (the repair never sees them)."""
        return [l for l in self.layers if l not in self.protect]

    def time_mask(self, T: int, layer_len: int) -> torch.Tensor:
        """bool [layer_len]: the segment over the last `layer_len` of T positions (sliding layers keep fewer)."""
        return corruption.time_mask(T, self.time_mode, self.n_recent, self.window)[T - layer_len:]

    def rng(self, *parts) -> torch.Generator:
        """The generator of one draw; every draw has its own, so a resumed run is bit-identical."""
        return seeding.torch_rng(self.seed, PHASE, *parts)


def _layers_and_heads(cfg: Config, arch: hf.ArchInfo) -> tuple[list[int], list[int], list[int]]:
    """(layers, protected layers, heads), every problem reported together."""
    st = cfg.stability
    protect = sorted({int(x) for x in cfg.repair.protect_layers})
    layers = sorted({int(x) for x in (st.layers if st.layers is not None else protect)})
    problems = []
    bad = [l for l in layers if l >= arch.num_layers]
    if bad:
        problems.append(f"stability.layers: {bad} out of range for a {arch.num_layers}-layer model")
    if not layers:
        problems.append("stability.layers: empty")
    if layers and not any(l in protect for l in layers):
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
    return layers, protect, heads


def build_setup(cfg: Config, arch: hf.ArchInfo, vocab: int, heuristic: str) -> Setup:
    st = cfg.stability
    layers, protect, heads = _layers_and_heads(cfg, arch)
    deltas = measured_deltas(st.delta_norms)
    m_delta, m_choice = map_delta(deltas)
    s = Setup(seed=int(cfg.seed), deltas=deltas, map_delta=m_delta, map_choice=m_choice,
              num_directions=int(st.num_directions), delta_scale=float(st.delta_scale),
              topk=min(int(st.topk_logits), vocab), layers=layers, sens_layers=[l for l in layers if l in protect],
              protect=protect, heads=heads, time_mode=st.time_mode, n_recent=int(st.N_recent),
              window=[int(x) for x in cfg.corruption.axes.window], heuristic=heuristic,
              baseline_cfg=cfg.baseline.to_dict())
    T = st.prompt_len - 1
    if not bool(s.time_mask(T, T).any()):
        key = "stability.N_recent" if s.time_mode == "old_only" else "corruption.axes.window"
        raise ConfigError(f"{key}: the time segment ({s.time_mode}) of a {T}-token clean state is empty; "
                          "lower it or raise stability.prompt_len")
    return s


def load_prompts(cfg: Config, tokenizer) -> tuple[list[torch.Tensor], dict]:
    """The last `num_prompts` consecutive windows of `prompt_len` tokens of the evaluation text's test split
    (`data.SPLITS`: stability is a test measurement), and where they come from."""
    st = cfg.stability
    text, source = data.load_text(cfg.data.to_dict(), "wikitext2")
    tokens = data.tokenize_stream(tokenizer, text)
    _, n = data.split_range(tokens.numel(), "test")
    L = int(st.prompt_len)
    if n < L * st.num_prompts:
        raise ConfigError(f"stability.num_prompts: the test split of the evaluation text ({source}) has {n} tokens, "
                          f"fewer than {st.num_prompts} windows of stability.prompt_len = {L}")
    starts = [n - (st.num_prompts - i) * L for i in range(st.num_prompts)]
    eval_tokens = sum(int(t["num_examples"]) for t in cfg.eval.tasks if t["name"] == "wikitext2_ppl") \
        * int(cfg.eval.max_seq_len)
    info = {"source": source, "stream_tokens": n, "windows": "last consecutive windows of the token stream's test split",
            "token_starts": starts, "prompt_len": L,
            "overlaps_wikitext2_eval_windows": bool(eval_tokens > starts[0])}
    return [tokens[s:s + L] for s in starts], info


# --------------------------------------------------------------------------------------------------
# what the results say about how they were measured


def settings_record(cfg: Config, s: Setup, arch: hf.ArchInfo, ckpt: dict, paired: dict | None, h_origin: str,
                    prompt_info: dict) -> dict:
    """`stability.settings` (results.StabilitySettings) but for segment_positions, known after a prompt."""
    st = cfg.stability
    return {
        "delta_norms": s.deltas, "delta_norms_configured": list(st.delta_norms), "delta_scale": s.delta_scale,
        "perturbation_size": "||Delta_l||_F = delta * delta_scale * rms(S_l) * sqrt(#masked entries), per layer "
                             "and per K/V tensor; rms over the layer's whole K (or V)",
        "topk": s.topk, "topk_configured": int(st.topk_logits), "num_prompts": int(st.num_prompts),
        "num_directions": s.num_directions, "time_mode": s.time_mode, "N_recent": s.n_recent,
        "window": s.window if s.time_mode == "window" else None,
        "layers": s.layers, "sensitivity_layers": s.sens_layers, "protect_layers": s.protect,
        "flagged_layers": s.flagged, "heads": s.heads, "num_kv_heads": arch.num_kv_heads,
        "sliding_layers": list(arch.sliding_layers),
        "heuristic": s.heuristic, "heuristic_origin": h_origin, "heuristic_note": defenses.ORACLE_NOTE,
        "reference": "drift is measured against the clean undefended logits unless a key says otherwise",
        "map_delta_norm": s.map_delta, "map_delta_choice": s.map_choice,
        "map_cachemedic_reference": "repaired clean logits (cachemedic_vs_clean_no_defense: undefended clean)",
        "paired_run": paired, "repair": {**ckpt, "family": cfg.repair.family, "rank": cfg.repair.rank},
        "prompts": prompt_info, "model": cfg.model.name, "compute_dtype": "float32",
        "config_dtype": cfg.dtype, "seed": s.seed, "rng": f"seeding.torch_rng(seed, '{PHASE}', ...)",
    }


def fingerprint(s: Setup, paired: dict | None, prompt_info: dict) -> dict:
    """What the saved units depend on beyond the config hash and the checkpoint: a change discards saved
    progress."""
    return {"paired": paired and {k: paired[k] for k in ("config_hash", "checkpoint_sha256")},
            "heuristic": s.heuristic, "prompts": prompt_info["token_starts"], "source": prompt_info["source"],
            "deltas": s.deltas, "layers": s.layers, "heads": s.heads, "topk": s.topk}
