"""lm-evaluation-harness tasks under KV-cache corruption: a `cachemedic` lm-eval model and a task adapter.

Two ways in, one scoring path (the eval grid's: `eval.grid.score_example` prefills the clean context,
corrupts the stored cache at rest on its old region, or on read, per `corruption.persistence`, applies the
defense, then scores the continuation rows with one forward over that cache):

- the lm-eval backend `cachemedic` (`python -m cachemedicpp.lmeval --model cachemedic --model_args
  config=Y,corruption=T,eps=E,defense=D[,run_dir=R] --tasks ...`): every request goes through ONE grid
  cell (T, E, D). The `lm_eval` executable itself cannot find it (lm-eval 0.4.x has no plugin discovery
  for models), so `python -m cachemedicpp.lmeval` registers it and then runs lm-eval's own CLI unchanged;
- an `eval.tasks` entry `lmeval:<task>`: the task's documents become `tasks.Example`s and join the whole
  grid (defenses × types × eps), the paired bootstrap, the AUC and the figures like a built-in task.

Semantics, shared by both:

- Tokens are encoded exactly as lm-eval's stock `hf` model encodes them (context + continuation encoded
  whole, then split; trailing context spaces moved to the continuation; an empty context becomes the
  prefix token; left truncation to the model's length). The cache holds context[:-1]; each row feeds the
  context's last token + continuation[:-1], so every scored token reads the corrupted cache. With eps 0
  and no_defense the log-likelihoods equal the stock backend's within fp32 tolerance.
- The requests of one document that share a context (the choices of a multiple-choice question) are the
  rows of one `Example`: they are scored over one and the same corrupted cache. Its `example_id`
  ("lmeval:<task>:<doc_id>") seeds the corruption draws, so draws are per request (document), shared by
  all choices and by every defense (paired), and the same in both ways in.
- multiple_choice: x = lm-eval's own per-document metric (`process_results`) on the choices'
  (log-likelihood, is_greedy); `metric: acc` (argmax of the summed log-likelihood is gold) by default,
  `acc_norm` (length-normalised) on request. loglikelihood_rolling: the text is scored in windows that
  predict `eval.cont_len` tokens each from up to `eval.max_seq_len − eval.cont_len` cached context tokens
  (every window's context is corrupted); as an `eval.tasks` entry each window with a context is one example
  of a perplexity-kind task (the first token of a document has no context and is not scored there).
  generate_until: backend only, at-rest persistence, greedy decoding from the corrupted cache.
  Other output types are refused (exit 2).
"""

from __future__ import annotations

import difflib
import logging
import sys
from functools import lru_cache
from typing import Any, Mapping, Sequence

import torch

from cachemedicpp import tasks
from cachemedicpp.config import ConfigError

log = logging.getLogger("cachemedicpp")

MODEL_NAME = "cachemedic"
PREFIX = "lmeval:"  # eval.tasks names of lm-eval tasks: "lmeval:<task>"
INSTALL = 'pip install "cachemedicpp[lmeval]"'
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
CHOICE_TYPES = ("multiple_choice",)
ROLLING_TYPES = ("loglikelihood_rolling",)


def require():
    """The lm_eval package, or a ConfigError (exit 2) naming lm-eval and the install command."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"lm-eval is not installed ({type(e).__name__}: {e}); install the optional "
                          f"dependency with {INSTALL}") from None
    return lm_eval


def is_lmeval(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def lmeval_name(name: str) -> str:
    """The lm-eval task name of an eval.tasks name ("lmeval:arc_easy" -> "arc_easy")."""
    return name[len(PREFIX):]


# --------------------------------------------------------------------------------------------------
# tokenisation: exactly what lm-eval's stock HF backend does (models/huggingface.py, api/model.py)


def prefix_token_id(tok) -> int:
    return int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)


def tok_encode(tok, string: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's own special tokens, unless the string
    already starts with the prefix token's text."""
    from lm_eval.models.utils import has_bos_prefix

    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None and has_bos_prefix(string, tok.decode(prefix_token_id(tok))):
        kw["add_special_tokens"] = False
    return list(tok.encode(string, **kw))


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a log-likelihood request, as TemplateLM.loglikelihood builds them."""
    if context == "":
        cont = tok_encode(tok, continuation, add_special_tokens=False)
        p = prefix_token_id(tok)
        return ([p], cont) if p != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tok, context + continuation)
    ctx = tok_encode(tok, context)
    return ctx, whole[len(ctx):]


def truncate(ctx: list[int], cont_len: int, max_length: int) -> list[int]:
    """The context the stock backend sees: (context + continuation)[-(max_length + 1):] minus the continuation."""
    keep = max_length + 1 - cont_len
    if keep < 1:
        raise ConfigError(f"an lm-eval continuation of {cont_len} tokens exceeds the model's {max_length} positions")
    return ctx[-keep:] if len(ctx) > keep else ctx


def max_length(lm) -> int:
    from lm_eval.models.utils import resolve_max_length

    return int(resolve_max_length(lm.model.config, lm.tokenizer, default=2048))


def rolling_windows(ids: Sequence[int], prefix: int, window: int, cont: int) -> list[tuple[list[int], list[int]]]:
    """(context, scored tokens) windows covering every token of `ids` once: each scores up to `cont` tokens
    after up to `window − cont` context tokens ([prefix] + ids before them)."""
    seq = [prefix] + list(ids)
    out, s = [], 1
    while s < len(seq):
        e = min(s + cont, len(seq))
        out.append((seq[max(0, s - (window - cont)):s], seq[s:e]))
        s = e
    return out


# --------------------------------------------------------------------------------------------------
# lm-eval tasks


@lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(name: str, include_path: str | None = None):
    """A TaskManager that knows `name`: the include path's tasks alone when it has it (fast), else every
    registered task too. An unknown name is bad input naming it (with the closest known name)."""
    require()
    if include_path:
        tm = _manager(str(include_path), False)
        if name in tm.all_tasks:
            return tm
    tm = _manager(str(include_path) if include_path else None, True)
    if name not in tm.all_tasks:
        close = difflib.get_close_matches(name, tm.all_tasks, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        where = f" (include_path {include_path})" if include_path else ""
        raise ConfigError(f"unknown lm-eval task {name!r}{hint}{where}; `lm-eval ls tasks` lists them, a custom "
                          "YAML task needs its folder as include_path")
    return tm


def load_task(name: str, include_path: str | None = None):
    """The lm-eval Task object of a (leaf) task name."""
    tm = task_manager(name, include_path)
    try:
        loaded = tm.load([name])
    except Exception as e:  # dataset unreachable, bad YAML: bad input naming the task
        raise ConfigError(f"lm-eval task {name!r} cannot be loaded ({type(e).__name__}: {e})") from None
    got = loaded["tasks"]
    if name not in got or loaded.get("groups"):
        raise ConfigError(f"lm-eval task {name!r} is a group or tag of {sorted(got)}: name one task per "
                          "eval.tasks entry")
    return got[name]


def task_requests(task, first: int, n: int, few_shot: int) -> dict[int, list]:
    """{doc_id: its Instances in request order} for documents first .. first + n − 1, built by lm-eval."""
    task.set_config(key="num_fewshot", value=int(few_shot))
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    task.build_all_requests(limit=first + n, rank=0, world_size=1)
    docs: dict[int, list] = {}
    for ins in task.instances:
        if ins.doc_id >= first:
            docs.setdefault(int(ins.doc_id), []).append(ins)
    for v in docs.values():
        v.sort(key=lambda i: i.idx)
    return dict(sorted(docs.items()))


# --------------------------------------------------------------------------------------------------
# examples and scoring (one function for both ways in)


def choice_example(lm, task_name: str, doc_id: int, ctx: list[int], conts: Sequence[list[int]],
                   meta: dict | None = None) -> tasks.Example:
    """One context, R continuations: the cache holds ctx[:-1]; row r feeds ctx[-1] + conts[r][:-1]."""
    if len(ctx) < 2:
        raise ValueError("a context of fewer than 2 tokens leaves nothing in the cache")
    feeds, targets = tasks.pad_rows([tasks.feed_row(ctx[-1], c) for c in conts], tasks.pad_id(lm.tokenizer))
    return tasks.Example(PREFIX + task_name, int(doc_id), torch.tensor(ctx[:-1], dtype=torch.long), feeds, targets,
                         meta=dict(meta or {}))


def score_rows(logits: torch.Tensor, ex: tasks.Example) -> float:
    """tasks.Task.score for lm-eval examples: records each row's (summed log-likelihood, is_greedy) in
    `ex.meta["scored"]` (what the backend returns) and returns x: lm-eval's per-document metric for a
    multiple-choice document, the mean NLL of a rolling window, else 0."""
    lp, mask = tasks.token_logprobs(logits, ex.targets)
    greedy = ((logits.argmax(-1) == ex.targets) | ~mask).all(-1)
    scored = [(float(s), bool(g)) for s, g in zip(lp.sum(-1).tolist(), greedy.tolist())]
    ex.meta["scored"] = scored
    if ex.meta.get("kind") == "ppl":
        return float(-(lp.sum() / mask.sum()))
    task, doc = _TASKS.get(ex.task), ex.meta.get("doc")
    if task is not None and doc is not None:
        return float(task.process_results(doc, scored)[ex.meta.get("metric", "acc")])
    return 0.0


_TASKS: dict[str, Any] = {}  # "lmeval:<task>" -> its lm-eval Task object (for process_results)


def build(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[tasks.Example], dict]:
    """tasks.Task.build of an `lmeval:<task>` entry: its first documents (from `start`) as examples."""
    name = lmeval_name(task_cfg["name"])
    include = task_cfg.get("include_path")
    task = load_task(name, str(include) if include else None)
    kind = task.OUTPUT_TYPE
    start, n = tasks.example_span(task_cfg)
    few = int(task_cfg.get("few_shot", 0) or 0)
    metric = task_cfg.get("metric") or "acc"
    tok, L = lm.tokenizer, max_length(lm)
    info = {"source": _source(task), "lmeval": {"task": name, "output_type": kind, "num_fewshot": few,
                                                "metric": metric, "include_path": str(include) if include else None,
                                                "version": require().__version__}}
    if kind in CHOICE_TYPES:
        out = []
        for doc_id, reqs in task_requests(task, start, n, few).items():
            contexts = {r.args[0] for r in reqs}
            if len(contexts) != 1:
                raise ConfigError(f"eval.tasks {task_cfg['name']}: the choices of a document have different contexts "
                                  "(e.g. winogrande's partial scoring), so they cannot share one cached context; "
                                  "score it through the lm-eval backend instead")
            pairs = [encode_pair(tok, *r.args) for r in reqs]
            ctx = truncate(pairs[0][0], max(len(c) for _, c in pairs), L)
            if len(ctx) < 2:
                raise ConfigError(f"eval.tasks {task_cfg['name']}: document {doc_id} has a context of {len(ctx)} "
                                  "token(s): nothing to hold in the cache")
            out.append(choice_example(lm, name, doc_id, ctx, [c for _, c in pairs],
                                      {"doc": reqs[0].doc, "metric": metric}))
        if out:
            probe = task.process_results(out[0].meta["doc"], [(0.0, False)] * out[0].rows)
            if metric not in probe:
                raise ConfigError(f"eval.tasks {task_cfg['name']}: metric {metric!r} is not one of the task's "
                                  f"per-document metrics {sorted(probe)}")
        _TASKS[PREFIX + name] = task
        lens = [int(e.prefix.numel()) for e in out]
        info.update(kind="accuracy", value_name="accuracy",
                    cache_len_min=min(lens, default=0), cache_len_max=max(lens, default=0))
        return out, info
    if kind in ROLLING_TYPES:
        ev = cfg.eval
        W, cont = min(int(ev.max_seq_len), L), int(ev.cont_len)
        if cont >= W - 1:
            raise ConfigError(f"eval.cont_len ({cont}) must be smaller than eval.max_seq_len − 1 ({W - 1})")
        out, index = [], 0  # examples are windows, numbered over the documents in order
        task.set_config(key="num_fewshot", value=0)
        for d, doc in enumerate(task.eval_docs):
            for ctx, tgt in rolling_windows(tok_encode(tok, task.doc_to_target(doc)), prefix_token_id(tok), W, cont):
                if len(ctx) < 2:
                    continue  # the document's first token: no context to corrupt
                if index >= start:
                    out.append(choice_example(lm, name, index, ctx, [tgt], {"kind": "ppl", "doc_index": d}))
                index += 1
                if len(out) >= n:
                    break
            if len(out) >= n:
                break
        info.update(kind="ppl", value_name="perplexity", window_len=W, cont_len=cont,
                    first_token_note="windows of eval.max_seq_len tokens scoring eval.cont_len tokens each; a "
                                     "document's first token (no context) is not scored")
        return out, info
    raise ConfigError(f"eval.tasks {task_cfg['name']}: output type {kind!r} is not supported in the grid "
                      f"(supported: {list(CHOICE_TYPES + ROLLING_TYPES)}); generate_until tasks run through the "
                      f"lm-eval backend (python -m cachemedicpp.lmeval --model {MODEL_NAME} ...)")


def _source(task) -> str:
    c = task.config
    files = (c.dataset_kwargs or {}).get("data_files") if isinstance(c.dataset_kwargs, dict) else None
    split = c.test_split or c.validation_split
    what = f"{c.dataset_path}/{c.dataset_name}" if c.dataset_name else str(c.dataset_path)
    if files:
        what += f"({files})"
    return f"lmeval:{c.task}:{what}:{split}"


def get_task(name: str) -> tasks.Task:
    """The tasks.Task of an `lmeval:<task>` name (its kind is settled by `build`, from the output type)."""
    require()
    if not lmeval_name(name):
        raise ConfigError(f"eval.tasks: {name!r} names no lm-eval task (write lmeval:<task>)")
    return tasks.Task(name, "accuracy", "accuracy", build, score_rows)


# --------------------------------------------------------------------------------------------------
# the backend: one grid cell applied to lm-eval's requests


class CellScorer:
    """The eval grid restricted to one cell (corruption type, eps, defense) on a loaded model: builds the
    grid's EvalContext (corruptor with its donors, repair operator, calibration) and scores examples with
    `eval.grid.score_example`, the function the eval stage uses."""

    def __init__(self, cfg, lm, ctype: str | None, eps: float, defense: str, run_dir: str | None = None):
        from cachemedicpp import corruption, defenses
        from cachemedicpp.eval import grid, stage

        self.cfg, self.lm = cfg, lm
        ctype = ctype or (list(cfg.eval.corruption_eval.types) or ["gaussian"])[0]
        corruption.get(ctype, key="model_args corruption")
        if defense != grid.REPAIR_NAME:
            defenses.check_name(defense)
        if float(eps) < 0:
            raise ConfigError(f"model_args eps: must be >= 0, got {eps}")
        self.cell = grid.Cell(grid.CLEAN, 0.0, defense) if float(eps) == 0 else grid.Cell(ctype, float(eps), defense)
        op = cal = None
        if defense == grid.REPAIR_NAME or defense in defenses.CALIBRATED:
            if not run_dir:
                raise ConfigError(f"model_args defense={defense} needs run_dir (the run that holds its "
                                  "repair checkpoint / calibration)")
            from cachemedicpp.rundir import RunDir

            rd = RunDir(run_dir)
            if defense == grid.REPAIR_NAME:
                ckpt = stage.resolve_checkpoint(cfg, rd, [defense])
                op = stage.load_operator(cfg, rd, ckpt, lm.arch)
            else:
                from cachemedicpp import calibration

                cal = calibration.check_file(cfg, rd.calibration) or calibration.obtain(cfg, lm, rd.calibration)
        types = [ctype]
        layers = sorted(set(cfg.repair.protect_layers) | set(cfg.corruption.axes.layers))
        longest = max_length(lm)
        donors = corruption.donors(cfg.corruption.params, lm, types, longest, layers)
        corruptor = corruption.Corruptor(cfg.corruption.to_dict(), list(cfg.repair.protect_layers),
                                         lm.arch.num_kv_heads, cfg.seed, **donors)
        self.ctx = grid.EvalContext(cfg, lm, corruptor, op.to(lm.device) if op is not None else None, [defense],
                                    types, [float(eps)], [self.cell], [], {}, {}, cfg.baseline.to_dict(),
                                    cfg.corruption.persistence, ctype, int(cfg.eval.cell_batch_size), cal=cal)

    def score(self, ex: tasks.Example) -> list[tuple[float, bool]]:
        """(summed log-likelihood, is_greedy) of each row of `ex` over its corrupted, defended cache."""
        from cachemedicpp.eval import grid

        grid.score_example(self.ctx, ex)
        return list(ex.meta["scored"])

    def score_plain(self, ctx: list[int], conts: Sequence[list[int]]) -> list[tuple[float, bool]]:
        """Rows whose context is one token: nothing is cached, so nothing can be corrupted (a plain forward)."""
        from cachemedicpp import hf

        out = []
        with torch.no_grad():
            for c in conts:
                ids = torch.tensor([ctx + c[:-1]], device=self.lm.device)
                logits, _ = hf.forward(self.lm.model, ids)
                tg = torch.tensor([[tasks.IGNORE] * (len(ctx) - 1) + list(c)])
                lp, mask = tasks.token_logprobs(logits.float().cpu(), tg)
                out.append((float(lp.sum()), bool(((logits.cpu().argmax(-1) == tg) | ~mask).all())))
        return out

    def generate(self, ex: tasks.Example, until: Sequence[str], max_new: int) -> str:
        """Greedy decoding from the corrupted, defended cache of `ex` (at rest: the corrupted old region
        persists while new tokens are appended clean)."""
        from cachemedicpp import hf
        from cachemedicpp.eval import grid

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


@lru_cache(maxsize=1)
def backend_class():
    """The `cachemedic` lm-eval model class (built on first use: lm-eval is imported lazily)."""
    lm_eval = require()
    from lm_eval.api.model import TemplateLM

    class CacheMedicLM(TemplateLM):
        """lm-eval model `cachemedic`: a frozen HF causal LM from a cachemedicpp config, every request scored
        through one grid cell (clean prefill -> corruption at rest / on read -> defense -> scoring)."""

        def __init__(self, config: str | None = None, run_dir: str | None = None, corruption: str | None = None,
                     eps: float | str = 0.0, defense: str = "no_defense", device: str | None = None,
                     dtype: str | None = None, **other):
            super().__init__()
            from cachemedicpp import hf
            from cachemedicpp.config import load_config

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
            from lm_eval.utils import simple_parse_args_string

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
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

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

    CacheMedicLM.__module__ = "cachemedicpp.lmeval"
    CacheMedicLM.lm_eval_version = lm_eval.__version__
    return CacheMedicLM


def __getattr__(name: str):
    if name == "CacheMedicLM":  # the target lm-eval's registry imports ("cachemedicpp.lmeval:CacheMedicLM")
        return backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> type:
    """Register the `cachemedic` model with lm-eval (idempotent, lazily by import path) and return its class."""
    require()
    import lm_eval.models  # noqa: F401  lm-eval loads its own models only into an empty registry: first
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="cachemedicpp.lmeval:CacheMedicLM")
    return backend_class()


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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cachemedicpp.lmeval <lm_eval arguments>`: lm-eval's CLI with `--model cachemedic` available."""
    from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        check_tasks(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        cli_evaluate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = old
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
