"""Text sources: Hugging Face `datasets` when reachable (and not `data.use_offline`), otherwise the
offline files in `data/offline/` (original text written for this project) or user files named in
`data.offline_paths`. Every loader returns the data together with a description of its source.

`data.source` makes the choice explicit: `hub` (an unreachable dataset is bad input, exit 2, never a
silent switch to the offline files), `offline`, or `auto` (the hub when reachable, else the offline
files; the default). `data.use_offline: true`, the older spelling of `offline`, makes `auto` offline.

Training text never comes from an evaluation split: the hub path trains on wikitext-103 *train*,
the offline path on `train_corpus.txt`, a separate corpus from the evaluation prose.

The evaluation data is cut into three disjoint splits (`SPLITS`, `split_range`): the token stream of the
evaluation text, the SST-2 evaluation rows and an lm-eval task's documents each give their first 60 % to
`test` (the test grid, stability's prompts), the next 20 % to `validation` (a run's own validation grid,
which picks its baseline) and the last 20 % to `selection` (the examples settings and operator families are
chosen on, across runs). Every example of a split, its needle filler included, is cut from that split's
range only, so a setting chosen on the selection split has never seen a test or validation text.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Mapping

import torch

from cachemedicpp.config import ConfigError, resolve_path

log = logging.getLogger("cachemedicpp")

HUB = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "train_corpus": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train"),
    "sst2": ("nyu-mll/glue", "sst2", "validation"),
    "sst2_train": ("nyu-mll/glue", "sst2", "train"),
}


def _offline_path(data_cfg: Mapping, key: str) -> Path:
    p = resolve_path(data_cfg["offline_paths"][key])
    if not p.is_file():
        raise ConfigError(f"data.offline_paths.{key}: file not found: {p}")
    return p


def _from_hub(key: str):
    from datasets import load_dataset

    repo, name, split = HUB[key]
    return load_dataset(repo, name, split=split), f"hf:{repo}/{name}:{split}"


SOURCES = ("hub", "offline", "auto")

# [first, last) fraction of the evaluation data each split owns, in stream order
SPLITS = {"test": (0.0, 0.6), "validation": (0.6, 0.8), "selection": (0.8, 1.0)}


def split_range(n: int, split: str) -> tuple[int, int]:
    """[lo, hi) of n items (tokens of the evaluation stream, rows, documents) that `split` owns."""
    if split not in SPLITS:
        raise ConfigError(f"evaluation split {split!r} is not one of {list(SPLITS)}")
    lo, hi = SPLITS[split]
    return int(n * lo), int(n * hi)


def source_mode(data_cfg: Mapping) -> str:
    """data.source, with `data.use_offline: true` as the older spelling of `offline`."""
    src, offline = data_cfg.get("source") or "auto", bool(data_cfg.get("use_offline", False))
    if src not in SOURCES:
        raise ConfigError(f"data.source: {src!r} is not one of {list(SOURCES)}")
    if offline and src == "hub":
        raise ConfigError("data.source: hub contradicts data.use_offline: true (its older spelling of offline); "
                          "drop one of them")
    return "offline" if offline else src


def _try_hub(data_cfg: Mapping, key: str):
    mode = source_mode(data_cfg)
    if mode == "offline":
        return None
    try:
        return _from_hub(key)
    except Exception as e:  # no network, no cache, renamed dataset
        repo, name, split = HUB[key]
        if mode == "hub":
            raise ConfigError(f"data.source: hub, but dataset {repo}/{name}:{split} ({key}) is unreachable "
                              f"({type(e).__name__}: {str(e)[:200]}); prefetch it (python -m cachemedicpp.prefetch "
                              "--config ...) or set data.source: auto / offline") from None
        log.warning("dataset %s unavailable from the hub (%s); using the offline file", key, type(e).__name__)
        return None


def load_text(data_cfg: Mapping, key: str, max_chars: int | None = None) -> tuple[str, str]:
    """Plain text for `wikitext2` (evaluation) or `train_corpus` (training)."""
    hub = _try_hub(data_cfg, key)
    if hub is not None:
        ds, source = hub
        text, n = [], 0
        for row in ds:
            text.append(row["text"])
            n += len(row["text"])
            if max_chars and n >= max_chars:
                break
        return "".join(text), source
    p = _offline_path(data_cfg, key)
    text = p.read_text(encoding="utf-8")
    return (text[:max_chars] if max_chars else text), f"offline:{data_cfg['offline_paths'][key]}"


def load_sst2(data_cfg: Mapping, key: str = "sst2") -> tuple[list[tuple[str, int]], str]:
    """(sentence, label) pairs, label 1 = positive, for `sst2` (evaluation) or `sst2_train` (demos)."""
    hub = _try_hub(data_cfg, key)
    if hub is not None:
        ds, source = hub
        return [(r["sentence"].strip(), int(r["label"])) for r in ds], source
    p = _offline_path(data_cfg, key)
    rows = []
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"sentence", "label"} <= set(reader.fieldnames):
            raise ConfigError(f"data.offline_paths.{key}: {p} needs a header 'sentence<TAB>label'")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append((r["sentence"].strip(), int(r["label"])))
            except (TypeError, ValueError):
                raise ConfigError(f"data.offline_paths.{key}: {p} line {i}: label must be 0 or 1") from None
    return rows, f"offline:{data_cfg['offline_paths'][key]}"


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def fixed_windows(tokens: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of `length` tokens (the wikitext protocol)."""
    n = tokens.numel() // length
    if n == 0:
        raise ConfigError(f"text has {tokens.numel()} tokens, fewer than one window of {length}")
    return [tokens[i * length:(i + 1) * length] for i in range(min(n, count))]
