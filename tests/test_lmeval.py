"""lm-evaluation-harness integration: the `cachemedic` lm-eval model equals lm-eval's stock `hf` model at
eps 0 (accuracy exactly, log-likelihoods within fp32 tolerance), the choices of a question share one
corrupted cache (paired across defenses), `lmeval:<task>` entries join the eval grid, figures and report
(and resume bit-identically after a pause), and bad input exits 2 naming the culprit. Offline: the tasks
are small YAML tasks over JSONL files in tests/data/lmeval/, on the tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import write_cfg as cfg_file  # noqa: E402
from cachemedicpp import ROOT, hf, lmeval, tasks  # noqa: E402
from cachemedicpp.lmeval import adapter, backend, tokens  # noqa: E402
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PAUSED  # noqa: E402
from cachemedicpp.config import ConfigError, load_config  # noqa: E402

DATA = ROOT / "tests" / "data" / "lmeval"
MC, TEXT, GEN = "cm_tiny_mc", "cm_tiny_text", "cm_tiny_gen"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task_dir(lmeval_task_dir) -> Path:
    return lmeval_task_dir


def evaluate(model: str, model_args: str, task: str, task_dir: Path, limit: int | None = None) -> dict:
    import lm_eval

    backend.register()
    tm = adapter.task_manager(task, str(task_dir))
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tm,
                                   log_samples=True, limit=limit, bootstrap_iters=0)


def lls(res: dict, task: str) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


# --------------------------------------------------------------------------------------------------
# the backend


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backend_equals_stock_hf_at_eps_zero(arch, tiny_model_dir, tiny_cfg, task_dir, tmp_path):
    cfg = cfg_file(tmp_path, tiny_cfg(arch))
    stock = evaluate("hf", f"pretrained={tiny_model_dir(arch)},dtype=float32,device=cpu", MC, task_dir)
    ours = evaluate("cachemedic", f"config={cfg},eps=0,defense=no_defense", MC, task_dir)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][MC][metric] == stock["results"][MC][metric]
    a, b = lls(stock, MC), lls(ours, MC)
    assert len(a) == 12 and [len(x) for x in a] == [len(x) for x in b]
    assert max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)) < 1e-4
    assert ours["config"]["model"] == "cachemedic"


def test_rolling_and_generation_equal_stock_hf_at_eps_zero(tiny_model_dir, tiny_cfg, task_dir, tmp_path):
    """Texts shorter than the window: every token sees its whole prefix in both backends, so the rolling
    log-likelihoods agree; greedy decoding from the (clean) cache emits the stock model's tokens."""
    cfg = cfg_file(tmp_path, tiny_cfg("llama", **{"eval.max_seq_len": 128}))
    stock_args = f"pretrained={tiny_model_dir('llama')},dtype=float32,device=cpu"
    ours_args = f"config={cfg},eps=0,defense=no_defense"
    a, b = evaluate("hf", stock_args, TEXT, task_dir), evaluate("cachemedic", ours_args, TEXT, task_dir)
    assert len(a["samples"][TEXT]) == 4
    for s, t in zip(a["samples"][TEXT], b["samples"][TEXT]):
        x, y = float(s["resps"][0][0]), float(t["resps"][0][0])
        assert abs(x - y) < 1e-5 * abs(x) + 1e-4
    g1, g2 = evaluate("hf", stock_args, GEN, task_dir, limit=4), evaluate("cachemedic", ours_args, GEN, task_dir, limit=4)
    texts = [s["resps"][0][0] for s in g1["samples"][GEN]]
    assert [s["resps"][0][0] for s in g2["samples"][GEN]] == texts and any(texts)


def test_choices_share_one_corrupted_context_paired_across_defenses(tiny_cfg, task_dir, tmp_path, monkeypatch):
    from cachemedicpp import corruption

    draws: dict[str, list] = {}
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    orig_apply, orig_set = corruption.Corruptor.apply_cache, hf.set_kv

    def apply_cache(self, kv, ctype, eps, phase, example_id, **kw):
        out = orig_apply(self, kv, ctype, eps, phase, example_id, **kw)
        draws.setdefault(example_id, []).append({l: (k.clone(), v.clone()) for l, (k, v) in out[0].items()})
        return out

    def set_kv(cache, layer, k, v):
        batches.append((k.clone(), v.clone()))
        return orig_set(cache, layer, k, v)

    monkeypatch.setattr(corruption.Corruptor, "apply_cache", apply_cache)
    monkeypatch.setattr(hf, "set_kv", set_kv)
    cfg = cfg_file(tmp_path, tiny_cfg("llama"))
    res = {}
    for d in ("no_defense", "smoothing"):
        res[d] = evaluate("cachemedic", f"config={cfg},corruption=gaussian,eps=1.0,defense={d}", MC, task_dir, limit=4)
    # one corrupted context per question and defense: 4 questions × 2 defenses, never one per choice
    assert sorted(draws) == [f"lmeval:{MC}:{i}" for i in range(4)]
    assert all(len(v) == 2 for v in draws.values())
    for v in draws.values():  # paired: both defenses started from the very same corrupted cache
        assert v[0].keys() == v[1].keys() and v[0]
        assert all(torch.equal(v[0][l][0], v[1][l][0]) and torch.equal(v[0][l][1], v[1][l][1]) for l in v[0])
    # every choice (batch row) of a question reads the same cache
    assert batches and all(k.shape[0] == 4 and all(torch.equal(k[0], k[i]) and torch.equal(v[0], v[i])
                                                   for i in range(4)) for k, v in batches)
    clean = evaluate("cachemedic", f"config={cfg},eps=0,defense=no_defense", MC, task_dir, limit=4)
    assert lls(clean, MC) != lls(res["no_defense"], MC)  # the corruption reached the scores
    assert lls(res["smoothing"], MC) != lls(res["no_defense"], MC)


def test_on_read_persistence_through_the_backend(tiny_cfg, task_dir, tmp_path):
    """On read: the clean cell equals the at-rest clean scores; a corrupted read moves them."""
    at_rest = cfg_file(tmp_path / "a", tiny_cfg("llama"))
    on_read = cfg_file(tmp_path / "r", tiny_cfg("llama", **{"corruption.persistence": "on_read"}))
    base = lls(evaluate("cachemedic", f"config={at_rest},eps=0", MC, task_dir, limit=3), MC)
    clean = lls(evaluate("cachemedic", f"config={on_read},eps=0", MC, task_dir, limit=3), MC)
    hit = lls(evaluate("cachemedic", f"config={on_read},corruption=gaussian,eps=1.0", MC, task_dir, limit=3), MC)
    assert max(abs(x - y) for u, v in zip(base, clean) for x, y in zip(u, v)) < 1e-4
    assert hit != clean


@pytest.mark.parametrize("defense", ["no_defense", "smoothing"])
def test_a_context_without_an_old_region_is_scored_not_aliased(defense, tiny_cfg, task_dir, tmp_path):
    """Contexts no longer than corruption.axes.N_recent have no old region: a corrupted cell covers nothing at
    rest and scores what the clean cell scores. The backend's grid holds that one cell, so it is scored, not
    read from a clean cell the backend never scored."""
    cfg = cfg_file(tmp_path, tiny_cfg("llama", **{"corruption.axes.N_recent": 10_000}))
    clean = lls(evaluate("cachemedic", f"config={cfg},eps=0,defense={defense}", MC, task_dir, limit=3), MC)
    hit = lls(evaluate("cachemedic", f"config={cfg},corruption=gaussian,eps=0.64,defense={defense}", MC, task_dir,
                       limit=3), MC)
    assert hit == clean


def test_cachemedic_defense_reads_the_run_dirs_checkpoint(tiny_cfg, tiny_lm, task_dir, tmp_path):
    """defense=cachemedic loads the run's repair checkpoint; the operator (not the identity) changes the
    scores of the very same corrupted caches; generation decodes from the corrupted cache."""
    from cachemedicpp import repair
    from cachemedicpp.fileio import atomic_torch_save

    data = tiny_cfg("llama")
    cfg_path = cfg_file(tmp_path, data)
    cfg = load_config(cfg_path)
    op = repair.build_operator(cfg.repair.to_dict(), tiny_lm("llama").arch, cfg.seed)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    rd = tmp_path / "run"
    atomic_torch_save(rd / "checkpoints" / "repair_step_4.pt",
                      repair.repair_checkpoint_payload(op, 4, cfg.hash, cfg.repair.to_dict()))
    args = f"config={cfg_path},corruption=gaussian,eps=1.0"
    plain = evaluate("cachemedic", args, MC, task_dir, limit=3)
    fixed = evaluate("cachemedic", f"{args},defense=cachemedic,run_dir={rd}", MC, task_dir, limit=3)
    assert lls(fixed, MC) != lls(plain, MC)
    gen = evaluate("cachemedic", f"{args},defense=cachemedic,run_dir={rd}", GEN, task_dir, limit=2)
    assert len(gen["samples"][GEN]) == 2
    with pytest.raises(ConfigError, match="no repair checkpoint"):
        backend.register()(config=str(cfg_path), defense="cachemedic", run_dir=str(tmp_path / "empty"))


def test_backend_bad_model_args(tiny_cfg, tmp_path):
    cls = backend.register()
    cfg = cfg_file(tmp_path, tiny_cfg("llama"))
    with pytest.raises(ConfigError, match="unknown corruption type 'gausian'.*did you mean gaussian"):
        cls(config=str(cfg), corruption="gausian", eps=0.1)
    with pytest.raises(ConfigError, match="needs run_dir"):
        cls(config=str(cfg), defense="cachemedic")
    with pytest.raises(ConfigError, match="config=<a cachemedicpp config YAML> is required"):
        cls.create_from_arg_string("eps=0.1")
    with pytest.raises(ConfigError, match=r"unknown defence \(did you mean defense\?\)"):
        cls.create_from_arg_string(f"config={cfg},defence=smoothing", {"batch_size": 1, "device": None})


# --------------------------------------------------------------------------------------------------
# lmeval:<task> in the eval grid


def grid_cfg(tiny_cfg, task_dir: Path, **over) -> dict:
    return tiny_cfg("llama", **{
        "eval.tasks": [{"name": f"lmeval:{MC}", "num_examples": 4, "include_path": str(task_dir)},
                       {"name": f"lmeval:{TEXT}", "num_examples": 3, "include_path": str(task_dir)},
                       {"name": "wikitext2_ppl", "num_examples": 2}],
        "eval.defenses": ["no_defense", "smoothing", "cachemedic"], "eval.allow_missing_checkpoint": True,
        "eval.corruption_eval.types": ["gaussian"], **over})


def test_examples_mirror_lm_eval_requests(tiny_lm, tiny_cfg, task_dir):
    lm = tiny_lm("llama")
    cfg = load_config(data=grid_cfg(tiny_cfg, task_dir))
    tcfg = dict(cfg.eval.tasks[0], start=2)
    exs, info = tasks.get_task(tcfg["name"]).build(lm, cfg, tcfg, {})
    assert [e.index for e in exs] == [2, 3, 4, 5] and info["kind"] == "accuracy"
    docs = [json.loads(l) for l in (DATA / "questions.jsonl").read_text().splitlines()]
    for ex in exs:
        d = docs[ex.index]
        ctx, _ = tokens.encode_pair(lm.tokenizer, f"Question: {d['question']}\nAnswer:", " x")
        assert ex.prefix.tolist() == ctx[:-1] and ex.rows == len(d["choices"])
        assert (ex.feeds[:, 0] == ctx[-1]).all()  # every scored token reads the cache
        assert ex.example_id == f"lmeval:{MC}:{ex.index}"
    few, finfo = tasks.get_task(tcfg["name"]).build(lm, cfg, {**tcfg, "few_shot": 2}, {})
    assert finfo["lmeval"]["num_fewshot"] == 2  # lm-eval's own demonstrations, in front of each question
    assert all(f.prefix.numel() > e.prefix.numel() + 10 and torch.equal(f.feeds, e.feeds) for f, e in zip(few, exs))
    # x is lm-eval's own per-document metric: acc (argmax of the summed log-likelihood), or acc_norm
    norm, _ = tasks.get_task(tcfg["name"]).build(lm, cfg, {**tcfg, "metric": "acc_norm"}, {})
    task = adapter._TASKS[tcfg["name"]]
    g = torch.Generator().manual_seed(0)
    for a, b in zip(exs, norm):
        logits = torch.randn(a.rows, a.feeds.shape[1], 512, generator=g)
        x_acc, x_norm = tasks.get_task(a.task).score(logits, a), tasks.get_task(b.task).score(logits, b)
        assert a.meta["scored"] == b.meta["scored"]
        want = task.process_results(a.meta["doc"], a.meta["scored"])
        assert (x_acc, x_norm) == (want["acc"], want["acc_norm"])
        best = max(range(a.rows), key=lambda r: a.meta["scored"][r][0])
        assert x_acc == float(best == docs[a.index]["answer"])
    rolled, rinfo = tasks.get_task(cfg.eval.tasks[1]["name"]).build(lm, cfg, cfg.eval.tasks[1], {})
    assert rinfo["kind"] == "ppl" and rinfo["value_name"] == "perplexity" and len(rolled) == 3
    assert all(e.prefix.numel() >= 1 and e.rows == 1 for e in rolled)


def test_grid_metrics_report_figure_and_resume(tiny_cfg, task_dir, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from cachemedicpp import eval as ev
    from cachemedicpp import plots, results

    data = grid_cfg(tiny_cfg, task_dir)
    cfg = cfg_file(tmp_path / "c", data)
    straight = tmp_path / "straight"
    assert ev.main(["--config", str(cfg), "--run_dir", str(straight)]) == EXIT_OK
    m = json.loads((straight / "metrics" / "task_metrics.json").read_text())
    name, text = f"lmeval:{MC}", f"lmeval:{TEXT}"
    assert results.validate(m, results.TASK_METRICS_SCHEMA) == []
    met, st = m["metrics"], m["settings"]
    assert {r["task"] for r in met["task_curves"]} == {name, text, "wikitext2_ppl"}
    assert name in met["robustness_auc_by_task"] and name in met["clean_metrics"]
    assert st["tasks"][name]["lmeval"]["output_type"] == "multiple_choice" and st["tasks"][name]["n"] == 4
    assert st["tasks"][text]["kind"] == "ppl"
    # x is lm-eval's acc: the clean undefended accuracy equals the stock backend's on the same documents
    stock = evaluate("hf", f"pretrained={data['model']['name']},dtype=float32,device=cpu", MC, task_dir, limit=4)
    assert met["clean_metrics"][name]["no_defense"] == pytest.approx(stock["results"][MC]["acc,none"], abs=1e-12)

    # report and figure A (one panel per task)
    stab = json.loads((ROOT / "tests" / "data" / "metrics" / "stability_metrics.json").read_text())
    stab["config_hash"] = m["config_hash"]
    (straight / "metrics" / "stability_metrics.json").write_text(json.dumps(stab))
    titles, orig = [], Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda self, t, *a, **k: (titles.append(t), orig(self, t, *a, **k))[1])
    plots.fig_score_vs_eps(plots.load_inputs(straight))
    assert name in titles and text in titles
    assert plots.main(["--run_dir", str(straight)]) == 0
    assert name in (straight / "paper" / "report.md").read_text()
    monkeypatch.undo()

    # pause after two units, resume: the same bytes as the straight run
    paused = tmp_path / "paused"
    orig_score, n = ev.score_example, {"k": 0}

    def pause_after_two(ctx, ex, dedupe=True):
        out = orig_score(ctx, ex, dedupe)
        n["k"] += 1
        if n["k"] == 2:
            (paused / "control" / "pause.request").write_text("")
        return out

    monkeypatch.setattr(ev, "score_example", pause_after_two)
    assert ev.main(["--config", str(cfg), "--run_dir", str(paused)]) == EXIT_PAUSED
    monkeypatch.undo()
    assert json.loads((paused / "metrics" / "eval_progress.json").read_text())["completed_units"] == 2
    assert ev.main(["--config", str(cfg), "--run_dir", str(paused)]) == EXIT_OK
    a, b = (json.loads((d / "metrics" / "task_metrics.json").read_text()) for d in (straight, paused))
    a.pop("run_id"), b.pop("run_id")
    assert a["metrics"] == b["metrics"]


# --------------------------------------------------------------------------------------------------
# the command and bad input


def test_cli_runs_lm_eval_with_the_backend(tiny_cfg, task_dir, tmp_path):
    cfg = cfg_file(tmp_path, tiny_cfg("llama"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cachemedicpp.lmeval", "--model", "cachemedic", "--model_args",
           f"config={cfg},corruption=gaussian,eps=0.5,defense=no_defense", "--tasks", MC, "--include_path",
           str(task_dir), "--limit", "3", "--output_path", str(out), "--device", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["results"][MC]["acc,none"] >= 0 and res["config"]["model"] == "cachemedic"


def test_unknown_task_exits_2_naming_it(tiny_cfg, task_dir, tmp_path, capsys):
    from cachemedicpp import eval as ev

    assert lmeval.main(["--model", "cachemedic", "--model_args", "config=x.yaml", "--tasks", "cm_tiny_mcq",
                        "--include_path", str(task_dir)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'cm_tiny_mcq'" in err and "did you mean cm_tiny_mc" in err
    data = grid_cfg(tiny_cfg, task_dir, **{"eval.tasks": [{"name": "lmeval:cm_tiny_mcq", "num_examples": 2,
                                                           "include_path": str(task_dir)}]})
    cfg = cfg_file(tmp_path, data)
    assert ev.main(["--config", str(cfg), "--run_dir", str(tmp_path / "rd")]) == EXIT_BAD_INPUT
    assert "unknown lm-eval task 'cm_tiny_mcq'" in capsys.readouterr().err


def test_unsupported_output_type_and_metric_exit_2(tiny_lm, tiny_cfg, task_dir):
    lm = tiny_lm("llama")
    cfg = load_config(data=grid_cfg(tiny_cfg, task_dir))
    gen = {"name": f"lmeval:{GEN}", "num_examples": 2, "include_path": str(task_dir), "start": 0, "few_shot": 0}
    with pytest.raises(ConfigError, match="output type 'generate_until' is not supported in the grid"):
        tasks.get_task(gen["name"]).build(lm, cfg, gen, {})
    bad = {**gen, "name": f"lmeval:{MC}", "metric": "f1"}
    with pytest.raises(ConfigError, match="metric 'f1' is not one of the task's per-document metrics"):
        tasks.get_task(bad["name"]).build(lm, cfg, bad, {})


def test_missing_lm_eval_exits_2_naming_it(tiny_cfg, task_dir, tmp_path, monkeypatch, capsys):
    from cachemedicpp import eval as ev

    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    adapter._manager.cache_clear()
    try:
        assert lmeval.main(["--model", "cachemedic", "--tasks", MC]) == EXIT_BAD_INPUT
        assert "lm-eval is not installed" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=r"lm-eval is not installed.*cachemedicpp\[lmeval\]"):
            tasks.get_task(f"lmeval:{MC}")
        cfg = cfg_file(tmp_path, grid_cfg(tiny_cfg, task_dir))
        assert ev.main(["--config", str(cfg), "--run_dir", str(tmp_path / "rd")]) == EXIT_BAD_INPUT
        assert "lm-eval is not installed" in capsys.readouterr().err
    finally:
        adapter._manager.cache_clear()


@pytest.mark.slow
def test_embedded_model_backend_equals_stock_hf(task_dir, tmp_path):
    """The embedded SmolLM2: the same accuracy as lm-eval's stock model at eps 0; a heavy corruption of the
    cached question moves the choices' log-likelihoods."""
    source, _ = hf.model_source({"name": "embedded:smollm2-135m-instruct"})
    cfg = cfg_file(tmp_path, {"seed": 0, "device": "cpu", "repair": {"protect_layers": [2, 3]},
                              "corruption": {"axes": {"N_recent": 4}}, "data": {"use_offline": True}})
    stock = evaluate("hf", f"pretrained={source},dtype=float32,device=cpu", MC, task_dir)
    ours = evaluate("cachemedic", f"config={cfg},eps=0,defense=no_defense", MC, task_dir)
    assert ours["results"][MC]["acc,none"] == stock["results"][MC]["acc,none"]
    assert ours["results"][MC]["acc_norm,none"] == stock["results"][MC]["acc_norm,none"]
    a, b = lls(stock, MC), lls(ours, MC)
    assert max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)) < 1e-3
    hit = evaluate("cachemedic", f"config={cfg},corruption=gaussian,eps=1.0,defense=no_defense", MC, task_dir)
    assert lls(hit, MC) != b
    print(f"SmolLM2 {MC}: acc {stock['results'][MC]['acc,none']:.3f} stock = cachemedic eps 0; "
          f"gaussian eps 1.0: acc {hit['results'][MC]['acc,none']:.3f}")
