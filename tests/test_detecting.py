"""Family D, the detecting operator: identity at initialisation and on clean caches once its threshold
is set, causality, GQA, the detector scored once per cached entry across decode steps, the attention
bias through the mask of every kernel, bit-identical resume with the new losses, a trained operator
that beats no repair on draws it never saw, and refusal of another family's checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from cachemedicpp import hf, train
from cachemedicpp.cli import EXIT_OK, EXIT_PAUSED
from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.corruption import Corruptor
from cachemedicpp.fileio import read_jsonl
from cachemedicpp.repair import build_operator, load_repair_checkpoint
from cachemedicpp.repair_detect import FEATURES, DetectingOperator, clean_caches, set_threshold
from conftest import pause_after, tiny_config


def _cfg(tmp_path, model_dir, **over):
    base = {"repair.family": "D", "repair.protect_layers": [1, 2], "repair.detector.fit_windows": 3,
            "repair.detector.fit_len": 24, "train.lr": 0.01}
    data = tiny_config(model_dir, **{**base, **over})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def _fitted(lm, layers=(1, 2), reference=0, windows=3, seed=0):
    op = DetectingOperator(list(layers), lm.arch.head_dim, lm.arch.num_heads, lm.arch.num_kv_heads, rank=4,
                           reference_layer=reference)
    tokens = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(seed))
    op.fit(clean_caches(lm, tokens, windows, 32, list(layers) + ([reference] if reference is not None else []), seed))
    return op, tokens


def _open_detector(op, scale=3.0, seed=1):
    """Random detector weights: the score varies with the entry, so some entries are gated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        op.w2.copy_(torch.randn(op.w2.shape, generator=g) * scale)
        op.b2.zero_()
        op.u.copy_(torch.randn(op.u.shape, generator=g) * 0.2)
    return op


def _logits(lm, ids, plan=None):
    with torch.no_grad():
        logits, _ = hf.forward(lm.model, ids, plan=plan)
    return logits


# --------------------------------------------------------------------------------------------------
# identity


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_identity_at_initialisation_is_bit_exact(tiny_lm, arch):
    lm = tiny_lm(arch)
    ref = 0 if arch != "gemma3" else None  # gemma3's layer 0 slides: no reference layer there
    op, tokens = _fitted(lm, layers=(1,) if arch == "gpt2" else (1, 2), reference=ref)
    ids = tokens[:40][None]
    assert all(op.is_identity(l) for l in op.layers)
    assert torch.equal(_logits(lm, ids, hf.HookPlan(repair=op)), _logits(lm, ids))


# the configured rule (repair.detector.fit_windows, repair.detector.threshold_margin defaults)
FIT_WINDOWS, MARGIN = 24, 0.5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_clean_cache_is_untouched_once_the_threshold_is_set(tiny_lm, arch):
    """τ set on clean training windows by the configured rule: on clean windows of other text, which it
    never saw, the operator leaves the logits bit for bit; without the margin one of them is gated."""
    lm = tiny_lm(arch)
    ref = 0 if arch == "llama" else None
    op, tokens = _fitted(lm, reference=ref, windows=FIT_WINDOWS)
    _open_detector(op)
    other_text = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(11))
    unseen = other_text[:320].view(8, 40)[:, :32]
    ids = unseen[:1]
    opened = _logits(lm, ids, hf.HookPlan(repair=op))
    assert not torch.equal(opened, _logits(lm, ids)), "the open detector gates nothing: the test proves nothing"
    layers = list(op.layers) + list(op.observes)
    # what attention reads (a sliding layer's stored cache keeps only its window)
    training = clean_caches(lm, tokens, FIT_WINDOWS, 32, layers, seed=0, stream="detector-threshold")

    def untouched() -> list[bool]:
        return [torch.equal(_logits(lm, w[None], hf.HookPlan(repair=op)), _logits(lm, w[None])) for w in unseen]

    set_threshold(op, training, margin=0.0)
    # on the windows τ was set on nothing is gated, even without a margin ...
    assert not any(bool((op.prime(c)[l]["gate"] > 0).any()) for c in training for l in op.layers)
    # ... but an unseen window can score above them: the margin is what keeps unseen clean text untouched
    assert not all(untouched())
    record = set_threshold(op, training, margin=MARGIN)
    assert all(r["tau"] >= r["max_clean_score"] + MARGIN - 1e-6 for r in record.values())
    assert all(untouched())


# --------------------------------------------------------------------------------------------------
# the hook: bias through the mask, causality, GQA, the memo


def _manual_attention(q, k, v, bias, scaling):
    """Causal softmax attention with a per-(KV head, key) additive bias, GQA by repetition: [B, Tq, Hq, d]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scaling
    Tq, Tk = q.shape[2], k.shape[2]
    causal = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    s = s.masked_fill(~causal, -math.inf) + bias.repeat_interleave(g, 1)[:, :, None, :]
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("kind", ["eager", "sdpa"])
def test_bias_reaches_every_query_head_of_its_kv_head(kind):
    torch.manual_seed(0)
    B, Hq, Hkv, T, d = 2, 4, 2, 7, 8
    q, k, v = torch.randn(B, Hq, T, d), torch.randn(B, Hkv, T, d), torch.randn(B, Hkv, T, d)
    bias = -torch.rand(B, Hkv, T) * 5
    mask = hf._bias_mask(None, bias, q, k)
    if kind == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=d**-0.5).transpose(1, 2)
    else:
        s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * d**-0.5 + mask
        out = (s.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, _manual_attention(q, k, v, bias, d**-0.5), rtol=1e-5, atol=1e-6)
    # a bool mask (sdpa's) turns into the same additive one
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    torch.testing.assert_close(hf._bias_mask(causal, bias, q, k), mask)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_eager_and_sdpa_agree_with_the_operator_gating(tiny_lm, arch):
    """On layer 0 (sliding on gemma3), whose inputs the two kernels compute identically: an open detector's
    gate is a steep function of the entry, so upstream fp32 reordering would otherwise be amplified."""
    lm_e, lm_s = tiny_lm(arch, attn="eager"), tiny_lm(arch, attn="sdpa")
    op, tokens = _fitted(lm_e, layers=(0,), reference=None)
    _open_detector(op)
    ids = tokens[100:140][None]
    a = _logits(lm_e, ids, hf.HookPlan(repair=op))
    assert not torch.equal(a, _logits(lm_e, ids))
    torch.testing.assert_close(_logits(lm_s, ids, hf.HookPlan(repair=op)), a, rtol=1e-4, atol=1e-4)


def test_causal_no_future_entry_changes_an_earlier_output(tiny_lm):
    lm = tiny_lm("llama")
    op, _ = _fitted(lm)
    _open_detector(op)
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)

    def kernel(q, k, v, bias=None):
        return _manual_attention(q, k, v, torch.zeros(k.shape[:3]) if bias is None else bias, 0.25)

    out = op.attend(1, q, k, v, kernel)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:] += 50 * torch.randn_like(k2[:, :, 8:])
    v2[:, :, 8:] = 0
    out2 = op.attend(1, q, k2, v2, kernel)
    assert torch.equal(out[:, :8], out2[:, :8])
    assert not torch.equal(out[:, 8:], out2[:, 8:])


def test_detector_is_scored_once_per_entry_across_decode_steps(tiny_lm):
    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    _open_detector(op)
    op.score_block = 1  # every appended entry scored at its first read
    plan = hf.HookPlan(repair=op)
    H, T, steps = lm.arch.num_kv_heads, 20, 5
    op.entries_scored = 0
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, tokens[:T][None], plan=plan)
        for i in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            logits, cache = hf.forward(lm.model, nxt, cache, plan=plan)
    assert op.entries_scored == len(op.layers) * H * (T + steps)
    # and the reused outputs are the ones a fresh plan computes over the whole cache
    fresh = DetectingOperator.entries
    for l in op.layers:
        k, v = hf.get_kv(cache, l)
        ref = hf.get_kv(cache, 0)
        full = fresh(op, l, k, v, 0, ref)
        torch.testing.assert_close(plan.memo[l]["gate"], full["gate"])


def test_decode_steps_score_appended_entries_in_blocks(tiny_lm):
    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    _open_detector(op)
    op.score_block = 4
    plan = hf.HookPlan(repair=op)
    H, T, steps = lm.arch.num_kv_heads, 20, 10
    op.entries_scored = 0
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, tokens[:T][None], plan=plan)
        for _ in range(steps):
            logits, cache = hf.forward(lm.model, logits[:, -1:].argmax(-1), cache, plan=plan)
    # the prefill scores its 20 entries; the 10 appended ones in two full blocks of 4, 2 still pending
    assert op.entries_scored == len(op.layers) * H * (T + 8)
    for l in op.layers:
        assert plan.memo[l]["n"] == T + 8
        k, v = hf.get_kv(cache, l)
        full = DetectingOperator.entries(op, l, k, v, 0, hf.get_kv(cache, 0))
        torch.testing.assert_close(plan.memo[l]["gate"], full["gate"][:, :, :T + 8])
    # a forward of several tokens scores the pending entries at once
    op.entries_scored = 0
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, tokens[T:T + 3][None], cache, plan=plan)
    assert op.entries_scored == len(op.layers) * H * (2 + 3)
    # a pending entry that is not finite is scored (and replaced) at once, in its layer only
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, logits[:, -1:].argmax(-1), cache, plan=plan)  # one pending entry
    k, v = hf.get_kv(cache, 1)
    k, v = k.clone(), v.clone()
    k[0, 0, -1, 0] = float("nan")
    hf.set_kv(cache, 1, k, v)
    op.entries_scored = 0
    with torch.no_grad():
        logits, _ = hf.forward(lm.model, logits[:, -1:].argmax(-1), cache, plan=plan)
    assert op.entries_scored == H * 2 and torch.isfinite(logits).all()


def _decode(lm, op, ids, steps, memo=None, edit=None):
    """Greedy decode after a prefill of `ids` with the operator: (logits of every step, the plan's memo).
    `memo`: a primed memo to start from (the prefill then runs without the operator, as the bench does);
    `edit(step, cache)`: an at-rest edit of the cache before a step's forward."""
    plan = hf.HookPlan(repair=op, memo=dict(memo) if memo is not None else {})
    out = []
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, ids, plan=None if memo is not None else plan)
        for i in range(steps):
            if edit is not None:
                edit(i, cache)
            logits, cache = hf.forward(lm.model, logits[:, -1:].argmax(-1), cache, plan=plan)
            out.append(logits)
    return out, plan.memo


@pytest.mark.parametrize("attn,suppress,apply_to", [("eager", False, "KV"), ("sdpa", False, "KV"),
                                                    ("sdpa", True, "V")])
def test_decode_steps_read_kept_corrections_as_adding_them_every_step(tiny_lm, monkeypatch, attn, suppress, apply_to):
    """A one-token decode step reads the corrected cache from buffers kept beside the memo (`_read`): logits bit
    for bit those of adding every kept correction again at every step, with entries gated in the prefill, with
    nothing gated until a block scored mid-decode gates one of its entries, and with a decode run again from
    the same primed memo (the bench's runs); on a clean cache the bare model's, and no buffer is kept."""
    lm = tiny_lm("llama", attn=attn)
    op, tokens = _fitted(lm)
    _open_detector(op)
    op.suppress, op.apply_to, op.score_block = suppress, apply_to, 4
    ids, steps = tokens[:24][None], 11

    def every_step(m, k, v):
        return op._corrected(m, k, v, 0, k.shape[2])

    def runs(**kw):
        fast = _decode(lm, op, ids, steps, **kw)
        with monkeypatch.context() as mp:
            mp.setattr(op, "_read", every_step)
            slow = _decode(lm, op, ids, steps, **kw)
        assert all(torch.equal(a, b) for a, b in zip(fast[0], slow[0]))
        return fast

    # entries gated in the prefill, read from the buffers from the first step on
    _, memo = runs()
    assert all(memo[l]["any"] and memo[l]["read"]["n"] == memo[l]["n"] for l in op.layers)
    # the same from a primed memo, twice: the second run builds its own buffers
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    primed = op.prime({l: hf.get_kv(cache, l) for l in (0, *op.layers)})
    first, _ = runs(memo=primed)
    assert all(torch.equal(a, b) for a, b in zip(first, runs(memo=primed)[0]))
    # nothing gated in the prefill (τ above its scores; the detector's sign flipped, so an outlier scores high);
    # an entry edited at rest while pending is gated when its block is scored, and the steps after read the buffers
    with torch.no_grad():
        op.w2.neg_()
        op.tau.fill_(-min(float(primed[l]["score"].min()) for l in op.layers) + 5.0)

    def edit(i, cache):
        if i == 5:  # the entry step 4 appended (position 28), pending until its block is scored at step 7
            k, v = (x.clone() for x in hf.get_kv(cache, 2))
            k[:, :, -1] *= 40
            v[:, :, -1] *= 40
            hf.set_kv(cache, 2, k, v)

    _, memo = runs(edit=edit)
    assert not memo[1]["any"] and "read" not in memo[1]
    assert memo[2]["any"] and memo[2]["read"]["n"] == memo[2]["n"] == ids.shape[1] + 8
    # a clean cache (τ above every score): nothing gated, the bare model's logits
    with torch.no_grad():
        op.tau.fill_(1e4)
    out, memo = runs()
    with torch.no_grad():
        logits, cache = hf.forward(lm.model, ids)
        for z in out:
            logits, cache = hf.forward(lm.model, logits[:, -1:].argmax(-1), cache)
            assert torch.equal(logits, z)
    assert not any(memo[l]["any"] or "read" in memo[l] for l in op.layers)


def test_a_sliding_window_memo_drops_the_entries_that_left_it(tiny_lm):
    """A sliding-window layer (simulated: layer 1 read through a 16-entry window, the reference layer 0 in
    full) is scored once per entry while the window moves, and the kept outputs are those of the window."""
    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    _open_detector(op)
    op.score_block = 1
    with torch.no_grad():
        _, cache = hf.forward(lm.model, tokens[:40][None])
    k, v = hf.get_kv(cache, 1)
    rk, rv = hf.get_kv(cache, 0)
    W, H, memo = 16, lm.arch.num_kv_heads, {}
    op.entries_scored = 0
    with torch.no_grad():
        for t in range(W, 41):
            memo["reference"] = (rk[:, :, :t], rv[:, :, :t])
            m = op._memo(1, k[:, :, t - W:t], v[:, :, t - W:t], memo, q_len=1)
            full = DetectingOperator.entries(op, 1, k[:, :, t - W:t], v[:, :, t - W:t], t - W,
                                             (rk[:, :, t - W:t], rv[:, :, t - W:t]))
            op.entries_scored -= H * W  # (the reference computation above)
            torch.testing.assert_close(m["gate"], full["gate"])
    assert op.entries_scored == H * 40  # 16 in the first window, then one per step


def test_non_finite_entries_are_gated_and_never_reach_attention(tiny_lm):
    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    ids = tokens[:30][None]
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :24])
    k, v = hf.get_kv(cache, 1)
    k, v = k.clone(), v.clone()
    k[0, 0, 5, 3] = float("inf")
    v[0, 1, 9, 0] = float("nan")
    hf.set_kv(cache, 1, k, v)
    with torch.no_grad():
        bare, _ = hf.forward(lm.model, ids[:, 24:], hf.clone_cache(cache))
        fixed, _ = hf.forward(lm.model, ids[:, 24:], cache, hf.HookPlan(repair=op))
    assert not torch.isfinite(bare).all()
    assert torch.isfinite(fixed).all()


# --------------------------------------------------------------------------------------------------
# training


def test_training_logs_the_detection_losses_and_resumes_bit_identically(tmp_path, tiny_model_dir, monkeypatch,
                                                                         one_thread):
    from test_train import assert_same_checkpoints, losses

    path, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{"train.steps": 6, "train.save_every": 3})
    ref = tmp_path / "ref"
    assert train.run(cfg, ref, config_path=str(path)) == EXIT_OK
    recs = read_jsonl(ref / "logs" / "train.jsonl")
    corrupted = [r for r in recs if r["corruption"]["type"] != "clean"]
    assert corrupted and all(r["loss_det"] is not None and r["loss_det"] > 0 for r in recs)
    assert all(r["loss_contr"] == 0 and r["rho_mean"] is None for r in recs)
    for r in recs:
        total = r["loss_kd"] + cfg.train.lambda_id * r["loss_id"] + cfg.train.lambda_det * r["loss_det"] \
            + cfg.train.lambda_rec * r["loss_rec"]
        assert r["loss_total"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    ckpt = torch.load(ref / "checkpoints" / "repair_step_6.pt", weights_only=True)
    assert set(ckpt["detector_threshold"]) == {1, 2}
    assert torch.equal(ckpt["state_dict"]["tau"], torch.tensor([ckpt["detector_threshold"][l]["tau"] for l in (1, 2)]))
    state = torch.load(ref / "checkpoints" / "train_state_latest.pt", weights_only=True)
    assert not state["operator"]["tau"].any()  # training itself runs at τ = 0

    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        pause_after(m, rd, 4)
        assert train.run(cfg, rd, config_path=str(path)) == EXIT_PAUSED
    assert train.run(cfg, rd, config_path=str(path)) == EXIT_OK
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)


def test_random_regions_are_drawn_per_step_and_row(tmp_path, tiny_model_dir, tiny_lm):
    _, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{"repair.protect_layers": [0, 1, 2]})
    tr = train.Trainer(cfg, tiny_lm("llama"))
    assert tr.random_regions
    regions = [tr.random_region(40, s, b) for s in range(12) for b in range(2)]
    assert len({(r.layers, tuple(r.time.tolist())) for r in regions}) > 12
    assert any(not r.time[0] for r in regions) and any(bool(r.time[0]) for r in regions)
    assert any(len(r.layers) < 3 for r in regions)
    again = tr.random_region(40, 5, 1)
    assert again.layers == regions[11].layers and torch.equal(again.time, regions[11].time)


def test_a_trained_operator_beats_no_repair_on_draws_it_never_saw(tmp_path, tiny_model_dir, tiny_lm, one_thread):
    """Trained on sparse spikes, scored on fresh draws (another phase, other windows): the paired KD to
    the clean logits is lower with the operator than without it."""
    over = {"train.steps": 60, "train.clean_batch_prob": 0.1, "corruption.mixture": {"bitflipish_sparse": 1.0},
            "corruption.params.bitflip_p": 0.05, "corruption.eps_grid": [0.08, 0.16],
            "repair.protect_layers": [1, 2], "train.log_every": 60, "train.save_every": 60}
    path, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **over)
    assert train.run(cfg, tmp_path / "run", config_path=str(path)) == EXIT_OK
    lm = tiny_lm("llama")
    op, _ = load_repair_checkpoint(tmp_path / "run" / "checkpoints" / "repair_step_60.pt", cfg.repair.to_dict(),
                                   lm.arch)
    corruptor = Corruptor(cfg.corruption.to_dict(), [1, 2], lm.arch.num_kv_heads, seed=123)
    tokens = train.Trainer(cfg, lm).tokens
    with_op, without = [], []
    for i in range(8):
        ids = tokens[3000 + 50 * i: 3000 + 50 * i + 40][None]
        with torch.no_grad():
            _, cache = hf.forward(lm.model, ids[:, :32])
            z_clean, _ = hf.forward(lm.model, ids[:, 32:], hf.clone_cache(cache))
            kv, _ = corruptor.apply_cache({l: hf.get_kv(cache, l) for l in (1, 2)}, "bitflipish_sparse", 0.16,
                                          "heldout", i)
            for l, (k, v) in kv.items():
                hf.set_kv(cache, l, k, v)
            z_none, _ = hf.forward(lm.model, ids[:, 32:], hf.clone_cache(cache))
            z_op, _ = hf.forward(lm.model, ids[:, 32:], cache, hf.HookPlan(repair=op))
        without.append(float(train.kd_loss(z_clean, z_none, 1.0)))
        with_op.append(float(train.kd_loss(z_clean, z_op, 1.0)))
    assert sum(without) > 0
    assert sum(with_op) < 0.8 * sum(without), (with_op, without)


# --------------------------------------------------------------------------------------------------
# bad input


def test_a_checkpoint_of_another_family_is_refused(tmp_path, tiny_model_dir, tiny_lm):
    path, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{"train.steps": 2, "train.save_every": 2})
    assert train.run(cfg, tmp_path / "run", config_path=str(path)) == EXIT_OK
    ckpt = tmp_path / "run" / "checkpoints" / "repair_step_2.pt"
    lm = tiny_lm("llama")
    other = {**cfg.repair.to_dict(), "family": "A"}
    with pytest.raises(ConfigError, match="family-D operator"):
        load_repair_checkpoint(ckpt, other, lm.arch)
    wider = {**cfg.repair.to_dict(), "protect_layers": [0, 1, 2]}
    with pytest.raises(ConfigError, match="does not match"):
        load_repair_checkpoint(ckpt, wider, lm.arch)
    # through the CLI: exit 2 naming it
    cfg_a = yaml.safe_load(path.read_text())
    cfg_a["repair"]["family"] = "A"
    pa = tmp_path / "a.yaml"
    pa.write_text(yaml.safe_dump(cfg_a))
    r = subprocess.run([sys.executable, "-m", "cachemedicpp.eval", "--config", str(pa), "--run_dir",
                        str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_reference_layer_must_be_an_unprotected_full_attention_layer(tiny_lm):
    arch = tiny_lm("gemma3").arch
    base = {"family": "D", "rank": 4, "protect_layers": [2], "apply_to": "KV", "alpha_max": 0.9,
            "share_across_heads": True, "conditioning": {}}
    with pytest.raises(ConfigError, match="sliding-window"):
        build_operator({**base, "detector": {"reference_layer": 0}}, arch)
    with pytest.raises(ConfigError, match="unprotected"):
        build_operator({**base, "detector": {"reference_layer": 2}}, arch)
    assert build_operator({**base, "detector": {"reference_layer": "auto"}}, arch).reference_layer is None
    llama = tiny_lm("llama").arch
    assert build_operator({**base, "detector": {}}, llama).reference_layer == 1


def test_eval_reports_the_detectors_recall_and_false_positives(tmp_path, tiny_model_dir, one_thread):
    from cachemedicpp import eval as ev
    from cachemedicpp.fileio import validate_records

    path, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{
        "train.steps": 4, "train.save_every": 4, "eval.corruption_eval.types": ["gaussian", "dropout_zero"],
        "eval.defenses": ["no_defense", "cachemedic", "detect_recompute", "checksum_recompute"]})
    rd = tmp_path / "run"
    assert train.run(cfg, rd, config_path=str(path)) == EXIT_OK
    assert ev.run(cfg, rd, config_path=str(path)) == EXIT_OK
    doc = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    assert validate_records([doc], "task_metrics") == []
    det = doc["metrics"]["detector"]
    assert set(det["threshold"]) == {"1", "2"} and det["sink_tokens"] == 4
    cells = {(c["corruption_type"], c["epsilon"]): c for c in det["by_cell"]}
    assert cells[("clean", 0.0)]["changed_entries"] == 0 and cells[("clean", 0.0)]["recall"] is None
    hit = cells[("dropout_zero", 0.16)]
    assert hit["changed_entries"] > 0 and 0 <= hit["recall"] <= 1 and 0 <= hit["false_positive_rate"] <= 1
    assert 0 <= hit["roc_auc"] <= 1 and hit["roc_auc_ci"][0] <= hit["roc_auc"] <= hit["roc_auc_ci"][1]
    assert cells[("clean", 0.0)]["roc_auc"] is None
    m = doc["metrics"]
    assert m["defense_groups"]["detect_recompute"] == "detect + recompute (no checksums)"
    cost = {(c["corruption_type"], c["epsilon"]): c for c in m["detect_recompute_cost"]["by_cell"]}
    assert cost.keys() == {(c["corruption_type"], c["epsilon"]) for c in m["recompute_cost"]["by_cell"]}
    assert all(0 <= c["recomputed_fraction"] <= 1 for c in cost.values())


def test_roc_auc_is_the_mann_whitney_statistic():
    from cachemedicpp.stats import roc_auc

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    y = torch.rand(200, generator=g) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert roc_auc(s, y) == pytest.approx(float(brute), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.9, float("nan")]), torch.tensor([False, True, True])) == 1.0
    assert roc_auc(s, torch.zeros(200, dtype=torch.bool)) is None


def test_detect_recompute_recomputes_exactly_the_flagged_blocks(tmp_path, tiny_model_dir, tiny_lm, one_thread):
    """An alarm on every entry restores the clean cache (the clean cell's score); an alarm that never fires
    leaves the corrupted cache (no_defense's score); no alarm on a clean cache costs nothing."""
    from cachemedicpp.eval.grid import build_context, score_example

    _, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{
        "eval.corruption_eval.types": ["gaussian"], "eval.defenses": ["no_defense", "detect_recompute"],
        "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}]})
    lm = tiny_lm("llama")
    op, _ = _fitted(lm)
    ctx = build_context(cfg, lm, op)
    assert ctx.defense("detect_recompute").alarm >= 1 and any("detect_recompute" in n for n in ctx.notes)
    for tau, restores in ((-1e4, True), (1e4, False)):
        op.tau.fill_(tau)
        ctx.defense("detect_recompute").alarm = 1  # any gated entry raises the alarm
        for ex in ctx.examples:
            unit = score_example(ctx, ex)
            cells = unit["cells"]
            for eps in [e for e in ctx.eps if e > 0]:
                got = cells[f"gaussian|{eps!r}|detect_recompute"]
                want = cells["clean|0.0|detect_recompute"] if restores else cells[f"gaussian|{eps!r}|no_defense"]
                assert got == want
                assert cells[f"gaussian|{eps!r}|no_defense"] != cells["clean|0.0|no_defense"]
                assert (unit["recompute"][f"gaussian|{eps!r}|detect_recompute"]["tokens"] > 0) == restores
            if not restores:
                assert unit["recompute"]["clean|0.0|detect_recompute"]["tokens"] == 0


def _outlier_detector(op, tau=2.0):
    """A hand-set detector that sees outliers, as a trained one does: the score is gelu of the standardised
    largest channel z-score of K plus that of V, so entries far from the clean statistics score high; at
    this τ it gates some clean entries too."""
    with torch.no_grad():
        for p in (op.w1, op.b1, op.w2, op.b2):
            p.zero_()
        op.w1[:, FEATURES.index("k_max_z"), 0] = 1.0
        op.w1[:, FEATURES.index("v_max_z"), 1] = 1.0
        op.w2[:, :2] = 1.0
        op.tau.fill_(tau)
    return op


def test_the_alarm_level_keeps_every_clean_training_block_quiet(tiny_lm):
    from cachemedicpp.repair_detect import alarm_level, gated_per_block

    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    _outlier_detector(op)
    caches = clean_caches(lm, tokens, 3, 40, [0, 1, 2], seed=5)
    level = alarm_level(op, caches, 16)
    counts = [gated_per_block(op, op.prime(c), 40, 16) for c in caches]
    assert level > 1  # the detector gates some clean entries
    # no block of the clean windows alarms, and the level is the tightest such: one lower, a clean block would
    assert not any(bool((c >= level).any()) for c in counts)
    assert any(bool((c >= level - 1).any()) for c in counts)
    assert all(int(c.sum()) == sum(int((op.prime(cc)[l]["gate"] > 0).sum()) for l in op.layers)
               for c, cc in zip(counts, caches))
    # a corrupted block (positions 16..31 of a clean window) alarms; the blocks it left alone stay as they were
    corruptor = Corruptor({"axes": {"time_mode": "window", "window": [16, 32]}, "params": {"bitflip_p": 0.1}},
                          op.layers, lm.arch.num_kv_heads, 0)
    for ctype, eps in (("gaussian", 1.0), ("bitflipish_sparse", 0.16)):
        kv, _ = corruptor.apply_cache({l: caches[0][l] for l in op.layers}, ctype, eps, "alarm", 0)
        assert all(not torch.equal(kv[l][0], caches[0][l][0]) for l in op.layers), ctype
        hit = gated_per_block(op, op.prime({**caches[0], **kv}), 40, 16)
        assert int(hit[1]) >= level > int(counts[0][1]), (ctype, hit.tolist(), level)
        assert torch.equal(hit[[0, 2]], counts[0][[0, 2]]), ctype


def test_the_budget_rule_lets_at_most_the_budget_of_clean_caches_alarm():
    from cachemedicpp.repair_detect import budget_level

    maxima = list(range(1, 100))  # 99 clean caches, maxima 1..99
    for budget in (0.0, 0.01, 0.05, 0.2, 0.5):
        level = budget_level(maxima, budget)
        alarmed = sum(m >= level for m in maxima) / len(maxima)
        assert alarmed <= budget + 1e-12
        # the tightest such level: one lower lets more than the conformal count through
        assert sum(m >= level - 1 for m in maxima) > sum(m >= level for m in maxima)
    assert budget_level(maxima, 0.0) == 100  # the max rule
    assert budget_level([3, 3, 3], 0.05) == 4  # too few caches for the budget: none alarms
    assert budget_level(maxima, 0.05) == 96  # rank ceil(100 * 0.95) = 95: maxima 96..99 (4 %) alarm


def test_the_alarm_level_is_set_on_the_selection_split_only(tmp_path, tiny_model_dir, tiny_lm):
    """Change the test examples and the level is unchanged; it moves with the budget, on selection caches."""
    from cachemedicpp.eval.grid import build_context

    lm = tiny_lm("llama")
    op, _ = _fitted(lm)
    _outlier_detector(op, tau=1.0)
    levels = {}
    for name, over in (("a", {"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}]}),
                       ("b", {"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 3, "start": 5}]}),
                       ("tight", {"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}],
                                  "baseline.alarm_budget": 0.5})):
        (tmp_path / name).mkdir()
        _, cfg = _cfg(tmp_path / name, tiny_model_dir("llama"), **{
            "eval.corruption_eval.types": ["gaussian"], "eval.defenses": ["no_defense", "detect_recompute"],
            "baseline.alarm_examples": 20, **over})
        ctx = build_context(cfg, lm, op)
        dfn = ctx.defense("detect_recompute")
        levels[name] = dfn.alarm
        assert dfn.alarm_caches == 20 and "selection split" in " ".join(ctx.notes)
    assert levels["a"] == levels["b"]  # other test caches, the same level
    assert levels["tight"] <= levels["a"]  # a larger budget never raises the level


def test_detect_recompute_needs_a_family_d_operator(tmp_path, tiny_model_dir, tiny_lm):
    from cachemedicpp.eval.grid import build_context

    _, cfg = _cfg(tmp_path, tiny_model_dir("llama"), **{"repair.family": "A", "eval.defenses": ["detect_recompute"]})
    with pytest.raises(ConfigError, match="detect_recompute"):
        build_context(cfg, tiny_lm("llama"), build_operator(cfg.repair.to_dict(), tiny_lm("llama").arch))


@pytest.mark.slow
def test_embedded_model_clean_logits_unchanged_after_training(tmp_path, one_thread):
    """SmolLM2-135M: a family-D operator trained briefly (its detector no longer constant), its threshold
    set on clean training windows; on fresh clean text the logits are those of the bare model to within
    fp32 rounding."""
    from cachemedicpp import ROOT

    data = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    data["repair"].update(family="D", protect_layers=[2, 3, 4, 5])
    data["repair"]["detector"] = {"fit_windows": 6}  # fit_len: the longest context read (eval.max_seq_len)
    data["train"].update(steps=12, batch_size=1, prefix_len=48, cont_len=16, save_every=12, log_every=6, lr=0.05)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert train.run(cfg, tmp_path / "run", config_path=str(path)) == EXIT_OK
    lm = hf.load_model(cfg.model.to_dict(), "cpu", "float32")
    op, payload = load_repair_checkpoint(tmp_path / "run" / "checkpoints" / "repair_step_12.pt", cfg.repair.to_dict(),
                                         lm.arch)
    assert op.w2.detach().abs().sum() > 0  # trained: the score depends on the entry
    text = (ROOT / "data" / "offline" / "wikitext2_eval.txt").read_text(encoding="utf-8")
    ids = lm.tokenizer(text[:4000], return_tensors="pt")["input_ids"][:, :160]
    bare = _logits(lm, ids)
    repaired = _logits(lm, ids, hf.HookPlan(repair=op))
    assert (repaired - bare).abs().max() <= 1e-4 * max(1.0, float(bare.abs().max()))


def test_memo_arrays_grow_in_place_and_a_fork_copies():
    """`_append` (a block scored without gradients): the values of `_cat` bit for bit, written into a buffer that
    grows with the cache; a memo reused from an earlier state (a fork) copies into a buffer of its own, so the
    later memo's entries stay as they were; None (zeros) joins as zeros."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, 2, n, 3, generator=g) for n in (5, 4, 4))
    store: dict = {}
    x = DetectingOperator._append(store, "dk", a, b, 5, 4)
    assert torch.equal(x, torch.cat([a, b], 2))
    first = dict(store)
    y = DetectingOperator._append(dict(first), "dk", x, c, 9, 4)  # extends x's buffer in place
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, torch.cat([a, b, c], 2))
    z = DetectingOperator._append(dict(first), "dk", x, b, 9, 4)  # x again, after y extended it: a copy
    assert z.data_ptr() != x.data_ptr() and torch.equal(z, torch.cat([a, b, b], 2))
    assert torch.equal(y, torch.cat([a, b, c], 2))  # the later memo's entries untouched
    assert DetectingOperator._append({}, "bias", None, None, 5, 4) is None
    w = DetectingOperator._append({}, "dv", a, None, 5, 4)
    assert torch.equal(w, torch.cat([a, torch.zeros(1, 2, 4, 3)], 2))


def test_a_cache_longer_than_the_training_windows_warns_once(tiny_lm):
    """`trained_positions` (set by `protect`): attending to a longer cache warns once, naming both lengths; a
    cache within it, or no length set, warns nothing; the output is the same either way."""
    import warnings

    lm = tiny_lm("llama")
    op, tokens = _fitted(lm)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, tokens[:24][None])
    k, v = hf.get_kv(cache, 1)
    q = torch.randn(1, lm.arch.num_heads, 1, lm.arch.head_dim, generator=torch.Generator().manual_seed(0))

    def kernel(q, k, v, bias=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                                                v.repeat_interleave(q.shape[1] // k.shape[1], 1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = op.attend(1, q, k, v, kernel)  # no length set
        op.trained_positions = 24
        assert torch.equal(op.attend(1, q, k, v, kernel), want)  # within it
    op.trained_positions = 16
    with pytest.warns(RuntimeWarning, match="holds 24 positions, but this operator was trained on windows of 16"):
        assert torch.equal(op.attend(1, q, k, v, kernel), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.attend(1, q, k, v, kernel)  # once
