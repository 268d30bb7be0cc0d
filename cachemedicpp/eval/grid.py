"""The evaluation grid and the scoring of one example.

Per example (one unit of work, key "<task>/<index>"):
  1. prefill the clean context once (no hook);
  2. for every grid cell — defenses × (clean + types × eps) — copy that cache (one batch row per cell),
     corrupt its old region at rest with the draws of (seed, "eval", example id, type, eps, layer), so
     every defense sees the very same corrupted cache (paired), apply the defense (`defenses`, handed what
     it declares it needs: the corruption's region for the reference heuristics, an oracle advantage that
     is recorded; the calibration; the clean cache for ceilings and checksums; the recomputation), and
     write it back;
  3. score the example's continuation rows with one forward over the batched cache; the rows of a defense
     that acts inside attention (the learned operator) run with it in the hook plan (their own batches).
Clean cells use eps 0 with the region of the first evaluated type, so heuristics act on clean inputs
too (their clean cost is measured, never a silent no-op). Figure E's bit-class cells (eval.bit_classes)
score `bitflip` once per bit class at eval.bit_class_eps, outside the curves: a cell's `bits` replaces
corruption.params.bitflip_bits, with the draws of the bitflip cells at that eps (the same elements hit in
every class, only the bit flipped differs). A cell whose input is provably identical to
its defense's clean cell (eps 0 on the same region, or a region covering nothing at rest) reuses the
clean cell's value instead of recomputing it. So does, at rest, a cell whose defense provably leaves the cache as
no_defense's cell of the same corruption reads it: a defense that wrote back the very K/V it was handed and drops
nothing, or an operator inside attention (one with `changes`, family E) that changes nothing in any layer of the
cache no_defense's forward left behind (by induction over the layers, its forward is then no_defense's). Each such
cell's value is the one its own forward would give, up to the float rounding that the rows batched beside a row can
already cause (eval.cell_batch_size: differences of ~1e-7 relative in the learned operator's cells, none seen in
the others); with one row per batch, bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from cachemedicpp import corruption, defenses, hf, recompute, repair, seeding, tasks
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.results import CACHEMEDIC as REPAIR_NAME
from cachemedicpp.results import NO_DEFENSE
from cachemedicpp.stats import roc_auc

PHASE = "eval"  # also the name of the corruption draw stream: changing it changes every draw
CLEAN = "clean"


# --------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Cell:
    ctype: str  # "clean" or a corruption type
    eps: float
    defense: str
    bits: str | None = None  # figure E: the bit class replacing corruption.params.bitflip_bits (bitflip only)

    @property
    def key(self) -> str:
        return f"{self.ctype}|{float(self.eps)!r}|{self.defense}" + (f"|bits={self.bits}" if self.bits else "")

    @property
    def repaired(self) -> bool:
        """Its rows run with the learned operator inside attention."""
        return defenses.get(self.defense).in_attention


BIT_TYPE = "bitflip"  # the type of figure E's bit-class cells


def make_grid(defense_names: Sequence[str], types: Sequence[str], eps: Sequence[float],
              bit_classes: Sequence[str] = (), bit_eps: float | None = None) -> list[Cell]:
    cells = [Cell(CLEAN, 0.0, d) for d in defense_names]
    cells += [Cell(t, float(e), d) for t in types for e in eps for d in defense_names]
    cells += [Cell(BIT_TYPE, float(bit_eps), d, bits=b) for b in bit_classes for d in defense_names]
    return cells


def bit_class_eps(cfg: Config) -> float | None:
    """The severity of figure E's bit-class cells (None without bit classes): eval.bit_class_eps, else the
    largest eval eps."""
    if not cfg.eval.bit_classes:
        return None
    e = cfg.eval.bit_class_eps
    return float(e) if e is not None else max(float(x) for x in cfg.eval.corruption_eval.eps)


def eval_defenses(cfg: Config) -> tuple[list[str], list[str]]:
    """(defenses evaluated, notes). no_defense is always evaluated: it normalises perplexity."""
    names, notes = [], []
    for d in cfg.eval.defenses:
        defenses.check_name(d)  # unknown name -> ConfigError listing the known ones
        if d not in names:
            names.append(d)
    if NO_DEFENSE not in names:
        names.insert(0, NO_DEFENSE)
        notes.append("no_defense added: it is the baseline and normalises perplexity")
    return names, notes


@dataclass
class Row:
    """One grid cell of one example, ready to be batched."""

    cell: Cell
    overrides: dict | None  # layer -> (k, v) batch-1 tensors written at rest (None: clean cache)
    on_read: Callable | None  # (layer, k, v) -> (k, v) for on-read persistence
    region: corruption.Region
    alias: Cell | None = None  # provably identical to this cell: reuse its value
    drops: dict | None = None  # layer -> bool [1, H, T]: entries attention ignores (dropping defenses)
    recompute: dict | None = None  # a recomputing defense at rest: _Recomputation.cost


@dataclass
class EvalContext:
    cfg: Config
    lm: hf.LoadedModel
    corruptor: corruption.Corruptor
    op: repair.RepairOperator | None
    defense_names: list[str]
    types: list[str]
    eps: list[float]
    cells: list[Cell]
    examples: list[tasks.Example]
    task_info: dict
    sources: dict
    baseline: dict
    persistence: str
    ref_type: str
    batch_rows: int
    notes: list[str] = field(default_factory=list)
    cal: Any = None  # calibration.Calibration when a calibrated baseline is evaluated
    bit_classes: list[str] = field(default_factory=list)  # figure E's bit classes (eval.bit_classes)
    bit_eps: float | None = None  # their severity
    # recomputing defenses: always run the real recomputation (timed overhead) instead of reading the clean
    # prefill where that is what it gives (see _Recomputation); the cost is counted either way
    recompute_exact: bool = False
    instances: dict = field(default_factory=dict)  # defense name -> its Defense (made once, set up by build_context)

    def defense(self, name: str) -> defenses.Defense:
        """The evaluated defense `name`, with its hyper-parameters from the baseline section."""
        if name not in self.instances:
            self.instances[name] = defenses.make(name, self.baseline)
        return self.instances[name]

    @property
    def layers(self) -> list[int]:
        """Every layer a corruption may touch (protected layers and targeted ones)."""
        ls = set(self.cfg.repair.protect_layers)
        if "targeted" in self.types:
            ls |= set(self.cfg.corruption.axes.layers)
        return sorted(ls)


# --------------------------------------------------------------------------------------------------
# building the context


def _check_grid(cfg: Config, n_layers: int) -> None:
    bad = [l for l in list(cfg.repair.protect_layers) + list(cfg.corruption.axes.layers) if l >= n_layers]
    if bad:
        raise ConfigError(f"repair.protect_layers / corruption.axes.layers: {sorted(set(bad))} out of range for "
                          f"a {n_layers}-layer model")
    task_names = [t["name"] for t in cfg.eval.tasks]
    dup = sorted({n for n in task_names if task_names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.tasks: task(s) {dup} listed twice")
    for n in task_names:
        tasks.get_task(n)


def _build_examples(cfg: Config, lm: hf.LoadedModel, notes: list[str]) -> tuple[list, dict, dict]:
    """(examples of every task in config order, per-task info, data sources)."""
    sources = tasks.load_sources(cfg, lm, [t["name"] for t in cfg.eval.tasks])
    examples, info = [], {}
    for tcfg in cfg.eval.tasks:
        task = tasks.get_task(tcfg["name"])
        exs, tinfo = task.build(lm, cfg, tcfg, sources)
        if not exs:
            raise ConfigError(f"eval.tasks {task.name}: no example could be built")
        if len(exs) < int(tcfg["num_examples"]):
            notes.append(f"{task.name}: {len(exs)} examples available, {tcfg['num_examples']} requested")
        info[task.name] = {"num_examples": int(tcfg["num_examples"]), "n": len(exs), "few_shot": int(tcfg["few_shot"]),
                           "kind": task.kind, "value_name": task.value_name, **tinfo}
        examples += exs
    return examples, info, sources


def build_context(cfg: Config, lm: hf.LoadedModel, op: repair.RepairOperator | None = None, cal=None) -> EvalContext:
    """Examples, corruptor (with donor KV when needed) and grid for one evaluation; `cal` is the run's
    calibration (needed when a calibrated baseline is evaluated)."""
    names, notes = eval_defenses(cfg)
    types = list(cfg.eval.corruption_eval.types)
    eps = sorted({float(e) for e in cfg.eval.corruption_eval.eps})
    _check_grid(cfg, lm.arch.num_layers)
    examples, info, sources = _build_examples(cfg, lm, notes)
    longest = max((int(e.prefix.numel()) for e in examples), default=0)
    layers = sorted(set(cfg.repair.protect_layers) | set(cfg.corruption.axes.layers))
    donors = corruption.donors(cfg.corruption.params, lm, types, longest, layers)
    corruptor = corruption.Corruptor(cfg.corruption.to_dict(), list(cfg.repair.protect_layers),
                                     lm.arch.num_kv_heads, cfg.seed, **donors)
    axes = cfg.corruption.axes
    needles = [e for e in examples if e.task in ("needle_long_context", "kv_retrieval")]
    if needles:
        where = (f"corruption.axes.time_mode={axes.time_mode}, N_recent={axes.N_recent}, window={list(axes.window)}")
        tasks.check_needle(needles, corruptor.time_mask, where)
    ref = next((t for t in types if t != "targeted"), types[0])
    bits, bit_eps = list(cfg.eval.bit_classes), bit_class_eps(cfg)
    ctx = _context(cfg, lm, corruptor, op, cal, names, types, eps, make_grid(names, types, eps, bits, bit_eps),
                   ref, examples=examples, task_info=info, sources=sources, notes=notes, bit_classes=bits,
                   bit_eps=bit_eps)
    set_up_defenses(ctx)
    return ctx


def cell_context(cfg: Config, lm: hf.LoadedModel, corruptor: corruption.Corruptor, cell: Cell, ctype: str,
                 op=None, cal=None) -> EvalContext:
    """The grid reduced to one cell, set up like a whole grid, for examples built elsewhere (the lm-eval
    backend scores lm-eval's requests through it); `ctype` is the type whose region a clean cell takes."""
    ctx = _context(cfg, lm, corruptor, op, cal, [cell.defense], [ctype], [float(cell.eps)], [cell], ctype)
    set_up_defenses(ctx)
    return ctx


def _context(cfg: Config, lm: hf.LoadedModel, corruptor, op, cal, names, types, eps, cells, ref_type: str, *,
             examples: Sequence[tasks.Example] = (), task_info: dict | None = None, sources: dict | None = None,
             notes: list[str] | None = None, bit_classes: Sequence[str] = (), bit_eps: float | None = None) -> EvalContext:
    return EvalContext(cfg=cfg, lm=lm, corruptor=corruptor, op=op.to(lm.device) if op is not None else None,
                       defense_names=list(names), types=list(types), eps=list(eps), cells=list(cells),
                       examples=list(examples), task_info=task_info or {}, sources=sources or {},
                       baseline=cfg.baseline.to_dict(), persistence=cfg.corruption.persistence, ref_type=ref_type,
                       batch_rows=int(cfg.eval.cell_batch_size), notes=notes if notes is not None else [], cal=cal,
                       bit_classes=list(bit_classes), bit_eps=bit_eps)


def set_up_defenses(ctx: EvalContext) -> None:
    """Make every evaluated defense, check that the evaluation gives it what it needs (bad input first), and
    let it set what it sets on training data (e.g. an alarm level)."""
    for name in ctx.defense_names:
        dfn = ctx.defense(name)
        if dfn.needs.operator and ctx.op is None:
            raise ValueError(f"{name} is evaluated but no repair operator was given")
        if dfn.needs.calibration and ctx.cal is None:
            raise ValueError(f"{name} is evaluated but no calibration was given")
        if dfn.at_rest_only and ctx.persistence != "at_rest":
            raise ConfigError(f"eval.defenses: {name} is evaluated at rest only (corruption.persistence: at_rest)")
        dfn.check(ctx.cfg, ctx.op)
    for name in ctx.defense_names:
        ctx.notes += ctx.defense(name).setup(ctx.cfg, ctx.lm, ctx.op)


def corruptor_for(ctx: EvalContext, cell: Cell) -> corruption.Corruptor:
    """The corruptor of a cell: the run's, or for a bit-class cell the run's with that bit class."""
    return ctx.corruptor if cell.bits is None else ctx.corruptor.with_params(bitflip_bits=cell.bits)


# --------------------------------------------------------------------------------------------------
# one example


def defense_rng(ctx: EvalContext, ex: tasks.Example, name: str, layer: int) -> torch.Generator:
    """A defense's own randomness (masking_dropout): per example, defense and layer, the same in every
    cell of the example, so defense noise is paired across eps like the corruption."""
    return seeding.torch_rng(ctx.cfg.seed, "eval-defense", ex.example_id, name, layer)


def _layer_input(ctx: EvalContext, ex: tasks.Example, dfn: defenses.Defense, layer: int, k: torch.Tensor,
                 region: corruption.Region, clean: tuple | None, end: int | None = None,
                 fresh: Callable | None = None, cache: defenses.CacheInput | None = None) -> defenses.LayerInput:
    """What `dfn` may read of one layer, and nothing it does not declare. The positions are the last
    k.shape[2] before `end` (default: the example's context length, at rest; on read, what is read ends at
    the context and the continuation): all of them, or a sliding-window layer's last ones; the region's mask
    is cut to them."""
    T = int(ex.prefix.numel()) if end is None else int(end)
    needs = dfn.needs
    return defenses.LayerInput(
        layer, torch.arange(T - k.shape[2], T),
        region=region.mask(layer, k.shape[2]) if needs.region else None,
        gen=defense_rng(ctx, ex, dfn.name, layer) if needs.generator else None,
        cal=ctx.cal if needs.calibration else None,
        clean=clean if needs.clean else None,
        fresh=fresh if needs.recompute else None,
        op=ctx.op if needs.operator else None,
        cache=cache)


class _Recomputation:
    """What a recomputing defense's `fresh(blocks, block_size)` reads for one example's cache, obtained at most
    once (the defense asks for the same blocks in every layer). With `ctx.recompute_exact`, the real
    recomputation of recompute.py (timed). Otherwise the clean prefill stands for it where that is what the
    recomputation gives: the whole context's (bit for bit), or failing blocks whose prefix holds clean entries
    in every layer (within recompute.TOLERANCE; so for every block checksum_recompute recomputes, its tags
    catching every change). A selective request whose prefix keeps changed entries (blocks detect_recompute
    missed) runs the real recomputation, whose entries depend on them."""

    def __init__(self, ctx: EvalContext, ex: tasks.Example, layers, clean_cache, stored: Callable):
        self.ctx, self.ex, self.layers, self.clean, self.stored = ctx, ex, sorted(layers), clean_cache, stored
        self.request: tuple | None = None  # (sorted block ids, or None for the whole context; block size)
        self.run = None

    def layer(self, layer: int) -> Callable[[tuple | None, int], tuple[torch.Tensor, torch.Tensor]]:
        def get(blocks, block_size):
            req = (None if blocks is None else tuple(sorted(int(j) for j in blocks)), int(block_size))
            if self.request is not None and req != self.request:
                raise ValueError(f"a recomputing defense asked for {req} after {self.request} in one cache")
            self.request = req
            if self.run is None and (self.ctx.recompute_exact or not self._stands_in()):
                self.run = self._recompute()
            return self.run.kv[layer] if self.run is not None else hf.get_kv(self.clean, layer)
        return get

    def _recompute(self) -> recompute.Recomputed:
        blocks, bs = self.request
        if blocks is None:
            return recompute.recompute(self.ctx.lm, self.ex.prefix, self.layers)
        stored = {l: self.stored(l) for l in range(self.ctx.lm.arch.num_layers)}
        return recompute.recompute_blocks(self.ctx.lm, self.ex.prefix, stored, blocks, bs)

    def _stands_in(self) -> bool:
        """Whether the clean prefill is what the requested recomputation gives: no entry before the last
        requested block differs from the clean one outside the requested blocks."""
        blocks, bs = self.request
        if blocks is None:
            return True
        T, last = int(self.ex.prefix.numel()), max(blocks) * bs
        redone = torch.zeros(T, dtype=torch.bool)
        for j in blocks:
            redone[j * bs:(j + 1) * bs] = True
        return not bool((self.changed_positions & ~redone)[:last].any())

    @functools.cached_property
    def changed_positions(self) -> torch.Tensor:
        """bool [T]: the positions holding an entry that differs from the clean cache in some layer (one scan
        of every layer, shared by the stand-in rule and the oracle's minimum)."""
        T = int(self.ex.prefix.numel())
        hit = torch.zeros(T, dtype=torch.bool)
        for l in range(self.ctx.lm.arch.num_layers):
            k, v = self.stored(l)
            k0, v0 = hf.get_kv(self.clean, l)
            if k is k0 and v is v0:
                continue
            pos = torch.arange(T - k.shape[2], T)
            hit[pos[defenses.changed_entries(k0, v0, k, v).any(1).any(0).cpu()]] = True
        return hit

    def cost(self, blocks: int, block_size: int) -> dict:
        """{"tokens": forward tokens recomputed (0 when nothing was asked), "blocks": `blocks`,
        "corrupted_block_tokens": the oracle's minimum (tokens of the blocks the corruption changed),
        "corrupted_blocks": how many blocks those are, "recalled_blocks": how many of them the request recomputes
        (all for the whole context, none when nothing was asked)[, "seconds"]}. Blocks of `block_size` positions,
        the size the defense asks in."""
        hit = self.corrupted_blocks(int(block_size))
        if self.request is None:
            recalled = 0
        else:
            asked = self.request[0]
            recalled = len(hit) if asked is None else len(hit.intersection(asked))
        out = {"tokens": self._tokens(), "blocks": int(blocks),
               "corrupted_block_tokens": self.corrupted_block_tokens(int(block_size)),
               "corrupted_blocks": len(hit), "recalled_blocks": recalled}
        if self.run is not None:
            out["seconds"] = self.run.seconds
        return out

    def corrupted_blocks(self, block_size: int) -> set[int]:
        """Ids of the blocks of `block_size` positions holding an entry that differs from the clean cache in any
        layer."""
        return set((self.changed_positions.nonzero().flatten() // block_size).tolist())

    def corrupted_block_tokens(self, block_size: int) -> int:
        """Tokens of the corrupted blocks (`corrupted_blocks`): what a recomputation that knew the damage would
        forward."""
        T = int(self.ex.prefix.numel())
        return sum(min(block_size, T - j * block_size) for j in self.corrupted_blocks(block_size))

    def _tokens(self) -> int:
        if self.request is None:
            return 0
        if self.run is not None:
            return int(self.run.tokens)
        blocks, bs = self.request
        T = int(self.ex.prefix.numel())
        if blocks is None:
            return T
        held = {l: hf.held_length(self.clean, l) for l in range(self.ctx.lm.arch.num_layers)}
        return recompute.plan_tokens(recompute.plan(blocks, bs, T, self.ctx.lm.arch, held))


def _acting_layers(ctx: EvalContext, dfn: defenses.Defense, corrupted) -> list[int]:
    """The layers a defense acts on at rest: none, the corrupted ones, or every protected layer as well."""
    if dfn.acts_on == defenses.NOWHERE:
        return []
    if dfn.acts_on == defenses.PROTECTED:
        return list(dict.fromkeys([*ctx.cfg.repair.protect_layers, *corrupted]))
    return list(corrupted)


def _defend(ctx: EvalContext, ex: tasks.Example, name: str, kv: dict, region: corruption.Region,
            clean_cache) -> tuple[dict, dict | None, dict | None]:
    """At rest: the defended K/V of every layer the defense acts on (the corrupted `kv` as read elsewhere),
    the entries to drop (or None), and for a recomputing defense its cost (`_Recomputation.cost`)."""
    dfn = ctx.defense(name)
    layers = _acting_layers(ctx, dfn, kv)
    stored = lambda l: kv[l] if l in kv else hf.get_kv(clean_cache, l)  # noqa: E731
    clean = (lambda l: hf.get_kv(clean_cache, l)) if dfn.needs.clean else None
    cache = defenses.CacheInput(int(ex.prefix.numel()), stored, layers=tuple(layers), clean=clean, tokens=ex.prefix)
    fresh = _Recomputation(ctx, ex, layers, clean_cache, stored) if dfn.needs.recompute else None
    out, drops, blocks = dict(kv), {}, set()
    for l in layers:
        k, v = stored(l)
        got = dfn.apply(k, v, _layer_input(ctx, ex, dfn, l, k, region, hf.get_kv(clean_cache, l),
                                           fresh=fresh.layer(l) if fresh else None, cache=cache))
        out[l] = (got.k, got.v)
        if got.drop is not None and bool(got.drop.any()):
            drops[l] = got.drop
        if got.cost is not None:
            blocks |= got.cost.blocks
    bs = int(getattr(dfn, "checksum_block_size", ctx.baseline["checksum_block_size"]))
    return out, (drops or None), (fresh.cost(len(blocks), bs) if fresh else None)


def _covers_nothing(region: corruption.Region) -> bool:
    return not region.layers or not bool(region.time.any())


def _same_region(a: corruption.Region, b: corruption.Region) -> bool:
    return (a.layers == b.layers and torch.equal(a.time, b.time)
            and all(torch.equal(a.heads[l], b.heads[l]) for l in a.layers))


def _region(ctx: EvalContext, ctype: str, eps: float, T: int, ex: tasks.Example) -> corruption.Region:
    if ctype == CLEAN:
        return ctx.corruptor.region(ctx.ref_type, 0.0, T, PHASE, ex.example_id)
    return ctx.corruptor.region(ctype, eps, T, PHASE, ex.example_id)


def _read_fn(ctx: EvalContext, ex: tasks.Example, cell: Cell) -> Callable:
    """On-read persistence: corrupt what attention reads, then defend it, with the region of the length read
    (the context and the continuation, scored in one forward: a full-attention layer reads all of it, a
    sliding-window layer its last positions)."""
    T = int(ex.prefix.numel() + ex.feeds.shape[-1])
    corrupt = None if cell.ctype == CLEAN else corruptor_for(ctx, cell).on_read(cell.ctype, cell.eps, PHASE,
                                                                               ex.example_id)
    region = _region(ctx, cell.ctype, cell.eps, T, ex)
    dfn = ctx.defense(cell.defense)

    def fn(layer: int, k: torch.Tensor, v: torch.Tensor):
        clean = (k, v)
        if corrupt is not None:
            k, v = corrupt(layer, k, v, length=T)
        if dfn.acts_on == defenses.PROTECTED or (dfn.acts_on == defenses.CORRUPTED and layer in region.layers):
            got = dfn.apply(k, v, _layer_input(ctx, ex, dfn, layer, k, region, clean, end=T))
            k, v = got.k, got.v
            if got.drop is not None:
                fn.drops[layer] = got.drop  # read by the batch's drop function right after this call
        return k, v

    fn.drops = {}
    return fn


def undefended(cell: Cell) -> Cell:
    """no_defense's cell of the same corruption (type, eps, bit class) as `cell`."""
    return Cell(cell.ctype, cell.eps, NO_DEFENSE, cell.bits)


def _unchanged(defended: dict, kv: dict, clean_cache) -> bool:
    """Whether a defense at rest wrote back, in every layer it acted on, the very K/V it was handed (`kv` where
    the corruption acted, the clean cache elsewhere; a NaN never compares equal, so it counts as changed)."""
    for l, (k, v) in defended.items():
        k0, v0 = kv[l] if l in kv else hf.get_kv(clean_cache, l)
        if not ((k is k0 or torch.equal(k, k0)) and (v is v0 or torch.equal(v, v0))):
            return False
    return True


def cell_rows(ctx: EvalContext, ex: tasks.Example, clean_cache, dedupe: bool = True) -> Iterator[Row]:
    """The grid's rows for one example, in grid order. At rest, every defense of a (type, eps) pair
    starts from one corrupted copy of the clean K/V."""
    T = int(ex.prefix.numel())
    ref = _region(ctx, CLEAN, 0.0, T, ex)
    at_rest = ctx.persistence == "at_rest"
    scored = set(ctx.cells)
    group: tuple | None = None
    region, kv = ref, {}
    for cell in ctx.cells:
        if (cell.ctype, cell.eps, cell.bits) != group:
            group = (cell.ctype, cell.eps, cell.bits)
            region = ref if cell.ctype == CLEAN else _region(ctx, cell.ctype, cell.eps, T, ex)
            kv = {l: hf.get_kv(clean_cache, l) for l in region.layers}
            if at_rest and cell.ctype != CLEAN:
                kv, _ = corruptor_for(ctx, cell).apply_cache(kv, cell.ctype, cell.eps, PHASE, ex.example_id,
                                                             region=region)
        alias = Cell(CLEAN, 0.0, cell.defense)
        # the clean cell's value is reused only where the grid scores it (a one-cell grid, as the lm-eval
        # backend's, scores a corrupted cell that covers nothing itself)
        if dedupe and cell.ctype != CLEAN and alias in scored and (
                (cell.eps == 0 and _same_region(region, ref))
                or (at_rest and _covers_nothing(region) and _covers_nothing(ref))):
            yield Row(cell, None, None, region, alias=alias)
            continue
        if at_rest:
            defended, drops, cost = _defend(ctx, ex, cell.defense, kv, region, clean_cache)
            twin = undefended(cell)
            if (dedupe and twin != cell and not cell.repaired and twin in scored and drops is None and cost is None
                    and _unchanged(defended, kv, clean_cache)):
                yield Row(cell, None, None, region, alias=twin)
                continue
            yield Row(cell, defended, None, region, drops=drops, recompute=cost)
        else:
            yield Row(cell, None, _read_fn(ctx, ex, cell), region)


class _RowsReader:
    """On-read persistence for a batch: row i goes through its own cell's function; what a dropping defense
    decided for the entries just read is kept for the batch's drop mask (the hook asks right after)."""

    def __init__(self, fns: list[Callable]):
        self.fns = fns
        self.drops: dict[int, torch.Tensor] = {}

    def on_read(self, layer, k, v):
        ks, vs, ds = [], [], []
        for i, f in enumerate(self.fns):
            ki, vi = f(layer, k[i:i + 1], v[i:i + 1])
            ks.append(ki)
            vs.append(vi)
            ds.append(f.drops.pop(layer, None))
        if any(d is not None for d in ds):
            H, T = k.shape[1], k.shape[2]
            self.drops[layer] = torch.cat([d.to(torch.bool) if d is not None else torch.zeros(1, H, T, dtype=torch.bool)
                                           for d in ds])
        return torch.cat(ks), torch.cat(vs)

    def drop(self, layer: int, k_len: int) -> torch.Tensor | None:
        return self.drops.pop(layer, None)


def at_rest_drop(rows: list[Row], R: int) -> Callable | None:
    """HookPlan.drop for a batch of at-rest rows: each row's mask, repeated over its R alternatives; the
    entries the continuation appends are kept. None when no row drops anything."""
    if not any(r.drops for r in rows):
        return None

    def fn(layer: int, k_len: int) -> torch.Tensor | None:
        masks = [(r.drops or {}).get(layer) for r in rows]
        if all(m is None for m in masks):
            return None
        H = next(m for m in masks if m is not None).shape[1]
        out = []
        for m in masks:
            m = torch.zeros(1, H, k_len, dtype=torch.bool) if m is None else m.to(torch.bool).cpu()
            out.append(defenses.fit_drop(m, k_len).expand(R, -1, -1))
        return torch.cat(out)

    return fn


def run_batch(ctx: EvalContext, ex: tasks.Example, clean_cache, rows: list[Row], repaired: bool,
              detected: dict | None = None, nonfinite: dict | None = None,
              inspect: Callable | None = None) -> list[float]:
    """Score `rows` (cells of one example) with one forward over a batched copy of the cache. With a
    detecting operator (family D) at rest, `detected` receives its detection counts per cell; `inspect(rows,
    cache)`, when given, sees the cache the forward left behind (rows' R alternatives one after another).

    A position whose logits are not all finite (a flipped exponent bit can make the model's output NaN)
    carries no information: it is scored as the uniform distribution (its logits set to 0), and the cell
    is listed in `nonfinite`, so the damage is scored and the metrics stay defined."""
    R = ex.rows
    cache = hf.repeat_cache(clean_cache, R * len(rows))
    layers = sorted({l for r in rows if r.overrides for l in r.overrides})
    for l in layers:
        k0, v0 = hf.get_kv(clean_cache, l)
        ks, vs = [], []
        for r in rows:
            k, v = r.overrides.get(l, (k0, v0)) if r.overrides else (k0, v0)
            ks.append(k.expand(R, -1, -1, -1))
            vs.append(v.expand(R, -1, -1, -1))
        hf.set_kv(cache, l, torch.cat(ks), torch.cat(vs))
    plan = None
    reader = _RowsReader([r.on_read for r in rows for _ in range(R)]) if rows[0].on_read is not None else None
    drop = reader.drop if reader is not None else at_rest_drop(rows, R)
    if repaired or reader is not None or drop is not None:
        hooked = set(ctx.layers) | (set(ctx.cal.layers) if ctx.cal is not None else set())
        plan = hf.HookPlan(layers=frozenset(hooked) if reader is not None or drop is not None else frozenset(),
                           on_read=reader.on_read if reader is not None else None,
                           repair=ctx.op if repaired else None, drop=drop)
    feeds = ex.feeds.repeat(len(rows), 1).to(ctx.lm.device)
    logits, _ = hf.forward(ctx.lm.model, feeds, cache, plan=plan)
    if inspect is not None:
        inspect(rows, cache)
    if repaired and detected is not None and plan is not None and repair.detects(ctx.op) \
            and ctx.persistence == "at_rest":
        detected.update(detection_counts(ctx.op, plan.memo, clean_cache, rows, R))
    logits = logits.float().cpu()
    bad = ~torch.isfinite(logits).all(-1, keepdim=True)  # [rows, T, 1]
    if bool(bad.any()):
        logits = logits.masked_fill(bad, 0.0)
        if nonfinite is not None:
            for i, r in enumerate(rows):
                if bool(bad[i * R:(i + 1) * R].any()):
                    nonfinite[r.cell.key] = 1
    score = tasks.get_task(ex.task).score
    return [score(logits[i * R:(i + 1) * R], ex) for i in range(len(rows))]


def detection_counts(op, memo: dict, clean_cache, rows: list[Row], R: int) -> dict[str, list[int]]:
    """Per row's cell: [changed entries gated, changed entries, untouched entries gated, untouched entries,
    ROC-AUC] over the protected layers' stored context entries (sinks excluded): the detector's recall, false
    positives and threshold-free ranking on the very cache it read. The AUC ranks the score's margin over its
    layer's threshold (s − τ, what the gate compares), pooled over layers; None unless both classes occur."""
    out = {}
    for i, row in enumerate(rows):
        tp = pos = fp = neg = 0
        margins, labels = [], []
        for j, l in enumerate(op.layers):
            k0, v0 = hf.get_kv(clean_cache, l)
            n = k0.shape[2]
            gate = memo[l]["gate"][i * R, :, op.sink:n] > 0  # [H, n - sink]
            if row.overrides and l in row.overrides:
                k, v = row.overrides[l]
                changed = ((k[0] != k0[0]) | (v[0] != v0[0])).any(-1)[:, op.sink:]
            else:
                changed = torch.zeros_like(gate)
            tp += int((gate & changed).sum())
            pos += int(changed.sum())
            fp += int((gate & ~changed).sum())
            neg += int((~changed).sum())
            margins.append((memo[l]["score"][i * R, :, op.sink:n].float() - float(op.tau[j])).flatten())
            labels.append(changed.flatten())
        auc = roc_auc(torch.cat(margins), torch.cat(labels)) if pos and neg else None
        out[row.cell.key] = [tp, pos, fp, neg, auc]
    return out


def exposure(ctx: EvalContext, regions: Sequence[corruption.Region], held: dict[int, int] | None = None,
             evicted: bool = False) -> float:
    """Mean fraction of the corruptible layers' context K/V entries (every position of the context) that the
    masks cover and the layer's cache holds: `held` gives the positions each layer holds (its last ones; a
    sliding-window layer's window), the positions before them count as not exposed. With `evicted`, the
    fraction the masks cover at positions the layers no longer hold instead (0 without sliding layers)."""
    held = held or {}
    vals = []
    for reg in regions:
        layers = sorted(set(ctx.layers) | set(reg.layers))
        frac = (lambda l: reg.evicted(l, held.get(l))) if evicted else (lambda l: reg.fraction(l, held.get(l)))
        vals.append(sum(frac(l) for l in layers) / max(1, len(layers)))
    return float(np.mean(vals)) if vals else 0.0


def _quiet_check(ctx: EvalContext, ex: tasks.Example, dedupe: bool) -> Callable | None:
    """At rest, with an operator that says where it `changes` a cache (family E): a function of the cache a batch
    of no_defense rows left behind -> {group: whether the operator changes nothing in any of its layers for that
    row} (None where the rule does not apply)."""
    changes = getattr(ctx.op, "changes", None)
    if not dedupe or changes is None or ctx.persistence != "at_rest" \
            or not any(c.repaired for c in ctx.cells):
        return None
    R = ex.rows

    def check(rows: list[Row], cache) -> dict:
        out = {}
        kv = {l: hf.get_kv(cache, l) for l in ctx.op.layers}
        for i, row in enumerate(rows):
            if row.cell.defense != NO_DEFENSE:
                continue
            out[_group(row.cell)] = not any(changes(l, k[i * R:(i + 1) * R], v[i * R:(i + 1) * R])
                                            for l, (k, v) in kv.items())
        return out

    return check


def _group(cell: Cell) -> tuple:
    return cell.ctype, cell.eps, cell.bits


def _resolve(values: dict, alias: dict, key: str) -> str:
    """The computed cell whose value `key`'s is (following aliases)."""
    while key not in values:
        key = alias[key]
    return key


def score_example(ctx: EvalContext, ex: tasks.Example, dedupe: bool = True) -> dict:
    """All grid cells of one example: {"cells": {cell key: raw value}, "exposure": float, "evicted": float,
    "tokens": int} (exposure and evicted: see `exposure`). Rows inside attention wait for no_defense's row of
    their corruption where the operator can say it changes nothing (`_quiet_check`)."""
    with torch.no_grad():
        _, clean = hf.forward(ctx.lm.model, ex.prefix[None].to(ctx.lm.device), logits_to_keep=1)
        per_batch = max(1, ctx.batch_rows // ex.rows)
        values: dict[str, float] = {}
        pending: dict[bool, list[Row]] = {False: [], True: []}
        aliases, regions, seen = [], [], set()
        costs: dict[str, dict] = {}
        detected: dict[str, list[int]] = {}
        nonfinite: dict[str, int] = {}
        check = _quiet_check(ctx, ex, dedupe)
        scored = set(ctx.cells)
        quiet: dict[tuple, bool] = {}  # corruption group -> the operator changes nothing after no_defense's forward
        waiting: dict[tuple, list[Row]] = {}  # rows inside attention whose group's no_defense row is not run yet

        def flush(q: list[Row], repaired: bool) -> None:
            inspect = None
            if check is not None and not repaired:
                inspect = lambda rows, cache: quiet.update(check(rows, cache))  # noqa: E731
            values.update(zip([r.cell.key for r in q], run_batch(ctx, ex, clean, q, repaired, detected, nonfinite,
                                                                 inspect)))
            q.clear()
            release()

        def release() -> None:  # the waiting rows whose group's no_defense row has run
            for g in [g for g in waiting if g in quiet]:
                for r in waiting.pop(g):
                    place(r)

        def place(row: Row) -> None:
            if row.cell.repaired and check is not None and undefended(row.cell) in scored:
                g = _group(row.cell)
                if g not in quiet:
                    waiting.setdefault(g, []).append(row)
                    return
                if quiet[g]:
                    aliases.append(Row(row.cell, None, None, row.region, alias=undefended(row.cell)))
                    return
            q = pending[row.cell.repaired]
            q.append(row)
            if len(q) == per_batch:
                flush(q, row.cell.repaired)

        for row in cell_rows(ctx, ex, clean, dedupe):
            if row.recompute is not None:
                costs[row.cell.key] = row.recompute
            if row.cell.ctype != CLEAN and row.cell.bits is None and (row.cell.ctype, row.cell.eps) not in seen:
                seen.add((row.cell.ctype, row.cell.eps))
                regions.append(row.region)
            if row.alias is not None:
                aliases.append(row)
                continue
            place(row)
        if pending[False]:
            flush(pending[False], False)
        quiet.update(dict.fromkeys(waiting, False))  # a group whose no_defense row was never run (aliased): run them
        release()
        if pending[True]:
            flush(pending[True], True)
        computed = len(values)
        links = {row.cell.key: row.alias.key for row in aliases}
        for row in aliases:
            src = _resolve(values, links, row.alias.key)
            values[row.cell.key] = values[src]
            for kept in (costs, detected, nonfinite):
                if src in kept:
                    kept[row.cell.key] = kept[src]
    held = {l: hf.held_length(clean, l) for l in ctx.layers}
    unit = {"cells": {c.key: float(values[c.key]) for c in ctx.cells}, "exposure": exposure(ctx, regions, held),
            "evicted": exposure(ctx, regions, held, evicted=True),
            "tokens": int(ex.prefix.numel() + computed * ex.feeds.numel())}
    if costs:  # a recomputing defense at rest: {cell key: _Recomputation.cost (tokens, blocks, the oracle's
        # minimum corrupted_block_tokens, corrupted and recalled blocks; seconds when the real recomputation ran)}
        unit["recompute"] = {k: {f: (float(x) if f == "seconds" else int(x)) for f, x in c.items()}
                             for k, c in costs.items()}
    if detected:  # family D at rest: {cell key: [changed gated, changed, untouched gated, untouched, ROC-AUC]}
        unit["detector"] = detected
    if nonfinite:  # cells whose output had non-finite logits (scored as uniform there)
        unit["nonfinite"] = sorted(nonfinite)
    return unit
