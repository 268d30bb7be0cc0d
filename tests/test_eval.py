"""eval: metric keys and shapes, files written, paired corruption across defenses, eps 0 = clean,
bit-identical resume after a pause request or a SIGKILL, the same file from worker processes, --no-resume,
missing checkpoint, on-read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cfg
from cachemedicpp import ROOT, corruption, defenses, repair
from cachemedicpp import eval as ev
from cachemedicpp.config import load_config
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import atomic_torch_save, read_jsonl, validate_records

SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1"}
REFERENCE = ("reset_clear", "smoothing", "masking_dropout", "clipping_renorm")  # the reference heuristics
DEFENSES = ["no_defense", "reset_clear", "smoothing", "masking_dropout", "clipping_renorm", "cachemedic"]
METRIC_KEYS = {"task_curves", "clean_metrics", "clean_scores", "score_vs_eps", "score_vs_eps_by_task",
               "robustness_auc", "robustness_auc_ci", "robustness_auc_by_task", "clean_regression",
               "best_heuristic_name", "heuristic_auc", "paired_bootstrap", "robustness_auc_by_type",
               "paired_bootstrap_by_type", "exposure", "overhead", "best_baseline_choice", "defense_groups", "damage",
               "damage_by_type", "recovered_fraction", "recovered_fraction_by_type", "exposure_evicted",
               "nonfinite_outputs"}
ROW_KEYS = {"task", "corruption_type", "epsilon", "defense", "value", "score", "n", "ci_low", "ci_high"}
PAIRED = {"cachemedic_minus_no_defense", "cachemedic_minus_best_heuristic",
          "clean_cachemedic_minus_no_defense", "clean_cachemedic_minus_best_heuristic"}


pytestmark = pytest.mark.usefixtures("one_thread")


def args(cfg_path: Path, rd: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--run_dir", str(rd), *extra]


def files_of(rd: Path) -> set[str]:
    return {str(p.relative_to(rd)) for p in rd.rglob("*") if p.is_file()}


def metrics_bytes(rd: Path) -> bytes:
    return (rd / "metrics" / "task_metrics.json").read_bytes()


def load_metrics(rd: Path) -> dict:
    return json.loads(metrics_bytes(rd))


def make_checkpoint(cfg_dict: dict, lm, rd: Path, step: int = 4) -> Path:
    """A repair checkpoint whose operator is not the identity (so cachemedic cells differ)."""
    cfg = load_config(data=cfg_dict)
    op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = rd / "checkpoints" / f"repair_step_{step}.pt"
    atomic_torch_save(path, repair.repair_checkpoint_payload(op, step, cfg.hash, cfg.repair.to_dict()))
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, tiny_lm):
    """One uninterrupted eval on the tiny Llama with a trained-looking checkpoint."""
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("eval_base")
    data = tiny_config(tiny_model_dir("llama"))
    cfg_path = write_cfg(root, data)
    rd = root / "a" / "run"
    ckpt = make_checkpoint(data, tiny_lm("llama"), rd)
    assert ev.main(args(cfg_path, rd)) == EXIT_OK
    return {"cfg_path": cfg_path, "data": data, "rd": rd, "ckpt": ckpt.read_bytes()}


def fresh_run_dir(base: dict, folder: Path) -> Path:
    rd = folder / "run"  # same run dir name: same run_id, so metrics files can be compared byte for byte
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "checkpoints" / "repair_step_4.pt").write_bytes(base["ckpt"])
    return rd


# --------------------------------------------------------------------------------------------------
# outputs


def test_metrics_keys_shapes_and_files(baseline):
    rd = baseline["rd"]
    assert files_of(rd) == {".lock", "config_resolved.yaml", "run_record.json", "env.json",
                            "checkpoints/repair_step_4.pt", "logs/eval.jsonl", "logs/eval_heartbeat.json",
                            "logs/eval_heartbeat.jsonl", "metrics/task_metrics.json", "metrics/eval_progress.json"}
    doc = load_metrics(rd)
    cfg = load_config(baseline["cfg_path"])
    assert set(doc) == {"run_id", "config_hash", "metrics", "settings"} and doc["config_hash"] == cfg.hash
    m = doc["metrics"]
    assert set(m) == METRIC_KEYS
    tasks_ = ["wikitext2_ppl", "sst2_prompted", "needle_long_context"]
    eps, types = [0.0, 0.16], ["gaussian", "contiguous_overwrite"]
    n_cells = len(DEFENSES) * (1 + len(types) * len(eps))
    assert len(m["task_curves"]) == len(tasks_) * n_cells
    assert all(set(r) == ROW_KEYS for r in m["task_curves"])
    assert {(r["task"], r["corruption_type"], r["epsilon"], r["defense"]) for r in m["task_curves"]} == (
        {(t, "clean", 0.0, d) for t in tasks_ for d in DEFENSES}
        | {(t, ty, e, d) for t in tasks_ for ty in types for e in eps for d in DEFENSES})
    for r in m["task_curves"]:
        assert r["n"] == {"wikitext2_ppl": 3, "sst2_prompted": 4, "needle_long_context": 2}[r["task"]]
        assert r["ci_low"] <= r["score"] + 1e-12 and r["score"] <= r["ci_high"] + 1e-12
    for t in tasks_:
        assert set(m["clean_metrics"][t]) == set(DEFENSES) == set(m["clean_scores"][t])
        assert 0.0 <= m["exposure"][t] <= 1.0 and m["exposure_evicted"][t] == 0.0  # no sliding layers
    assert m["clean_scores"]["wikitext2_ppl"]["no_defense"] == 1.0
    assert m["clean_metrics"]["wikitext2_ppl"]["no_defense"] > 1.0  # a perplexity
    for block in [m["score_vs_eps"]] + [m["score_vs_eps_by_task"][t] for t in tasks_]:
        assert block["eps"] == eps
        assert set(block["per_defense"]) == set(DEFENSES)
        for name in ("no_defense", "best_heuristic", "cachemedic"):
            assert len(block[name]) == len(eps)
        assert set(block["ci"]) == set(DEFENSES) | {"best_heuristic"}
        assert all(len(v["low"]) == len(v["high"]) == len(eps) for v in block["ci"].values())
    best = m["best_heuristic_name"]
    assert best in defenses.candidates()
    # chosen on the validation grid (held-in types, other examples), never on these test AUCs
    choice = m["best_baseline_choice"]
    assert choice["chosen"] == best and set(choice["validation_auc"]) == set(REFERENCE)
    assert choice["validation_auc"][best] == max(choice["validation_auc"].values())
    assert m["heuristic_auc"] == m["robustness_auc"]["best_heuristic"] == m["robustness_auc"][best]
    assert set(m["robustness_auc"]) == set(DEFENSES) | {"best_heuristic"} == set(m["robustness_auc_ci"])
    assert m["score_vs_eps"]["best_heuristic"] == m["score_vs_eps"]["per_defense"][best]
    assert set(m["paired_bootstrap"]) == PAIRED
    pb = m["paired_bootstrap"]["cachemedic_minus_no_defense"]
    assert set(pb) >= {"diff", "ci_low", "ci_high", "n", "samples"} and pb["n"] == 9 and pb["samples"] == 50
    assert pb["diff"] == pytest.approx(m["robustness_auc"]["cachemedic"] - m["robustness_auc"]["no_defense"])
    # per type: the overall curve averages the types at every eps > 0 (eps 0 is the shared clean cell) and
    # the trapezoid is linear, so the overall AUC is the mean of the per-type AUCs
    assert set(m["robustness_auc_by_type"]) == set(types) == set(m["paired_bootstrap_by_type"])
    for d in DEFENSES:
        assert m["robustness_auc"][d] == pytest.approx(np.mean([m["robustness_auc_by_type"][ty][d] for ty in types]))
    assert m["robustness_auc_by_type"]["gaussian"] != m["robustness_auc_by_type"]["contiguous_overwrite"]
    for ty in types:
        pt = m["paired_bootstrap_by_type"][ty]
        assert set(pt) == {"cachemedic_minus_no_defense", "cachemedic_minus_best_heuristic"}
        a = m["robustness_auc_by_type"][ty]
        assert pt["cachemedic_minus_no_defense"]["diff"] == pytest.approx(a["cachemedic"] - a["no_defense"])
        assert pt["cachemedic_minus_best_heuristic"]["diff"] == pytest.approx(a["cachemedic"] - a[best])
        assert pt["cachemedic_minus_no_defense"]["ci_low"] <= pt["cachemedic_minus_no_defense"]["ci_high"]
    assert m["overhead"] is None
    # the checkpoint's operator is not the identity: cachemedic changes the scores
    assert m["clean_metrics"]["wikitext2_ppl"]["cachemedic"] != m["clean_metrics"]["wikitext2_ppl"]["no_defense"]
    s = doc["settings"]
    assert s["checkpoint"]["path"] == "checkpoints/repair_step_4.pt" and s["checkpoint"]["step"] == 4
    assert s["persistence"] == "at_rest" and s["eps"] == eps and s["types"] == types
    assert s["data_sources"]["wikitext2"].startswith("offline:") and s["oracle_note"] == defenses.ORACLE_NOTE
    assert s["tasks"]["sst2_prompted"]["n"] == 4 and s["bootstrap_samples"] == 50

    logs = read_jsonl(rd / "logs" / "eval.jsonl")
    assert not validate_records(logs, "log_record")
    assert not validate_records([doc], "metric_record")
    assert {(r["task"], r["epsilon"]) for r in logs} == {(t, e) for t in tasks_ + ["all"] for e in eps}
    assert len(logs) == 8 and all(r["phase"] == "eval" and r["run_id"] == doc["run_id"] for r in logs)
    hb = json.loads((rd / "logs" / "eval_heartbeat.json").read_text())
    assert hb["status"] == "completed" and hb["step"] == hb["total_steps"] == 9 + 3  # 3 validation units
    prog = json.loads((rd / "metrics" / "eval_progress.json").read_text())
    assert prog["status"] == "completed" and prog["completed_units"] == prog["total_units"] == 9 + 3
    # validation examples come from the validation split: one per task
    assert set(prog["validation_units"]) == {"wikitext2_ppl/validation/00000", "sst2_prompted/validation/00255",
                                            "needle_long_context/validation/00000"}  # disjoint splits (data.SPLITS)
    assert set(prog["units"]) == {f"{t}/{i:05d}" for t, n in (("wikitext2_ppl", 3), ("sst2_prompted", 4),
                                                              ("needle_long_context", 2)) for i in range(n)}

    # a rerun of a finished eval recomputes nothing, rewrites the same metrics and no duplicate summaries
    before = metrics_bytes(rd)
    assert ev.main(args(baseline["cfg_path"], rd)) == EXIT_OK
    assert metrics_bytes(rd) == before
    assert len(read_jsonl(rd / "logs" / "eval.jsonl")) == 8


# --------------------------------------------------------------------------------------------------
# pairing and identities


def _ctx(tiny_cfg, tiny_lm, **over):
    lm = tiny_lm("llama")
    cfg = load_config(data=tiny_cfg("llama", **over))
    op = repair.build_operator(cfg.repair.to_dict(), lm.arch, cfg.seed)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return ev.build_context(cfg, lm, op)


def test_all_defenses_see_the_same_corrupted_cache(tiny_cfg, tiny_lm, monkeypatch):
    ctx = _ctx(tiny_cfg, tiny_lm)
    ex = ctx.examples[0]
    from cachemedicpp import hf

    seen = []
    for name in REFERENCE:
        cls = defenses.get(name)
        original = cls.apply

        def recorder(self, k, v, inp, _original=original):
            seen.append((self.name, k.clone(), v.clone()))
            return _original(self, k, v, inp)

        monkeypatch.setattr(cls, "apply", recorder)
    with torch.no_grad():
        _, clean = hf.forward(ctx.lm.model, ex.prefix[None])
    groups: dict = {}
    for row in ev.cell_rows(ctx, ex, clean, dedupe=False):
        g = groups.setdefault((row.cell.ctype, row.cell.eps), {"rows": {}, "inputs": []})
        g["rows"][row.cell.defense] = row
        g["inputs"] += seen
        seen.clear()
    assert len(groups) == 1 + 2 * 2
    for (ctype, eps), g in groups.items():
        nd, cm = g["rows"]["no_defense"], g["rows"]["cachemedic"]
        region = nd.region
        assert set(nd.overrides) == set(region.layers) == {0, 1}
        heur_inputs = {}
        for name, k, v in g["inputs"]:
            heur_inputs.setdefault(name, []).append((k, v))
        assert set(heur_inputs) == set(REFERENCE)
        for layer_i, layer in enumerate(sorted(nd.overrides)):
            k_nd, v_nd = nd.overrides[layer]
            # cachemedic reads exactly the corrupted cache no_defense reads
            assert torch.equal(cm.overrides[layer][0], k_nd) and torch.equal(cm.overrides[layer][1], v_nd)
            # every heuristic was handed that same corrupted K/V
            for name, kvs in heur_inputs.items():
                assert torch.equal(kvs[layer_i][0], k_nd) and torch.equal(kvs[layer_i][1], v_nd), name
            k_clean, _ = hf.get_kv(clean, layer)
            m = region.mask(layer).expand_as(k_clean)
            if ctype != "clean" and eps > 0:
                assert not torch.equal(k_nd[m], k_clean[m])  # the corruption really acted
            else:
                assert torch.equal(k_nd, k_clean)
            assert torch.equal(k_nd[~m], k_clean[~m])  # and only inside the region
            reset = g["rows"]["reset_clear"].overrides[layer][0]
            assert (reset[m] == 0).all() and torch.equal(reset[~m], k_nd[~m])  # never a silent no-op
    # the draws depend only on (seed, example, type, eps, layer): rebuilt from scratch, they agree
    again = corruption.Corruptor(ctx.cfg.corruption.to_dict(), [0, 1], ctx.lm.arch.num_kv_heads, ctx.cfg.seed,
                                 donor_kv=ctx.corruptor.donor)
    kv = {l: hf.get_kv(clean, l) for l in (0, 1)}
    redo, _ = again.apply_cache(kv, "gaussian", 0.16, "eval", ex.example_id)
    assert torch.equal(redo[0][0], groups[("gaussian", 0.16)]["rows"]["no_defense"].overrides[0][0])


def test_eps0_cells_equal_clean_cells(tiny_cfg, tiny_lm):
    ctx = _ctx(tiny_cfg, tiny_lm)
    by_task = {}
    for ex in ctx.examples:
        by_task.setdefault(ex.task, ex)
    for ex in by_task.values():
        full = ev.score_example(ctx, ex, dedupe=False)["cells"]  # every eps 0 cell really computed
        fast = ev.score_example(ctx, ex)["cells"]
        assert fast.keys() == full.keys()
        for d in ctx.defense_names:
            clean = full[ev.Cell("clean", 0.0, d).key]
            for t in ctx.types:
                assert full[ev.Cell(t, 0.0, d).key] == pytest.approx(clean, rel=1e-5, abs=1e-6), (ex.task, t, d)
                assert fast[ev.Cell(t, 0.0, d).key] == fast[ev.Cell("clean", 0.0, d).key]
        for key in full:
            assert fast[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6)
        if ex.task == "wikitext2_ppl":
            nd = full[ev.Cell("clean", 0.0, "no_defense").key]
            assert full[ev.Cell("gaussian", 0.16, "no_defense").key] != nd
            assert full[ev.Cell("clean", 0.0, "cachemedic").key] != nd


# --------------------------------------------------------------------------------------------------
# resume


def test_pause_request_then_resume_is_bit_identical(baseline, tmp_path, monkeypatch):
    rd = fresh_run_dir(baseline, tmp_path)
    real = ev.score_example
    calls, arm = [], [True]

    def pause_after_first(ctx, ex, dedupe=True):
        out = real(ctx, ex, dedupe)
        calls.append(ex.key)
        if len(calls) == 2 and arm[0]:
            arm[0] = False
            (rd / "control" / "pause.request").write_text("")
        return out

    monkeypatch.setattr(ev, "score_example", pause_after_first)
    assert ev.main(args(baseline["cfg_path"], rd)) == EXIT_PAUSED
    ack = json.loads((rd / "control" / "pause_ack_eval.json").read_text())
    assert ack["phase"] == "eval" and ack["step"] == 2 and ack["reason"] == "pause.request"
    assert not (rd / "control" / "pause.request").exists()
    assert not (rd / "metrics" / "task_metrics.json").exists()
    prog = json.loads((rd / "metrics" / "eval_progress.json").read_text())
    assert prog["status"] == "paused" and prog["completed_units"] == 2
    assert len(prog["units"]) + len(prog["validation_units"]) == 2
    hb = json.loads((rd / "logs" / "eval_heartbeat.json").read_text())
    assert hb["status"] == "paused" and hb["step"] == 2

    calls.clear()
    assert ev.main(args(baseline["cfg_path"], rd)) == EXIT_OK
    done = set(prog["units"]) | set(prog["validation_units"])
    assert len(calls) == 12 - 2 and not set(calls) & done  # exactly the unfinished units (3 of them validation)
    assert metrics_bytes(rd) == metrics_bytes(baseline["rd"])
    assert len(read_jsonl(rd / "logs" / "eval.jsonl")) == 8
    statuses = [r["status"] for r in read_jsonl(rd / "logs" / "eval_heartbeat.jsonl")]
    assert "paused" in statuses and "resumed" in statuses and statuses[-1] == "completed"


def test_sigkill_then_rerun_is_bit_identical(tmp_path, tiny_cfg):
    data = tiny_cfg("llama", **{"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 12}],
                                "eval.cell_batch_size": 1, "eval.allow_missing_checkpoint": True})
    cfg_path = write_cfg(tmp_path, data)
    ref = tmp_path / "a" / "run"
    assert ev.main(args(cfg_path, ref)) == EXIT_OK
    rd = tmp_path / "b" / "run"
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "cachemedicpp.eval", *args(cfg_path, rd)], cwd=ROOT,
                                env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=e)
    prog_path = rd / "metrics" / "eval_progress.json"
    deadline = time.monotonic() + 180
    done = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"eval ended early ({proc.returncode}): {err.read_text()[-2000:]}"
        if prog_path.is_file():
            done = json.loads(prog_path.read_text())["completed_units"]
            if done >= 2:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    prog = json.loads(prog_path.read_text())
    assert 2 <= prog["completed_units"] < 12 and prog["status"] == "running"
    assert not (rd / "metrics" / "task_metrics.json").exists()

    assert ev.main(args(cfg_path, rd)) == EXIT_OK
    assert metrics_bytes(rd) == metrics_bytes(ref)
    assert not [p for p in files_of(rd) if ".tmp" in p]  # a killed writer's temp file is cleared


def test_no_resume_recomputes(baseline, tmp_path):
    rd = fresh_run_dir(baseline, tmp_path)
    assert ev.main(args(baseline["cfg_path"], rd)) == EXIT_OK
    prog_path = rd / "metrics" / "eval_progress.json"
    prog = json.loads(prog_path.read_text())
    key = ev.Cell("clean", 0.0, "no_defense").key
    prog["units"]["sst2_prompted/00000"]["cells"][key] = 1.0 - prog["units"]["sst2_prompted/00000"]["cells"][key]
    prog_path.write_text(json.dumps(prog))
    # resume trusts the stored units (recomputes nothing) ...
    assert ev.main(args(baseline["cfg_path"], rd)) == EXIT_OK
    assert metrics_bytes(rd) != metrics_bytes(baseline["rd"])
    # ... --no-resume discards them and recomputes everything
    assert ev.main(args(baseline["cfg_path"], rd, "--no-resume")) == EXIT_OK
    assert metrics_bytes(rd) == metrics_bytes(baseline["rd"])


# --------------------------------------------------------------------------------------------------
# worker processes


def with_workers(base: dict, folder: Path, n: int = 2) -> Path:
    data = json.loads(json.dumps(base["data"]))
    data["eval"]["workers"] = n
    return write_cfg(folder, data)


def summaries(rd: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timestamp_utc"} for r in read_jsonl(rd / "logs" / "eval.jsonl")]


def test_workers_give_the_serial_results(baseline, tmp_path):
    """eval.workers: 2 scores the units in two worker processes (one torch thread each, as the serial run
    here): the same metrics file byte for byte (eval.workers is outside the config hash), units and log."""
    rd = fresh_run_dir(baseline, tmp_path)
    assert ev.main(args(with_workers(baseline, tmp_path / "cfg"), rd)) == EXIT_OK
    assert metrics_bytes(rd) == metrics_bytes(baseline["rd"])
    prog, ref = (json.loads((d / "metrics" / "eval_progress.json").read_text()) for d in (rd, baseline["rd"]))
    assert prog["status"] == "completed" and prog["completed_units"] == 12
    assert prog["units"] == ref["units"] and prog["validation_units"] == ref["validation_units"]
    assert summaries(rd) == summaries(baseline["rd"])
    assert not (rd / "control" / "pause_ack_eval.json").exists()


def test_workers_pause_request_then_resume(baseline, tmp_path, monkeypatch):
    """A pause request under eval.workers: 2 lets the units in flight finish, saves them, exits 3; the
    rerun scores the rest to the serial run's file."""
    from cachemedicpp import progress

    rd = fresh_run_dir(baseline, tmp_path)
    cfg_path = with_workers(baseline, tmp_path / "cfg")
    real, saved, armed = progress.Progress.save, [], [True]

    def save(self, status, elapsed):
        real(self, status, elapsed)
        saved.append(status)
        if saved.count("running") == 2 and armed[0]:  # after the second unit
            armed[0] = False
            (rd / "control" / "pause.request").write_text("")

    monkeypatch.setattr(progress.Progress, "save", save)
    assert ev.main(args(cfg_path, rd)) == EXIT_PAUSED
    prog = json.loads((rd / "metrics" / "eval_progress.json").read_text())
    k = prog["completed_units"]
    assert prog["status"] == "paused" and 2 <= k <= 3  # the unit in flight beside the second one is kept
    assert len(prog["units"]) + len(prog["validation_units"]) == k == saved.count("running")
    ack = json.loads((rd / "control" / "pause_ack_eval.json").read_text())
    assert ack["step"] == k and ack["reason"] == "pause.request"
    assert json.loads((rd / "logs" / "eval_heartbeat.json").read_text())["status"] == "paused"
    assert not (rd / "metrics" / "task_metrics.json").exists()

    saved.clear()
    assert ev.main(args(cfg_path, rd)) == EXIT_OK
    assert saved.count("running") == 12 - k  # only the units not saved before
    assert metrics_bytes(rd) == metrics_bytes(baseline["rd"])


# --------------------------------------------------------------------------------------------------
# bad input and variants


def test_missing_checkpoint_is_exit_2(tiny_cfg, tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, tiny_cfg("llama"))
    rd = tmp_path / "run"
    assert ev.main(args(cfg_path, rd)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "repair checkpoint" in err and "allow_missing_checkpoint" in err and "Traceback" not in err
    assert not (rd / "metrics" / "task_metrics.json").exists()


def test_on_read_persistence_and_untrained_operator(tiny_cfg, tmp_path):
    data = tiny_cfg("llama", **{"corruption.persistence": "on_read", "eval.allow_missing_checkpoint": True,
                                "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}],
                                "eval.defenses": ["smoothing", "cachemedic"], "eval.measure_overhead": True})
    cfg_path = write_cfg(tmp_path, data)
    rd = tmp_path / "run"
    assert ev.main(args(cfg_path, rd)) == EXIT_OK
    doc = load_metrics(rd)
    s, m = doc["settings"], doc["metrics"]
    assert s["persistence"] == "on_read" and s["defenses"] == ["no_defense", "smoothing", "cachemedic"]
    assert "identity" in s["checkpoint"]["status"] and s["checkpoint"]["path"] is None
    rows = {(r["corruption_type"], r["epsilon"], r["defense"]): r["value"] for r in m["task_curves"]}
    assert rows[("gaussian", 0.16, "no_defense")] != rows[("clean", 0.0, "no_defense")]
    # an untrained operator is exactly the identity
    assert rows[("gaussian", 0.16, "cachemedic")] == rows[("gaussian", 0.16, "no_defense")]
    assert set(m["overhead"]) == {"no_defense", "smoothing", "cachemedic"}
    assert all(v["tokens_per_sec"] > 0 and v["wall_sec"] > 0 and v["peak_mem_mb"] > 0 for v in m["overhead"].values())
    assert all("peak" in v["peak_mem_method"] for v in m["overhead"].values())


@pytest.mark.slow
def test_embedded_model_clean_needle_accuracy_is_nonzero(tmp_path):
    data = {"seed": 0, "device": "cpu", "repair": {"protect_layers": [2, 3]},
            "data": {"use_offline": True, "long_context": {"context_len": 128}},
            "eval": {"tasks": [{"name": "needle_long_context", "num_examples": 3}],
                     "defenses": ["no_defense"], "bootstrap_samples": 10,
                     "corruption_eval": {"eps": [0.0, 0.16], "types": ["gaussian"]}}}
    cfg_path = write_cfg(tmp_path, data)
    rd = tmp_path / "run"
    assert ev.main(args(cfg_path, rd)) == EXIT_OK
    m = load_metrics(rd)["metrics"]
    assert m["clean_metrics"]["needle_long_context"]["no_defense"] > 0
