"""bench: what the harness and the repair operator cost, measured side by side.

    python -m cachemedicpp.bench [--out bench/results.json] [--reps N] [--lengths 256,1024,2048] [--quick]
                                 [--config configs/quickstart.yaml] [--model NAME] [--device auto|cpu|cuda]

Measurements (each a key of the results JSON; every ratio is taken between runs interleaved in one
process, after a warm-up, and the median over repetitions is reported; wall-time ratios are the
measurements, CPU-time ratios are reported beside them):

- `train_step`: `train.Trainer.step` / a bare step of the same shapes with no harness (clean prefill of
  the prefix, teacher continuation forward, student continuation forward whose protected layers read
  `K * s` for one scalar parameter `s`, the same distillation loss, backward).
- `eval_grid`: the wall time of the eval grid (`eval.score_example` over every example of a small grid
  built from the base config) / the bare forwards that grid needs (one clean prefill per example and
  one continuation forward per cell); plus `eval.run` once, end to end, in a temporary run dir.
- `decode`: greedy decoding tokens/s at several cache lengths with the repair operator active (its U
  perturbed so it is not the identity) / tokens/s with the hook installed and no plan; the same for a
  naive operator that materialises the repaired K/V for every query (the reference's approach), and for
  `augmented`, the earlier factored form that appends r columns to q, K and V (exact too, but its cost
  grows with the cache length; the operator now folds the correction into q and the output instead).
- `memory`: peak memory of each workload. On CPU every workload runs in a fresh subprocess with glibc's
  mmap threshold pinned (so freed tensors leave the resident set), the kernel's peak-RSS mark is reset
  after setup and warm-up (`/proc/self/clear_refs`), and the peak is read from `VmHWM` after one unit of
  work; on CUDA it is `torch.cuda.max_memory_allocated` above the memory allocated before the unit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# On a machine shared with other busy processes, OpenMP workers that spin while they wait made a 2-thread
# SmolLM2 forward ~20x slower and its timings pure noise; with OMP_WAIT_POLICY=PASSIVE they sleep instead,
# which costs ~20% on a quiet machine. So: PASSIVE when the 1-minute load average already exceeds the
# cores at start, the OpenMP default otherwise, unless the caller set the variable. Only effective before
# torch is first imported; `machine.omp_wait_policy` records what was in effect and why.
_OMP_POLICY_BEFORE_TORCH = "torch" not in sys.modules
if "OMP_WAIT_POLICY" in os.environ:
    _OMP_POLICY_REASON = "set by the caller"
elif os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _OMP_POLICY_REASON = "set to PASSIVE: load average above the core count at start"
else:
    _OMP_POLICY_REASON = "OpenMP default (machine not overloaded at start)"

import torch  # noqa: E402

from cachemedicpp import ROOT, hf  # noqa: E402
from cachemedicpp.config import ConfigError, load_config  # noqa: E402

log = logging.getLogger("cachemedicpp")

FORMAT = "cachemedicpp.bench/1"
TARGETS = {"train_step": ("<=", 1.15), "eval_grid": ("<=", 1.3), "decode_repair": (">=", 0.95)}
DECODE_VARIANTS = ("none", "repair", "naive", "augmented")
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"


@dataclass
class Settings:
    config: str = str(DEFAULT_CONFIG)
    model: str | None = None
    protect_layers: list[int] = field(default_factory=lambda: [10, 11, 12, 13])  # the 4 protected layers measured
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    reps: int = 5
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    decode_tokens: int = 8  # per timed run; each repetition times 2 runs of a variant and 2 of no defense
    memory: str = "subprocess"  # subprocess | inprocess | off
    memory_lengths: list[int] = field(default_factory=lambda: [2048])
    memory_of: list[str] = field(default_factory=lambda: ["train_step", "eval_grid", "decode"])
    memory_decode_tokens: int = 8  # peak memory hardly depends on how many tokens are decoded
    eval_examples: int = 1  # per task of the base config
    eval_eps: list[float] = field(default_factory=lambda: [0.0, 0.16, 0.64])
    eval_end_to_end: bool = True
    eval_reps: int | None = None  # default: reps
    only: list[str] = field(default_factory=lambda: ["train_step", "eval_grid", "decode", "memory"])
    threads: int | None = None
    quick: bool = False
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# small helpers


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Clock:
    """Wall seconds and process CPU seconds (all threads) of a span; CPU time is reported beside wall
    time because it is far less sensitive to other processes competing for the cores."""

    def __init__(self, dev: torch.device):
        self.dev, self.wall, self.cpu = dev, 0.0, 0.0

    @contextlib.contextmanager
    def span(self):
        _sync(self.dev)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            _sync(self.dev)
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def _timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[float, float]:
    clock = Clock(dev)
    with clock.span():
        fn()
    return clock.wall, clock.cpu


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b else None


def machine_info() -> dict:
    cpu = None
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else None
    except OSError:
        pass
    info = hf.versions()
    info.update({
        "cpu_model": cpu or platform.processor() or None,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
        "omp_wait_policy": {"value": os.environ.get("OMP_WAIT_POLICY"), "reason": _OMP_POLICY_REASON,
                            "set_before_torch_import": _OMP_POLICY_BEFORE_TORCH},
    })
    return info


def bench_config(s: Settings, device: str, arch: hf.ArchInfo | None = None):
    """The run config the workloads use: the base config with the model/device overrides, the settings'
    protected layers (the first four when the model is shallower), and a small eval grid (the base
    config's tasks, types and persistence; `eval_examples` per task and `eval_eps`)."""
    over: dict[str, Any] = {"device": device, "dtype": "float32", "repair.protect_layers": list(s.protect_layers)}
    if s.model:
        over["model.name"] = s.model
    cfg = load_config(s.config, over)
    over["eval.tasks"] = [dict(t, num_examples=s.eval_examples) for t in cfg.eval.tasks]
    over["eval.corruption_eval.eps"] = list(s.eval_eps)
    if arch is not None and max(s.protect_layers) >= arch.num_layers:
        over["repair.protect_layers"] = list(range(min(4, arch.num_layers)))
    return load_config(s.config, over)


def load_lm(s: Settings, device: str) -> hf.LoadedModel:
    cfg = bench_config(s, device)
    return hf.load_model(cfg.model.to_dict(), device, "float32")


def perturbed_operator(cfg, lm: hf.LoadedModel, std: float = 0.05):
    """The configured operator with nonzero U (B: nonzero gate scale): a real correction, not the identity."""
    from cachemedicpp.repair import build_operator

    op = build_operator(cfg.repair.to_dict(), lm.arch, seed=cfg.seed).to(lm.device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u") or name.endswith(".scale"):
                p.copy_((torch.randn(p.shape, generator=g) * std).abs() if name.endswith(".scale")
                        else torch.randn(p.shape, generator=g) * std)
    op.requires_grad_(False)
    assert not any(op.is_identity(l) for l in op.layers)
    return op


# --------------------------------------------------------------------------------------------------
# repair variants used by the decode benchmark (all objects the hook accepts as `HookPlan.repair`)


class NaiveRepair:
    """Attention over materialised per-query K̂, V̂ (`repair.reference_attention`, causal for queries
    that are the last Tq positions); ignores the model's kernel."""

    def __init__(self, op, scaling: float):
        self.op, self.layers, self.scaling = op, op.layers, scaling

    def attend(self, layer, q, k, v, kernel):
        from cachemedicpp.repair import reference_attention

        return reference_attention(self.op, layer, q, k, v, self.scaling)


class AugmentedRepair:
    """The earlier factored form: r columns appended to q, K and V of every protected layer,
        q·K̂ᵀ = [q, (qU_k) ⊙ α_k]·[K, K W_k]ᵀ,   Σ p V̂ = (p·[V, V W_v]) folded back through U_v.
    Exact, but every decoding step recomputes `K W` over the whole cache and copies K and V into wider
    tensors, so its cost grows with the cache length; `RepairOperator.attend` moves the correction onto
    q and the attention output instead and leaves the cache alone."""

    def __init__(self, op):
        self.op, self.layers = op, op.layers

    def attend(self, layer, q, k, v, kernel):
        op, hq, d = self.op, q.shape[1], q.shape[-1]
        facs = op._factors(layer)
        alpha = op.gates(layer, q)
        if "K" in facs:
            w, u = facs["K"].wu()
            kw = torch.matmul(k.float(), op._per_kv_head(w))
            qu = torch.matmul(q.float(), op._per_query_head(u, hq)) * alpha["K"]
            q, k = torch.cat([q, qu.to(q.dtype)], dim=-1), torch.cat([k, kw.to(k.dtype)], dim=-1)
        if "V" in facs:
            w, u = facs["V"].wu()
            v = torch.cat([v, torch.matmul(v.float(), op._per_kv_head(w)).to(v.dtype)], dim=-1)
        out = kernel(q, k, v)  # [B, Tq, Hq, d (+ r)]
        if "V" not in facs:
            return out[..., :d]
        pvw = out[..., d:].float().transpose(1, 2) * alpha["V"]  # [B, Hq, Tq, r]
        corr = torch.matmul(pvw, op._per_query_head(u, hq).transpose(-1, -2)).transpose(1, 2)
        return out[..., :d] + corr.to(out.dtype)


def decode_plans(op, lm: hf.LoadedModel) -> dict[str, hf.HookPlan | None]:
    scaling = lm.arch.head_dim ** -0.5
    return {"none": None, "repair": hf.HookPlan(repair=op), "naive": hf.HookPlan(repair=NaiveRepair(op, scaling)),
            "augmented": hf.HookPlan(repair=AugmentedRepair(op))}


def variant_agreement(lm: hf.LoadedModel, op, length: int = 48, seed: int = 0) -> dict:
    """Max |Δlogit| of one decode step between the operator and the naive / augmented forms."""
    ids = _random_ids(lm, length + 1, seed)
    plans = decode_plans(op, lm)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :-1], logits_to_keep=1)
        z = {n: hf.forward(lm.model, ids[:, -1:], hf.clone_cache(cache), plans[n])[0].float()
             for n in ("none", "repair", "naive", "augmented")}
    return {"repair_vs_none": float((z["repair"] - z["none"]).abs().max()),
            "naive_vs_repair": float((z["naive"] - z["repair"]).abs().max()),
            "augmented_vs_repair": float((z["augmented"] - z["repair"]).abs().max())}


def _random_ids(lm: hf.LoadedModel, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(lm.model.config.vocab_size) if hasattr(lm.model.config, "vocab_size") else len(lm.tokenizer)
    return torch.randint(0, vocab, (1, n), generator=g).to(lm.device)


# --------------------------------------------------------------------------------------------------
# workloads: prepare() -> arg (untimed, not counted in memory), run(arg) -> one unit of work


@dataclass
class Workload:
    name: str
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    info: dict = field(default_factory=dict)
    self_timed: bool = False  # run() returns the (wall, cpu) seconds that count, excluding its bookkeeping


def bare_train_step(lm: hf.LoadedModel, cfg, protect: Sequence[int], ids: torch.Tensor,
                    scale: torch.Tensor) -> float:
    """Teacher and student forwards plus backward with no harness; the student backpropagates through
    the protected layers' attention via one scalar parameter multiplying their K."""
    model, t = lm.model, cfg.train
    prefix, cont = ids[:, :t.prefix_len], ids[:, t.prefix_len:]
    with torch.no_grad():
        _, cache = hf.forward(model, prefix)
        z_clean, _ = hf.forward(model, cont, hf.clone_cache(cache))
    plan = hf.HookPlan(layers=frozenset(protect), on_read=lambda l, k, v: (k * scale.to(k.dtype), v))
    z, _ = hf.forward(model, cont, cache, plan)
    temp = t.temperature
    lp_c = torch.log_softmax(z_clean.float() / temp, dim=-1)
    lp_s = torch.log_softmax(z.float() / temp, dim=-1)
    loss = temp**2 * (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean()
    scale.grad = None
    loss.backward()
    return float(loss.detach())


def train_workloads(cfg, lm: hf.LoadedModel) -> tuple[Workload, Workload]:
    from cachemedicpp.train import Trainer

    trainer = Trainer(cfg, lm)
    protect = list(cfg.repair.protect_layers)
    scale = torch.ones((), device=lm.device, requires_grad=True)
    counter = iter(range(10**9))
    kinds: list[str] = []

    def run_train(step):
        out = trainer.step(step)
        kinds.append(out["corruption"]["type"])

    info = {"batch_size": cfg.train.batch_size, "prefix_len": cfg.train.prefix_len, "cont_len": cfg.train.cont_len,
            "protect_layers": protect, "step_corruption_types": kinds}
    return (Workload("train_step", lambda: next(counter), run_train, info),
            Workload("train_bare", lambda: trainer.batch(next(counter)),
                     lambda ids: bare_train_step(lm, cfg, protect, ids, scale), info))


def prefilled(lm: hf.LoadedModel, length: int, seed: int = 0) -> tuple[torch.Tensor, Any]:
    """(first greedy token, cache) after a clean prefill of `length` random tokens."""
    ids = _random_ids(lm, length, seed + length)
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, ids, logits_to_keep=1)
    return logits[:, -1:].argmax(-1), cache


def decode_workload(lm: hf.LoadedModel, op, length: int, tokens: int, variant: str, seed: int = 0,
                    start: tuple[torch.Tensor, Any] | None = None) -> Workload:
    """Greedy decoding of `tokens` tokens, one forward each, from a copy of a prefilled cache."""
    plan = decode_plans(op, lm)[variant]
    first, cache = start if start is not None else prefilled(lm, length, seed)

    def run(c):
        nxt = first
        with torch.no_grad():
            for _ in range(tokens):
                z, c = hf.forward(lm.model, nxt, c, plan, logits_to_keep=1)
                nxt = z[:, -1:].argmax(-1)
        return nxt

    return Workload(f"decode_{variant}_{length}", lambda: hf.clone_cache(cache), run,
                    {"length": length, "tokens": tokens, "variant": variant})


# --------------------------------------------------------------------------------------------------
# interleaved timing


def interleaved(dev: torch.device, workloads: Sequence[Workload], reps: int,
                warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, cpu) seconds per unit for each workload, run round-robin after warm-up; the order rotates
    every repetition so no workload always runs first (or right after the same neighbour)."""
    for _ in range(warmup):
        for w in workloads:
            w.run(w.prepare())
    wall: dict[str, list[float]] = {w.name: [] for w in workloads}
    cpu: dict[str, list[float]] = {w.name: [] for w in workloads}
    for r in range(reps):
        order = list(workloads[r % len(workloads):]) + list(workloads[:r % len(workloads)])
        for w in order:
            arg = w.prepare()
            tw, tc = w.run(arg) if w.self_timed else _timed(dev, lambda: w.run(arg))
            wall[w.name].append(float(tw))
            cpu[w.name].append(float(tc))
            del arg
        gc.collect()
    return wall, cpu


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den) if b > 0]


def bench_train(s: Settings, lm: hf.LoadedModel) -> dict:
    cfg = bench_config(s, str(lm.device), lm.arch)
    train, bare = train_workloads(cfg, lm)
    t, c = interleaved(lm.device, [train, bare], s.reps)
    per_rep = paired_ratios(t["train_step"], t["train_bare"])
    info = dict(train.info)
    info["step_corruption_types"] = info["step_corruption_types"][1:]  # drop the warm-up step
    return {"ratio": _median(per_rep), "ratio_of_medians": _ratio(_median(t["train_step"]), _median(t["train_bare"])),
            "per_rep_ratios": per_rep, "train_step_sec": t["train_step"], "bare_step_sec": t["train_bare"],
            "median_train_step_sec": _median(t["train_step"]), "median_bare_step_sec": _median(t["train_bare"]),
            "cpu_time_ratio": _median(paired_ratios(c["train_step"], c["train_bare"])),
            "train_step_cpu_sec": c["train_step"], "bare_step_cpu_sec": c["train_bare"],
            "target": "<= 1.15", "shapes": info,
            "bare_definition": "clean prefix prefill (no grad) + teacher continuation forward (no grad) + student "
                               "continuation forward reading K*s on the protected layers (s: one scalar "
                               "parameter) + the same KD loss + backward; no harness"}


def abba(dev: torch.device, base: Workload, others: Sequence[Workload], reps: int) -> dict:
    """Each of `others` timed against `base` in ABBA blocks (base, x, x, base; then x, base, base, x),
    so a drift in machine speed cancels within a block. One ratio per block and workload:
    base time / x time (a throughput ratio). Returns raw (wall, cpu) run times and the ratios."""
    for w in (base, *others):  # warm-up
        w.run(w.prepare())
    res = {w.name: {"wall": [], "cpu": []} for w in (base, *others)}
    ratios = {w.name: {"wall": [], "cpu": []} for w in others}
    for r in range(reps):
        k = r % len(others)
        for x in list(others[k:]) + list(others[:k]):
            order = (base, x, x, base) if r % 2 == 0 else (x, base, base, x)
            sums = {base.name: [0.0, 0.0], x.name: [0.0, 0.0]}
            for w in order:
                arg = w.prepare()
                tw, tc = _timed(dev, lambda: w.run(arg))
                del arg
                res[w.name]["wall"].append(tw)
                res[w.name]["cpu"].append(tc)
                sums[w.name][0] += tw
                sums[w.name][1] += tc
            ratios[x.name]["wall"].append(sums[base.name][0] / sums[x.name][0])
            ratios[x.name]["cpu"].append(sums[base.name][1] / sums[x.name][1])
        gc.collect()
    return {"runs": res, "ratios": ratios}


def bench_decode(s: Settings, lm: hf.LoadedModel) -> dict:
    cfg = bench_config(s, str(lm.device), lm.arch)
    op = perturbed_operator(cfg, lm)
    out: dict[str, Any] = {"protect_layers": list(op.layers), "rank": op.rank, "apply_to": op.apply_to,
                           "family": op.family, "tokens_per_run": s.decode_tokens,
                           "design": "per repetition and variant an ABBA block against no defense "
                                     "(none, v, v, none or v, none, none, v), each run decoding tokens_per_run "
                                     "tokens greedily from a copy of one shared prefilled cache; ratio = "
                                     "time(none) / time(v) per block, median over repetitions",
                           "agreement_max_abs_logit_diff": variant_agreement(lm, op, seed=s.seed),
                           "lengths": {}}
    for length in s.lengths:
        if length + s.decode_tokens > lm.arch.max_positions:
            raise ConfigError(f"--lengths: {length} + {s.decode_tokens} decoded tokens exceeds the model's "
                              f"{lm.arch.max_positions} positions")
        start = prefilled(lm, length, s.seed)  # one prefill shared by every variant
        ws = {v: decode_workload(lm, op, length, s.decode_tokens, v, s.seed, start) for v in DECODE_VARIANTS}
        res = abba(lm.device, ws["none"], [ws[v] for v in DECODE_VARIANTS[1:]], s.reps)
        runs = {v: res["runs"][ws[v].name] for v in DECODE_VARIANTS}
        row: dict[str, Any] = {
            "tokens_per_sec": {v: s.decode_tokens / _median(runs[v]["wall"]) for v in DECODE_VARIANTS},
            "sec_per_run": {v: runs[v]["wall"] for v in DECODE_VARIANTS},
            "cpu_sec_per_run": {v: runs[v]["cpu"] for v in DECODE_VARIANTS},
            "ratios": {}, "cpu_time_ratios": {}, "ratio_of_fastest_runs": {}, "per_rep_ratios": {}}
        for v in DECODE_VARIANTS[1:]:
            rat = res["ratios"][ws[v].name]
            row["per_rep_ratios"][v] = rat["wall"]
            row["ratios"][v] = _median(rat["wall"])
            row["cpu_time_ratios"][v] = _median(rat["cpu"])
            row["ratio_of_fastest_runs"][v] = min(runs["none"]["wall"]) / min(runs[v]["wall"])
        out["lengths"][str(length)] = row
        del ws, start
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------------
# eval grid


def eval_setup(s: Settings, lm: hf.LoadedModel):
    from cachemedicpp import eval as eval_mod

    cfg = bench_config(s, str(lm.device), lm.arch)
    op = perturbed_operator(cfg, lm)
    return eval_mod, cfg, op, eval_mod.build_context(cfg, lm, op)


def bare_eval_forwards(lm: hf.LoadedModel, examples, n_cells: int, computed: Sequence[int],
                       strict: list | None = None) -> tuple[float, float]:
    """(wall, cpu) seconds of the bare forwards: per example one clean prefill, then one continuation
    forward of its feeds per grid cell, each over its own copy of the clean cache (copies untimed).
    The cells of one example all have the same shapes, so the bare time of only the cells the eval
    computes is the prefill plus that fraction of the cell forwards; it is appended to `strict`."""
    total, only = Clock(lm.device), [0.0, 0.0]
    with torch.no_grad():
        for ex, n in zip(examples, computed):
            ids, feeds = ex.prefix[None].to(lm.device), ex.feeds.to(lm.device)
            pre, cells = Clock(lm.device), Clock(lm.device)
            with pre.span():
                _, clean = hf.forward(lm.model, ids, logits_to_keep=1)
            for _ in range(n_cells):
                cache = hf.repeat_cache(clean, ex.rows)
                with cells.span():
                    hf.forward(lm.model, feeds, cache)
                del cache
            total.wall += pre.wall + cells.wall
            total.cpu += pre.cpu + cells.cpu
            only[0] += pre.wall + cells.wall * n / n_cells
            only[1] += pre.cpu + cells.cpu * n / n_cells
    if strict is not None:
        strict.append(tuple(only))
    return total.wall, total.cpu


def eval_workloads(s: Settings, lm: hf.LoadedModel) -> tuple[Workload, Workload, dict]:
    """The eval grid (eval.score_example over every example) and its bare forwards."""
    eval_mod, cfg, op, ctx = eval_setup(s, lm)
    n_cells = len(ctx.cells)
    computed: list[int] = []

    def run_grid(_):
        units = [eval_mod.score_example(ctx, ex) for ex in ctx.examples]
        computed[:] = [(u["tokens"] - int(ex.prefix.numel())) // int(ex.feeds.numel())
                       for u, ex in zip(units, ctx.examples)]
        return units

    run_grid(None)  # warm-up, and learns how many cells each example computes
    info = {"examples": len(ctx.examples), "tasks": {t: dict(i) for t, i in ctx.task_info.items()},
            "cells_per_example": n_cells, "computed_cells_per_example": list(computed),
            "types": list(ctx.types), "eps": list(ctx.eps), "defenses": list(ctx.defense_names),
            "persistence": ctx.persistence, "cell_batch_size": ctx.batch_rows,
            "cache_lens": [int(ex.prefix.numel()) for ex in ctx.examples],
            "rows_per_cell": [ex.rows for ex in ctx.examples], "feed_len": [int(ex.feeds.shape[1]) for ex in ctx.examples]}
    strict: list = []
    grid = Workload("eval_grid", lambda: None, run_grid, info)
    bare = Workload("eval_bare", lambda: None,
                    lambda _: bare_eval_forwards(lm, ctx.examples, n_cells, computed, strict), info, True)
    return grid, bare, {"cfg": cfg, "op": op, "ctx": ctx, "strict": strict}


def eval_end_to_end(cfg, op) -> dict:
    """`eval.run` once on the same grid in a temporary run dir (model load, data, grid, aggregation,
    progress and metrics files): what a user waits for."""
    from cachemedicpp import eval as eval_mod
    from cachemedicpp.repair import repair_checkpoint_payload
    from cachemedicpp.fileio import atomic_torch_save

    with tempfile.TemporaryDirectory(prefix="cachemedicpp-bench-") as tmp:
        ck = Path(tmp) / "checkpoints" / "repair_step_1.pt"
        atomic_torch_save(ck, repair_checkpoint_payload(op, 1, cfg.hash, cfg.repair.to_dict()))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            rc = eval_mod.run(cfg, tmp, resume=False)
        wall = time.perf_counter() - t0
    return {"exit_code": rc, "wall_sec": wall}


def bench_eval(s: Settings, lm: hf.LoadedModel) -> dict:
    try:
        import cachemedicpp.eval  # noqa: F401
    except ImportError as e:
        return {"skipped": f"cachemedicpp.eval is not available ({e})"}
    grid, bare, extra = eval_workloads(s, lm)
    t, c = interleaved(lm.device, [grid, bare], s.eval_reps or s.reps, warmup=0)  # the set-up ran the grid once
    strict_wall = [w for w, _ in extra["strict"]]
    per_rep = paired_ratios(t["eval_grid"], t["eval_bare"])
    out = {"ratio": _median(per_rep), "ratio_of_medians": _ratio(_median(t["eval_grid"]), _median(t["eval_bare"])),
           "ratio_vs_computed_cells": _median(paired_ratios(t["eval_grid"], strict_wall)),
           "cpu_time_ratio": _median(paired_ratios(c["eval_grid"], c["eval_bare"])), "per_rep_ratios": per_rep,
           "grid_sec": t["eval_grid"], "bare_sec": t["eval_bare"], "bare_computed_cells_sec": strict_wall,
           "grid_cpu_sec": c["eval_grid"], "bare_cpu_sec": c["eval_bare"],
           "median_grid_sec": _median(t["eval_grid"]), "median_bare_sec": _median(t["eval_bare"]),
           "cells": grid.info["cells_per_example"] * grid.info["examples"], "grid": grid.info, "target": "<= 1.3",
           "grid_definition": "eval.score_example over every example (clean prefill shared per example, cells "
                              "corrupted, defended and batched as the eval does, repair active on cachemedic cells)",
           "bare_definition": "per example one clean prefill + one batch-1 continuation forward of its feeds per "
                              "grid cell, no hook plan, cache copies untimed; `ratio_vs_computed_cells` counts only "
                              "the cells the eval computes (it reuses cells provably equal to a clean cell)"}
    if s.eval_end_to_end:
        e2e = eval_end_to_end(extra["cfg"], extra["op"])
        e2e["ratio_vs_bare"] = _ratio(e2e["wall_sec"], out["median_bare_sec"])
        e2e["note"] = "includes model load, data loading, example building, bootstrap aggregation and file writes"
        out["end_to_end"] = e2e
    return out


# --------------------------------------------------------------------------------------------------
# memory


def _rss_kib() -> tuple[int, int]:
    text = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
    return hwm, rss


def _pin_mmap_threshold() -> bool:
    """Make glibc serve large blocks by mmap and unmap them on free (no dynamic threshold), so the RSS
    follows the live tensors instead of a heap that keeps freed memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 65536))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def measure_memory(w: Workload, dev: torch.device) -> dict:
    """Peak memory of one unit of `w` above what was resident before it (setup and a warm-up done)."""
    w.run(w.prepare())  # warm-up: lazy allocations, optimizer state, kernel caches
    arg = w.prepare()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        w.run(arg)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"peak_delta_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20, "before_mib": before / 2**20,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the unit"}
    from cachemedicpp.eval import reset_cpu_peak

    reset = reset_cpu_peak()
    _, before = _rss_kib()
    max_before = _maxrss_kib()
    w.run(arg)
    hwm, after = _rss_kib()
    res = {"before_mib": before / 1024, "peak_mib": hwm / 1024, "after_mib": after / 1024,
           "process_maxrss_mib": _maxrss_kib() / 1024}
    if reset:
        res.update(peak_delta_mib=(hwm - before) / 1024,
                   method="VmHWM after the unit - VmRSS before it (peak mark reset via /proc/self/clear_refs)")
    else:  # no reset possible: a maxrss delta can only see growth above the earlier high-water mark
        res.update(peak_delta_mib=(_maxrss_kib() - max_before) / 1024,
                   method="ru_maxrss delta (lower bound: peak RSS mark could not be reset)")
    return res


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_specs(s: Settings) -> list[dict]:
    specs = []
    want = [m for m in s.memory_of if m in s.only]
    if "train_step" in want:
        specs += [{"kind": "train_step"}, {"kind": "train_bare"}]
    if "eval_grid" in want:
        specs += [{"kind": "eval_grid"}, {"kind": "eval_bare"}]
    if "decode" in want:
        for length in s.memory_lengths:
            specs += [{"kind": "decode", "variant": v, "length": length} for v in DECODE_VARIANTS]
    return specs


def spec_name(spec: dict) -> str:
    if spec["kind"] == "decode":
        return f"decode_{spec['variant']}_{spec['length']}"
    return spec["kind"]


def workload_for(spec: dict, s: Settings, lm: hf.LoadedModel) -> Workload | None:
    cfg = bench_config(s, str(lm.device), lm.arch)
    if spec["kind"] in ("train_step", "train_bare"):
        train, bare = train_workloads(cfg, lm)
        return train if spec["kind"] == "train_step" else bare
    if spec["kind"] in ("eval_grid", "eval_bare"):
        return eval_workload(spec["kind"], s, lm)
    if spec["kind"] == "decode":
        op = perturbed_operator(cfg, lm)
        return decode_workload(lm, op, spec["length"], min(s.decode_tokens, s.memory_decode_tokens), spec["variant"],
                               s.seed)
    raise ValueError(f"unknown memory workload {spec}")


def eval_workload(kind: str, s: Settings, lm: hf.LoadedModel) -> Workload | None:
    try:
        import cachemedicpp.eval  # noqa: F401
    except ImportError:
        return None
    grid, bare, _ = eval_workloads(s, lm)
    return grid if kind == "eval_grid" else bare


def probe(spec: dict, s: Settings, device: str) -> dict:
    """One memory measurement in this (fresh) process."""
    if device == "cpu":
        _pin_mmap_threshold()
    lm = load_lm(s, device)
    w = workload_for(spec, s, lm)
    if w is None:
        return {"skipped": "workload not available"}
    return measure_memory(w, lm.device)


def bench_memory(s: Settings, device: str, lm: hf.LoadedModel | None) -> dict:
    out: dict[str, Any] = {}
    for spec in memory_specs(s):
        name = spec_name(spec)
        t0 = time.perf_counter()
        if s.memory == "subprocess":
            res = _probe_subprocess(spec, s, device)
            res["isolation"] = "fresh subprocess"
        else:
            res = probe(spec, s, device) if lm is None else _probe_inprocess(spec, s, lm)
            res["isolation"] = "in process"
        res["wall_sec"] = time.perf_counter() - t0
        out[name] = res
        log.info("memory %s: %s", name, _fmt(res.get("peak_delta_mib")))
    dec = [k for k in out if k.startswith("decode_none_")]
    for k in dec:
        length = k.rsplit("_", 1)[1]
        base = out[k].get("peak_delta_mib")
        for v in DECODE_VARIANTS[1:]:
            r = out.get(f"decode_{v}_{length}", {})
            if "peak_delta_mib" in r and base is not None:
                r["extra_vs_none_mib"] = r["peak_delta_mib"] - base
    return out


def _probe_inprocess(spec: dict, s: Settings, lm: hf.LoadedModel) -> dict:
    if lm.device.type == "cpu":
        _pin_mmap_threshold()
    w = workload_for(spec, s, lm)
    if w is None:
        return {"skipped": "workload not available"}
    res = measure_memory(w, lm.device)
    del w
    gc.collect()
    return res


def _probe_subprocess(spec: dict, s: Settings, device: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    payload = json.dumps({"spec": spec, "settings": asdict(s), "device": device})
    cmd = [sys.executable, "-m", "cachemedicpp.bench", "--probe", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"probe exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------
# driver


def run_device(s: Settings, device: str) -> dict:
    dev_res: dict[str, Any] = {}
    lm = load_lm(s, device)
    dev_res["load_sec"] = lm.load_seconds
    if "train_step" in s.only:
        log.info("[%s] train step vs bare step (%d reps)", device, s.reps)
        dev_res["train_step"] = bench_train(s, lm)
    if "eval_grid" in s.only:
        log.info("[%s] eval grid vs bare forwards (%d reps)", device, s.eval_reps or s.reps)
        dev_res["eval_grid"] = bench_eval(s, lm)
    if "decode" in s.only:
        log.info("[%s] decode at lengths %s (%d reps x %d tokens)", device, s.lengths, s.reps, s.decode_tokens)
        dev_res["decode"] = bench_decode(s, lm)
    if "memory" in s.only and s.memory != "off":
        log.info("[%s] peak memory (%s)", device, s.memory)
        if s.memory == "subprocess" and device != "cpu":
            s_dev = Settings(**{**asdict(s), "memory": "inprocess"})  # CUDA peak stats are exact in process
            dev_res["memory"] = bench_memory(s_dev, device, lm)
        else:
            dev_res["memory"] = bench_memory(s, device, lm if s.memory == "inprocess" else None)
    del lm
    gc.collect()
    return dev_res


def run(s: Settings) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"format": FORMAT, "created_unix": time.time(), "machine": machine_info(),
                               "settings": asdict(s), "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}}
    per_device = {d: run_device(s, d) for d in s.devices}
    for key in ("train_step", "eval_grid", "decode", "memory"):
        results[key] = {d: r[key] for d, r in per_device.items() if key in r}
    results["load_sec"] = {d: r["load_sec"] for d, r in per_device.items()}
    results["summary"] = summary(results)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_sec"] = time.perf_counter() - t0
    return results


def summary(results: dict) -> dict:
    out: dict[str, Any] = {}
    for dev, r in results.get("train_step", {}).items():
        out.setdefault(dev, {})["train_step"] = r.get("ratio")
    for dev, r in results.get("eval_grid", {}).items():
        out.setdefault(dev, {})["eval_grid"] = r.get("ratio")
    for dev, r in results.get("decode", {}).items():
        for length, row in r["lengths"].items():
            for v, x in row["ratios"].items():
                out.setdefault(dev, {})[f"decode_{v}@{length}"] = x
    for dev, vals in out.items():
        met = {}
        for k, x in vals.items():
            base = "decode_repair" if k.startswith("decode_repair@") else k
            if base in TARGETS and x is not None:
                op, target = TARGETS[base]
                met[k] = bool(x <= target) if op == "<=" else bool(x >= target)
        vals["meets_target"] = met
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m['cpu_model']} | nproc {m['nproc']} | torch threads {m['torch_threads']} | "
                 f"torch {m['torch']} | transformers {m['transformers']} | gpu {m['gpu_name'] or '-'} | "
                 f"loadavg {m['loadavg_start'][0]:.1f} -> {m.get('loadavg_end', [float('nan')])[0]:.1f} | "
                 f"OMP_WAIT_POLICY {m['omp_wait_policy']['value'] or 'default'}")
    for dev, r in results.get("train_step", {}).items():
        lines.append(f"[{dev}] train step: {_fmt(r['median_train_step_sec'])} s vs bare {_fmt(r['median_bare_step_sec'])} s"
                     f"  ratio {_fmt(r['ratio'])} (target <= 1.15; CPU-time ratio {_fmt(r.get('cpu_time_ratio'))})")
    for dev, r in results.get("eval_grid", {}).items():
        if "skipped" in r:
            lines.append(f"[{dev}] eval grid: skipped ({r['skipped']})")
        else:
            lines.append(f"[{dev}] eval grid: {_fmt(r.get('median_grid_sec'))} s vs bare {_fmt(r.get('median_bare_sec'))} s"
                         f"  ratio {_fmt(r.get('ratio'))} (target <= 1.3; CPU-time ratio {_fmt(r.get('cpu_time_ratio'))};"
                         f" vs computed cells only {_fmt(r.get('ratio_vs_computed_cells'))})  [{r.get('cells', '?')} cells]")
            if "end_to_end" in r:
                e = r["end_to_end"]
                lines.append(f"  eval.run end to end on the same grid: {_fmt(e['wall_sec'], '.1f')} s "
                             f"({_fmt(e['ratio_vs_bare'], '.2f')}x the bare forwards; model load and files included)")
    for dev, r in results.get("decode", {}).items():
        lines.append(f"[{dev}] decode tokens/s (wall-time ratio to none; repair target >= 0.95); CPU-time ratios below:")
        lines.append(f"  {'length':>7} " + " ".join(f"{v:>16}" for v in DECODE_VARIANTS))
        for length, row in r["lengths"].items():
            cells = []
            for v in DECODE_VARIANTS:
                tps = row["tokens_per_sec"][v]
                rat = row["ratios"].get(v)
                cells.append(f"{_fmt(tps, '.1f'):>7} ({_fmt(rat, '.3f') if v != 'none' else '1':>6})")
            lines.append(f"  {length:>7} " + " ".join(f"{c:>16}" for c in cells))
            cpu = row.get("cpu_time_ratios", {})
            lines.append(f"  {'cpu':>7} " + " ".join(f"{'':>16}" if v == "none" else f"{'(' + _fmt(cpu.get(v)) + ')':>16}"
                                                      for v in DECODE_VARIANTS))
    for dev, r in results.get("memory", {}).items():
        lines.append(f"[{dev}] peak memory above the pre-unit resident set (MiB):")
        for name, res in r.items():
            extra = f"  (+{_fmt(res['extra_vs_none_mib'], '.1f')} vs none)" if "extra_vs_none_mib" in res else ""
            val = res.get("peak_delta_mib")
            note = res.get("error") or res.get("skipped") or ""
            lines.append(f"  {name:<22} {_fmt(val, '.1f'):>8}  peak {_fmt(res.get('peak_mib'), '.0f'):>6}{extra} {note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results.json", help="results JSON (default: bench/results.json)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 5; quick 2)")
    p.add_argument("--lengths", default=None, help="decode cache lengths, comma-separated (default 256,1024,2048)")
    p.add_argument("--quick", action="store_true", help="small settings: about a minute on a 2-core CPU")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base run config (default configs/quickstart.yaml)")
    p.add_argument("--model", default=None, help="override model.name (a hub id, a folder, a GGUF, embedded:...)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CPU, and CUDA too when available (default)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per timed run (default 8; quick 4)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"],
                   help="how peak memory is measured on CPU (default: a fresh subprocess per workload)")
    p.add_argument("--memory-lengths", default=None, help="decode lengths whose memory is measured (default: the longest)")
    p.add_argument("--only", default=None, help="subset of train_step,eval_grid,decode,memory")
    p.add_argument("--layers", default="10,11,12,13",
                   help="protected layers of the repair in every workload (default 10,11,12,13)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < minimum for v in vals):
        raise ConfigError(f"{what}: expected integers >= {minimum}, got {text!r}")
    return vals


def settings_from_args(a: argparse.Namespace) -> Settings:
    s = Settings(config=a.config, model=a.model, memory=a.memory, threads=a.threads, quick=a.quick,
                 protect_layers=sorted(set(_ints(a.layers, "--layers", minimum=0))))
    if a.quick:
        s.reps, s.lengths, s.decode_tokens = 2, [256], 4
        s.eval_eps, s.eval_end_to_end, s.eval_reps, s.memory_of = [0.0, 0.16], False, 1, ["decode"]
    if a.reps is not None:
        if a.reps < 1:
            raise ConfigError("--reps: must be at least 1")
        s.reps, s.eval_reps = a.reps, None
    if a.lengths:
        s.lengths = _ints(a.lengths, "--lengths")
    if a.decode_tokens is not None:
        if a.decode_tokens < 1:
            raise ConfigError("--decode-tokens: must be at least 1")
        s.decode_tokens = a.decode_tokens
    s.memory_lengths = _ints(a.memory_lengths, "--memory-lengths") if a.memory_lengths else [max(s.lengths)]
    if a.only:
        only = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in only if x not in Settings().only]
        if bad:
            raise ConfigError(f"--only: unknown measurement(s) {bad}; known: {Settings().only}")
        s.only = only
    if not Path(s.config).is_file():
        raise ConfigError(f"--config: file not found: {s.config}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")
    s.devices = ["cuda"] if a.device == "cuda" else ["cpu"] + (["cuda"] if a.device == "auto" and torch.cuda.is_available() else [])
    return s


def main(argv: Sequence[str] | None = None) -> int:
    from cachemedicpp.cli import guarded, setup_logging

    a = parse_args(argv)
    setup_logging()
    if a.probe:
        def go_probe() -> int:
            p = json.loads(a.probe)
            s = Settings(**p["settings"])
            if s.threads:
                torch.set_num_threads(s.threads)
            print(json.dumps(probe(p["spec"], s, p["device"])), flush=True)
            return 0

        return guarded(go_probe)

    def go() -> int:
        from cachemedicpp.rundir import atomic_write_json

        s = settings_from_args(a)
        results = run(s)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        print(table(results))
        print(f"results: {out}")
        return 0

    return guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
