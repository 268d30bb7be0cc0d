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
- `needle_long_context`: seeded filler from the wikitext text with "NEEDLE: {token} = {value}." at
  `position_frac`, then the question and the answer cue "{token} =". x = 1 if every answer token is the argmax given the correct
  previous ones (teacher forcing), which is exactly "greedy decoding emits the answer's tokens first":
  deterministic, one forward, no generation loop. value = score = accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cachemedicpp import data, seeding
from cachemedicpp.config import ConfigError, lookup

IGNORE = -100
SST2_LABELS = (" negative", " positive")
NEEDLE_TEMPLATE = "NEEDLE: {token} = {value}."
ANSWER_CUE = " {needle_token} ="
DEMO_SEED = 1234


@dataclass
class Example:
    task: str
    index: int
    prefix: torch.Tensor  # [T] long
    feeds: torch.Tensor  # [R, L] long
    targets: torch.Tensor  # [R, L] long, IGNORE where not scored
    label: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable unit key of this example in progress files."""
        return f"{self.task}/{self.index:05d}"

    @property
    def example_id(self) -> str:
        """The id that seeds this example's corruption draws (shared by every defense: paired)."""
        return f"{self.task}:{self.index}"

    @property
    def rows(self) -> int:
        return int(self.feeds.shape[0])

    def num_tokens(self) -> int:
        return int(self.prefix.numel() + self.feeds.numel())


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "ppl" | "accuracy"
    value_name: str
    build: Callable[..., tuple[list[Example], dict]]
    score: Callable[[torch.Tensor, Example], float]


# --------------------------------------------------------------------------------------------------
# helpers


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _feed(prefix_last: int, target: Sequence[int]) -> tuple[list[int], list[int]]:
    """Feed = last context token + target[:-1]; predictions at each feed position are the targets."""
    return [prefix_last] + list(target[:-1]), list(target)


def _pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(f) for f, _ in rows)
    feeds = torch.full((len(rows), n), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    for i, (f, t) in enumerate(rows):
        feeds[i, :len(f)] = torch.tensor(f)
        targets[i, :len(t)] = torch.tensor(t)
    return feeds, targets


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def _prefix(task: str, prompt: Sequence[int], answer_len: int, max_positions: int) -> torch.Tensor:
    """The cached part of a prompt (all but its last token), after checking prompt + answer fit."""
    if len(prompt) < 2:
        raise ConfigError(f"eval task {task}: a prompt needs at least 2 tokens")
    if len(prompt) + answer_len > max_positions:
        raise ConfigError(f"eval task {task}: a prompt of {len(prompt)} tokens plus a {answer_len}-token answer "
                          f"exceeds the model's {max_positions} positions")
    return torch.tensor(prompt[:-1], dtype=torch.long)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target ([R, L], 0 where ignored) and the scored-position mask."""
    mask = targets != IGNORE
    lp = torch.log_softmax(logits.float(), dim=-1)
    got = lp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, got, torch.zeros_like(got)), mask


# --------------------------------------------------------------------------------------------------
# wikitext2_ppl


def build_wikitext(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    ev = cfg.eval
    L, cont = int(ev.max_seq_len), int(ev.cont_len)
    if cont >= L - 1:
        raise ConfigError(f"eval.cont_len ({cont}) must be smaller than eval.max_seq_len − 1 ({L - 1})")
    if L > lm.arch.max_positions:
        raise ConfigError(f"eval.max_seq_len ({L}) exceeds the model's {lm.arch.max_positions} positions")
    stream = sources["wikitext2_ids"]
    windows = data.fixed_windows(stream, L, int(task_cfg["num_examples"]))
    out = []
    for i, w in enumerate(windows):
        ctx, target = w[:L - cont], w[L - cont:]
        feed, tgt = _feed(int(ctx[-1]), target.tolist())
        out.append(Example("wikitext2_ppl", i, ctx[:-1].clone(), torch.tensor([feed]), torch.tensor([tgt])))
    info = {"window_len": L, "context_len": L - cont, "cache_len": L - cont - 1, "cont_len": cont,
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
    rows = sources["sst2"]
    n = min(int(task_cfg["num_examples"]), len(rows))
    few = int(task_cfg.get("few_shot", 0) or 0)
    demos = sources["sst2_train"] if few else []
    if few and len(demos) < few:
        raise ConfigError(f"eval.tasks sst2_prompted few_shot={few}: the SST-2 train split has {len(demos)} rows")
    label_ids = [_ids(tok, s) for s in SST2_LABELS]
    if any(not ids for ids in label_ids):
        raise ConfigError("sst2_prompted: a label tokenises to nothing")
    pad = _pad_id(tok)
    out = []
    for i in range(n):
        sentence, label = rows[i]
        text = ""
        if few:
            # a fixed draw, not the run seed: runs of a multi-seed sweep share one evaluation set
            g = seeding.torch_rng(DEMO_SEED, "sst2-demos", i)
            pick = torch.randperm(len(demos), generator=g)[:few].tolist()
            text = "".join(f"{sst2_prompt(demos[j][0])}{SST2_LABELS[demos[j][1]]}\n\n" for j in pick)
        full = _ids(tok, text + sst2_prompt(sentence), special=True)
        prefix = _prefix("sst2_prompted", full, max(map(len, label_ids)), lm.arch.max_positions)
        feeds, targets = _pad_rows([_feed(full[-1], ids) for ids in label_ids], pad)
        out.append(Example("sst2_prompted", i, prefix, feeds, targets, label=int(label)))
    if not out:
        return [], {"source": sources["sst2_source"]}
    lens = [int(e.prefix.numel()) for e in out]
    info = {"source": sources["sst2_source"], "few_shot": few, "labels": list(SST2_LABELS),
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


def needle_parts(lm, lc: Mapping) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the needle line, the question (with its cue) and the answer."""
    tok = lm.tokenizer
    needle = _ids(tok, "\n" + NEEDLE_TEMPLATE.format(token=lc["needle_token"], value=lc["needle_value"]) + "\n")
    question = _ids(tok, "\n" + needle_question(lc))
    answer = _ids(tok, " " + lc["needle_value"])
    return needle, question, answer


def build_needle(lm, cfg, task_cfg: Mapping, sources: dict) -> tuple[list[Example], dict]:
    lc = cfg.data.long_context
    tok = lm.tokenizer
    ctx_len = int(lc.context_len)
    needle, question, answer = needle_parts(lm, lc)
    bos = _ids(tok, "", special=True)  # whatever the tokenizer puts in front of a prompt (often nothing)
    n_fill = ctx_len - len(needle) - len(bos)
    if n_fill < 0:
        raise ConfigError(f"data.long_context.context_len ({ctx_len}) is shorter than the needle ({len(needle)} tokens)")
    total = ctx_len + len(question) + len(answer)
    if total > lm.arch.max_positions:
        raise ConfigError(f"data.long_context.context_len: {ctx_len} context + {len(question)} question + "
                          f"{len(answer)} answer tokens exceed the model's {lm.arch.max_positions} positions")
    stream = sources["wikitext2_ids"]
    if stream.numel() < n_fill + 1:
        raise ConfigError(f"needle_long_context: the filler text has {stream.numel()} tokens, needs {n_fill}")
    at = int(round(float(lc.position_frac) * n_fill))
    out = []
    for i in range(int(task_cfg["num_examples"])):
        g = seeding.torch_rng(int(lc.seed), "needle-filler", i)
        start = int(torch.randint(0, stream.numel() - n_fill + 1, (1,), generator=g))
        fill = stream[start:start + n_fill].tolist()
        full = bos + fill[:at] + needle + fill[at:] + question
        prefix = _prefix("needle_long_context", full, len(answer), lm.arch.max_positions)
        feeds, targets = _pad_rows([_feed(full[-1], answer)], _pad_id(tok))
        span = (len(bos) + at, len(bos) + at + len(needle))
        out.append(Example("needle_long_context", i, prefix, feeds, targets,
                           meta={"needle_span": span, "filler_start": start}))
    info = {"source": sources["wikitext2_source"] + " (filler)", "seed": int(lc.seed), "context_len": ctx_len,
            "cache_len": int(out[0].prefix.numel()) if out else 0, "needle_tokens": len(needle),
            "needle_span": list(out[0].meta["needle_span"]) if out else None, "answer_tokens": len(answer),
            "needle": NEEDLE_TEMPLATE.format(token=lc.needle_token, value=lc.needle_value),
            "question": needle_question(lc),
            "scoring": "exact match by teacher forcing: every answer token must be the argmax "
                       "(= greedy decoding emits the answer's tokens first)"}
    return out, info


def check_needle(examples: Sequence[Example], time_mask: Callable[[int], torch.Tensor], where: str) -> None:
    """Raise unless every needle lies inside the corrupted (old) part of its cache."""
    for ex in examples:
        a, b = ex.meta["needle_span"]
        T = int(ex.prefix.numel())
        m = time_mask(T)
        if b > T or not bool(m[a:b].all()):
            covered = torch.nonzero(m).flatten()
            rng = f"[{int(covered[0])}, {int(covered[-1]) + 1})" if covered.numel() else "nothing"
            raise ConfigError(
                f"needle_long_context: the needle (tokens [{a}, {b}) of a {T}-token cache) is outside the "
                f"corrupted region {rng} ({where}); lower data.long_context.position_frac or the recent "
                "window, or raise data.long_context.context_len")


def score_needle(logits: torch.Tensor, ex: Example) -> float:
    mask = ex.targets != IGNORE
    pred = logits.argmax(-1)
    return 1.0 if bool((pred[mask] == ex.targets[mask]).all()) else 0.0


# --------------------------------------------------------------------------------------------------
# registry and aggregation


TASKS: dict[str, Task] = {
    "wikitext2_ppl": Task("wikitext2_ppl", "ppl", "perplexity", build_wikitext, score_wikitext),
    "sst2_prompted": Task("sst2_prompted", "accuracy", "accuracy", build_sst2, score_sst2),
    "needle_long_context": Task("needle_long_context", "accuracy", "accuracy", build_needle, score_needle),
}


def get_task(name: str) -> Task:
    return lookup("task", name, TASKS, key="eval.tasks")


def load_sources(cfg, lm, names: Sequence[str]) -> dict:
    """Load (once) the data the named tasks need; every entry records where it came from."""
    src: dict = {}
    d = cfg.data.to_dict()
    if {"wikitext2_ppl", "needle_long_context"} & set(names):
        text, src["wikitext2_source"] = data.load_text(d, "wikitext2")
        src["wikitext2_ids"] = data.tokenize_stream(lm.tokenizer, text)
    if "sst2_prompted" in names:
        src["sst2"], src["sst2_source"] = data.load_sst2(d, "sst2")
        if any(int(t.get("few_shot", 0) or 0) > 0 for t in cfg.eval.tasks if t["name"] == "sst2_prompted"):
            src["sst2_train"], src["sst2_train_source"] = data.load_sst2(d, "sst2_train")
    return src


def value_from_mean(kind: str, m):
    """Task value from the mean raw value (perplexity = exp(mean NLL); accuracy as is)."""
    return np.exp(m) if kind == "ppl" else m


def score_from_means(kind: str, m, m_clean_no_defense):
    """Normalised score in [0, 1] for accuracy; ppl_clean_no_defense / ppl for perplexity."""
    if kind == "ppl":
        return np.exp(np.asarray(m_clean_no_defense) - np.asarray(m))
    return m
