"""Device and dtype paths on an accelerator: the tiny models in bfloat16 on CUDA (skipped without one).

`scripts/gpu_check.sh` runs this file on a CUDA machine. CACHEMEDICPP_TEST_DEVICE=cpu runs the same checks on
the CPU (in bfloat16), which keeps them working on machines without a GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import cachemedicpp
from cachemedicpp import corruption, hf
from cachemedicpp.config import load_config
from conftest import ARCHS

DEVICE = os.environ.get("CACHEMEDICPP_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]


def _lm(tiny_model_dir, arch: str):
    return hf.load_model({"name": str(tiny_model_dir(arch)), "attn_implementation": "sdpa"}, DEVICE, "bfloat16")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hook_is_the_identity_in_bfloat16(tiny_model_dir, arch):
    lm = _lm(tiny_model_dir, arch)
    assert lm.device.type == torch.device(DEVICE).type and lm.dtype == torch.bfloat16
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0)).to(lm.device)
    with torch.no_grad(), hf.stock_attention(lm.model):
        ref = lm.model(ids).logits
    with torch.no_grad():
        out, cache = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=frozenset(range(lm.arch.num_layers))))
    assert torch.equal(out, ref)
    k, v = hf.get_kv(cache, 0)
    assert k.device.type == lm.device.type and k.dtype == torch.bfloat16


@pytest.mark.parametrize("ctype", ["gaussian", "dropout_zero", "orthogonal_rotation", "bitflip", "kv_quant"])
def test_corruption_of_a_bfloat16_cache_on_the_device(tiny_model_dir, ctype):
    lm = _lm(tiny_model_dir, "llama")
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1)).to(lm.device)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    layers = list(range(lm.arch.num_layers))
    clean = {l: hf.get_kv(cache, l) for l in layers}
    cor = corruption.Corruptor({"axes": {"N_recent": 8}}, layers, lm.arch.num_kv_heads, 0)
    kv, _ = cor.apply_cache(clean, ctype, 0.64, "cuda-check", 0)
    mask = cor.time_mask(40).to(lm.device)
    for l in layers:
        k, v = kv[l]
        assert k.device == clean[l][0].device and k.dtype == torch.bfloat16
        assert torch.equal(k[:, :, ~mask], clean[l][0][:, :, ~mask])  # the recent window is never touched
    assert any(not torch.equal(kv[l][0], clean[l][0]) or not torch.equal(kv[l][1], clean[l][1]) for l in layers)
    same, _ = cor.apply_cache(clean, ctype, 0.0, "cuda-check", 0)
    assert all(torch.equal(same[l][0], clean[l][0]) for l in layers)  # the identity at eps 0


def test_train_and_eval_on_the_device_in_bfloat16(tiny_cfg, tmp_path):
    from cachemedicpp import eval as ev
    from cachemedicpp import train

    cfg = load_config(data=tiny_cfg("llama", **{
        "device": DEVICE, "dtype": "bfloat16", "train.steps": 3, "train.save_every": 3,
        "eval.defenses": ["no_defense", "range_clamp", "oracle_drop", "checksum_recompute", "cachemedic"]}))
    rd = tmp_path / "run"
    assert train.run(cfg, rd) == 0 and ev.run(cfg, rd) == 0
    doc = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    aucs = doc["metrics"]["robustness_auc"]
    assert set(aucs) >= {"no_defense", "range_clamp", "oracle_drop", "checksum_recompute", "cachemedic"}
    assert all(isinstance(a, float) and a == a for a in aucs.values())


def test_protect_generates_what_the_stock_model_does(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(DEVICE).eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with cachemedicpp.protect(model, defense="no_defense"):
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
