"""Contract tests for the attention hook, per architecture (GPT-2, GQA Llama, Gemma-3-like)."""

from __future__ import annotations

import pytest
import torch

from cachemedicpp import hf
from cachemedicpp.config import ConfigError

ARCHS = ["gpt2", "llama", "gemma3"]


def _ids(lm, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(lm.tokenizer) - 1, (1, n), generator=g)


def _stock(lm, ids):
    m = lm.model
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return m(input_ids=ids).logits
    finally:
        m.set_attn_implementation(hf.HOOK_NAMES["eager"])


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_hook_bit_identical_to_stock_eager(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm)
    ref = _stock(lm, ids)
    plan = hf.HookPlan(layers=frozenset(range(lm.arch.num_layers)), on_read=lambda l, k, v: (k, v),
                       record=lambda *a: None)
    with torch.no_grad():
        out, _ = hf.forward(lm.model, ids, plan=plan)
    assert torch.equal(out, ref)
    assert all(plan.calls[l] == 1 for l in range(lm.arch.num_layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_uncached(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm, 40)
    with torch.no_grad():
        full, _ = hf.forward(lm.model, ids)
        a, cache = hf.forward(lm.model, ids[:, :25])
        b, cache = hf.forward(lm.model, ids[:, 25:30], cache)
        c, cache = hf.forward(lm.model, ids[:, 30:], cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-5)
    assert hf.cache_length(cache) == 40


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_mask_is_honoured(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm, 30)
    other = ids.clone()
    other[:, 20:] = (other[:, 20:] + 7) % (len(lm.tokenizer) - 1)
    with torch.no_grad():
        a, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=frozenset({0})))
        b, _ = hf.forward(lm.model, other, plan=hf.HookPlan(layers=frozenset({0})))
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.equal(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("arch", ARCHS)
def test_on_read_perturbation_changes_logits_but_not_the_cache(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm, 30)
    last = lm.arch.num_layers - 1  # a full-attention layer on every arch
    with torch.no_grad():
        base, cache = hf.forward(lm.model, ids[:, :24])
        stored = [x.clone() for x in hf.get_kv(cache, last)]
        ref, _ = hf.forward(lm.model, ids[:, 24:], hf.clone_cache(cache))
        plan = hf.HookPlan(layers=frozenset({last}), on_read=lambda l, k, v: (k, v * 3.0))
        out, cache2 = hf.forward(lm.model, ids[:, 24:], cache, plan)
    assert (out - ref).abs().max() > 1e-4
    k2, v2 = hf.get_kv(cache2, last)
    assert torch.equal(v2[:, :, :24], stored[1])  # on-read edits are never stored


@pytest.mark.parametrize("arch", ARCHS)
def test_at_rest_edit_persists_and_acts(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm, 30)
    last = lm.arch.num_layers - 1
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :24])
        ref, _ = hf.forward(lm.model, ids[:, 24:], hf.clone_cache(cache))
        k, v = hf.get_kv(cache, last)
        hf.set_kv(cache, last, k, torch.zeros_like(v))
        out, cache = hf.forward(lm.model, ids[:, 24:], cache)
    assert (out - ref).abs().max() > 1e-4
    assert torch.equal(hf.get_kv(cache, last)[1][:, :, :24], torch.zeros_like(v))
    with pytest.raises(ValueError):
        hf.set_kv(cache, last, k[:, :, :3], v[:, :, :3])


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_hook_parameter_not_model(tiny_lm, arch):
    lm = tiny_lm(arch)
    ids = _ids(lm, 20)
    scale = torch.nn.Parameter(torch.ones(()))
    plan = hf.HookPlan(layers=frozenset({0}), on_read=lambda l, k, v: (k * scale, v * scale))
    out, _ = hf.forward(lm.model, ids, plan=plan)
    out.float().pow(2).mean().backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_repeat_cache_rows_are_copies(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(lm, 20)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    rep = hf.repeat_cache(cache, 3)
    k, _ = hf.get_kv(rep, 0)
    assert k.shape[0] == 3 and torch.equal(k[1], hf.get_kv(cache, 0)[0][0])
    assert hf.get_kv(cache, 0)[0].shape[0] == 1  # the original is untouched


def test_arch_info(tiny_lm):
    g = tiny_lm("gemma3").arch
    assert (g.num_kv_heads, g.num_heads, g.sliding_layers, g.sliding_window) == (1, 4, (0, 1), 16)
    l = tiny_lm("llama").arch
    assert (l.num_layers, l.num_kv_heads, l.group_size) == (3, 2, 2)


def test_sdpa_base_kernel_matches_eager(tiny_lm):
    eager, sdpa = tiny_lm("llama"), tiny_lm("llama", attn="sdpa")
    ids = _ids(eager, 30)
    with torch.no_grad():
        a, _ = hf.forward(eager.model, ids, plan=hf.HookPlan(layers=frozenset({0, 1, 2})))
        b, _ = hf.forward(sdpa.model, ids, plan=hf.HookPlan(layers=frozenset({0, 1, 2})))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_model_paths_are_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        hf.load_model({"name": str(tmp_path)}, "cpu")
    with pytest.raises(ConfigError, match="not found"):
        hf.load_model({"name": str(tmp_path / "m.gguf")}, "cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        hf.load_model({"name": "./missing/model"}, "cpu")
    with pytest.raises(ConfigError, match="unknown embedded"):
        hf.load_model({"name": "embedded:nope"}, "cpu")


def test_dtype_decisions_on_cpu():
    notes: list[str] = []
    assert hf.resolve_dtype("float16", torch.device("cpu"), notes) == torch.float32 and notes
    assert hf.resolve_dtype("bfloat16", torch.device("cpu"), []) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            hf.resolve_device("cuda")


@pytest.mark.slow
def test_embedded_model_loads_fast_and_hook_is_identity():
    lm = hf.load_model({"name": "embedded:smollm2-135m-instruct"}, "cpu", "float32")
    assert (lm.arch.num_layers, lm.arch.num_heads, lm.arch.num_kv_heads, lm.arch.head_dim) == (30, 9, 3, 64)
    again = hf.load_model({"name": "embedded:smollm2-135m-instruct"}, "cpu", "float32")
    assert again.load_seconds < 10 and again.source == lm.source  # the converted folder is reused
    ids = lm.tokenizer("The river runs past the old mill and into the", return_tensors="pt").input_ids
    ref = _stock(lm, ids)
    with torch.no_grad():
        out, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=frozenset(range(30))))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_entries_have_no_influence(tiny_lm, arch, kind):
    # what attention is told to ignore may hold anything: the logits do not move
    lm = tiny_lm(arch)
    lm.model.set_attn_implementation(hf.HOOK_NAMES[kind])
    try:
        ids = _ids(lm, n=24)
        layers = frozenset(range(lm.arch.num_layers))
        H = lm.arch.num_kv_heads

        def drop(layer, T):
            d = torch.zeros(1, H, T, dtype=torch.bool)
            d[:, :, 5:9] = True  # positions 5-8 of every KV head (a query at 5-8 still reads itself)
            return d

        def garbage(layer, k, v):
            g = torch.Generator().manual_seed(layer)
            k, v = k.clone(), v.clone()
            k[:, :, 5:9] = 50 * torch.randn(k[:, :, 5:9].shape, generator=g)
            v[:, :, 5:9] = 50 * torch.randn(v[:, :, 5:9].shape, generator=g)
            return k, v

        with torch.no_grad():
            plain, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=layers))
            dropped, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=layers, drop=drop))
            both, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(layers=layers, drop=drop, on_read=garbage))
            nothing, _ = hf.forward(lm.model, ids, plan=hf.HookPlan(
                layers=layers, drop=lambda l, T: torch.zeros(1, H, T, dtype=torch.bool)))
        assert torch.equal(nothing, plain)  # an empty drop leaves the kernel's own path untouched
        assert torch.allclose(dropped[:, 9:], both[:, 9:], atol=1e-5)  # the dropped content is never read
        assert not torch.allclose(dropped[:, 9:], plain[:, 9:], atol=1e-4)  # the drop itself acts
        assert torch.equal(dropped[:, :5], plain[:, :5])  # causal: earlier positions are untouched
        assert torch.isfinite(both).all()
    finally:
        lm.model.set_attn_implementation(hf.HOOK_NAMES["eager"])


def test_dropping_everything_keeps_each_query_on_itself(tiny_lm):
    lm = tiny_lm("llama")
    ids = _ids(lm, n=12)
    plan = hf.HookPlan(layers=frozenset(range(lm.arch.num_layers)),
                       drop=lambda l, T: torch.ones(1, lm.arch.num_kv_heads, T, dtype=torch.bool))
    with torch.no_grad():
        out, _ = hf.forward(lm.model, ids, plan=plan)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# whether a model can be hooked: the probe decides, not a class flag


class _BypassRegistry:
    """Stands in for transformers' attention registry in a modeling module: every layer gets the module's own
    kernel back, as in a model whose attention does not go through the AttentionInterface."""

    def get_interface(self, name, default):
        return default


def _load_llama(tiny_model_dir, attn: str = "eager"):
    return hf.load_model({"name": str(tiny_model_dir("llama")), "attn_implementation": attn}, "cpu")


def _identity_logits(lm, ids):
    plan = hf.HookPlan(layers=frozenset(range(lm.arch.num_layers)), on_read=lambda l, k, v: (k, v))
    with torch.no_grad():
        out, _ = hf.forward(lm.model, ids, plan=plan)
    assert all(plan.calls[l] == 1 for l in range(lm.arch.num_layers))
    return out


def test_a_class_without_the_backend_flag_loads_when_its_attention_reaches_the_hook(tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    lm = _load_llama(tiny_model_dir)
    assert type(lm.model) is LlamaForCausalLM and not lm.model._supports_attention_backend
    ids = _ids(lm)
    assert torch.equal(_identity_logits(lm, ids), _stock(lm, ids))


def test_the_hook_is_selected_where_transformers_will_not_switch_the_class(tiny_model_dir, monkeypatch):
    """transformers refuses to switch a class whose module source fails its AttentionInterface heuristic
    (logging a warning only); the hook is then selected through the config, and stock attention too."""
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    lm = _load_llama(tiny_model_dir)
    assert lm.model.config._attn_implementation == hf.HOOK_NAMES["eager"]
    ids = _ids(lm)
    plan = hf.HookPlan(layers=frozenset(range(lm.arch.num_layers)))
    with torch.no_grad(), hf.stock_attention(lm.model, "eager"), hf.hooked(plan):
        stock = lm.model(input_ids=ids).logits
    assert plan.calls == {} and lm.model.config._attn_implementation == hf.HOOK_NAMES["eager"]
    assert torch.equal(_identity_logits(lm, ids), stock)


def test_a_model_whose_attention_bypasses_the_hook_is_refused(tiny_model_dir, monkeypatch, capsys):
    from transformers.models.llama import modeling_llama

    from cachemedicpp.cli import EXIT_BAD_INPUT, guarded

    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", _BypassRegistry())
    name = str(tiny_model_dir("llama"))
    with pytest.raises(hf.ModelLoadError) as e:
        _load_llama(tiny_model_dir)
    msg = str(e.value)
    assert f"model {name!r} (LlamaForCausalLM): its attention does not go through transformers' AttentionInterface" \
           ", so the cache hook cannot act on it" in msg and "3 of 3 layers" in msg
    assert guarded(lambda: _load_llama(tiny_model_dir, "sdpa")) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.count("error: model") == 1
