"""The base attention kernel: sdpa by default (the fastest), eager still selectable, and the same metrics
under both within fp32 tolerance, the dropping defenses (which act through the attention mask) included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cachemedicpp import ROOT
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

DEFENSES = ["no_defense", "reset_clear", "norm_outlier_drop", "oracle_drop", "cachemedic"]


def test_default_kernel_is_sdpa(tiny_cfg):
    assert load_config(data=tiny_cfg("llama")).model.attn_implementation == "sdpa"
    assert load_config(data=tiny_cfg("llama", **{"model.attn_implementation": "eager"})).model.attn_implementation \
        == "eager"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(path).model.attn_implementation == "sdpa", path.name


def _eval(tmp: Path, data: dict, name: str) -> tuple[dict, dict]:
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rd = tmp / name
    assert ev.main(["--config", str(cfg_path), "--run_dir", str(rd)]) == EXIT_OK
    resolved = yaml.safe_load((rd / "config_resolved.yaml").read_text())
    return json.loads((rd / "metrics" / "task_metrics.json").read_text())["metrics"], resolved


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sdpa_and_eager_give_the_same_metrics(tmp_path, tiny_cfg, arch):
    """Every grid cell's raw value (perplexities, accuracies) agrees within fp32 tolerance, under no defense,
    a write defense and both dropping defenses; on gemma3 with a context past its window of 16."""
    over = {"eval.defenses": DEFENSES, "eval.allow_missing_checkpoint": True,
            "eval.corruption_eval.types": ["gaussian", "bitflipish_sparse"],
            "eval.validation.num_examples": 1,
            "baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
            "baseline.calibration.window_len": 40, "baseline.calibration.cont_len": 8}
    if arch == "gemma3":
        over.update({"data.long_context.context_len": 40, "eval.max_seq_len": 48, "repair.protect_layers": [0, 1, 2]})
    base = tiny_cfg(arch, **over)
    assert "attn_implementation" not in base["model"]
    sdpa, resolved = _eval(tmp_path, base, "sdpa")
    assert resolved["model"]["attn_implementation"] == "sdpa"  # the default, resolved
    eager, _ = _eval(tmp_path, tiny_cfg(arch, **over, **{"model.attn_implementation": "eager"}), "eager")
    rows_s = {(r["task"], r["corruption_type"], r["epsilon"], r["defense"]): r["value"] for r in sdpa["task_curves"]}
    rows_e = {(r["task"], r["corruption_type"], r["epsilon"], r["defense"]): r["value"] for r in eager["task_curves"]}
    assert rows_s.keys() == rows_e.keys()
    assert {k[3] for k in rows_s} == set(DEFENSES)
    keys = sorted(rows_s)
    for d in ("oracle_drop", "norm_outlier_drop"):  # they drop entries here: the mask path is exercised
        assert any(rows_s[k] != rows_s[k[:3] + ("no_defense",)] for k in keys if k[3] == d), d
    np.testing.assert_allclose([rows_s[k] for k in keys], [rows_e[k] for k in keys], rtol=1e-4, atol=1e-6)
    for t in sdpa["robustness_auc_by_task"]:
        for d in DEFENSES:
            assert sdpa["robustness_auc_by_task"][t][d] == pytest.approx(eager["robustness_auc_by_task"][t][d],
                                                                         rel=1e-4, abs=1e-6), (t, d)
