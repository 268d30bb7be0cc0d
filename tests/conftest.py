"""Shared fixtures: tiny random models (GPT-2, GQA Llama, Gemma-3-like) saved to disk and loaded
through the same `hf.load_model` path as real models, plus small configs for fast pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cachemedicpp import ROOT  # noqa: E402

ARCHS = ("gpt2", "llama", "gemma3")


def _tokenizer_text() -> str:
    parts = []
    for name in ("wikitext2_eval.txt", "train_corpus.txt", "sst2_train.tsv"):
        p = ROOT / "data" / "offline" / name
        if p.is_file():
            parts.append(p.read_text(encoding="utf-8")[:200_000])
    parts.append("Review: a fine film\nSentiment: positive negative NEEDLE: the_key = violet-7. Question: What is")
    return "\n".join(parts)


@pytest.fixture
def one_thread():
    """Pin torch to one thread: tiny models gain nothing from thread pools, a busy machine makes them
    crawl, and subprocesses pinned the same way compute the same bits (bit-identical resume checks)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from cachemedicpp import hf

    root = tmp_path_factory.mktemp("tiny_models")
    tok_dir = hf.build_tiny_tokenizer(_tokenizer_text(), root / "tokenizer", vocab_size=512)
    for arch in ARCHS:
        hf.build_tiny_model(arch, root / arch, tok_dir, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    def get(arch: str = "llama") -> Path:
        return tiny_root / arch

    return get


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from cachemedicpp import hf

    cache: dict = {}

    def get(arch: str = "llama", dtype: str = "float32", attn: str = "eager"):
        key = (arch, dtype, attn)
        if key not in cache:
            cache[key] = hf.load_model({"name": str(tiny_model_dir(arch)), "attn_implementation": attn},
                                       "cpu", dtype)
        return cache[key]

    return get


def calibrated_tiny(model_dir: Path, lm, **overrides):
    """(config, model, calibration) of a tiny run config with `overrides`, the calibration built on one thread
    (a module-scoped fixture's: built once, the same bits on every machine)."""
    import torch

    from cachemedicpp import calibration
    from cachemedicpp.config import load_config

    cfg = load_config(data=tiny_config(model_dir, **overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cfg, lm, calibration.build(cfg, lm)
    finally:
        torch.set_num_threads(threads)


def tiny_config(model_dir: Path, **overrides) -> dict:
    """A small but complete run config on a tiny model (all tasks, offline data, few steps)."""
    from cachemedicpp.config import apply_overrides

    base = {
        "seed": 0,
        "device": "cpu",
        "model": {"name": str(model_dir)},
        "repair": {"protect_layers": [0, 1], "rank": 4},
        "corruption": {"axes": {"N_recent": 8}},
        "train": {"steps": 6, "prefix_len": 24, "cont_len": 8, "log_every": 2, "save_every": 3},
        "eval": {
            "tasks": [{"name": "wikitext2_ppl", "num_examples": 3}, {"name": "sst2_prompted", "num_examples": 4},
                      {"name": "needle_long_context", "num_examples": 2}],
            "corruption_eval": {"eps": [0.0, 0.16], "types": ["gaussian", "contiguous_overwrite"]},
            "max_seq_len": 48, "cont_len": 8, "bootstrap_samples": 50,
            # the reference grid; tests/test_fair_benchmark.py covers the calibrated baselines and oracle_drop
            "defenses": ["no_defense", "reset_clear", "smoothing", "masking_dropout", "clipping_renorm", "cachemedic"],
            "validation": {"num_examples": 1},
        },
        "stability": {"num_prompts": 2, "prompt_len": 24, "num_directions": 2, "topk_logits": 50, "N_recent": 8},
        "data": {"use_offline": True, "long_context": {"context_len": 40}},
    }
    return apply_overrides(base, overrides)


@pytest.fixture
def tiny_cfg(tiny_model_dir):
    def make(arch: str = "llama", **overrides) -> dict:
        return tiny_config(tiny_model_dir(arch), **overrides)

    return make


def pause_after(monkeypatch, run_dir: Path, k: int) -> None:
    """Make a training run write control/pause.request right after step k."""
    from cachemedicpp import train

    orig = train.Trainer.step

    def step(self, s):
        out = orig(self, s)
        if s == k:
            (run_dir / "control" / "pause.request").write_text("")
        return out

    monkeypatch.setattr(train.Trainer, "step", step)


@pytest.fixture(scope="session")
def lmeval_task_dir(tmp_path_factory) -> Path:
    """The lm-eval test tasks of tests/data/lmeval with absolute data_files (lm-eval resolves relative ones
    against the working directory)."""
    import yaml

    data = ROOT / "tests" / "data" / "lmeval"
    out = tmp_path_factory.mktemp("lmeval_tasks")
    for y in data.glob("*.yaml"):
        doc = yaml.safe_load(y.read_text())
        doc["dataset_kwargs"]["data_files"] = {k: str(data / v) for k, v in doc["dataset_kwargs"]["data_files"].items()}
        (out / y.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def write_cfg(folder: Path, data: dict) -> Path:
    """`data` as `folder/cfg.yaml` (the folder made), the path returned."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
