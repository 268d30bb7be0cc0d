"""Integrity tags kept with a stored cache (cachemedicpp/integrity.py): recorded, verified, the failing blocks
recomputed; tag files recorded for another sequence or model, or damaged, refused; the command line's exit
codes."""

from __future__ import annotations

import json

import pytest
import torch

from cachemedicpp import hf, integrity, recompute
from cachemedicpp.config import ConfigError

PROMPT = ("The river keeps its own counsel through the valley, and the mill on its bank turns whenever the "
          "spring floods come down from the hills above the old stone bridge near the market square.")


def _prefill(lm, text: str = PROMPT):
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids, logits_to_keep=1)
    return ids, cache


def _damage(cache, layer: int, start: int, end: int, value: float = 0.0) -> None:
    k, v = hf.get_kv(cache, layer)
    k, v = k.clone(), v.clone()
    first = hf.cache_length(cache) - k.shape[2]
    k[:, :, start - first:end - first] = value
    hf.set_kv(cache, layer, k, v)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_damaged_block_fails_and_is_recomputed_to_the_clean_entries(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids, cache = _prefill(lm)
    T = ids.shape[1]
    assert T > 40
    tags = integrity.record(lm.model, cache, ids, block_size=8)
    assert integrity.verify(cache, tags, ids) == {}  # a clean cache passes, nothing to recompute
    assert integrity.repair(lm.model, cache, ids, tags) == {"blocks": [], "tokens": 0, "seconds": 0.0}
    clean = hf.clone_cache(cache)
    last = lm.arch.num_layers - 1
    _damage(cache, last, T - 12, T - 10)  # held by every layer, sliding ones included: block (T-12)//8
    assert integrity.verify(cache, tags, ids) == {last: [(T - 12) // 8]}
    done = integrity.repair(lm.model, cache, ids, tags)
    assert done["blocks"] == [(T - 12) // 8] and 0 < done["tokens"] < T
    assert integrity.verify(cache, tags, ids) == {}
    for l in range(lm.arch.num_layers):
        for got, want in zip(hf.get_kv(cache, l), hf.get_kv(clean, l)):
            assert (got - want).abs().max().item() <= recompute.TOLERANCE


def test_a_stale_block_with_intact_content_fails(tiny_lm):
    """An earlier prompt's entries at the same positions: internally intact, still a failing block."""
    lm = tiny_lm("llama")
    ids, cache = _prefill(lm)
    other_ids, other = _prefill(lm, PROMPT.replace("river", "canal").replace("mill", "forge"))
    tags = integrity.record(lm.model, cache, ids, block_size=8)
    n = min(ids.shape[1], other_ids.shape[1])
    k, v = (x.clone() for x in hf.get_kv(cache, 1))
    ko, vo = hf.get_kv(other, 1)
    k[:, :, 16:24], v[:, :, 16:24] = ko[:, :, 16:24], vo[:, :, 16:24]
    assert n > 24 and not torch.equal(k, hf.get_kv(cache, 1)[0])
    hf.set_kv(cache, 1, k, v)
    assert integrity.verify(cache, tags, ids) == {1: [2]}


def test_tag_files_round_trip_and_foreign_or_damaged_ones_are_refused(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    ids, cache = _prefill(lm)
    tags = integrity.record(lm.model, cache, ids, block_size=16)
    path = tags.save(tmp_path / "tags.json")
    back = integrity.load(path, lm.model, ids)
    assert torch.equal(back.tags, tags.tags) and back.block_size == 16
    other_ids = lm.tokenizer(PROMPT.replace("river", "canal"), return_tensors="pt").input_ids
    with pytest.raises(ConfigError, match=f"tag file {path}: recorded for another sequence"):
        integrity.load(path, lm.model, other_ids)
    with pytest.raises(ConfigError, match=f"tag file {path}: recorded for another model"):
        integrity.load(path, tiny_lm("gemma3").model, ids)
    text = path.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match=f"tag file {cut} is corrupted"):
        integrity.load(cut, lm.model, ids)
    edited = json.loads(text)
    edited["tags"][0][0] += 1
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match=f"tag file {bad}: its content does not match its sha256"):
        integrity.load(bad, lm.model, ids)
    with pytest.raises(ConfigError, match="tag file not found"):
        integrity.load(tmp_path / "missing.json", lm.model, ids)


def test_the_command_line_records_verifies_repairs_and_refuses(tiny_model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "kv"
    assert integrity.main(["record", "--model", model, "--prompt", str(prompt), "--out", str(out),
                           "--block-size", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cache.pt", "tags.json"]
    check = ["check", "--model", model, "--prompt", str(prompt), "--dir", str(out)]
    assert integrity.main(check) == 0
    stored = torch.load(out / "cache.pt", weights_only=True)
    stored["layers"][0][1][:, :, 9] = 0.0  # a lost value row at position 9: block 1 of layer 0
    torch.save(stored, out / "cache.pt")
    capsys.readouterr()
    assert integrity.main(check) == 1
    assert "failing: blocks [1]" in capsys.readouterr().out
    assert integrity.main(check + ["--repair"]) == 0
    assert integrity.main(check) == 0
    other = tmp_path / "other.txt"
    other.write_text(PROMPT.replace("river", "canal"))
    capsys.readouterr()
    assert integrity.main(["check", "--model", model, "--prompt", str(other), "--dir", str(out)]) == 2
    assert f"tag file {out / 'tags.json'}: recorded for another sequence" in capsys.readouterr().err
    (out / "tags.json").write_text((out / "tags.json").read_text()[:40])
    assert integrity.main(check) == 2
    assert f"tag file {out / 'tags.json'} is corrupted" in capsys.readouterr().err
    cache_bytes = (out / "cache.pt").read_bytes()
    assert integrity.main(check + ["--repair"]) == 2 and (out / "cache.pt").read_bytes() == cache_bytes


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tags_extended_while_decoding_equal_tags_recorded_afresh(tiny_lm, arch):
    """integrity.extend after each decoded token (blocks completing, sliding layers dropping positions) gives
    exactly the tags `record` computes on the grown cache."""
    lm = tiny_lm(arch)
    ids, cache = _prefill(lm)
    tags = integrity.record(lm.model, cache, ids, block_size=4)
    nxt = ids[:, -1:]
    for _ in range(9):
        with torch.no_grad():
            z, cache = hf.forward(lm.model, nxt, cache, logits_to_keep=1)
        ids = torch.cat([ids, nxt], dim=1)
        nxt = z[:, -1:].argmax(-1)
        tags = integrity.extend(tags, cache, ids)
        fresh = integrity.record(lm.model, cache, ids, block_size=4)
        assert tags.length == ids.shape[1] and tags.sequence == fresh.sequence
        assert torch.equal(tags.tags, fresh.tags)
    assert integrity.verify(cache, tags, ids) == {}
