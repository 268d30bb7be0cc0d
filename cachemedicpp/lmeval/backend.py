"""The lm-eval model `cachemedic`: every request scored through one grid cell of the eval grid (clean prefill
-> corruption at rest / on read -> defense -> scoring). `python -m cachemedicpp.lmeval` registers it and
runs lm-eval's own CLI (`cli_evaluate`)."""

from __future__ import annotations

import difflib
import sys
from typing import Sequence

import lm_eval
import lm_eval.models  # noqa: F401  lm-eval loads its own models only into an empty registry: first
import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from cachemedicpp import calibration, corruption, defenses, hf
from cachemedicpp.config import load_config
from cachemedicpp.eval import grid, stage
from cachemedicpp.examples import IGNORE, Example, token_logprobs
from cachemedicpp.lmeval import MODEL_NAME
from cachemedicpp.lmeval.adapter import choice_example, task_manager
from cachemedicpp.lmeval.tokens import encode_pair, max_length, prefix_token_id, rolling_windows, tok_encode, truncate
from cachemedicpp.rundir import RunDir
from cachemedicpp.schema import ConfigError, lookup


class CellScorer:
    """The eval grid restricted to one cell (corruption type, eps, defense) on a loaded model: builds the
    grid's EvalContext (corruptor with its donors, repair operator, calibration) and scores examples with
    `eval.grid.score_example`, the function the eval stage uses."""

    def __init__(self, cfg, lm, ctype: str | None, eps: float, defense: str, run_dir: str | None = None):
        self.cfg, self.lm = cfg, lm
        ctype = ctype or (list(cfg.eval.corruption_eval.types) or ["gaussian"])[0]
        lookup("corruption type", ctype, corruption.CORRUPTION_TYPES, key="model_args corruption")
        needs = defenses.get(defense).needs  # unknown name -> ConfigError listing the known ones
        if float(eps) < 0:
            raise ConfigError(f"model_args eps: must be >= 0, got {eps}")
        self.cell = grid.Cell(grid.CLEAN, 0.0, defense) if float(eps) == 0 else grid.Cell(ctype, float(eps), defense)
        op = cal = None
        if needs.operator or needs.calibration:
            if not run_dir:
                raise ConfigError(f"model_args defense={defense} needs run_dir (the run that holds its "
                                  "repair checkpoint / calibration)")
            rd = RunDir(run_dir)
            if needs.operator:
                ckpt = stage.resolve_checkpoint(cfg, rd, [defense])
                op = stage.load_operator(cfg, rd, ckpt, lm.arch)
            if needs.calibration:
                cal = calibration.check_file(cfg, rd.calibration) or calibration.obtain(cfg, lm, rd.calibration)
        types = [ctype]
        layers = sorted(set(cfg.repair.protect_layers) | set(cfg.corruption.axes.layers))
        longest = max_length(lm)
        donors = corruption.donors(cfg.corruption.params, lm, types, longest, layers)
        corruptor = corruption.Corruptor(cfg.corruption.to_dict(), list(cfg.repair.protect_layers),
                                         lm.arch.num_kv_heads, cfg.seed, **donors)
        self.ctx = grid.cell_context(cfg, lm, corruptor, self.cell, ctype, op, cal)

    def score(self, ex: Example) -> list[tuple[float, bool]]:
        """(summed log-likelihood, is_greedy) of each row of `ex` over its corrupted, defended cache."""
        grid.score_example(self.ctx, ex)
        return list(ex.meta["scored"])

    def score_plain(self, ctx: list[int], conts: Sequence[list[int]]) -> list[tuple[float, bool]]:
        """Rows whose context is one token: nothing is cached, so nothing can be corrupted (a plain forward)."""
        out = []
        with torch.no_grad():
            for c in conts:
                ids = torch.tensor([ctx + c[:-1]], device=self.lm.device)
                logits, _ = hf.forward(self.lm.model, ids)
                tg = torch.tensor([[IGNORE] * (len(ctx) - 1) + list(c)])
                lp, mask = token_logprobs(logits.float().cpu(), tg)
                out.append((float(lp.sum()), bool(((logits.cpu().argmax(-1) == tg) | ~mask).all())))
        return out

    def generate(self, ex: Example, until: Sequence[str], max_new: int) -> str:
        """Greedy decoding from the corrupted, defended cache of `ex` (at rest: the corrupted old region
        persists while new tokens are appended clean)."""
        if self.ctx.persistence != "at_rest":
            raise ConfigError("generate_until through the cachemedic backend needs corruption.persistence: at_rest")
        tok, eos = self.lm.tokenizer, self.lm.tokenizer.eos_token_id
        with torch.no_grad():
            _, clean = hf.forward(self.lm.model, ex.prefix[None].to(self.lm.device), logits_to_keep=1)
            row = next(grid.cell_rows(self.ctx, ex, clean, dedupe=False))
            cache = hf.repeat_cache(clean, 1)
            for l, (k, v) in (row.overrides or {}).items():
                hf.set_kv(cache, l, k, v)
            drop = grid.at_rest_drop([row], 1)
            plan = None
            if self.cell.repaired or drop is not None:
                plan = hf.HookPlan(layers=frozenset(self.ctx.layers) if drop is not None else frozenset(),
                                   repair=self.ctx.op if self.cell.repaired else None, drop=drop)
            ids, out = ex.feeds[:1, :1], []
            for _ in range(max_new):
                logits, cache = hf.forward(self.lm.model, ids.to(self.lm.device), cache, plan=plan)
                nxt = int(logits[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
                text = tok.decode(out)
                if any(u and u in text for u in until):
                    break
                ids = torch.tensor([[nxt]])
        text = tok.decode(out)
        for u in until:
            if u:
                text = text.split(u)[0]
        return text


class CacheMedicLM(TemplateLM):
    """lm-eval model `cachemedic`: a frozen HF causal LM from a cachemedicpp config, every request scored
    through one grid cell (clean prefill -> corruption at rest / on read -> defense -> scoring)."""

    def __init__(self, config: str | None = None, run_dir: str | None = None, corruption: str | None = None,
                 eps: float | str = 0.0, defense: str = "no_defense", device: str | None = None,
                 dtype: str | None = None, **other):
        super().__init__()
        if not config:
            raise ConfigError("cachemedic model_args: config=<a cachemedicpp config YAML> is required")
        unknown = sorted(set(other) - {"batch_size", "max_batch_size"})  # lm-eval's own, not used here
        if unknown:
            known = ["config", "run_dir", "corruption", "eps", "defense", "device", "dtype"]
            hints = [f"{k} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, known, n=1)) else k
                     for k in unknown]
            raise ConfigError(f"cachemedic model_args: unknown {', '.join(hints)}; known: {known}")
        over = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
        self.cfg = load_config(config, over)
        self.lm = hf.load_model(self.cfg.model.to_dict(), self.cfg.device, self.cfg.dtype)
        self.tokenizer = self.lm.tokenizer
        self.scorer = CellScorer(self.cfg, self.lm, corruption, float(eps), str(defense), run_dir)
        self._max_length = max_length(self.lm)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm-eval's own options (its --device, default cuda:0 on its CLI)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return tok_encode(self.tokenizer, string, add_special_tokens)

    def _loglikelihood_tokens(self, requests, **kw):
        raise NotImplementedError("cachemedic scores whole documents: see loglikelihood")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """The requests of one document sharing a context are the rows of one Example (one cache)."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            ctx, cont = encode_pair(self.tokenizer, *req.args)
            ctx = truncate(ctx, len(cont), self.max_length)
            groups.setdefault((req.task_name or "", int(req.doc_id or 0), tuple(ctx)), []).append((i, cont))
        out: list = [None] * len(requests)
        for (task_name, doc_id, ctx), items in groups.items():
            conts = [c for _, c in items]
            if len(ctx) < 2:
                res = self.scorer.score_plain(list(ctx), conts)
            else:
                res = self.scorer.score(choice_example(self.lm, task_name, doc_id, list(ctx), conts))
            for (i, _), r in zip(items, res):
                out[i] = r
                self.cache_hook.add_partial("loglikelihood", requests[i].args, r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-likelihoods over windows scoring eval.cont_len tokens after a corrupted context of
        up to eval.max_seq_len − eval.cont_len tokens (see the module docstring)."""
        ev = self.cfg.eval
        W, cont = min(int(ev.max_seq_len), self.max_length), int(ev.cont_len)
        out = []
        for req in requests:
            total = 0.0
            wins = rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, W, cont)
            for j, (ctx, tgt) in enumerate(wins):
                if len(ctx) < 2:
                    total += self.scorer.score_plain(ctx, [tgt])[0][0]
                else:
                    # window j of document d: its own draws ("lmeval:<task>/w:<d>:<j>")
                    ex = choice_example(self.lm, f"{req.task_name}/w{int(req.doc_id or 0)}", j, ctx, [tgt])
                    total += self.scorer.score(ex)[0][0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = handle_stop_sequences(kw.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
            max_new = int(kw.pop("max_gen_toks"))
            ctx = self.tok_encode(context)[-(self.max_length - max_new):]
            if len(ctx) < 2:
                raise ConfigError("generate_until: a context of fewer than 2 tokens leaves nothing to cache")
            ex = choice_example(self.lm, req.task_name or "", int(req.doc_id or 0), ctx, [[ctx[-1]]])
            text = self.scorer.generate(ex, until, max_new)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


CacheMedicLM.lm_eval_version = lm_eval.__version__


def register() -> type:
    """Register the `cachemedic` model with lm-eval (idempotent, by import path) and return its class."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="cachemedicpp.lmeval.backend:CacheMedicLM")
    return CacheMedicLM


# --------------------------------------------------------------------------------------------------
# the command: lm-eval's own CLI with the backend registered


def _arg(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_tasks(argv: Sequence[str]) -> None:
    """Unknown names in --tasks (with --include_path) are bad input, found before the model loads."""
    names = _arg(argv, "--tasks")
    if not names:
        return
    include = _arg(argv, "--include_path")
    for n in (x.strip() for x in names.split(",")):
        if n and not n.endswith((".yaml", ".yml")) and not any(ch in n for ch in "*?["):
            task_manager(n, include)


def evaluate(argv: Sequence[str]) -> None:
    """lm-eval's CLI on `argv` with the backend registered; unknown --tasks names fail before the model loads
    (ConfigError). lm-eval ends by SystemExit when it fails."""
    register()
    check_tasks(argv)
    old = sys.argv
    sys.argv = ["lm-eval"] + list(argv)
    try:
        cli_evaluate()
    finally:
        sys.argv = old
