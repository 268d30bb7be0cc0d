"""lm-eval tasks as `eval.tasks` entries `lmeval:<task>`: a task's documents become `Example`s and join the
whole grid like a built-in task (see the package docstring for what x is per output type)."""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any, Mapping, Sequence

import lm_eval
import torch
from lm_eval.tasks import TaskManager

from cachemedicpp import data
from cachemedicpp.examples import (Example, Task, example_span, example_split, feed_row, pad_id, pad_rows,
                                   token_logprobs)
from cachemedicpp.lmeval import CHOICE_TYPES, FEWSHOT_SEED, MODEL_NAME, PREFIX, ROLLING_TYPES, lmeval_name
from cachemedicpp.lmeval.tokens import encode_pair, max_length, prefix_token_id, rolling_windows, tok_encode, truncate
from cachemedicpp.schema import ConfigError


@lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(name: str, include_path: str | None = None):
    """A TaskManager that knows `name`: the include path's tasks alone when it has it (fast), else every
    registered task too. An unknown name is bad input naming it (with the closest known name)."""
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
                   meta: dict | None = None, split: str = "test") -> Example:
    """One context, R continuations: the cache holds ctx[:-1]; row r feeds ctx[-1] + conts[r][:-1]."""
    if len(ctx) < 2:
        raise ValueError("a context of fewer than 2 tokens leaves nothing in the cache")
    feeds, targets = pad_rows([feed_row(ctx[-1], c) for c in conts], pad_id(lm.tokenizer))
    return Example(PREFIX + task_name, int(doc_id), torch.tensor(ctx[:-1], dtype=torch.long), feeds, targets,
                   meta=dict(meta or {}), split=split)


def score_rows(logits: torch.Tensor, ex: Example) -> float:
    """tasks.Task.score for lm-eval examples: records each row's (summed log-likelihood, is_greedy) in
    `ex.meta["scored"]` (what the backend returns) and returns x: lm-eval's per-document metric for a
    multiple-choice document, the mean NLL of a rolling window, else 0."""
    lp, mask = token_logprobs(logits, ex.targets)
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


def build(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    """tasks.Task.build of an `lmeval:<task>` entry: documents of the task's split (`data.split_range` over its
    evaluation documents), from `start`, as examples."""
    name = lmeval_name(task_cfg["name"])
    include = task_cfg.get("include_path")
    task = load_task(name, str(include) if include else None)
    kind = task.OUTPUT_TYPE
    start, n = example_span(task_cfg)
    split = example_split(task_cfg)
    lo, hi = data.split_range(len(task.eval_docs), split)
    few = int(task_cfg.get("few_shot", 0) or 0)
    metric = task_cfg.get("metric") or "acc"
    tok, L = lm.tokenizer, max_length(lm)
    info = {"source": _source(task), "lmeval": {"task": name, "output_type": kind, "num_fewshot": few,
                                                "metric": metric, "include_path": str(include) if include else None,
                                                "version": lm_eval.__version__}, "split": split}
    if kind in CHOICE_TYPES:
        out = []
        for doc_id, reqs in task_requests(task, lo + start, min(n, max(0, hi - lo - start)), few).items():
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
                                      {"doc": reqs[0].doc, "metric": metric}, split))
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
            if not lo <= d < hi:
                continue
            for ctx, tgt in rolling_windows(tok_encode(tok, task.doc_to_target(doc)), prefix_token_id(tok), W, cont):
                if len(ctx) < 2:
                    continue  # the document's first token: no context to corrupt
                if index >= start:
                    out.append(choice_example(lm, name, index, ctx, [tgt], {"kind": "ppl", "doc_index": d}, split))
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


def get_task(name: str) -> Task:
    """The tasks.Task of an `lmeval:<task>` name (its kind is settled by `build`, from the output type)."""
    if not lmeval_name(name):
        raise ConfigError(f"eval.tasks: {name!r} names no lm-eval task (write lmeval:<task>)")
    return Task(name, "accuracy", "accuracy", build, score_rows)
