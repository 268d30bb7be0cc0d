"""results: the typed description of task_metrics.json and stability_metrics.json, the schemas generated
from it, and real files of tiny eval / stability runs validated against them."""


import copy
import json
from pathlib import Path

import jsonschema
import pytest
import torch

from cachemedicpp import eval as ev
from cachemedicpp import defenses, repair, results, stability
from cachemedicpp.cli import EXIT_OK
from cachemedicpp.config import SCHEMA_DIR, load_config, load_schema
from cachemedicpp.fileio import atomic_torch_save, validate_records
from cachemedicpp.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# the generated schemas


@pytest.mark.parametrize("name", list(results.SCHEMAS))
def test_checked_in_schema_is_generated(name):
    """schemas/<name> is exactly what the TypedDicts generate (regenerate: python -m cachemedicpp.results)."""
    td = results.SCHEMAS[name]
    text = (SCHEMA_DIR / name).read_text(encoding="utf-8")
    assert text == results.schema_text(td), f"schemas/{name} is stale: run python -m cachemedicpp.results"
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert load_schema(name.removesuffix(".schema.json")) == results.json_schema(td)
    assert results.stale_schemas() == []


def test_metric_record_keeps_the_envelope():
    s = load_schema("metric_record")
    assert s["required"] == ["run_id", "config_hash", "metrics", "settings"]
    for name in (results.TASK_METRICS_SCHEMA, results.STABILITY_METRICS_SCHEMA):
        assert json.loads((SCHEMA_DIR / name).read_text())["required"] == s["required"]


def _typeddicts(td: type, seen: dict[str, type]) -> dict[str, type]:
    """Every TypedDict reachable from td, walking the type hints themselves (not the generated schema)."""
    from typing import get_args

    if td.__name__ in seen:
        return seen
    seen[td.__name__] = td

    def walk(tp):
        if results.is_typeddict(tp):
            _typeddicts(tp, seen)
        for a in get_args(tp):
            walk(a)

    for tp, _, _, _ in results.field_docs(td).values():
        walk(tp)
    return seen


@pytest.mark.parametrize("name", list(results.SCHEMAS))
def test_every_key_has_a_description(name):
    td = results.SCHEMAS[name]
    schema = results.json_schema(td)
    tds = _typeddicts(td, {})
    assert len(tds) == 1 + len(schema.get("$defs", {}))
    n_keys = 0
    for tname, t in tds.items():
        obj = schema if t is td else schema["$defs"][tname]
        assert obj["description"].strip(), f"{tname} has no docstring"
        keys = set(t.__annotations__)
        assert set(obj["properties"]) == keys
        for key in keys:
            desc = obj["properties"][key].get("description", "")
            assert isinstance(desc, str) and len(desc.strip()) >= 3, f"{tname}.{key}: no description"
            n_keys += 1
        assert set(obj.get("required", [])) == set(t.__required_keys__)
        assert obj["additionalProperties"] is False
    assert n_keys >= 4


def test_converter_types():
    from typing import Annotated, Literal, NotRequired, TypedDict

    class Inner(TypedDict):
        """An inner object."""

        x: Annotated[int, "an int", {"minimum": 0}]

    class Outer(TypedDict):
        """An outer object."""

        a: Annotated[list[Inner], "list of inner"]
        b: Annotated[dict[str, float], "keys: names"]
        c: Annotated[Inner | None, "nullable inner"]
        d: Annotated[Literal["p", "q"], "a choice"]
        e: NotRequired[Annotated[str | None, "optional nullable string"]]
        f: Annotated[tuple[float, float], "a pair"]
        g: Annotated[bool, "a flag"]

    s = results.json_schema(Outer)
    p = s["properties"]
    assert s["required"] == ["a", "b", "c", "d", "f", "g"] and s["additionalProperties"] is False
    assert p["a"] == {"description": "list of inner", "type": "array", "items": {"$ref": "#/$defs/Inner"}}
    assert p["b"]["additionalProperties"] == {"type": "number"}
    assert p["c"]["anyOf"] == [{"$ref": "#/$defs/Inner"}, {"type": "null"}]
    assert p["d"]["enum"] == ["p", "q"] and p["e"]["type"] == ["string", "null"] and p["g"]["type"] == "boolean"
    assert s["$defs"]["Inner"]["properties"]["x"] == {"description": "an int", "type": "integer", "minimum": 0}
    v = jsonschema.Draft202012Validator(s)
    good = {"a": [{"x": 1}], "b": {"k": 1.5}, "c": None, "d": "p", "f": [0.1, 0.2], "g": True}
    assert not list(v.iter_errors(good))
    assert list(v.iter_errors({**good, "f": [0.1, 0.2, 0.3]})) and list(v.iter_errors({**good, "a": [{"x": -1}]}))

    class NoComment(TypedDict):
        """Missing a comment."""

        y: int

    with pytest.raises(TypeError, match="NoComment.y"):
        results.json_schema(NoComment)


def test_reader_constants_are_keys_of_the_typeddicts():
    tm, sm = results.TaskMetrics.__annotations__, results.StabilityMetrics.__annotations__
    for key in (results.BEST_HEURISTIC_NAME, results.ROBUSTNESS_AUC, results.ROBUSTNESS_AUC_CI,
                results.CLEAN_REGRESSION, results.PAIRED_BOOTSTRAP, results.OVERHEAD, results.SCORE_VS_EPS,
                results.SCORE_VS_EPS_BY_TASK, results.ROBUSTNESS_AUC_BY_TASK, results.ROBUSTNESS_AUC_BY_TYPE,
                results.CLEAN_SCORES, results.PAIRED_BOOTSTRAP_BY_TYPE, results.BEST_BASELINE_CHOICE,
                results.DEFENSE_GROUPS, results.DAMAGE, results.DAMAGE_BY_TYPE, results.RECOVERED_FRACTION,
                results.RECOVERED_FRACTION_BY_TYPE):
        assert key in tm, key
    for key in (results.CALIBRATION, results.VALIDATION, results.OOD_SPLIT):
        assert key in results.TaskSettings.__annotations__, key
    for key in (results.SENS_KEY, results.AMP_KEY, results.STAB_SETTINGS_KEY):
        assert key in sm, key
    assert set(results.MAP_DEFENSES) <= set(results.AmplificationMap.__annotations__)
    assert results.BEST_HEURISTIC_SERIES in results.CurveBlock.__annotations__
    pb = results.PairedBootstrap.__annotations__
    assert {results.CACHEMEDIC_MINUS_NO_DEFENSE, results.CACHEMEDIC_MINUS_BEST_HEURISTIC} <= set(pb)
    env = {results.RUN_ID, results.CONFIG_HASH, results.METRICS, results.SETTINGS}
    assert env == set(results.MetricRecord.__annotations__) == set(results.TaskMetricsFile.__annotations__) \
        == set(results.StabilityMetricsFile.__annotations__)
    # the writers' own spellings agree with the shared ones
    assert ev.REPAIR_NAME == results.CACHEMEDIC and stability.MAP_DEFENSES == results.MAP_DEFENSES


# --------------------------------------------------------------------------------------------------
# the fair benchmark's keys (issue 16)


FAIR = Path(__file__).parent / "data" / "metrics" / "task_metrics_fair.json"


def _props(schema: dict, name: str) -> dict:
    return schema["$defs"][name]["properties"]


def test_fair_benchmark_keys_are_described():
    schema = results.json_schema(results.TaskMetricsFile)
    m = _props(schema, "TaskMetrics")
    assert "validation" in m[results.BEST_HEURISTIC_NAME]["description"]
    assert m[results.BEST_BASELINE_CHOICE]["anyOf"] == [{"$ref": "#/$defs/BestBaselineChoice"}, {"type": "null"}]
    assert set(_props(schema, "BestBaselineChoice")) == {"rule", "types", "examples", "validation_auc",
                                                         "validation_auc_no_defense", "validation_auc_cachemedic",
                                                         "chosen"}
    assert m[results.DEFENSE_GROUPS]["additionalProperties"] == {"enum": list(results.DEFENSE_GROUP_NAMES)}
    assert results.DEFENSE_GROUP_NAMES == ("baseline", "reference heuristic (oracle region)", "calibrated baseline",
                                           "ceiling", "learned", "exact recovery (checksum + recompute)",
                                           "detect + recompute (no checksums)", "calibrated repair")
    assert m[results.DAMAGE]["$ref"] == "#/$defs/Damage"
    assert m[results.DAMAGE_BY_TYPE]["additionalProperties"] == {"$ref": "#/$defs/Damage"}
    assert set(_props(schema, "Damage")) == {"auc_clean", "auc_no_defense", "diff", "ci_low", "ci_high", "n"}
    assert "ceiling" in _props(schema, "Damage")["auc_clean"]["description"]
    rf = _props(schema, "RecoveredFraction")
    assert set(rf) == {"value", "ci_low", "ci_high"} and all(v["type"] == ["number", "null"] for v in rf.values())
    assert "damage is 0" in rf["value"]["description"]
    assert m[results.RECOVERED_FRACTION_BY_TYPE]["additionalProperties"]["additionalProperties"] == {
        "$ref": "#/$defs/RecoveredFraction"}
    st = _props(schema, "TaskSettings")
    assert st[results.CALIBRATION]["anyOf"][1] == st[results.VALIDATION]["anyOf"][1] == {"type": "null"}
    assert st[results.DEFENSE_GROUPS] == {**m[results.DEFENSE_GROUPS], "description": st[results.DEFENSE_GROUPS][
        "description"]}  # settings repeats metrics.defense_groups
    assert set(_props(schema, "CalibrationRecord")) == {
        "format", "hash", "data_source", "windows", "select_windows", "window_len", "tokens", "layers",
        "sink_tokens", "keys", "rule", "selection", "chosen", "prior"}
    assert set(_props(schema, "CalibrationPrior")) == {"keys", "quantiles", "block", "levels", "level_examples"}
    assert set(_props(schema, "CalibrationTry")) == {"q", "ppl", "cost"}
    assert set(_props(schema, "ValidationSettings")) == {"num_examples", "types", "split"}
    info = _props(schema, "TaskInfo")
    assert {"needles", "needle_spans", "distinct_keys", "needle", "question", "pairs", "split"} <= set(info)
    assert not {"needle_span", "needle_tokens", "answer_tokens"} & set(info)
    assert "fraction recalled" in info["value_name"]["enum"]


def test_fair_fixture_validates_and_broken_fair_keys_are_named():
    doc = json.loads(FAIR.read_text())
    assert results.validate(doc, results.TASK_METRICS_SCHEMA) == []
    m, st = doc["metrics"], doc["settings"]
    m["defense_groups"]["oracle_drop"] = "oracle"
    m["recovered_fraction"]["cachemedic"]["value"] = "high"
    del m["damage"]["auc_clean"]
    m["best_baseline_choice"]["validation_auc"]["smoothing"] = None
    st["tasks"]["needle_long_context"]["needle_span"] = [1, 2]
    st["calibration"]["chosen"]["range_clamp"]["index"] = 0.5
    st["validation"] = {"types": ["gaussian"]}
    problems = results.validate(doc, results.TASK_METRICS_SCHEMA)
    joined = "\n".join(problems)
    assert any(p.startswith("metrics.defense_groups.oracle_drop:") for p in problems), joined
    assert any(p.startswith("metrics.recovered_fraction.cachemedic.value:") for p in problems), joined
    assert "metrics.damage.auc_clean: required key missing" in problems, joined
    assert any(p.startswith("metrics.best_baseline_choice.validation_auc.smoothing:") for p in problems), joined
    assert any(p.startswith("settings.tasks.needle_long_context:") and "needle_span" in p for p in problems), joined
    assert any(p.startswith("settings.calibration.chosen.range_clamp.index:") for p in problems), joined
    assert any(p.startswith("settings.validation") for p in problems), joined


# --------------------------------------------------------------------------------------------------
# real files from tiny runs


def _checkpoint(cfg, arch, run_dir: Path, seed: int, step: int = 1) -> None:
    op = repair.build_operator(cfg.repair.to_dict(), arch, cfg.seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in op.named_parameters():
            if name.endswith(".u"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    atomic_torch_save(Path(run_dir) / "checkpoints" / f"repair_step_{step}.pt",
                             repair.repair_checkpoint_payload(op, step, cfg.hash, cfg.repair.to_dict()))


def _read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "metrics" / name).read_text())


SMALL = {
    "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 1},
                   {"name": "sst2_prompted", "num_examples": 2, "few_shot": 1},
                   {"name": "needle_long_context", "num_examples": 1}],
    "eval.corruption_eval": {"eps": [0.0, 0.16], "types": ["gaussian", "dropout_zero"]},
    "eval.bootstrap_samples": 20,
    "stability.num_prompts": 1, "stability.num_directions": 1, "stability.delta_norms": [0, 1],
}


# every defense group: reference heuristics, calibrated baselines and repairs (a tiny calibration), oracle_drop,
# cachemedic, checksum_recompute
EVERY_DEFENSE = {
    "eval.defenses": ["no_defense", "range_clamp", "norm_outlier_drop", "calibrated_repair", "reset_clear", "smoothing",
                      "masking_dropout", "clipping_renorm", "oracle_drop", "cachemedic", "checksum_recompute"],
    "baseline.calibration.windows": 3, "baseline.calibration.select_windows": 2,
    "baseline.calibration.window_len": 40, "baseline.calibration.cont_len": 8, "baseline.calibration.sink_tokens": 2,
}


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_model_dir, tiny_lm) -> dict:
    """Metrics files of tiny runs that between them take every optional branch of the writers:
    A (llama): every defense with a checkpoint, overhead timed, few-shot SST-2; its stability reads A's
      best heuristic and compares against a paired lambda_contr = 0 run.
    B (llama): no_defense alone under an OOD split (one type, no heuristic, no repair, no overhead).
    C (gemma3, sliding layers): stability alone, the untrained identity operator, a window segment, the
      fallback heuristic and no paired run (stored as "stab_b")."""
    from conftest import tiny_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the function-scoped one_thread fixture comes too late for a module fixture
    try:
        return _real_runs(tmp_path_factory.mktemp("results"), tiny_model_dir, tiny_lm, tiny_config)
    finally:
        torch.set_num_threads(threads)


def _real_runs(root: Path, tiny_model_dir, tiny_lm, tiny_config) -> dict:
    out = {}
    # A
    data_a = tiny_config(tiny_model_dir("llama"), **{**SMALL, **EVERY_DEFENSE, "eval.measure_overhead": True})
    cfg_a = load_config(data=data_a)
    arch = tiny_lm("llama").arch
    rd_a = root / "a"
    _checkpoint(cfg_a, arch, rd_a, seed=1)
    assert ev.run(cfg_a, rd_a) == EXIT_OK
    paired = root / "paired"
    cfg_p = load_config(data={**copy.deepcopy(data_a), "train": {**data_a["train"], "lambda_contr": 0.0}})
    RunDir(paired).ensure().bind_config(cfg_p, "test", None)
    _checkpoint(cfg_p, arch, paired, seed=7)
    assert stability.run(cfg_a, rd_a, paired_run_dir=str(paired)) == EXIT_OK
    out["task_a"], out["stab_a"] = _read(rd_a, "task_metrics.json"), _read(rd_a, "stability_metrics.json")
    # B: the bare minimum of an eval
    data_b = tiny_config(tiny_model_dir("llama"), **{**SMALL,
        "eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}], "eval.defenses": ["no_defense"],
        "eval.ood_protocol": "loto_holdout_gaussian"})
    rd_b = root / "b"
    assert ev.run(load_config(data=data_b), rd_b) == EXIT_OK
    out["task_b"] = _read(rd_b, "task_metrics.json")
    # C: stability on sliding-window layers, identity operator, window segment, no eval, no paired run
    data_c = tiny_config(tiny_model_dir("gemma3"), **{**SMALL, "eval.allow_missing_checkpoint": True,
                                                      "stability.time_mode": "window"})
    rd_c = root / "c"
    assert stability.run(load_config(data=data_c), rd_c) == EXIT_OK
    out["stab_b"] = _read(rd_c, "stability_metrics.json")
    return out


def test_real_files_take_the_optional_branches(real):
    """The fixture really exercises what the schemas make optional or nullable."""
    a, b = real["task_a"], real["task_b"]
    assert a["metrics"]["overhead"] and a["settings"]["overhead"] and b["metrics"]["overhead"] is None
    assert a["metrics"]["best_heuristic_name"] in defenses.candidates() and b["metrics"]["best_heuristic_name"] is None
    assert len(a["metrics"]["paired_bootstrap"]) == 4 and b["metrics"]["paired_bootstrap"] == {}
    assert b["settings"]["ood_split"]["test_type"] == "gaussian" and a["settings"]["ood_split"] is None
    assert a["settings"]["checkpoint"]["status"] == "loaded" and "config_hash" in a["settings"]["checkpoint"]
    assert set(a["settings"]["tasks"]) == {"wikitext2_ppl", "sst2_prompted", "needle_long_context"}
    assert a["settings"]["tasks"]["sst2_prompted"]["demo_source"]
    # the fair benchmark: a calibration, a validation grid and a choice in A; none of them in B
    assert a["settings"]["calibration"]["chosen"] and b["settings"]["calibration"] is None
    assert a["settings"]["validation"]["types"] and b["settings"]["validation"] is None
    assert a["metrics"]["best_baseline_choice"]["chosen"] == a["metrics"]["best_heuristic_name"]
    assert b["metrics"]["best_baseline_choice"] is None and b["metrics"]["recovered_fraction"] == {}
    assert {"oracle_drop", "range_clamp", "cachemedic"} <= set(a["metrics"]["recovered_fraction"])
    assert b["metrics"]["damage"]["n"] == 2 and set(b["metrics"]["damage_by_type"]) == {"gaussian"}
    sa, sb = real["stab_a"], real["stab_b"]
    assert sa["settings"]["paired_run"] and sb["settings"]["paired_run"] is None
    assert sa["metrics"][results.SENS_KEY]["points"][1]["cachemedic_no_contr"] is not None
    assert sb["metrics"][results.SENS_KEY]["points"][1]["cachemedic_no_contr"] is None
    assert sb["settings"]["repair"]["identity_operator"] and "note" in sb["settings"]["repair"]
    assert sb["settings"]["window"] is not None and sa["settings"]["window"] is None
    assert sa["settings"]["heuristic"] == a["metrics"][results.BEST_HEURISTIC_NAME]
    # every group but detect_recompute's (it needs a family-D run: tests/test_detecting.py validates that file)
    assert set(a["metrics"]["defense_groups"].values()) == set(results.DEFENSE_GROUP_NAMES) - {
        results.GROUP_DETECT_RECOMPUTE}
    assert a["metrics"]["recompute_cost"]["by_cell"] and "recompute_cost" not in b["metrics"]
    assert sb["settings"]["sliding_layers"] and sb["settings"]["heuristic_origin"].startswith("stability.heuristic")


@pytest.mark.parametrize("key, which", [("task_a", results.TASK_METRICS_SCHEMA),
                                        ("task_b", results.TASK_METRICS_SCHEMA),
                                        ("stab_a", results.STABILITY_METRICS_SCHEMA),
                                        ("stab_b", results.STABILITY_METRICS_SCHEMA)])
def test_real_files_validate(real, key, which):
    doc = real[key]
    assert results.validate(doc, which) == []
    assert results.validate(doc, results.METRIC_RECORD_SCHEMA) == []
    assert validate_records([doc], "metric_record") == []
    other = (results.STABILITY_METRICS_SCHEMA if which == results.TASK_METRICS_SCHEMA
             else results.TASK_METRICS_SCHEMA)
    assert results.validate(doc, other)  # the two files are told apart


def test_broken_documents_name_the_key(real):
    task = copy.deepcopy(real["task_a"])
    del task["metrics"]["robustness_auc_ci"]
    task["metrics"]["robustness_auc"]["cachemedic"] = "high"
    task["metrics"]["score_vs_eps"]["ci"]["no_defense"]["low"][0] = None
    task["settings"]["tasks"]["wikitext2_ppl"]["surprise"] = 1
    task["metrics"]["overhead"]["no_defense"]["wall_sec"] = "slow"
    del task["run_id"]
    problems = results.validate(task, "task_metrics")
    joined = "\n".join(problems)
    assert "metrics.robustness_auc_ci: required key missing" in problems
    assert "run_id: required key missing" in problems
    assert any(p.startswith("metrics.robustness_auc.cachemedic:") and "number" in p for p in problems)
    assert any(p.startswith("metrics.score_vs_eps.ci.no_defense.low.0:") for p in problems)
    assert any(p.startswith("settings.tasks.wikitext2_ppl:") and "surprise" in p for p in problems)
    assert any(p.startswith("metrics.overhead.no_defense.wall_sec:") and "number" in p for p in problems), joined
    assert len(problems) == 6, joined

    stab = copy.deepcopy(real["stab_a"])
    del stab["metrics"][results.SENS_KEY]["points"][0]["baseline"]
    stab["settings"]["topk"] = "fifty"
    stab["metrics"][results.AMP_KEY]["protected"] = ["yes"]
    problems = results.validate(stab, results.STABILITY_METRICS_SCHEMA)
    assert f"metrics.{results.SENS_KEY}.points.0.baseline: required key missing" in problems
    assert any(p.startswith("settings.topk:") and "integer" in p for p in problems)
    assert any(p.startswith(f"metrics.{results.AMP_KEY}.protected.0:") and "boolean" in p for p in problems)
    with pytest.raises(ValueError, match="unknown results schema"):
        results.validate(stab, "nope")


def test_main_check_and_write(tmp_path):
    assert results.main(["--check"]) == 0
    written = results.write_schemas(tmp_path)
    assert sorted(p.name for p in written) == sorted(results.SCHEMAS)
    assert results.stale_schemas(tmp_path) == []
    (tmp_path / results.TASK_METRICS_SCHEMA).write_text("{}\n")
    assert results.stale_schemas(tmp_path) == [results.TASK_METRICS_SCHEMA]
