"""`cachemedicpp.protect`: a defense inside the user's own `model.generate`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import cachemedicpp
from cachemedicpp import ROOT, hf, repair
from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.fileio import atomic_torch_save
from cachemedicpp.rundir import RunDir


def _stock(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _trained_run(tiny_cfg, arch: str, root: Path, scale: float = 0.3) -> Path:
    """A run dir with a config and a repair checkpoint whose correction is far from the identity."""
    cfg = load_config(data=tiny_cfg(arch))
    rd = RunDir(root / f"run_{arch}").ensure()
    rd.bind_config(cfg, "test", None)
    model_arch = hf.load_model(cfg.model.to_dict(), "cpu").arch
    op = repair.build_operator(cfg.repair.to_dict(), model_arch, cfg.seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    atomic_torch_save(rd.path / "checkpoints" / "repair_step_1.pt",
                      repair.repair_checkpoint_payload(op, 1, cfg.hash, cfg.repair.to_dict()))
    return rd.path


def _generate(model, ids, **kw):
    torch.manual_seed(0)
    return model.generate(ids, max_new_tokens=10, pad_token_id=0, **kw)


def test_no_defense_generates_what_the_stock_model_does(tiny_model_dir):
    model, tok = _stock(tiny_model_dir("llama"))
    tok.padding_side = "left"
    ids = tok(["The river runs past the old mill", "A fine film"], return_tensors="pt", padding=True)
    for kw in ({"do_sample": False}, {"do_sample": True, "top_k": 20}):
        ref = _generate(model, ids.input_ids, attention_mask=ids.attention_mask, **kw)
        with cachemedicpp.protect(model, defense="no_defense"):
            assert model.config._attn_implementation == hf.HOOK_NAMES["sdpa"]
            got = _generate(model, ids.input_ids, attention_mask=ids.attention_mask, **kw)
        assert torch.equal(got, ref)
    assert model.config._attn_implementation == "sdpa"  # the model's own implementation again


def test_the_operator_runs_inside_generate_and_changes_it(tiny_cfg, tiny_model_dir, tmp_path):
    run = _trained_run(tiny_cfg, "llama", tmp_path)
    model, tok = _stock(tiny_model_dir("llama"))
    ids = tok("The river runs past the old mill", return_tensors="pt").input_ids
    ref = model(ids).logits
    with cachemedicpp.protect(model, run_dir=run, defense="cachemedic"):
        got = model(ids).logits
        out = _generate(model, ids, do_sample=False)
    assert not torch.allclose(got, ref)  # the (far from identity) correction acts in attention
    assert out.shape == (1, ids.shape[1] + 10)
    assert torch.equal(model(ids).logits, ref)  # and stops acting on exit


def test_foreign_or_missing_runs_and_unsupported_defenses_are_refused(tiny_cfg, tiny_model_dir, tmp_path):
    model, _ = _stock(tiny_model_dir("llama"))
    with pytest.raises(ConfigError, match="run_dir"):
        cachemedicpp.protect(model, defense="cachemedic").__enter__()
    with pytest.raises(ConfigError, match="config_resolved.yaml"):
        cachemedicpp.protect(model, run_dir=tmp_path / "nothing").__enter__()
    with pytest.raises(ConfigError, match="supported"):
        cachemedicpp.protect(model, defense="range_clamp").__enter__()
    other = _trained_run(tiny_cfg, "gpt2", tmp_path)  # trained on another model
    with pytest.raises(ConfigError, match="trained on model.name"):
        cachemedicpp.protect(model, run_dir=other).__enter__()
    assert model.config._attn_implementation == "sdpa"
    run = _trained_run(tiny_cfg, "llama", tmp_path / "damaged")
    (run / "checkpoints" / "repair_step_1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="repair_step_1.pt"):
        cachemedicpp.protect(model, run_dir=run).__enter__()


def test_the_readme_example_runs(tiny_cfg, tiny_model_dir, tmp_path, capsys):
    """The README's Python example as written, with the tiny model and a tiny run dir in place of the
    embedded model and runs/quickstart."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10 and "cachemedicpp.protect(" in block
    run = _trained_run(tiny_cfg, "llama", tmp_path)
    code = block.replace('"embedded:smollm2-135m-instruct"', repr(str(tiny_model_dir("llama"))))
    code = code.replace('"runs/quickstart"', repr(str(run)))
    assert code != block
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
