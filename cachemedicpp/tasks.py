"""Evaluation tasks: a registry of example builders and scorers (SPEC §7).

Every example has the same shape, so one scoring loop serves all tasks:

- `prefix`: the context ids held in the KV cache. It is prefilled clean once; each grid cell then
  corrupts (at rest) and defends a copy of that cache.
- `feeds` [R, L] / `targets` [R, L]: R scored alternatives, each processed by one forward over the
  (corrupted, defended) cache. A feed starts with the context's last token, so every scored token is
  predicted by a forward that reads the corrupted cache (no prediction comes from the clean prefill).
  Targets are -100 where a row is padded (right padding is harmless under causal attention).

Scoring gives one raw number per example and cell (`x`); a task turns the mean of x into its value
and normalised score:

- `wikitext2_ppl`: x = mean NLL of the last `eval.cont_len` tokens of a fixed window of
  `eval.max_seq_len` tokens from the concatenated stream. value = exp(mean x) (perplexity);
  score = ppl_clean_no_defense / ppl = exp(mean x_clean_no_defense − mean x).
- `sst2_prompted`: "Review: {x}\\nSentiment:" (optionally after `few_shot` demos from the SST-2 *train*
  split), both labels " negative" / " positive" scored as summed log-probs against the same cache
  (two rows of one batch). x = 1 if the better label is the gold one. value = score = accuracy.
- `lmeval:<task>`: an lm-evaluation-harness task (`cachemedicpp.lmeval.adapter`): a multiple-choice document
  is one example whose choices are its rows (x = lm-eval's per-document `acc`, or `metric`); a rolling
  log-likelihood task is a perplexity task over windows.
- Every task reads its split of the evaluation data only (`data.SPLITS`: test, validation, selection;
  disjoint parts of the text stream and rows), needle filler included.
- `needle_long_context`: seeded filler from the wikitext text with "NEEDLE: {token} = {value}." at
  `position_frac`, then the question and the answer cue "{token} =". x = 1 if every answer token is the argmax given the correct
  previous ones (teacher forcing), which is exactly "greedy decoding emits the answer's tokens first":
  deterministic, one forward, no generation loop. value = score = accuracy.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cachemedicpp import data, hf, lmeval, seeding
from cachemedicpp.examples import (IGNORE, Example, Task, example_span, example_split, feed_row, pad_id,  # noqa: F401
                                   pad_rows, split_stream, token_logprobs)
from cachemedicpp.schema import ConfigError, lookup

SST2_LABELS = (" negative", " positive")
NEEDLE_TEMPLATE = "NEEDLE: {token} = {value}."
ANSWER_CUE = " {needle_token} ="
DEMO_SEED = 1234


# --------------------------------------------------------------------------------------------------
# helpers


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _prefix(task: str, prompt: Sequence[int], answer_len: int, max_positions: int) -> torch.Tensor:
    """The cached part of a prompt (all but its last token), after checking prompt + answer fit."""
    if len(prompt) < 2:
        raise ConfigError(f"eval task {task}: a prompt needs at least 2 tokens")
    if len(prompt) + answer_len > max_positions:
        raise ConfigError(f"eval task {task}: a prompt of {len(prompt)} tokens plus a {answer_len}-token answer "
                          f"exceeds the model's {max_positions} positions")
    return torch.tensor(prompt[:-1], dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# wikitext2_ppl


def build_wikitext(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    ev = cfg.eval
    L, cont = int(ev.max_seq_len), int(ev.cont_len)
    if cont >= L - 1:
        raise ConfigError(f"eval.cont_len ({cont}) must be smaller than eval.max_seq_len − 1 ({L - 1})")
    if L > lm.arch.max_positions:
        raise ConfigError(f"eval.max_seq_len ({L}) exceeds the model's {lm.arch.max_positions} positions")
    split = example_split(task_cfg)
    stream = split_tokens(sources["wikitext2_ids"], split)
    start, n = example_span(task_cfg)
    windows = data.fixed_windows(stream, L, start + n)[start:]
    if len(windows) < n:
        raise ConfigError(f"wikitext2_ppl: the {split} split of the text ({stream.numel()} tokens) has "
                          f"{len(windows) + start} windows of {L} tokens, fewer than the {start + n} asked for")
    out = []
    for i, w in enumerate(windows, start=start):
        ctx, target = w[:L - cont], w[L - cont:]
        feed, tgt = feed_row(int(ctx[-1]), target.tolist())
        out.append(Example("wikitext2_ppl", i, ctx[:-1].clone(), torch.tensor([feed]), torch.tensor([tgt]),
                           split=split))
    info = {"split": split, "window_len": L, "context_len": L - cont, "cache_len": L - cont - 1, "cont_len": cont,
            "scored_tokens_per_example": cont, "source": sources["wikitext2_source"],
            "first_token_note": "the continuation's first token is predicted by re-feeding the context's last "
                                "token over the corrupted cache (the cache holds context[:-1])"}
    return out, info


def score_wikitext(logits: torch.Tensor, ex: Example) -> float:
    lp, mask = token_logprobs(logits, ex.targets)
    return float(-(lp.sum() / mask.sum()))


# --------------------------------------------------------------------------------------------------
# sst2_prompted


def sst2_prompt(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


def build_sst2(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    tok = lm.tokenizer
    split = example_split(task_cfg)
    lo, hi = data.split_range(len(sources["sst2"]), split)
    start, n = example_span(task_cfg)
    if lo + start + n > hi:
        raise ConfigError(f"sst2_prompted: the {split} split has {hi - lo} rows, fewer than the {start + n} asked for")
    rows = sources["sst2"]
    few = int(task_cfg.get("few_shot", 0) or 0)
    demos = sources["sst2_train"] if few else []
    if few and len(demos) < few:
        raise ConfigError(f"eval.tasks sst2_prompted few_shot={few}: the SST-2 train split has {len(demos)} rows")
    label_ids = [_ids(tok, s) for s in SST2_LABELS]
    if any(not ids for ids in label_ids):
        raise ConfigError("sst2_prompted: a label tokenises to nothing")
    pad = pad_id(tok)
    out = []
    for i in range(lo + start, lo + start + n):  # rows are numbered over the whole evaluation set
        sentence, label = rows[i]
        text = ""
        if few:
            # a fixed draw, not the run seed: runs of a multi-seed sweep share one evaluation set
            g = seeding.torch_rng(DEMO_SEED, "sst2-demos", i)
            pick = torch.randperm(len(demos), generator=g)[:few].tolist()
            text = "".join(f"{sst2_prompt(demos[j][0])}{SST2_LABELS[demos[j][1]]}\n\n" for j in pick)
        full = _ids(tok, text + sst2_prompt(sentence), special=True)
        prefix = _prefix("sst2_prompted", full, max(map(len, label_ids)), lm.arch.max_positions)
        feeds, targets = pad_rows([feed_row(full[-1], ids) for ids in label_ids], pad)
        out.append(Example("sst2_prompted", i, prefix, feeds, targets, label=int(label), split=split))
    if not out:
        return [], {"source": sources["sst2_source"]}
    lens = [int(e.prefix.numel()) for e in out]
    info = {"source": sources["sst2_source"], "split": split, "rows": [lo + start, lo + start + n],
            "few_shot": few, "labels": list(SST2_LABELS),
            "demo_source": sources.get("sst2_train_source") if few else None,
            "demo_choice": f"per example, seeded ({DEMO_SEED}, 'sst2-demos', index)" if few else None,
            "cache_len_min": min(lens), "cache_len_max": max(lens),
            "label_balance": float(np.mean([e.label for e in out]))}
    return out, info


def score_sst2(logits: torch.Tensor, ex: Example) -> float:
    lp, _ = token_logprobs(logits, ex.targets)
    pred = int(torch.argmax(lp.sum(-1)))
    return 1.0 if pred == ex.label else 0.0


# --------------------------------------------------------------------------------------------------
# needle_long_context


def needle_question(lc: Mapping) -> str:
    """The question, ending with the answer cue "{token} =" (added unless the template has it).

    The cue restates the key the way the needle line states it, so the value is copied from the needle
    (an induction copy that corrupting the old region can break). Without it SmolLM2-135M-Instruct
    answers "Answer:" with a newline and scores 0 even on a clean cache.
    """
    try:
        q = lc["question_template"].format(needle_token=lc["needle_token"], needle_value=lc["needle_value"])
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"data.long_context.question_template: bad placeholder ({type(e).__name__}: {e}); "
                          "use {needle_token}") from None
    cue = ANSWER_CUE.format(needle_token=lc["needle_token"])
    return q if q.rstrip().endswith(cue.strip()) else q.rstrip() + cue


# A vocabulary written for this project: keys "<word>_<word>", values "<colour>-<digit>". Drawn per
# example, so examples do not share one answer (24 copies of one needle are one example, not 24).
KEY_WORDS = ("amber", "brisk", "cedar", "delta", "ember", "fable", "gleam", "harbor", "island", "jolly",
             "kettle", "lunar", "maple", "nectar", "orbit", "pepper", "quarry", "river", "saddle", "timber",
             "umber", "velvet", "willow", "zephyr")
VALUE_WORDS = ("violet", "crimson", "golden", "silver", "cobalt", "scarlet", "olive", "indigo", "ivory",
               "copper", "teal", "maroon")


def draw_pairs(lc: Mapping, index: int, k: int, stream: str) -> list[tuple[str, str]]:
    """k distinct (key, value) pairs of one example: seeded by (seed, stream, index), or the configured
    fixed needle when `data.long_context.needles` is "fixed" (then k must be 1)."""
    if lc["needles"] == "fixed":
        return [(lc["needle_token"], lc["needle_value"])] * k
    g = seeding.torch_rng(int(lc["seed"]), stream, index)
    n = len(KEY_WORDS)
    keys = torch.randperm(n * n, generator=g)[:k].tolist()
    vals = torch.randint(0, len(VALUE_WORDS) * 10, (k,), generator=g).tolist()
    return [(f"{KEY_WORDS[a // n]}_{KEY_WORDS[a % n]}", f"{VALUE_WORDS[b // 10]}-{b % 10}") for a, b in zip(keys, vals)]


def needle_parts(lm, lc: Mapping, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the needle line, the question (with its cue) and the answer."""
    tok = lm.tokenizer
    q = {**dict(lc), "needle_token": key, "needle_value": value}
    needle = _ids(tok, "\n" + NEEDLE_TEMPLATE.format(token=key, value=value) + "\n")
    question = _ids(tok, "\n" + needle_question(q))
    answer = _ids(tok, " " + value)
    return needle, question, answer


def _positions(lc: Mapping, index: int, n_fill: int, k: int, stream: str, lines_len: int = 0) -> list[int]:
    """Where the k needle lines go in the filler (sorted offsets), spread over `position_range` (per
    example, seeded) or at `position_frac` when no range is set. The range is a fraction of the whole
    context: every line, shifted by the `lines_len` tokens of the lines inserted before it, ends by its
    upper end."""
    rng = lc.get("position_range")
    if not rng:
        return [int(round(float(lc["position_frac"]) * n_fill))] * k
    ctx_len = n_fill + lines_len
    hi = max(0, min(n_fill, int(float(rng[1]) * ctx_len) - lines_len))
    lo = min(int(round(float(rng[0]) * n_fill)), hi)
    g = seeding.torch_rng(int(lc["seed"]), stream + "-position", index)
    return sorted(int(x) for x in torch.randint(lo, hi + 1, (k,), generator=g))


def _with_needles(bos: list[int], fill: list[int], lines: list[list[int]], at: list[int]) -> tuple[list[int], list]:
    """bos + filler with each needle line inserted at its offset; the spans the lines occupy."""
    out, spans, prev = list(bos), [], 0
    for line, a in zip(lines, at):
        out += fill[prev:a]
        spans.append((len(out), len(out) + len(line)))
        out += line
        prev = a
    return out + fill[prev:], spans


def split_tokens(stream: torch.Tensor, split: str) -> torch.Tensor:
    """The part of the evaluation token stream a split owns (`data.split_range`)."""
    lo, hi = data.split_range(stream.numel(), split)
    return stream[lo:hi]


def _filler(stream: torch.Tensor, lc: Mapping, index: int, n_fill: int, task: str,
            split: str) -> tuple[list[int], int]:
    """n_fill consecutive tokens at a seeded offset inside the split's part of the stream, and that offset
    in the whole stream."""
    lo, _ = data.split_range(stream.numel(), split)
    part = split_tokens(stream, split)
    if part.numel() < n_fill + 1:
        raise ConfigError(f"{task}: the {split} split of the filler text has {part.numel()} tokens, needs {n_fill}")
    g = seeding.torch_rng(int(lc["seed"]), split_stream("needle-filler", split), index)
    start = int(torch.randint(0, part.numel() - n_fill + 1, (1,), generator=g))
    return part[start:start + n_fill].tolist(), lo + start


def _fits(task: str, ctx_len: int, used: int, tail: int, max_positions: int) -> int:
    n_fill = ctx_len - used
    if n_fill < 0:
        raise ConfigError(f"data.long_context.context_len ({ctx_len}) is shorter than the {task} needle lines "
                          f"({used} tokens)")
    if ctx_len + tail > max_positions:
        raise ConfigError(f"data.long_context.context_len: {ctx_len} context + {tail} question/answer tokens "
                          f"exceed the model's {max_positions} positions")
    return n_fill


def build_needle(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    lc = cfg.data.long_context.to_dict()
    tok = lm.tokenizer
    ctx_len = int(lc["context_len"])
    bos = _ids(tok, "", special=True)  # whatever the tokenizer puts in front of a prompt (often nothing)
    out = []
    split = example_split(task_cfg)
    start, n = example_span(task_cfg)
    for i in range(start, start + n):
        (key, value), = draw_pairs(lc, i, 1, split_stream("needle-vocab", split))
        needle, question, answer = needle_parts(lm, lc, key, value)
        n_fill = _fits("needle_long_context", ctx_len, len(needle) + len(bos), len(question) + len(answer),
                       lm.arch.max_positions)
        fill, at = _filler(sources["wikitext2_ids"], lc, i, n_fill, "needle_long_context", split)
        ctx, spans = _with_needles(bos, fill, [needle], _positions(lc, i, n_fill, 1, split_stream("needle", split),
                                                                  len(needle)))
        full = ctx + question
        prefix = _prefix("needle_long_context", full, len(answer), lm.arch.max_positions)
        feeds, targets = pad_rows([feed_row(full[-1], answer)], pad_id(tok))
        out.append(Example("needle_long_context", i, prefix, feeds, targets,
                           meta={"needle_spans": spans, "filler_start": at, "filler_len": n_fill, "key": key,
                                 "value": value}, split=split))
    info = {"source": sources["wikitext2_source"] + " (filler)", "split": split, "seed": int(lc["seed"]),
            "context_len": ctx_len, "cache_len": int(out[0].prefix.numel()) if out else 0, "needles": lc["needles"],
            "needle_spans": [list(ex.meta["needle_spans"][0]) for ex in out],
            "needle": NEEDLE_TEMPLATE.format(token="{key}", value="{value}"),
            "question": needle_question({**lc, "needle_token": "{key}"}),
            "distinct_keys": len({ex.meta["key"] for ex in out}),
            "scoring": "exact match by teacher forcing: every answer token must be the argmax "
                       "(= greedy decoding emits the answer's tokens first)"}
    return out, info


def build_retrieval(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    """kv_retrieval: k key-value lines spread over the old region; one scored row per key, x = the
    fraction recalled, so partial damage to the context shows as a partial loss."""
    lc = cfg.data.long_context.to_dict()
    k = int(task_cfg.get("pairs") or 4)
    if lc["needles"] == "fixed":
        raise ConfigError("kv_retrieval needs data.long_context.needles: seeded (distinct keys per example)")
    tok = lm.tokenizer
    ctx_len = int(lc["context_len"])
    bos = _ids(tok, "", special=True)
    out = []
    split = example_split(task_cfg)
    start, n = example_span(task_cfg)
    for i in range(start, start + n):
        pairs = draw_pairs(lc, i, k, split_stream("retrieval-vocab", split))
        parts = [needle_parts(lm, lc, key, value) for key, value in pairs]
        lines = [p[0] for p in parts]
        tail = max(len(q) + len(a) for _, q, a in parts)
        n_fill = _fits("kv_retrieval", ctx_len, sum(map(len, lines)) + len(bos), tail, lm.arch.max_positions)
        fill, at = _filler(sources["wikitext2_ids"], lc, i, n_fill, "kv_retrieval", split)
        ctx, spans = _with_needles(bos, fill, lines, _positions(lc, i, n_fill, k, split_stream("retrieval", split),
                                                             sum(map(len, lines))))
        prefix = _prefix("kv_retrieval", ctx, tail, lm.arch.max_positions)
        rows = []
        for _, question, answer in parts:
            f, t = feed_row(ctx[-1], question + answer)
            rows.append((f, [IGNORE] * len(question) + t[len(question):]))
        feeds, targets = pad_rows(rows, pad_id(tok))
        out.append(Example("kv_retrieval", i, prefix, feeds, targets,
                           meta={"needle_spans": spans, "filler_start": at, "filler_len": n_fill, "pairs": pairs},
                           split=split))
    info = {"source": sources["wikitext2_source"] + " (filler)", "split": split, "seed": int(lc["seed"]),
            "context_len": ctx_len,
            "cache_len": int(out[0].prefix.numel()) if out else 0, "pairs": k,
            "scoring": "fraction of the k keys whose value is recalled exactly (teacher forcing, argmax)"}
    return out, info


def check_needle(examples: Sequence[Example], time_mask: Callable[[int], torch.Tensor], where: str) -> None:
    """Raise unless every needle line lies inside the corrupted (old) part of its cache."""
    for ex in examples:
        T = int(ex.prefix.numel())
        m = time_mask(T)
        for a, b in ex.meta["needle_spans"]:
            if b > T or not bool(m[a:b].all()):
                covered = torch.nonzero(m).flatten()
                rng = f"[{int(covered[0])}, {int(covered[-1]) + 1})" if covered.numel() else "nothing"
                raise ConfigError(
                    f"{ex.task}: a needle line (tokens [{a}, {b}) of a {T}-token cache) is outside the "
                    f"corrupted region {rng} ({where}); narrow data.long_context.position_range (or lower "
                    "position_frac), shorten the recent window, or raise data.long_context.context_len")


def score_needle(logits: torch.Tensor, ex: Example) -> float:
    mask = ex.targets != IGNORE
    pred = logits.argmax(-1)
    return 1.0 if bool((pred[mask] == ex.targets[mask]).all()) else 0.0


def score_retrieval(logits: torch.Tensor, ex: Example) -> float:
    mask = ex.targets != IGNORE
    hit = (logits.argmax(-1) == ex.targets) | ~mask
    return float(hit.all(dim=-1).float().mean())


# --------------------------------------------------------------------------------------------------
# registry and aggregation


TASKS: dict[str, Task] = {
    "wikitext2_ppl": Task("wikitext2_ppl", "ppl", "perplexity", build_wikitext, score_wikitext),
    "sst2_prompted": Task("sst2_prompted", "accuracy", "accuracy", build_sst2, score_sst2),
    "needle_long_context": Task("needle_long_context", "accuracy", "accuracy", build_needle, score_needle),
    "kv_retrieval": Task("kv_retrieval", "accuracy", "fraction recalled", build_retrieval, score_retrieval),
}


def get_task(name: str) -> Task:
    """A built-in task by name, or an lm-evaluation-harness task named "lmeval:<task>" (cachemedicpp.lmeval)."""
    if lmeval.is_lmeval(name):
        lmeval.require()  # bad input naming the install command when lm-eval is missing
        from cachemedicpp.lmeval import adapter  # imports lm-eval (optional): only once an lm-eval task is named

        return adapter.get_task(name)
    return lookup("task", name, TASKS, key="eval.tasks", note="; an lm-evaluation-harness task is named lmeval:<task>")


def hub_datasets(cfg) -> list[str]:
    """The data.HUB keys the configured built-in tasks read (what `load_sources` loads), in load order."""
    names = [t["name"] for t in cfg.eval.tasks]
    keys = []
    if {"wikitext2_ppl", "needle_long_context", "kv_retrieval"} & set(names):
        keys.append("wikitext2")
    if "sst2_prompted" in names:
        keys.append("sst2")
        if any(int(t.get("few_shot", 0) or 0) > 0 for t in cfg.eval.tasks if t["name"] == "sst2_prompted"):
            keys.append("sst2_train")
    return keys


def load_sources(cfg, lm, names: Sequence[str]) -> dict:
    """Load (once) the data the named tasks need; every entry records where it came from."""
    src: dict = {}
    d = cfg.data.to_dict()
    if {"wikitext2_ppl", "needle_long_context", "kv_retrieval"} & set(names):
        text, src["wikitext2_source"] = data.load_text(d, "wikitext2")
        src["wikitext2_ids"] = data.tokenize_stream(lm.tokenizer, text)
    if "sst2_prompted" in names:
        src["sst2"], src["sst2_source"] = data.load_sst2(d, "sst2")
        if any(int(t.get("few_shot", 0) or 0) > 0 for t in cfg.eval.tasks if t["name"] == "sst2_prompted"):
            src["sst2_train"], src["sst2_train_source"] = data.load_sst2(d, "sst2_train")
    return src


def selection_caches(cfg, lm, layers: Sequence[int], per_task: int, start: int = 0,
                     up_to: bool = False) -> list[dict]:
    """Clean caches ({layer: (K, V)}, every position) of `per_task` examples from the `start`-th of each
    configured task's selection split (data.SPLITS): held-in data, disjoint from every test and validation
    example. `up_to`: as many as the split holds when it holds fewer (at least one)."""
    src = load_sources(cfg, lm, [t["name"] for t in cfg.eval.tasks])
    out = []
    for t in cfg.eval.tasks:
        n = int(per_task)
        while True:
            spec = {**t, "split": "selection", "start": int(start), "num_examples": n}
            try:
                exs, _ = get_task(t["name"]).build(lm, cfg, spec, src)
                break
            except ConfigError:
                if not up_to or n == 1:
                    raise
                n -= 1
        out += [hf.prefill_kv(lm.model, ex.prefix.reshape(1, -1).to(lm.device), layers) for ex in exs]
    return out


def value_from_mean(kind: str, m):
    """Task value from the mean raw value (perplexity = exp(mean NLL); accuracy as is)."""
    return np.exp(m) if kind == "ppl" else m


def score_from_means(kind: str, m, m_clean_no_defense):
    """Normalised score in [0, 1] for accuracy; ppl_clean_no_defense / ppl for perplexity."""
    if kind == "ppl":
        return np.exp(np.asarray(m_clean_no_defense) - np.asarray(m))
    return m
