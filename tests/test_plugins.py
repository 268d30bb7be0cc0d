"""The plug-in points are real: a defense and a corruption type defined here, outside the package, and
registered by name, run through eval (grid, best-baseline rule, AUC, report, figure A), stability and the
lm-eval backend without any change to the package."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from cachemedicpp import corruption, defenses, plots, results, stability
from cachemedicpp import eval as ev
from cachemedicpp.cli import EXIT_OK

PLUGIN_DEFENSE = "test_vector_clip"
PLUGIN_TYPE = "test_sign_flip"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class VectorClip(defenses.Defense):
    """Clamp every element to ±c times its vector's RMS: sees no mask, so it treats every protected layer."""

    name = PLUGIN_DEFENSE
    group = results.GROUP_CALIBRATED
    acts_on = defenses.PROTECTED
    candidate = True
    c: float = 2.0

    def apply(self, k: torch.Tensor, v: torch.Tensor, inp: defenses.LayerInput) -> defenses.Defended:
        def clip(x):
            bound = self.c * x.float().pow(2).mean(-1, keepdim=True).sqrt()
            return torch.maximum(torch.minimum(x.float(), bound), -bound).to(x.dtype)
        return defenses.Defended(clip(k), clip(v))


def _sign_flip(x: torch.Tensor, sev: dict, gen: torch.Generator, mask: torch.Tensor) -> torch.Tensor:
    """Each element's sign flipped with probability p (one draw shared by the batch rows, as every type)."""
    return torch.where(corruption.draw(torch.rand, x, gen) < sev["p"], -x, x)


SIGN_FLIP = corruption.CorruptionType(
    PLUGIN_TYPE, "other", severity=lambda eps, s, params: {"p": min(1.0, 0.05 * s)},
    transform=corruption.float_transform(_sign_flip))


@pytest.fixture
def plugins():
    defenses.register_defense(VectorClip)
    corruption.register_corruption(SIGN_FLIP)
    yield
    defenses.unregister_defense(PLUGIN_DEFENSE)
    corruption.unregister_corruption(PLUGIN_TYPE)


def _config(tiny_cfg, folder: Path) -> Path:
    data = tiny_cfg("llama", **{
        "eval.defenses": ["no_defense", PLUGIN_DEFENSE, "cachemedic"],
        "eval.allow_missing_checkpoint": True,
        "eval.corruption_eval.types": [PLUGIN_TYPE, "bitflipish_sparse"],
        "eval.corruption_eval.eps": [0.0, 0.32],
        "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}, {"name": "sst2_prompted", "num_examples": 2}]})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_defense_and_a_corruption_type_registered_outside_the_package_run_everywhere(plugins, tiny_cfg, tmp_path):
    cfg = _config(tiny_cfg, tmp_path / "c")
    rd = tmp_path / "run"
    assert ev.main(["--config", str(cfg), "--run_dir", str(rd)]) == EXIT_OK
    doc = json.loads((rd / "metrics" / "task_metrics.json").read_text())
    assert results.validate(doc, results.TASK_METRICS_SCHEMA) == []
    m = doc["metrics"]
    # the grid scored it, the best-baseline rule chose it on the validation grid (the only candidate), the
    # AUC and the groups know it
    assert m["best_heuristic_name"] == PLUGIN_DEFENSE
    assert m["defense_groups"][PLUGIN_DEFENSE] == results.GROUP_CALIBRATED
    assert PLUGIN_DEFENSE in m["robustness_auc"] and PLUGIN_DEFENSE in m["best_baseline_choice"]["validation_auc"]
    rows = {(r["task"], r["corruption_type"], r["epsilon"], r["defense"]): r["value"] for r in m["task_curves"]}
    moved = [k for k, val in rows.items() if k[3] == PLUGIN_DEFENSE and val != rows[(*k[:3], "no_defense")]]
    assert moved  # it acted: some cell's value differs from no defense's
    # the plug-in type has its cells and its per-type AUC, and it reached the scores
    assert PLUGIN_TYPE in m["robustness_auc_by_type"]
    assert rows[("wikitext2_ppl", PLUGIN_TYPE, 0.32, "no_defense")] != rows[("wikitext2_ppl", "clean", 0.0, "no_defense")]

    assert stability.main(["--config", str(cfg), "--run_dir", str(rd)]) == EXIT_OK
    sdoc = json.loads((rd / "metrics" / "stability_metrics.json").read_text())
    sens = sdoc["metrics"]["stability.logit_sensitivity"]
    assert sens["heuristic"] == PLUGIN_DEFENSE and all(PLUGIN_DEFENSE in p["heuristics"] for p in sens["points"])

    assert plots.main(["--run_dir", str(rd)]) == EXIT_OK
    assert (rd / "paper" / "figures" / "figA_score_vs_eps.png").stat().st_size > 0
    assert PLUGIN_DEFENSE in (rd / "paper" / "report.md").read_text()
    assert defenses.style(PLUGIN_DEFENSE) == defenses.style(PLUGIN_DEFENSE)  # a stable spare style


def test_a_plugin_defense_through_the_lm_eval_backend(plugins, tiny_cfg, tmp_path, lmeval_task_dir):
    lm_eval = pytest.importorskip("lm_eval")
    from cachemedicpp.lmeval import adapter, backend

    tasks_dir = lmeval_task_dir
    cfg = _config(tiny_cfg, tmp_path / "c")
    backend.register()
    task = "cm_tiny_mc"

    def lls(defense: str) -> list[float]:
        res = lm_eval.simple_evaluate(model="cachemedic", model_args=f"config={cfg},corruption={PLUGIN_TYPE},eps=1.0,"
                                      f"defense={defense}", tasks=[task], task_manager=adapter.task_manager(task, str(tasks_dir)),
                                      log_samples=True, limit=4, bootstrap_iters=0)
        return [float(r[0][0]) for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]

    clean = lm_eval.simple_evaluate(model="cachemedic", model_args=f"config={cfg},eps=0,defense=no_defense",
                                    tasks=[task], task_manager=adapter.task_manager(task, str(tasks_dir)),
                                    log_samples=True, limit=4, bootstrap_iters=0)
    clean = [float(r[0][0]) for s in sorted(clean["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]
    hit = lls("no_defense")
    assert hit != clean  # the plug-in type reached the scores
    assert lls(PLUGIN_DEFENSE) != hit  # and the plug-in defense acted on them
