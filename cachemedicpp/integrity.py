"""Integrity tags for a KV cache kept outside the model (a prefix cache on disk, offloaded pages): recorded
when the cache is written, verified when it is read, and the failing blocks recomputed from their tokens.

    tags = integrity.record(model, cache, input_ids)           # the cache as written; batch 1
    tags.save("prefix.tags.json")
    ...
    tags = integrity.load("prefix.tags.json", model, input_ids)  # refuses another sequence, model or a damaged file
    failed = integrity.verify(cache, tags)                     # {layer: [block ids]} that fail their tags
    integrity.repair(model, cache, input_ids, tags)            # those blocks recomputed, in place

A tag is `checksum_recompute`'s (defenses/checksum.py): per layer and block of `block_size` positions, a
checksum of the raw words of K and V plus a key of the sequence's tokens and the block's place, so a changed
word, a stale block and a block of another sequence all fail. A sliding-window layer's blocks that it no longer
holds whole carry the tag 0 and are not verified (their entries are gone). The tag file names the model (a fingerprint of
its config, dtype and input embeddings) and the sequence (a hash of its token ids): tags recorded for another
model or sequence are bad input, not a verification failure. On the command line:

    python -m cachemedicpp.integrity record --model embedded:smollm2-135m-instruct --prompt P.txt --out DIR
    python -m cachemedicpp.integrity check  --model embedded:smollm2-135m-instruct --prompt P.txt --dir DIR [--repair]

`record` prefills the prompt and writes DIR/cache.pt and DIR/tags.json; `check` verifies the stored cache (exit
0 when every block passes, 1 when some fail) and with `--repair` recomputes the failing blocks and rewrites the
cache (exit 0). A missing, truncated or foreign file is exit 2 naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from cachemedicpp import hf, recompute
from cachemedicpp.config import ConfigError
from cachemedicpp.defenses.checksum import block_checksums, block_tags, place_keys
from cachemedicpp.fileio import atomic_torch_save, atomic_write_json, load_checkpoint

FORMAT = "cachemedicpp.tags/1"
CACHE_FORMAT = "cachemedicpp.kv/1"
DEFAULT_BLOCK_SIZE = 16


def fingerprint(model) -> str:
    """16 hex digits naming a model's cache: its config (architecture, sizes), dtype and input embeddings."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    w = model.get_input_embeddings().weight.detach()
    h.update(str(w.dtype).encode() + str(tuple(w.shape)).encode())
    h.update(w.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def sequence_hash(input_ids: Tensor) -> str:
    """16 hex digits naming a sequence of token ids."""
    ids = _ids(input_ids)
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()[:16]


def _ids(input_ids: Tensor) -> Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] != 1:
        raise ValueError(f"integrity: one sequence at a time (input_ids of shape {tuple(ids.shape)})")
    return ids.reshape(-1).to(device="cpu", dtype=torch.int64)


@dataclass
class Tags:
    """The tags of one cache: int64 [layers, blocks], with what they were recorded for."""

    model: str
    sequence: str
    length: int
    block_size: int
    tags: Tensor

    def to_dict(self) -> dict:
        body = {"model": self.model, "sequence": self.sequence, "length": self.length,
                "block_size": self.block_size, "tags": self.tags.tolist()}
        return {"format": FORMAT, **body, "sha256": _digest(body)}

    def save(self, path: str | Path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _layer_tags(cache, layer: int, tokens: Tensor, block_size: int) -> Tensor:
    k, v = hf.get_kv(cache, layer)
    if k.shape[0] != 1:
        raise ValueError(f"integrity: batch-1 caches only (layer {layer} holds a batch of {k.shape[0]})")
    T = int(tokens.numel())
    pos = torch.arange(T - k.shape[2], T)  # a sliding-window layer holds the last positions
    return _unheld(block_tags(k, v, pos, block_size, tokens)[0].cpu(), T - k.shape[2], block_size)


def _unheld(tags: Tensor, first: int, block_size: int) -> Tensor:
    """`tags` with 0 (not verified) for the blocks a sliding-window layer no longer holds whole (positions
    before `first`): their entries are gone, and what is left of them changes as the window moves."""
    tags[..., :-(-first // block_size)] = 0
    return tags


def _check_cache(cache, tokens: Tensor, num_layers: int) -> None:
    if hf.cache_layers(cache) != num_layers or hf.cache_length(cache) != tokens.numel():
        raise ValueError(f"integrity: the cache holds {hf.cache_layers(cache)} layers and {hf.cache_length(cache)} "
                         f"positions, the model has {num_layers} layers and the sequence {tokens.numel()} tokens")


def record(model, cache, input_ids: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> Tags:
    """The tags of `cache`, the K/V `model` stored for the sequence `input_ids` (batch 1), as it is now."""
    tokens = _ids(input_ids)
    _check_cache(cache, tokens, hf.cache_layers(cache))
    tags = torch.stack([_layer_tags(cache, l, tokens, int(block_size)) for l in range(hf.cache_layers(cache))])
    return Tags(fingerprint(model), sequence_hash(tokens), int(tokens.numel()), int(block_size), tags)


def extend(tags: Tags, cache, input_ids: Tensor) -> Tags:
    """The tags of `cache` after it grew from `tags.length` positions to the sequence `input_ids` (decoding):
    the recorded tags of the blocks complete before kept, the rest (the last, partial block on) computed. The
    cost per call is one checksum of the new entries per layer and one place key per new block."""
    tokens, bs = _ids(input_ids), tags.block_size
    T, first = int(tokens.numel()), tags.length // bs
    _check_cache(cache, tokens, tags.tags.shape[0])
    n = (T + bs - 1) // bs
    keys = place_keys(tokens, n, bs)[first:]
    new = []
    for l in range(tags.tags.shape[0]):
        k, v = hf.get_kv(cache, l)
        held = T - k.shape[2]
        s = max(first * bs, held)
        sums = block_checksums(k[:, :, s - held:], v[:, :, s - held:], torch.arange(s, T), bs)[0, first:].cpu()
        new.append(sums + keys)
    grown = torch.cat([tags.tags[:, :first], torch.stack(new)], dim=1)
    for l in range(grown.shape[0]):
        _unheld(grown[l], T - hf.held_length(cache, l), bs)
    return Tags(tags.model, sequence_hash(tokens), T, bs, grown)


def from_dict(d, model, input_ids: Tensor, where: str = "tags") -> Tags:
    """Tags read from `to_dict`'s form, checked against `model` and the sequence `input_ids`: anything else is
    bad input (ConfigError naming `where`)."""
    keys = ("format", "model", "sequence", "length", "block_size", "tags", "sha256")
    if not isinstance(d, dict) or any(k not in d for k in keys) or d["format"] != FORMAT:
        raise ConfigError(f"{where}: not a {FORMAT} tag file (a truncated or foreign file)")
    body = {k: d[k] for k in keys if k not in ("format", "sha256")}
    if d["sha256"] != _digest(body):
        raise ConfigError(f"{where}: its content does not match its sha256 (a damaged tag file)")
    tokens = _ids(input_ids)
    if d["model"] != fingerprint(model):
        raise ConfigError(f"{where}: recorded for another model (fingerprint {d['model']}, this model's "
                          f"{fingerprint(model)})")
    if d["sequence"] != sequence_hash(tokens) or int(d["length"]) != tokens.numel():
        raise ConfigError(f"{where}: recorded for another sequence ({d['length']} tokens, hash {d['sequence']}; "
                          f"this one: {tokens.numel()} tokens, hash {sequence_hash(tokens)})")
    tags = torch.tensor(d["tags"], dtype=torch.int64)
    bs = int(d["block_size"])
    if bs < 1 or tags.dim() != 2 or tags.shape[1] != (tokens.numel() + bs - 1) // bs:
        raise ConfigError(f"{where}: tags of shape {tuple(tags.shape)} do not cover {tokens.numel()} positions "
                          f"in blocks of {bs}")
    return Tags(d["model"], d["sequence"], int(d["length"]), bs, tags)


def load(path: str | Path, model, input_ids: Tensor) -> Tags:
    """The tag file `path`, refused (ConfigError naming it) when missing, damaged, or recorded for another
    model or sequence."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tag file not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"tag file {path} is corrupted or truncated ({e}); record the tags again") from None
    return from_dict(d, model, input_ids, where=f"tag file {path}")


def verify(cache, tags: Tags, input_ids: Tensor) -> dict[int, list[int]]:
    """{layer: block ids} of the blocks of `cache` whose tag differs from the recorded one (empty: intact)."""
    tokens = _ids(input_ids)
    if tags.tags.shape[0] != hf.cache_layers(cache):
        raise ValueError(f"integrity: tags of {tags.tags.shape[0]} layers for a cache of {hf.cache_layers(cache)}")
    _check_cache(cache, tokens, tags.tags.shape[0])
    out = {}
    for l in range(hf.cache_layers(cache)):
        bad = (_layer_tags(cache, l, tokens, tags.block_size) != tags.tags[l]).nonzero().flatten().tolist()
        if bad:
            out[l] = bad
    return out


def repair(model, cache, input_ids: Tensor, tags: Tags) -> dict:
    """Recompute, in place, the blocks of `cache` that fail their tags (in every layer, in position order:
    recompute.recompute_blocks) and verify again. {"blocks": failing block ids, "tokens": forward tokens,
    "seconds"}; a block still failing afterwards is a RuntimeError (the model is not the one that wrote it)."""
    failed = verify(cache, tags, input_ids)
    blocks = sorted(set().union(*failed.values())) if failed else []
    if not blocks:
        return {"blocks": [], "tokens": 0, "seconds": 0.0}
    lm = _loaded(model)
    stored = {l: hf.get_kv(cache, l) for l in range(lm.arch.num_layers)}
    run = recompute.recompute_blocks(lm, _ids(input_ids).to(lm.device), stored, blocks, tags.block_size)
    for l, (k, v) in run.kv.items():
        hf.set_kv(cache, l, k, v)
    still = verify(cache, tags, input_ids)
    if still:
        raise RuntimeError(f"integrity: blocks {sorted(set().union(*still.values()))} still fail after "
                           f"recomputation (the model differs from the one that wrote the cache)")
    return {"blocks": blocks, "tokens": int(run.tokens), "seconds": float(run.seconds)}


def _loaded(model) -> hf.LoadedModel:
    p = next(model.parameters())
    return hf.LoadedModel(model, None, hf.arch_info(model), str(getattr(model, "name_or_path", "")), p.device,
                          p.dtype, 0.0)


# --------------------------------------------------------------------------------------------------
# the cache on disk and the command line


def save_cache(path: str | Path, cache, input_ids: Tensor) -> Path:
    tokens = _ids(input_ids)
    layers = [tuple(x.detach().cpu() for x in hf.get_kv(cache, l)) for l in range(hf.cache_layers(cache))]
    atomic_torch_save(path, {"format": CACHE_FORMAT, "sequence": sequence_hash(tokens), "length": tokens.numel(),
                             "layers": layers})
    return Path(path)


def load_cache(path: str | Path, model, input_ids: Tensor):
    """The cache saved by `save_cache` for the sequence `input_ids`, on the model's device (a DynamicCache)."""
    d = load_checkpoint(path, what="cache file")
    tokens = _ids(input_ids)
    if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT or not isinstance(d.get("layers"), list):
        raise ConfigError(f"cache file {path}: not a {CACHE_FORMAT} file")
    if d.get("sequence") != sequence_hash(tokens):
        raise ConfigError(f"cache file {path}: written for another sequence ({d.get('length')} tokens)")
    layers = d["layers"]
    n = hf.arch_info(model).num_layers
    if len(layers) != n:
        raise ConfigError(f"cache file {path}: {len(layers)} layers, the model has {n}")
    p = next(model.parameters())
    return hf.cache_from_kv(model, {l: (k.to(p.device), v.to(p.device)) for l, (k, v) in enumerate(layers)},
                            int(tokens.numel()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.integrity",
                                description="Record integrity tags of a prompt's KV cache, or verify (and repair) "
                                            "a stored one.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("record", "prefill the prompt; write DIR/cache.pt and DIR/tags.json"),
                           ("check", "verify DIR/cache.pt against DIR/tags.json (exit 1 when a block fails)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help="model.name (hub id, folder, GGUF file or embedded:<name>)")
        s.add_argument("--prompt", required=True, help="text file of the prompt")
        s.add_argument("--device", default="auto")
        s.add_argument("--dtype", default="float32")
        if name == "record":
            s.add_argument("--out", required=True, help="folder to write cache.pt and tags.json to")
            s.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
        else:
            s.add_argument("--dir", required=True, help="folder holding cache.pt and tags.json")
            s.add_argument("--tags", default=None, help="tag file (default: DIR/tags.json)")
            s.add_argument("--repair", action="store_true", help="recompute the failing blocks and rewrite the cache")
    return p


def _prompt_ids(lm: hf.LoadedModel, path: str) -> Tensor:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"prompt file not found: {f}")
    ids = lm.tokenizer(f.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ConfigError(f"prompt file {f} holds no tokens")
    return ids.to(lm.device)


def run(args: argparse.Namespace) -> int:
    if args.command == "record" and args.block_size < 1:
        raise ConfigError(f"--block-size must be >= 1, got {args.block_size}")
    lm = hf.load_model({"name": args.model}, device=args.device, dtype=args.dtype)
    ids = _prompt_ids(lm, args.prompt)
    if args.command == "record":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            _, cache = hf.forward(lm.model, ids, logits_to_keep=1)
        save_cache(out / "cache.pt", cache, ids)
        tags = record(lm.model, cache, ids, args.block_size).save(out / "tags.json")
        print(f"recorded {ids.numel()} positions, {hf.cache_layers(cache)} layers: {out / 'cache.pt'}, {tags}")
        return 0
    d = Path(args.dir)
    tags = load(args.tags or d / "tags.json", lm.model, ids)
    cache = load_cache(d / "cache.pt", lm.model, ids)
    failed = verify(cache, tags, ids)
    if not failed:
        print(f"intact: {tags.tags.numel()} tags verified ({ids.numel()} positions, blocks of {tags.block_size})")
        return 0
    blocks = sorted(set().union(*failed.values()))
    print(f"failing: blocks {blocks} of {tags.tags.shape[1]} in {len(failed)} of {tags.tags.shape[0]} layers")
    if not args.repair:
        print("rerun with --repair to recompute them")
        return 1
    t0 = time.perf_counter()
    done = repair(lm.model, cache, ids, tags)
    save_cache(d / "cache.pt", cache, ids)
    print(f"repaired: {done['tokens']} tokens recomputed in {time.perf_counter() - t0:.2f} s; all tags verify; "
          f"{d / 'cache.pt'} rewritten")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from cachemedicpp.cli import guarded, setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    return guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
