"""Tokenisation exactly as lm-eval's stock HF backend does it (models/huggingface.py, api/model.py), shared by
the task adapter and the backend so that both ways in score the same tokens."""

from __future__ import annotations

from typing import Sequence

from lm_eval.models.utils import has_bos_prefix, resolve_max_length

from cachemedicpp.schema import ConfigError



def prefix_token_id(tok) -> int:
    return int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)


def tok_encode(tok, string: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's own special tokens, unless the string
    already starts with the prefix token's text."""
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
