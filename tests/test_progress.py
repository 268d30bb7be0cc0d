"""The progress file shared by eval and stability: its record, the checkpoint record, and the one resume
policy (unreadable or another config: exit 2 naming the file and the changed keys, the file untouched;
another checkpoint or other inputs: recompute)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import write_cfg
from cachemedicpp import eval as ev
from cachemedicpp import progress, stability
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK
from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.fileio import file_sha256
from cachemedicpp.phase import PhaseSession
from cachemedicpp.progress import Progress
from cachemedicpp.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

NONE = {"path": None, "step": None, "sha256": None, "status": "missing"}  # the record of no checkpoint


def saved_record(tmp_path: Path, cfg, **inputs) -> Path:
    """A progress file of two finished units written under `cfg`."""
    prog = Progress(tmp_path / "metrics" / "x_progress.json", cfg, 3, NONE, {"examples": "abc", **inputs})
    prog.units().update(u0={"v": 1}, u1={"v": 2})
    prog.save("paused", 12.5)
    return prog.path


# --------------------------------------------------------------------------------------------------
# the record and the policy, without a model


def test_record_layout_and_resume(tmp_path):
    cfg = load_config(data={"seed": 1})
    path = saved_record(tmp_path, cfg)
    doc = json.loads(path.read_text())
    assert {"format", "status", "config_hash", "config", "total_units", "completed_units", "elapsed_wall_sec",
            "checkpoint", "examples", "units"} == set(doc)
    assert doc["status"] == "paused" and doc["completed_units"] == 2 and doc["total_units"] == 3
    assert doc["config_hash"] == cfg.hash and doc["config"]["seed"] == 1
    assert doc["checkpoint"] == {"path": None, "step": None, "sha256": None, "status": "missing"}

    again = Progress(path, cfg, 3, NONE, {"examples": "abc"})
    assert again.resume(progress.read(path, cfg))
    assert again.units() == {"u0": {"v": 1}, "u1": {"v": 2}} and again.elapsed == 12.5 and again.completed == 2
    assert again.keep("units", lambda key, unit: key == "u1") == {"u1": {"v": 2}}
    assert progress.read(tmp_path / "none.json", cfg) is None


def test_another_config_is_refused_naming_the_changed_keys(tmp_path):
    path = saved_record(tmp_path, load_config(data={"seed": 1}))
    before = path.read_bytes()
    other = load_config(data={"seed": 2, "stability": {"num_prompts": 7}})
    with pytest.raises(ConfigError) as e:
        progress.read(path, other)
    msg = str(e.value)
    assert str(path) in msg and "changed: seed, stability.num_prompts)" in msg and "--no-resume" in msg
    assert path.read_bytes() == before
    # keys the hash leaves out (locations) are not a change
    moved = load_config(data={"seed": 1, "stability": {"paired_run_dir": "/elsewhere"}})
    assert progress.read(path, moved) is not None


def test_a_record_without_a_snapshot_is_refused_by_its_hash(tmp_path):
    path = saved_record(tmp_path, load_config(data={"seed": 1}))
    doc = json.loads(path.read_text())
    del doc["config"]  # a record of an older layout
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="the file names no keys"):
        progress.read(path, load_config(data={"seed": 2}))


@pytest.mark.parametrize("text, why", [("{\"units\": ", "corrupted"), ("[1, 2]", "not a JSON object"),
                                       ("{\"units\": [1]}", "units is not a mapping")])
def test_an_unreadable_record_is_refused_and_left_as_it_is(tmp_path, text, why):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why) as e:
        progress.read(path, load_config(data={"seed": 1}))
    assert str(path) in str(e.value) and path.read_text() == text


@pytest.mark.parametrize("change", ["checkpoint", "examples", "format"])
def test_other_inputs_recompute_every_unit(tmp_path, caplog, change):
    cfg = load_config(data={"seed": 1})
    path = saved_record(tmp_path, cfg)
    ckpt = {**NONE, "sha256": "0123456789abcdef"} if change == "checkpoint" else NONE
    prog = Progress(path, cfg, 3, ckpt, {"examples": "xyz" if change == "examples" else "abc"})
    saved = progress.read(path, cfg)
    if change == "format":
        saved["format"] = "cachemedicpp.stability_progress/1"
    with caplog.at_level(logging.WARNING, logger="cachemedicpp"):
        assert not prog.resume(saved)
    assert prog.units() == {} and prog.elapsed == 0.0 and change in caplog.text


def test_checkpoint_record(tmp_path):
    rd = RunDir(tmp_path / "run").ensure()
    with pytest.raises(ConfigError, match="no repair checkpoint in .*: train it"):
        progress.latest_checkpoint(rd, allow_missing=False, missing="m", remedy="train it")
    assert progress.latest_checkpoint(rd, allow_missing=True, missing="m", remedy="") == {**NONE, "status": "m"}
    assert progress.checkpoint_record(rd, None, "missing") == NONE
    p = rd.repair_checkpoint(3)
    p.write_bytes(b"weights")
    assert progress.latest_checkpoint(rd, allow_missing=False, missing="m", remedy="") == {
        "path": "checkpoints/repair_step_3.pt", "step": 3, "sha256": file_sha256(p), "status": "loaded"}


def test_session_checks_progress_before_binding_the_run_dir(tmp_path):
    a, b = load_config(data={"seed": 1}), load_config(data={"seed": 2})
    rd = RunDir(tmp_path / "run")
    saved_record(tmp_path / "elsewhere", a).replace(rd.ensure().progress("stability"))
    # a progress file that outlived its config_resolved.yaml: refused, and nothing is written
    with pytest.raises(ConfigError, match="stability_progress.json was written with a different config"):
        with PhaseSession(b, rd.path, "stability", resume=True):
            pass
    assert not rd.resolved_config_path.exists() and not rd.record.exists()
    with PhaseSession(a, rd.path, "stability", resume=True) as s:
        assert s.saved["units"] == {"u0": {"v": 1}, "u1": {"v": 2}}
    with PhaseSession(a, rd.path, "stability") as s:  # --no-resume never reads it
        assert s.saved is None
    # a run dir bound to another config: its own guard speaks (--no-resume would not help)
    with pytest.raises(ConfigError, match="belongs to config"):
        with PhaseSession(b, rd.path, "stability", resume=True):
            pass


# --------------------------------------------------------------------------------------------------
# both phases end to end on the tiny Llama


def run_args(cfg_path: Path, rd: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--run_dir", str(rd), *extra]


PHASES = {
    "eval": (ev.main, "eval.bootstrap_samples", 20,
             {"eval.tasks": [{"name": "wikitext2_ppl", "num_examples": 2}], "eval.bootstrap_samples": 10,
              "eval.defenses": ["no_defense", "cachemedic"], "eval.corruption_eval.types": ["gaussian"]}),
    "stability": (stability.main, "stability.num_prompts", 3, {"stability.num_prompts": 2}),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_phase_refuses_progress_of_another_config(tmp_path, tiny_cfg, capsys, phase):
    main, key, value, over = PHASES[phase]
    data = tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True, **over})
    rd = tmp_path / "run"
    assert main(run_args(write_cfg(tmp_path / "a", data), rd)) == EXIT_OK
    prog = rd / "metrics" / f"{phase}_progress.json"
    before = prog.read_bytes()
    (rd / "config_resolved.yaml").unlink()  # the progress file outlives the config it was written with
    changed = write_cfg(tmp_path / "b", tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True, **over,
                                                            key: value}))
    capsys.readouterr()
    assert main(run_args(changed, rd)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"metrics/{phase}_progress.json was written with a different config (changed: {key})" in err
    assert "Traceback" not in err
    assert prog.read_bytes() == before and not (rd / "config_resolved.yaml").exists()
    assert main(run_args(changed, rd, "--no-resume")) == EXIT_OK  # the remedy the message names
    assert json.loads(prog.read_text())["config"][key] == value


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_phase_refuses_a_corrupted_progress_file(tmp_path, tiny_cfg, capsys, phase):
    main, _, _, over = PHASES[phase]
    cfg_path = write_cfg(tmp_path, tiny_cfg("llama", **{"eval.allow_missing_checkpoint": True, **over}))
    rd = tmp_path / "run"
    prog = rd / "metrics" / f"{phase}_progress.json"
    prog.parent.mkdir(parents=True)
    for text in ("{\"status\": \"runn", "[]"):
        prog.write_text(text)
        assert main(run_args(cfg_path, rd)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert str(prog) in err and "corrupted" in err and "Traceback" not in err
        assert prog.read_text() == text
    assert not (rd / "metrics" / ("task_metrics.json" if phase == "eval" else "stability_metrics.json")).exists()
