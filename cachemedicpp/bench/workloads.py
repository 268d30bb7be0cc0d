"""The workloads: a train step and its bare baseline, the eval grid and its bare forwards, greedy decoding
under each repair variant. Each is a `Workload` (untimed prepare, one unit of work per run), shared by
the timing and the memory measurements."""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

from cachemedicpp import eval as ev
from cachemedicpp import calibration, defenses, hf, integrity, repair
from cachemedicpp.bench.settings import PROSE, Settings, bench_config, decode_variants
from cachemedicpp.bench.timing import Clock, Workload
from cachemedicpp.fileio import atomic_torch_save
from cachemedicpp.repair import build_operator, repair_checkpoint_payload
from cachemedicpp.repair_detect import set_threshold
from cachemedicpp.repair_reference import AugmentedRepair, NaiveRepair
from cachemedicpp.rundir import RunDir
from cachemedicpp.train import Trainer


def perturbed_operator(cfg, lm: hf.LoadedModel, std: float = 0.05):
    """The configured operator with nonzero U (B: nonzero gate scale): a real correction, not the identity.
    Family D: statistics fitted on random-token windows, a detector whose score varies with the entry and
    its threshold set on those windows (as training leaves it). Family E: the config's calibration attached and
    a gate that varies with the entry."""
    op = build_operator(cfg.repair.to_dict(), lm.arch, seed=cfg.seed).to(lm.device)
    if repair.detects(op):
        return _detecting_operator(op, lm, cfg.seed, std)
    if repair.family(op.family).calibrated:  # family E: the clean-cache model of the config's calibration
        op.attach(calibration.build(cfg, lm), float(cfg.baseline.repair_range_margin),
                  float(cfg.baseline.repair_noise_margin))
        op.incremental = True  # as `protect` runs it
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u") or name.endswith(".scale") or name == "w2":
                p.copy_((torch.randn(p.shape, generator=g) * std).abs() if name.endswith(".scale")
                        else torch.randn(p.shape, generator=g) * std)
    op.requires_grad_(False)
    assert not any(op.is_identity(l) for l in op.layers)
    return op


def _detecting_operator(op, lm: hf.LoadedModel, seed: int, std: float):
    layers = list(op.layers) + list(op.observes)
    caches = []
    for i in range(4):
        with torch.no_grad():
            _, cache = hf.forward(lm.model, random_ids(lm, 64, seed + 7919 + i), logits_to_keep=1)
        caches.append({l: hf.get_kv(cache, l) for l in layers})
    op.fit(caches)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        op.w2.copy_(torch.randn(op.w2.shape, generator=g))
        op.u.copy_(torch.randn(op.u.shape, generator=g) * std)
    set_threshold(op, caches, margin=0.5)
    op.requires_grad_(False)
    return op


def all_gated(op):
    """A copy of a family-D operator whose gate is open on every entry (τ far below any score)."""
    other = copy.deepcopy(op)
    other.tau.fill_(-1e4)
    return other


def random_ids(lm: hf.LoadedModel, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(lm.model.config.vocab_size) if hasattr(lm.model.config, "vocab_size") else len(lm.tokenizer)
    return torch.randint(0, vocab, (1, n), generator=g).to(lm.device)


# --------------------------------------------------------------------------------------------------
# train step


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
    trainer = Trainer(cfg, lm, calibration.build(cfg, lm) if repair.family(cfg.repair.family).calibrated else None)
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


# --------------------------------------------------------------------------------------------------
# decode: the repair variants (all objects the hook accepts as `HookPlan.repair`)


def decode_repairs(op, lm: hf.LoadedModel) -> dict[str, Any]:
    """The object each decode variant hands the hook (None: no plan)."""
    if repair.detects(op):
        return {"none": None, "repair": op, "repair_all_gated": all_gated(op), "stock": None, "stock_tagged": None}
    if repair.family(op.family).calibrated:
        return {"none": None, "repair": op, "stock": None, "stock_tagged": None}
    scaling = lm.arch.head_dim ** -0.5
    return {"none": None, "repair": op, "naive": NaiveRepair(op, scaling), "augmented": AugmentedRepair(op),
            "stock": None, "stock_tagged": None}


def decode_plans(op, lm: hf.LoadedModel) -> dict[str, hf.HookPlan | None]:
    return {v: (None if r is None else hf.HookPlan(repair=r)) for v, r in decode_repairs(op, lm).items()}


def variant_agreement(lm: hf.LoadedModel, op, length: int = 48, seed: int = 0) -> dict:
    """Max |Δlogit| of one decode step between the operator and the naive / augmented forms (family D:
    between the operator and no defense, and with every entry gated)."""
    ids = random_ids(lm, length + 1, seed)
    plans = decode_plans(op, lm)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :-1], logits_to_keep=1)
        z = {n: hf.forward(lm.model, ids[:, -1:], hf.clone_cache(cache), plans[n])[0].float()
             for n in decode_variants(op.family) if not n.startswith("stock")}
    with torch.no_grad(), hf.stock_attention(lm.model):
        z["stock"] = hf.forward(lm.model, ids[:, -1:], hf.clone_cache(cache))[0].float()
    out = {f"{n}_vs_{'none' if n in ('repair', 'stock') else 'repair'}":
           float((z[n] - z["none" if n in ("repair", "stock") else "repair"]).abs().max())
           for n in decode_variants(op.family) if n not in ("none", "stock_tagged")}
    return out


def prefilled(lm: hf.LoadedModel, length: int, seed: int = 0, kind: str = "random") -> tuple[torch.Tensor, Any]:
    """(first greedy token, cache) after a clean prefill of `length` tokens (`prefill_ids`)."""
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, prefill_ids(lm, length, seed, kind), logits_to_keep=1)
    return logits[:, -1:].argmax(-1), cache


def prefill_ids(lm: hf.LoadedModel, length: int, seed: int = 0, kind: str = "random") -> torch.Tensor:
    """`[1, length]`: random tokens, or ("prose") the offline evaluation text's tokens from a seeded start (the
    text repeated where it is too short)."""
    if kind == "random":
        return random_ids(lm, length, seed + length)
    ids = lm.tokenizer(PROSE.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ids = ids.repeat(-(-(length + 1000) // ids.numel()))
    start = int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(seed + length)))
    return ids[start:start + length][None].to(lm.device)


def tag_costs(lm: hf.LoadedModel, length: int, reps: int, seed: int = 0, kind: str = "random") -> dict:
    """What verifying a stored cache's integrity tags costs against recomputing it: median seconds of
    `integrity.verify` on a prefilled cache of `length` positions and of that prefill (reps of each,
    interleaved), and the tags' size."""
    ids = prefill_ids(lm, length, seed, kind)
    _, cache = prefilled(lm, length, seed, kind)
    tags = integrity.record(lm.model, cache, ids, integrity.DEFAULT_BLOCK_SIZE)
    verify, prefill = [], []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        assert not integrity.verify(cache, tags, ids)
        verify.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.forward(lm.model, ids, logits_to_keep=1)
        prefill.append(time.perf_counter() - t0)
    v, p = sorted(verify)[len(verify) // 2], sorted(prefill)[len(prefill) // 2]
    return {"block_size": tags.block_size, "tags": int(tags.tags.numel()), "verify_sec": v, "prefill_sec": p,
            "verify_vs_prefill": v / p}


def decode_workload(lm: hf.LoadedModel, op, length: int, tokens: int, variant: str, seed: int = 0,
                    start: tuple[torch.Tensor, Any] | None = None, prefill: str = "random") -> Workload:
    """Greedy decoding of `tokens` tokens, one forward each, from a copy of a prefilled cache. A family-D
    operator starts from its detector's output on the prefilled entries (untimed: a prefill run with the
    operator leaves it beside the cache), so a decode step scores only the entry it appends."""
    rep = decode_repairs(op, lm)[variant]
    first, cache = start if start is not None else prefilled(lm, length, seed, prefill)
    memo = None
    if getattr(rep, "uses_memo", False):
        memo = rep.prime({l: hf.get_kv(cache, l) for l in list(rep.layers) + list(rep.observes)})

    tagged = variant == "stock_tagged"
    ids0 = prefill_ids(lm, length, seed, prefill) if tagged else None
    tags0 = integrity.record(lm.model, cache, ids0) if tagged else None

    def prepare():
        plan = None if rep is None else hf.HookPlan(repair=rep, memo=copy.deepcopy(memo) if memo is not None else {})
        return hf.clone_cache(cache), plan

    def run(arg):
        c, plan = arg
        nxt, ids, tags = first, ids0, tags0
        stock = hf.stock_attention(lm.model) if variant.startswith("stock") else contextlib.nullcontext()
        with torch.no_grad(), stock:
            for _ in range(tokens):
                z, c = hf.forward(lm.model, nxt, c, plan, logits_to_keep=1)
                if tagged:  # the tags of each block as it completes
                    ids = torch.cat([ids, nxt], dim=1)
                    if ids.shape[1] % tags.block_size == 0:
                        tags = integrity.extend(tags, c, ids)
                nxt = z[:, -1:].argmax(-1)
        return nxt

    return Workload(f"decode_{variant}_{length}", prepare, run,
                    {"length": length, "tokens": tokens, "variant": variant})


# --------------------------------------------------------------------------------------------------
# eval grid


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
    """The eval grid (eval.score_example over every example) and its bare forwards; the third item holds
    the config, the operator and the bare time of only the computed cells (one entry per bare run)."""
    cfg = bench_config(s, str(lm.device), lm.arch)
    op = perturbed_operator(cfg, lm)
    names, _ = ev.eval_defenses(cfg)
    cal = calibration.build(cfg, lm) if defenses.required(names, "calibration") else None
    ctx = ev.build_context(cfg, lm, op, cal)
    n_cells = len(ctx.cells)
    computed: list[int] = []

    def run_grid(_):
        units = [ev.score_example(ctx, ex) for ex in ctx.examples]
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
    return grid, bare, {"cfg": cfg, "op": op, "strict": strict}


def eval_end_to_end(cfg, op) -> dict:
    """`eval.run` once on the same grid in a temporary run dir (model load, data, grid, aggregation,
    progress and metrics files): what a user waits for."""
    with tempfile.TemporaryDirectory(prefix="cachemedicpp-bench-") as tmp:
        atomic_torch_save(RunDir(tmp).repair_checkpoint(1), repair_checkpoint_payload(op, 1, cfg.hash, cfg.repair.to_dict()))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            rc = ev.run(cfg, tmp, resume=False)
        wall = time.perf_counter() - t0
    return {"exit_code": rc, "wall_sec": wall}
