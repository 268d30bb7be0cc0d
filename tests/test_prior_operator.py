"""Family E, the learned operator that builds on the model of clean caches: at initialisation it is
calibrated_repair (to float rounding), on a clean cache it is the bare kernel bit for bit, the harm-aware gate shuts where
the repair changes what was harmless, and it trains, saves, resumes and evaluates like every family."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cachemedicpp import calibration, defenses, hf, repair, train
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
         "baseline.calibration.window_len": 64, "baseline.calibration.cont_len": 8,
         "baseline.calibration.sink_tokens": 2, "repair.family": "E"}


@pytest.fixture(scope="module")
def llama_e(tiny_model_dir, tiny_lm):
    from conftest import calibrated_tiny

    return calibrated_tiny(tiny_model_dir("llama"), tiny_lm("llama"), **SMALL)


def _operator(cfg, lm, cal):
    op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    op.attach(cal, float(cfg.baseline.repair_range_margin), float(cfg.baseline.repair_noise_margin))
    return op


def _window(cfg, lm, n: int = 48, seed: int = 0) -> torch.Tensor:
    return calibration._windows(cfg, lm)[1][seed % 2][:n][None]


def _logits(op, lm, ids):
    """Logits of the last 8 tokens of `ids` read over the cache of the first ones (with `op` inside attention)."""
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :-8])
        z, _ = hf.forward(lm.model, ids[:, -8:], cache, hf.HookPlan(repair=op) if op is not None else None)
    return z


def _damaged(cache, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in layers:
        k, v = (x.clone() for x in hf.get_kv(cache, l))
        v[0, 0, 5, :4] = 0.0  # lost elements
        k[0, -1, 9, 1] = 1e3  # a spike
        v[0, -1, 20:] += 3.0 * v[0, -1, 20:].pow(2).mean().sqrt() * torch.randn(v[0, -1, 20:].shape, generator=g)
        out[l] = (k, v)
    return out


def test_on_a_clean_cache_the_operator_is_the_bare_kernel_bit_for_bit(llama_e):
    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    torch.manual_seed(1)
    op.w2.data.normal_()  # a trained-looking gate: still nothing flagged on a clean cache, nothing changes
    op.u.data.normal_()
    ids = _window(cfg, lm)
    z_bare = _logits(None, lm, ids)
    z_op = _logits(op, lm, ids)
    assert torch.equal(z_op, z_bare)


def test_at_initialisation_it_is_calibrated_repair(llama_e):
    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    ids = _window(cfg, lm)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :-8])
    bad = _damaged(cache, op.layers)
    seen = {}
    with torch.no_grad():
        _, c2 = hf.forward(lm.model, ids[:, :-8])
        for l, (k, v) in bad.items():
            hf.set_kv(c2, l, k, v)
        plan = hf.HookPlan(repair=op, record=lambda l, q, k, v: seen.__setitem__(l, (k.clone(), v.clone())))
        z_op, _ = hf.forward(lm.model, ids[:, -8:], c2, plan)
    # what the operator hands the kernel: calibrated_repair of what attention read (positions from 0)
    dfn = defenses.make("calibrated_repair", cfg.baseline.to_dict())
    for l in op.layers:
        k, v = seen[l]
        fixed = op.repair(l, k, v)
        assert bool(fixed["K"][1].any()) and bool(fixed["V"][1].any())
        got = dfn.apply(k, v, defenses.LayerInput(l, torch.arange(k.shape[2]), cal=cal))
        # the same closed form on the same statistics (copied into the operator's buffers), to float rounding;
        # what it flags, exactly
        assert torch.allclose(fixed["K"][0], got.k, rtol=0, atol=1e-6)
        assert torch.allclose(fixed["V"][0], got.v, rtol=0, atol=1e-6)
        assert torch.equal(fixed["K"][1], (got.k != k).any(-1)) and torch.equal(fixed["V"][1], (got.v != v).any(-1))
    # and the layer's output is the kernel on those repaired entries: same logits as the repaired cache read bare
    with torch.no_grad():
        _, c3 = hf.forward(lm.model, ids[:, :-8])
        for l, (k, v) in bad.items():
            hf.set_kv(c3, l, k, v)
        def on_read(l, k, v):
            fx = op.repair(l, k, v)
            return fx["K"][0].to(k.dtype), fx["V"][0].to(v.dtype)

        z_ref, _ = hf.forward(lm.model, ids[:, -8:], c3, hf.HookPlan(layers=frozenset(op.layers), on_read=on_read))
    assert torch.equal(z_op, z_ref)


def test_the_harm_aware_gate_shuts_on_a_harmless_change(llama_e):
    """A clean cache the repair mistakes for a damaged one (its ranges narrowed to a point: every element is
    'out of range' and clamped): correcting only harms, the KD loss says so, and training shuts the gate."""
    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    with torch.no_grad():
        for x in "kv":
            getattr(op, f"{x}_lo").copy_(getattr(op, f"{x}_mean"))
            getattr(op, f"{x}_hi").copy_(getattr(op, f"{x}_mean"))
        op.settings[2] = 0.0  # range margin: anything beyond the range is clamped
    ids = _window(cfg, lm, 64)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids[:, :-8])
        teacher, _ = hf.forward(lm.model, ids[:, -8:], hf.clone_cache(cache))
    opt = torch.optim.Adam(op.parameters(), lr=0.05)
    t = float(cfg.train.temperature)
    first = None
    for _ in range(30):
        z, _ = hf.forward(lm.model, ids[:, -8:], hf.clone_cache(cache), hf.HookPlan(repair=op))
        gate = op.gate_mean()
        loss = train.kd_loss(teacher, z, t) + 0.01 * gate
        if first is None:
            first, kd0 = float(gate.detach()), float(train.kd_loss(teacher, z, t).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == 1.0 and kd0 > 1e-5  # at initialisation the repair acted on every flagged entry, and harmed
    z, _ = hf.forward(lm.model, ids[:, -8:], hf.clone_cache(cache), hf.HookPlan(repair=op))
    assert float(op.gate_mean().detach()) < 0.05
    assert float(train.kd_loss(teacher, z, t).detach()) < 0.1 * kd0


def test_incremental_decoding_repairs_what_the_whole_cache_repair_does(llama_e):
    """With `incremental` (what `protect` sets), a decode step repairs only the entries after the last stable
    block and takes the rest from the plan's memo: the same flags and, to float rounding, the same logits as
    repairing the whole cache at every step."""
    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    torch.manual_seed(2)
    with torch.no_grad():
        op.w2.normal_()
        op.u.normal_(std=0.1)
    ids = _window(cfg, lm, 24)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    for l, (k, v) in _damaged(cache, op.layers).items():
        hf.set_kv(cache, l, k, v)
    runs = {}
    for incremental in (False, True):
        op.incremental, op.entries_repaired = incremental, 0
        c, plan, tok, got = hf.clone_cache(cache), hf.HookPlan(repair=op), ids[:, -1:], []
        with torch.no_grad():
            for _ in range(40):  # past several blocks of the noise estimate
                z, c = hf.forward(lm.model, tok, c, plan)
                tok = z[:, -1:].argmax(-1)
                got.append(z[:, -1])
        runs[incremental] = (torch.cat(got), plan.memo, op.entries_repaired)
    assert not runs[False][1] and runs[True][1]  # only the incremental run keeps repairs in the memo
    assert runs[True][2] < 0.7 * runs[False][2]  # and repairs the stable blocks once
    assert torch.allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-4)
    stored = runs[True][1][("prior", op.layers[0])]
    assert stored["end"] == op.stable(c.get_seq_length()) > 0  # the stable blocks of the last step's cache


def _decode(op, lm, cache, first, steps, between=None):
    """Greedy logits of `steps` decode steps from a copy of `cache` with `op` (None: the bare hook); `between(c)`
    may change the cache after each step."""
    plan = hf.HookPlan(repair=op) if op is not None else hf.HookPlan(layers=frozenset(range(lm.arch.num_layers)))
    c, tok, got = hf.clone_cache(cache), first, []
    with torch.no_grad():
        for _ in range(steps):
            z, c = hf.forward(lm.model, tok, c, plan)
            tok = z[:, -1:].argmax(-1)
            got.append(z[:, -1])
            if between is not None:
                between(c)
    return torch.cat(got)


def test_decoding_a_cache_the_repair_leaves_alone_repairs_nothing_and_is_the_bare_model(llama_e):
    """Where nothing can be flagged (margins far above any clean level), an incremental decode screens each step
    and repairs no entry after the first: the logits are the bare model's bit for bit, across block boundaries."""
    cfg, lm, cal = llama_e
    op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    op.attach(cal, 1e6, 1e6)
    op.incremental = True
    ids = _window(cfg, lm, 24)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    bare = _decode(None, lm, cache, ids[:, -1:], 40)
    op.entries_repaired = 0
    got = _decode(op, lm, cache, ids[:, -1:], 40)
    assert torch.equal(got, bare)
    first_step = len(op.layers) * 1 * lm.arch.num_kv_heads * 25  # the first step repairs the whole cache once
    assert op.entries_repaired == first_step


def test_the_screen_never_misses_what_the_repair_flags(llama_e):
    """`prior.may_flag` (the decode step's screen) says True on every tail of which `repair` flags an entry:
    lost elements, a spike, block noise, each alone; and False on tails the repair leaves alone."""
    from cachemedicpp import prior

    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    g = torch.Generator().manual_seed(3)
    seen = {True: 0, False: 0}
    for seed in range(2):
        ids = _window(cfg, lm, 64, seed)
        with torch.no_grad():
            _, cache = hf.forward(lm.model, ids)
        for l in op.layers:
            k, v = hf.get_kv(cache, l)
            for T in (20, 33, 47, 64):
                s0 = op.stable(T - 1)
                for damage in ("none", "zero", "spike", "noise", "nan"):
                    kt, vt = k[:, :, s0:T].clone(), v[:, :, s0:T].clone()
                    if damage == "zero":
                        vt[0, 0, -1, 2] = 0.0
                    elif damage == "spike":
                        kt[0, -1, 0, 1] += 50 * kt.abs().max()
                    elif damage == "noise":
                        vt += 2.0 * vt.pow(2).mean().sqrt() * torch.randn(vt.shape, generator=g)
                    elif damage == "nan":
                        kt[0, 0, -1, 0] = float("nan")
                    with torch.no_grad():
                        flagged = any(bool(ch.any()) for _, ch in op.repair(l, kt, vt, start=s0).values())
                    screen, _ = prior.may_flag(*op._kinds(op._i(l), kt, vt, s0), op._screen(op._i(l)), op._ints()[1])
                    assert screen or not flagged, (l, T, damage)
                    if damage != "none":
                        assert flagged, (l, T, damage)  # each damage is one the repair sees
                    seen[screen] += 1
    assert seen[False] > 0  # the screen clears tails, not only flags them


def test_an_entry_damaged_between_decode_steps_is_repaired_as_the_whole_cache_repair_does(llama_e):
    """A fault on the newest entry between two steps: the incremental decode notices the changed tail, repairs it,
    and gives the logits of repairing the whole cache at every step (to float rounding)."""
    cfg, lm, cal = llama_e
    op = _operator(cfg, lm, cal)
    ids = _window(cfg, lm, 24)
    with torch.no_grad():
        _, cache = hf.forward(lm.model, ids)
    count = {"n": 0}

    def spike(c):
        count["n"] += 1
        if count["n"] % 7 == 0:
            for l in op.layers:
                k, v = hf.get_kv(c, l)
                k[0, 0, -1, 1] += 100.0 * k.abs().max()
    runs = {}
    for incremental in (False, True):
        op.incremental, op.entries_repaired, count["n"] = incremental, 0, 0
        runs[incremental] = (_decode(op, lm, cache, ids[:, -1:], 30, spike), op.entries_repaired)
    assert torch.allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-4)
    assert 0 < runs[True][1] < runs[False][1]


def test_grid_cells_a_defense_leaves_alone_reuse_no_defense_value_bit_for_bit(llama_e, monkeypatch):
    cfg0, lm, cal = llama_e
    data = cfg0.to_dict()
    data["eval"]["defenses"] = ["no_defense", "calibrated_repair", "range_clamp", "cachemedic"]
    data["eval"]["corruption_eval"].update(types=["dropout_zero", "contiguous_overwrite"], eps=[0.0, 0.16, 0.64])
    data["eval"]["cell_batch_size"] = 1  # a row alone in its batch: its value is exactly its own forward's
    cfg = load_config(data=data)
    op = _operator(cfg, lm, cal)
    torch.manual_seed(1)
    op.w2.data.normal_()  # a trained-looking gate and residual: where something is flagged, the output changes
    op.u.data.normal_()
    ctx = ev.build_context(cfg, lm, op, cal)
    computed: list[str] = []
    real = ev.grid.run_batch

    def counting(ctx, ex, clean, rows, *args, **kwargs):
        computed.extend(r.cell.key for r in rows)
        return real(ctx, ex, clean, rows, *args, **kwargs)

    monkeypatch.setattr(ev.grid, "run_batch", counting)
    reused = set()
    for ex in {e.task: e for e in reversed(ctx.examples)}.values():
        full = ev.score_example(ctx, ex, dedupe=False)
        computed.clear()
        fast = ev.score_example(ctx, ex)
        assert fast["cells"] == full["cells"], ex.key  # bit for bit, every cell
        assert fast.get("nonfinite") == full.get("nonfinite")
        assert fast["tokens"] < full["tokens"]
        reused |= {k for k in fast["cells"] if k not in computed}
    key = lambda t, e, d: ev.Cell(t, e, d).key  # noqa: E731
    # on the clean cache neither the repair nor the operator flags anything: no_defense's forward stands for both
    assert {key("clean", 0.0, "calibrated_repair"), key("clean", 0.0, "cachemedic")} <= reused
    # a donor's history overwritten into the cache looks clean to them: left alone, reused
    assert {key("contiguous_overwrite", 0.64, d) for d in ("calibrated_repair", "cachemedic")} <= reused
    # lost elements are flagged and imputed: computed; a clamp to the calibrated range always moves something
    assert not {key("dropout_zero", 0.64, d) for d in ("calibrated_repair", "cachemedic")} & reused
    assert key("clean", 0.0, "range_clamp") not in reused


def test_family_e_training_paused_and_resumed_is_bit_identical(tiny_cfg, tmp_path, monkeypatch):
    from conftest import pause_after

    from cachemedicpp.cli import EXIT_PAUSED

    data = tiny_cfg("llama", **{**SMALL, "train.steps": 4, "train.save_every": 4, "train.log_every": 1})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(data=data)
    ref, rd = tmp_path / "straight", tmp_path / "paused"
    assert train.run(cfg, ref, config_path=str(cfg_path)) == EXIT_OK
    with monkeypatch.context() as m:
        pause_after(m, rd, 2)
        assert train.run(cfg, rd, config_path=str(cfg_path)) == EXIT_PAUSED
    assert train.run(cfg, rd, config_path=str(cfg_path)) == EXIT_OK  # the calibration file is reused
    a, b = (torch.load(x / "checkpoints" / "repair_step_4.pt", weights_only=False)["state_dict"] for x in (ref, rd))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda x: [json.loads(r)["loss_total"] for r in (x / "logs" / "train.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(ref) == losses(rd)


def test_sliding_window_layers_are_refused(tiny_lm):
    lm = tiny_lm("gemma3")
    with pytest.raises(ConfigError, match="sliding window"):
        repair.build_operator({"family": "E", "protect_layers": [0, 1, 2]}, lm.arch)


def test_family_e_trains_and_evaluates(tiny_cfg, tmp_path):
    data = tiny_cfg("llama", **{**SMALL, "train.steps": 4, "train.save_every": 2,
                                "eval.defenses": ["no_defense", "calibrated_repair", "cachemedic"],
                                "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}],
                                "eval.corruption_eval.types": ["dropout_zero"],
                                "eval.validation.num_examples": 1})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp_path / "run"
    assert train.main(["--config", str(cfg_path), "--run_dir", str(rd)]) == EXIT_OK
    assert (rd / "checkpoints" / "calibration.pt").is_file()  # built by training, reused by eval
    records = [json.loads(x) for x in (rd / "logs" / "train.jsonl").read_text().splitlines()]
    assert all(r["gate_mean"] is None or 0.0 <= r["gate_mean"] <= 1.0 for r in records)
    payload = torch.load(rd / "checkpoints" / "repair_step_4.pt", weights_only=False)
    assert bool(payload["state_dict"]["attached"])  # the checkpoint carries the clean-cache model
    assert ev.main(["--config", str(cfg_path), "--run_dir", str(rd)]) == EXIT_OK
    m = json.loads((rd / "metrics" / "task_metrics.json").read_text())["metrics"]
    assert "cachemedic" in m["robustness_auc"] and "calibrated_repair" in m["robustness_auc"]
    # in the user's own generate: on a clean prompt nothing is flagged, the tokens are the stock model's
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cachemedicpp

    model = AutoModelForCausalLM.from_pretrained(data["model"]["name"], attn_implementation="sdpa").eval()
    ids = AutoTokenizer.from_pretrained(data["model"]["name"])("The river runs past the old mill",
                                                               return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with cachemedicpp.protect(model, run_dir=rd, defense="cachemedic"):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref)
    # a checkpoint of family E under a config that asks for another family is refused, naming it
    other = dict(data, repair={**data["repair"], "family": "A"})
    with pytest.raises(ConfigError, match="family-E"):
        repair.load_repair_checkpoint(rd / "checkpoints" / "repair_step_4.pt", load_config(data=other).repair.to_dict(),
                                      hf.load_model(load_config(data=other).model.to_dict(), "cpu", "float32").arch)
