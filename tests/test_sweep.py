"""Sweep: validation (exit 2 on malformed files), run order and pairing, the shipped sweep files, and
end to end on a tiny model: a 2-run sweep (one leave-one-type-out), paused mid-run and resumed with
bit-identical metrics, completed runs skipped without loading a model, a paired lambda_contr ablation
wired to stability, and the Ray launcher giving the same metrics as the in-process one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from cachemedicpp import ROOT, sweep
from cachemedicpp.config import STATISTICAL_TYPES, ConfigError, config_hash
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import read_jsonl

METRIC_FILES = ("metrics/task_metrics.json", "metrics/stability_metrics.json")
HELD_OUT = "contiguous_overwrite"


def _small(cfg: dict) -> dict:
    """The conftest tiny config, trimmed further: a sweep runs every phase of several runs."""
    cfg["eval"]["tasks"] = [{"name": "wikitext2_ppl", "num_examples": 2}, {"name": "sst2_prompted", "num_examples": 3},
                            {"name": "needle_long_context", "num_examples": 2}]
    cfg["eval"]["corruption_eval"]["eps"] = [0.0, 0.16]
    cfg["stability"].update({"num_prompts": 2, "num_directions": 2, "delta_norms": [0.0, 1.0, 2.0]})
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and a busy machine loses a lot to them."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory, tiny_model_dir, one_thread) -> Path:
    from conftest import tiny_config

    path = tmp_path_factory.mktemp("sweep_base") / "base.yaml"
    path.write_text(yaml.safe_dump(_small(tiny_config(tiny_model_dir("llama")))))
    return path


def write_sweep(folder: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def two_runs(base: Path, **extra) -> dict:
    """A plain run and a leave-one-type-out run, summarised together as one group."""
    return {"sweep_name": "two", "base_config": str(base), **extra, "runs": [
        {"name": "plain", "group": "g", "overrides": {"train.lambda_contr": 0.0}},
        {"name": "loto", "group": "g", "overrides": {"eval.ood_protocol": f"loto_holdout_{HELD_OUT}"}},
    ]}


def metric_bytes(run_dir: Path) -> dict[str, bytes]:
    return {f: (run_dir / f).read_bytes() for f in METRIC_FILES}


# --------------------------------------------------------------------------------------------------
# validation (no model)


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(sweep_nmae="x"), "sweep_nmae"),
    (lambda d: d["runs"][0].update(name="../x"), "runs.0.name"),
    (lambda d: d["runs"][1].update(name="plain"), "duplicate run name 'plain'"),
    (lambda d: d["runs"].append({"name": "logs"}), "'logs' is reserved"),
    (lambda d: d.update(base_config="nowhere/missing.yaml"), "base_config 'nowhere/missing.yaml' not found"),
    (lambda d: d["runs"][1].update(paired_with="ghost"), "runs.loto.paired_with: no run named 'ghost'"),
    (lambda d: d["runs"][0].update(colour="red"), "unknown key runs.0.colour"),
    (lambda d: d["runs"][0]["overrides"].update({"train.stpes": 3}), "run plain: config: unknown key train.stpes"),
    (lambda d: d["runs"][1]["overrides"].update({"eval.ood_protocol": "loto_holdout_nothing"}),
     "run loto: eval.ood_protocol: unknown split 'loto_holdout_nothing'"),
    (lambda d: d.update(launcher="slurm"), "launcher"),
])
def test_malformed_sweep_exits_2(tmp_path, base_config, capsys, mutate, needle):
    doc = two_runs(base_config)
    mutate(doc)
    path = write_sweep(tmp_path, doc)
    rc = sweep.main(["--sweep_config", str(path), "--out_root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing is written before the sweep validates


def test_pairing_is_checked(tmp_path, base_config):
    runs = [{"name": "zero", "overrides": {"train.lambda_contr": 0.0, "seed": 1}},
            {"name": "half", "paired_with": "zero", "overrides": {"train.lambda_contr": 0.5, "seed": 2}},
            {"name": "nz", "overrides": {"train.lambda_contr": 0.3}},
            {"name": "other", "paired_with": "nz", "overrides": {"train.lambda_contr": 0.5}}]
    path = write_sweep(tmp_path, {"sweep_name": "p", "base_config": str(base_config), "runs": runs})
    with pytest.raises(ConfigError) as e:
        sweep.load_plan(path, str(tmp_path / "out"))
    text = "\n".join(e.value.problems)
    assert "runs.half.paired_with: half and zero differ in more than train.lambda_contr (seed: 2 vs 1)" in text
    assert "twin nz has train.lambda_contr = 0.3; it must be 0" in text


def test_order_puts_twins_first_and_records_the_pair(tmp_path, base_config):
    runs = [{"name": "b_half", "paired_with": "z_zero", "overrides": {"train.lambda_contr": 0.5}},
            {"name": "a_solo"},
            {"name": "z_zero", "overrides": {"train.lambda_contr": 0.0}}]
    path = write_sweep(tmp_path, {"sweep_name": "o", "base_config": "base.yaml", "runs": runs}, "o.yaml")
    (tmp_path / "base.yaml").write_text(base_config.read_text())  # base_config is relative to the sweep file
    plan = sweep.load_plan(path, str(tmp_path / "out"))
    assert [r.name for r in plan.runs] == ["z_zero", "b_half", "a_solo"]
    half = plan.by_name("b_half")
    assert half.cfg.stability.paired_run_dir == str(tmp_path.resolve() / "out" / "o" / "z_zero")
    assert half.cfg.hash == plan.by_name("a_solo").cfg.hash  # the twin's location is not part of the hash
    assert plan.by_name("z_zero").cfg.stability.paired_run_dir is None
    assert sweep.main(["--sweep_config", str(path), "--out_root", str(tmp_path / "out"), "--dry_run"]) == EXIT_OK
    assert not (tmp_path / "out").exists()

    capped = write_sweep(tmp_path, {**yaml.safe_load(path.read_text()), "budget": {"max_runs": 2}}, "capped.yaml")
    plan = sweep.load_plan(capped, str(tmp_path / "out"))
    assert [r.name for r in plan.active()] == ["z_zero", "b_half"]


def test_existing_run_dir_of_another_config_is_refused(tmp_path, base_config):
    path = write_sweep(tmp_path, two_runs(base_config))
    plan = sweep.load_plan(path, str(tmp_path / "out"))
    rd = plan.by_name("plain").run_dir
    rd.mkdir(parents=True)
    (rd / "config_resolved.yaml").write_text(yaml.safe_dump({**plan.by_name("loto").cfg.to_dict()}))
    with pytest.raises(ConfigError, match="run plain: .* belongs to config"):
        sweep.load_plan(path, str(tmp_path / "out"))


def test_shipped_sweeps_validate():
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"contr_ablation_loto", "loto_full", "seeds3", "cpu_quickstart_ablation"}
    plans = {f.stem: sweep.load_plan(f, "/nonexistent/out") for f in files}

    loto = plans["loto_full"]
    assert sorted(r.cfg.eval.ood_split["test_type"] for r in loto.runs) == sorted(STATISTICAL_TYPES)
    for r in loto.runs:
        test = r.cfg.eval.ood_split["test_type"]
        assert test not in r.cfg.corruption.mixture and r.cfg.eval.corruption_eval.types == [test]
        assert abs(sum(r.cfg.corruption.mixture.values()) - 1) < 1e-9

    for name in ("contr_ablation_loto", "cpu_quickstart_ablation"):
        plan = plans[name]
        assert len(plan.runs) == 6
        partners = [r for r in plan.runs if r.paired_with]
        assert len(partners) == 3 and sorted(r.cfg.seed for r in partners) == [0, 1, 2]
        for r in partners:
            twin = plan.by_name(r.paired_with)
            assert plan.runs.index(twin) < plan.runs.index(r)
            assert twin.cfg.seed == r.cfg.seed and twin.cfg.train.lambda_contr == 0 and r.cfg.train.lambda_contr > 0
            assert r.cfg.eval.corruption_eval.types == [HELD_OUT] and HELD_OUT not in r.cfg.corruption.mixture
    assert plans["cpu_quickstart_ablation"].runs[0].cfg.model.name == "embedded:smollm2-135m-instruct"
    assert plans["contr_ablation_loto"].runs[0].cfg.model.name == "gpt2-medium"
    assert sorted(r.cfg.seed for r in plans["seeds3"].runs) == [0, 1, 2]


def test_summary_statistics():
    assert sweep.bootstrap_ci([1.0]) is None
    lo, hi = sweep.bootstrap_ci([1.0, 2.0, 3.0])
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert sweep.bootstrap_ci([1.0, 2.0, 3.0]) == [lo, hi]  # seeded: reproducible
    d = sweep.describe([1.0, 2.0, 3.0], ci=False)
    assert d == {"mean": 2.0, "std": 1.0, "n": 3}
    recs = {
        "z": {"status": "completed", "paired_with": None, "seed": 0, "lambda_contr": 0.0,
              "metrics": {"auc": {"cachemedic": 0.5, "no_defense": 0.4}}},
        "h": {"status": "completed", "paired_with": "z", "seed": 0, "lambda_contr": 0.5,
              "metrics": {"auc": {"cachemedic": 0.7, "no_defense": 0.4}}},
        "y": {"status": "completed", "paired_with": None, "seed": 1, "lambda_contr": 0.0,
              "metrics": {"auc": {"cachemedic": 0.5, "no_defense": 0.3}}},
        "g": {"status": "paused", "paired_with": "y", "seed": 1, "lambda_contr": 0.5, "metrics": {}},
    }
    ab = sweep.ablation_summary(recs)
    assert [p["run"] for p in ab["pairs"]] == ["h"]  # the incomplete pair is left out
    assert ab["metrics"]["auc.cachemedic"]["mean"] == pytest.approx(0.2)
    assert "auc.no_defense" not in ab["metrics"]  # only what the operator changes is contrasted


# --------------------------------------------------------------------------------------------------
# end to end on a tiny model


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_config) -> Path:
    """An uninterrupted 2-run sweep: the reference the other launches must reproduce."""
    folder = tmp_path_factory.mktemp("sweep_ref")
    path = write_sweep(folder, two_runs(base_config))
    assert sweep.main(["--sweep_config", str(path), "--out_root", str(folder / "out")]) == EXIT_OK
    return folder / "out" / "two"


def test_two_run_sweep_end_to_end(reference):
    from cachemedicpp import pipeline

    for name in ("plain", "loto"):
        rd = reference / name
        assert all(pipeline.phase_done(rd, p) for p in pipeline.PHASES)
        assert (rd / "paper" / "figures" / "figA_score_vs_eps.png").is_file()
    plain = yaml.safe_load((reference / "plain" / "config_resolved.yaml").read_text())
    loto = yaml.safe_load((reference / "loto" / "config_resolved.yaml").read_text())
    assert plain["eval"]["ood_split"] is None and plain["eval"]["corruption_eval"]["types"] == [
        "gaussian", HELD_OUT]
    split = loto["eval"]["ood_split"]
    assert split["name"] == f"loto_holdout_{HELD_OUT}" and split["test_type"] == HELD_OUT
    assert loto["corruption"]["train_types"] == split["train_types"] and HELD_OUT not in split["train_types"]
    assert HELD_OUT not in loto["corruption"]["mixture"]
    assert abs(sum(loto["corruption"]["mixture"].values()) - 1) < 1e-9
    assert loto["eval"]["corruption_eval"]["types"] == [HELD_OUT]
    task = json.loads((reference / "loto" / METRIC_FILES[0]).read_text())
    assert {row["corruption_type"] for row in task["metrics"]["task_curves"]} <= {"clean", "none", HELD_OUT}

    hb = json.loads((reference / "logs" / "sweep_heartbeat.json").read_text())
    assert hb["phase"] == "sweep" and hb["status"] == "completed" and hb["step"] == hb["total_steps"] == 2
    units = [r["current_unit"] for r in read_jsonl(reference / "logs" / "sweep_heartbeat.jsonl")]
    assert "plain/train" in units and "loto/plots" in units

    summary = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["runs_completed"] == 2
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["loto"]["ood_test_type"] == HELD_OUT and runs["plain"]["ood_test_type"] is None
    for name, r in runs.items():
        m = r["metrics"]
        task = json.loads((reference / name / METRIC_FILES[0]).read_text())["metrics"]
        assert r["config_hash"] == config_hash(yaml.safe_load((reference / name / "config_resolved.yaml").read_text()))
        assert m["auc"]["cachemedic"] == task["robustness_auc"]["cachemedic"]
        assert m["auc"]["no_defense"] == task["robustness_auc"]["no_defense"]
        assert m["best_heuristic_name"] == task["best_heuristic_name"]
        assert m["auc_diff"]["cachemedic_minus_no_defense"] == pytest.approx(
            task["robustness_auc"]["cachemedic"] - task["robustness_auc"]["no_defense"])
        assert set(m["sensitivity"]) == {"delta_1", "delta_2"}
        assert m["sensitivity"]["delta_1"]["cachemedic"] is not None
    g = summary["groups"]["g"]
    assert g["completed"] == ["plain", "loto"]
    stat = g["metrics"]["auc.cachemedic"]
    vals = [runs[n]["metrics"]["auc"]["cachemedic"] for n in ("plain", "loto")]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(vals) / 2)
    assert g["metrics"]["auc_diff.cachemedic_minus_no_defense"]["ci95"] is not None
    md = (reference / "summary.md").read_text()
    assert "| plain | completed |" in md and "## Group g" in md
    # the leave-one-type-out run gets its row from what eval really wrote
    (row,) = summary["loto"]["rows"]
    lm = json.loads((reference / "loto" / METRIC_FILES[0]).read_text())["metrics"]
    assert row["run"] == "loto" and row["test_type"] == HELD_OUT and row["best_baseline"] == lm["best_heuristic_name"]
    assert row["damage"]["diff"] == lm["damage_by_type"][HELD_OUT]["diff"]
    assert row["recovered_fraction"]["cachemedic"]["value"] == lm["recovered_fraction_by_type"][HELD_OUT]["cachemedic"][
        "value"]
    assert (reference / summary["loto"]["figure"]).is_file() and "## Leave-one-type-out" in md


def test_a_sweep_without_stability_gets_the_figures_its_task_metrics_allow(tmp_path, base_config):
    """Phases train, eval, plots: the plots phase completes from the task metrics alone, with figures A and B
    and a report that says stability was not measured."""
    doc = {"sweep_name": "nostab", "base_config": str(base_config), "phases": ["train", "eval", "plots"],
           "runs": [{"name": "a"}]}
    path = write_sweep(tmp_path, doc)
    assert sweep.main(["--sweep_config", str(path), "--out_root", str(tmp_path / "out")]) == EXIT_OK
    rd = tmp_path / "out" / "nostab" / "a"
    assert (rd / METRIC_FILES[0]).is_file() and not (rd / METRIC_FILES[1]).exists()
    figures = {p.name for p in (rd / "paper" / "figures").iterdir()}
    assert figures == {"figA_score_vs_eps.png", "figB_clean_vs_overhead_pareto.png"}
    assert "Stability was not measured for this run" in (rd / "paper" / "report.md").read_text()
    summary = json.loads((tmp_path / "out" / "nostab" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["runs_completed"] == 1


def test_pause_mid_run_then_resume_is_bit_identical(tmp_path, base_config, reference, monkeypatch):
    from cachemedicpp import hf, train

    path = write_sweep(tmp_path, two_runs(base_config))
    out = tmp_path / "out"
    sweep_dir = out / "two"
    request = sweep_dir / "control" / "pause.request"
    orig_step = train.Trainer.step
    seen = []

    def step(self, i):  # the sweep pause request arrives while the second run is training
        result = orig_step(self, i)
        seen.append((self.cfg.eval.ood_protocol, i))
        if self.cfg.eval.ood_protocol and i == 3 and not request.parent.joinpath("pause_ack_sweep.json").exists():
            request.write_text("test\n")
        return result

    monkeypatch.setattr(train.Trainer, "step", step)
    args = ["--sweep_config", str(path), "--out_root", str(out)]
    assert sweep.main(args) == EXIT_PAUSED
    ack = json.loads((sweep_dir / "control" / "pause_ack_sweep.json").read_text())
    assert ack["run"] == "loto" and ack["run_phase"] == "train" and ack["step"] == 1
    assert not request.exists()
    train_hb = json.loads((sweep_dir / "loto" / "logs" / "train_heartbeat.json").read_text())
    assert train_hb["status"] == "paused" and train_hb["step"] == 3
    assert json.loads((sweep_dir / "logs" / "sweep_heartbeat.json").read_text())["status"] == "paused"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert {r["name"]: r["status"] for r in summary["runs"]} == {"plain": "completed", "loto": "paused"}

    seen.clear()
    assert sweep.main(args) == EXIT_OK
    assert [i for _, i in seen] == [4, 5, 6]  # the completed run was skipped, the paused one resumed
    for name in ("plain", "loto"):
        assert metric_bytes(sweep_dir / name) == metric_bytes(reference / name), name

    def no_model(*a, **k):
        raise AssertionError("a completed run loaded a model")

    monkeypatch.setattr(hf, "load_model", no_model)
    assert sweep.main(args) == EXIT_OK
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert all(r["this_invocation"] == "skipped (complete)" for r in summary["runs"])
    assert json.loads((sweep_dir / "logs" / "sweep_heartbeat.json").read_text())["status"] == "completed"


def test_paired_ablation_and_sigterm(tmp_path, base_config, monkeypatch):
    """The λ_contr > 0 run gets its twin's operator in stability; SIGTERM pauses like a request."""
    from cachemedicpp import train

    doc = {"sweep_name": "abl", "base_config": str(base_config), "phases": ["train", "stability"],
           "runs": [{"name": "half", "paired_with": "zero", "overrides": {"train.lambda_contr": 0.5}},
                    {"name": "zero", "overrides": {"train.lambda_contr": 0.0}}]}
    path = write_sweep(tmp_path, doc)
    sweep_dir = tmp_path / "out" / "abl"
    orig_step = train.Trainer.step

    def step(self, i):
        result = orig_step(self, i)
        if self.cfg.train.lambda_contr > 0 and i == 2 and not (sweep_dir / "control" / "pause_ack_sweep.json").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train.Trainer, "step", step)
    args = ["--sweep_config", str(path), "--out_root", str(tmp_path / "out")]
    assert sweep.main(args) == EXIT_PAUSED
    ack = json.loads((sweep_dir / "control" / "pause_ack_sweep.json").read_text())
    assert ack["run"] == "half" and ack["reason"] == "SIGTERM"
    assert sweep.main(args) == EXIT_OK

    stab = json.loads((sweep_dir / "half" / METRIC_FILES[1]).read_text())
    assert stab["settings"]["paired_run"]["run_dir"] == str(sweep_dir / "zero")
    points = stab["metrics"]["stability.logit_sensitivity"]["points"]
    assert all(p["cachemedic_no_contr"] is not None for p in points)
    twin = json.loads((sweep_dir / "zero" / METRIC_FILES[1]).read_text())
    assert all(p["cachemedic_no_contr"] is None for p in twin["metrics"]["stability.logit_sensitivity"]["points"])
    # at delta = 1 the twin's own cachemedic curve is what the partner measured as its no-contraction operator
    p1 = next(p for p in points if p["delta_norm"] == 1.0)
    t1 = next(p for p in twin["metrics"]["stability.logit_sensitivity"]["points"] if p["delta_norm"] == 1.0)
    assert p1["cachemedic_no_contr"] == pytest.approx(t1["cachemedic"])

    # --no-resume recomputes every phase of every run, with the same result
    before = {n: (sweep_dir / n / METRIC_FILES[1]).read_bytes() for n in ("zero", "half")}
    assert sweep.main(args + ["--no-resume"]) == EXIT_OK
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["this_invocation"] for r in summary["runs"]] == ["ran train,stability"] * 2
    assert len([r for r in read_jsonl(sweep_dir / "half" / "logs" / "train_heartbeat.jsonl")
                if r["status"] == "paused"]) == 0  # the paused attempt's timeline was discarded
    assert {n: (sweep_dir / n / METRIC_FILES[1]).read_bytes() for n in ("zero", "half")} == before

    assert summary["order"] == ["zero", "half"]
    ab = summary["ablation"]
    assert ab["pairs"] == [{"run": "half", "twin": "zero", "seed": 0, "lambda_contr": [0.5, 0.0]}]
    d1 = ab["metrics"]["sensitivity.delta_1.cachemedic"]
    assert d1["n"] == 1 and d1["mean"] == pytest.approx(p1["cachemedic"] - t1["cachemedic"])


def test_ray_launcher_matches_in_process(tmp_path, base_config, reference):
    ray = pytest.importorskip("ray")
    import torch

    # Ray gives each task OMP_NUM_THREADS = its cpus; CPU float reductions depend on the thread count, so
    # the workers get the same number of threads as this process for bit-identical metrics (no plots:
    # figures are not metrics)
    threads = torch.get_num_threads()
    path = write_sweep(tmp_path, two_runs(base_config, launcher="ray", resources={"cpus": threads, "gpus": 0},
                                          phases=["train", "eval", "stability"]))
    ray.init(num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False)
    try:
        assert sweep.main(["--sweep_config", str(path), "--out_root", str(tmp_path / "out")]) == EXIT_OK
    finally:
        ray.shutdown()
    sweep_dir = tmp_path / "out" / "two"
    for name in ("plain", "loto"):
        assert metric_bytes(sweep_dir / name) == metric_bytes(reference / name), name
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["this_invocation"] for r in summary["runs"]] == ["ray: completed"] * 2
    ref = json.loads((reference / "summary.json").read_text())
    assert [r["metrics"] for r in summary["runs"]] == [r["metrics"] for r in ref["runs"]]


def test_missing_ray_is_a_clear_error(tmp_path, base_config, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    path = write_sweep(tmp_path, two_runs(base_config))
    rc = sweep.main(["--sweep_config", str(path), "--out_root", str(tmp_path / "out"), "--launcher", "ray"])
    assert rc == EXIT_BAD_INPUT
    assert "--launcher ray needs Ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# the leave-one-type-out table and figure (fake run metrics, no model)


FAIR = Path(__file__).parent / "data" / "metrics" / "task_metrics_fair.json"


def _fake_run(sweep_dir: Path, name: str, test_type: str | None, edit=None) -> None:
    """A run dir whose plots phase is done and whose task metrics are the fair fixture, with its OOD split."""
    rd = sweep_dir / name
    (rd / "metrics").mkdir(parents=True)
    (rd / "paper").mkdir()
    (rd / "paper" / "report.md").write_text("done\n")
    d = json.loads(FAIR.read_text())
    d["settings"]["ood_split"] = None if test_type is None else {
        "name": f"loto_holdout_{test_type}", "train_types": ["dropout_zero"], "test_type": test_type}
    if edit is not None:
        edit(d["metrics"])
    (rd / "metrics" / "task_metrics.json").write_text(json.dumps(d))


def test_loto_table_and_figure_from_run_metrics(tmp_path, base_config):
    from PIL import Image
    from cachemedicpp.sweep.summary import loto_summary

    doc = {"sweep_name": "loto", "base_config": str(base_config), "phases": ["plots"], "runs": [
        {"name": "plain"},
        {"name": "hold_gauss", "overrides": {"eval.ood_protocol": "loto_holdout_gaussian"}},
        {"name": "hold_over", "overrides": {"eval.ood_protocol": f"loto_holdout_{HELD_OUT}"}},
        {"name": "hold_old", "overrides": {"eval.ood_protocol": "loto_holdout_quant_noise"}}]}
    plan = sweep.load_plan(write_sweep(tmp_path, doc), str(tmp_path / "out"))
    sweep_dir = plan.dir.path
    _fake_run(sweep_dir, "plain", None)
    _fake_run(sweep_dir, "hold_gauss", "gaussian")  # the file has gaussian's per-type entries: those are used

    def only_overall(m):  # a run that evaluated the held-out type alone: no per-type breakdown
        for k in ("robustness_auc_by_type", "paired_bootstrap_by_type", "damage_by_type",
                  "recovered_fraction_by_type"):
            m.pop(k)
        m["recovered_fraction"]["oracle_drop"] = {"value": None, "ci_low": None, "ci_high": None}

    _fake_run(sweep_dir, "hold_over", HELD_OUT, only_overall)

    def older(m):  # before the fair benchmark: no damage, recovered fractions or oracle_drop
        for k in ("damage", "damage_by_type", "recovered_fraction", "recovered_fraction_by_type",
                  "best_baseline_choice", "defense_groups", "robustness_auc_by_type"):
            m.pop(k)
        m["robustness_auc"].pop("oracle_drop")

    _fake_run(sweep_dir, "hold_old", "quant_noise", older)

    summary = sweep.Summary(plan).write("completed")
    on_disk = json.loads(plan.dir.summary_json.read_text())
    assert on_disk["loto"] == summary["loto"]
    rows = {r["run"]: r for r in summary["loto"]["rows"]}
    assert [r["test_type"] for r in summary["loto"]["rows"]] == [HELD_OUT, "gaussian", "quant_noise"]
    assert "plain" not in rows  # not a leave-one-type-out run

    g = rows["hold_gauss"]
    assert g["best_baseline"] == "range_clamp"
    assert g["auc"] == {"clean": 0.13707, "no_defense": 0.0836, "best_heuristic": 0.09713, "oracle_drop": 0.13458,
                        "cachemedic": 0.11287}
    assert g["damage"]["diff"] == 0.05347 and g["damage"]["ci_low"] == 0.04547
    assert g["recovered_fraction"]["cachemedic"] == {"value": 0.5474, "ci_low": 0.4274, "ci_high": 0.6674}
    assert g["recovered_fraction"]["best_heuristic"]["value"] == 0.253
    assert g["cachemedic_minus_no_defense"]["diff"] == 0.02927

    o = rows["hold_over"]  # the overall numbers
    assert o["auc"]["no_defense"] == 0.07418 and o["damage"]["diff"] == 0.06289
    assert o["recovered_fraction"]["oracle_drop"] == {"value": None, "ci_low": None, "ci_high": None}
    assert o["cachemedic_minus_no_defense"]["diff"] == 0.02661

    old = rows["hold_old"]
    assert old["damage"] is None and old["auc"]["clean"] is None and old["auc"]["oracle_drop"] is None
    assert all(v is None for v in old["recovered_fraction"].values())

    md = plan.dir.summary_md.read_text()
    assert "## Leave-one-type-out: per held-out type" in md
    assert ("| gaussian | hold_gauss | 0.1371 | 0.0836 | 0.09713 (range_clamp) | 0.1346 | 0.1129 | "
            "0.05347 [0.04547, 0.06147] | 0.253 [0.133, 0.373] | 0.9534 [0.8334, 1.073] | 0.5474 [0.4274, 0.6674] | "
            "0.02927 [0.01827, 0.04027] |") in md
    assert (f"| {HELD_OUT} | hold_over | 0.1371 | 0.07418 | 0.08648 (range_clamp) | 0.1205 | 0.1008 | "
            "0.06289 [0.05679, 0.06899] | 0.1956 [0.1056, 0.2856] | n/a | 0.4231 [0.3331, 0.5131] | ") in md
    assert ("| quant_noise | hold_old | – | 0.07418 | 0.08648 (range_clamp) | – | 0.1008 | – | – | – | – | "
            "0.02661 [0.01731, 0.03591] |") in md
    assert "![Recovered fraction per held-out type](loto_summary.png)" in md
    assert summary["loto"]["figure"] == "loto_summary.png" == plan.dir.loto_figure.name
    with Image.open(plan.dir.loto_figure) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400

    # group statistics leave the per-run CIs and the held-out block out
    flat = sweep.numeric_metrics(sweep.run_metrics(sweep_dir / "hold_gauss"))
    assert "recovered_fraction.cachemedic.value" in flat and "damage.diff" in flat
    assert not any(k.startswith("held_out") or k.endswith((".ci_low", ".ci_high")) for k in flat)
    assert loto_summary([{"name": "plain", "status": "completed", "metrics": {}}]) is None


def test_no_loto_runs_no_loto_section(tmp_path, base_config):
    doc = {"sweep_name": "plain", "base_config": str(base_config), "phases": ["plots"], "runs": [{"name": "a"}]}
    plan = sweep.load_plan(write_sweep(tmp_path, doc), str(tmp_path / "out"))
    _fake_run(plan.dir.path, "a", None)
    summary = sweep.Summary(plan).write("completed")
    assert summary["loto"] is None and not plan.dir.loto_figure.exists()
    assert "Leave-one-type-out" not in plan.dir.summary_md.read_text()


def test_combine_several_sweeps_into_one_loto_table(tmp_path, base_config, capsys):
    """The same leave-one-type-out sweep once per seed: one table and one figure, a type's runs side by side
    in seed order; a run counts once its eval is done; no sweep summary -> exit 2 naming it."""
    from PIL import Image
    from cachemedicpp.rundir import RunDir
    from cachemedicpp.sweep import combine

    dirs = []
    for seed in (2, 0):
        doc = {"sweep_name": f"loto_seed{seed}", "base_config": str(base_config), "phases": ["eval", "plots"],
               "overrides": {"seed": seed},
               "runs": [{"name": "hold_gauss", "overrides": {"eval.ood_protocol": "loto_holdout_gaussian"}},
                        {"name": "hold_over", "overrides": {"eval.ood_protocol": f"loto_holdout_{HELD_OUT}"}}]}
        plan = sweep.load_plan(write_sweep(tmp_path / f"s{seed}", doc), str(tmp_path / "out"))
        for name, t in (("hold_gauss", "gaussian"), ("hold_over", HELD_OUT)):
            _fake_run(plan.dir.path, name, t)
            timeline = RunDir(plan.dir.path / name).timeline("eval")
            timeline.parent.mkdir(parents=True, exist_ok=True)
            timeline.write_text(json.dumps({"status": "completed"}) + "\n")
        if seed == 2:  # its plots phase never ran: eval is enough for the combined table
            (plan.dir.path / "hold_over" / "paper" / "report.md").unlink()
        sweep.Summary(plan).write("completed")
        dirs.append(plan.dir.path)
    out = tmp_path / "combined"
    assert combine.main([str(d) for d in dirs] + ["--out", str(out)]) == EXIT_OK
    loto = json.loads((out / "loto_combined.json").read_text())
    assert [(r["test_type"], r["seed"]) for r in loto["rows"]] == [(HELD_OUT, 0), (HELD_OUT, 2), ("gaussian", 0),
                                                                    ("gaussian", 2)]
    assert {r["run"] for r in loto["rows"]} == {"loto_seed0/hold_gauss", "loto_seed0/hold_over",
                                               "loto_seed2/hold_gauss", "loto_seed2/hold_over"}
    assert "| gaussian | loto_seed2/hold_gauss |" in (out / "loto_combined.md").read_text()
    with Image.open(out / "loto_combined.png") as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600
    assert combine.main([str(tmp_path / "nowhere"), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "nowhere" in capsys.readouterr().err
