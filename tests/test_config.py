"""Config system: schema validation, defaults, overrides, hashing, mixture and OOD resolution, and
the exit-2 paths of the commands. No model is loaded here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cachemedicpp import ROOT
from cachemedicpp.config import (STATISTICAL_TYPES, ConfigError, apply_overrides, load_config, load_schema,
                                 parse_set_args, validate)

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
REFERENCE_KEYS = {
    "seed": 1234, "device": "cuda", "dtype": "bfloat16",
    "model": {"name": "gpt2-medium", "revision": "main", "attn_implementation": "eager", "use_cache": True},
    "repair": {"family": "A", "rank": 8, "protect_layers": [8, 9, 10, 11], "share_across_heads": True,
               "apply_to": "KV", "alpha_max": 0.9,
               "conditioning": {"use_layer_embedding": True, "use_head_embedding": False}},
    "corruption": {"mixture": "default_mix", "eps_grid": [0.0, 0.08, 0.16],
                   "axes": {"layer_mode": "all", "p_layer": 0.5, "layers": [], "head_mode": "all", "p_head": 0.5,
                            "heads": [], "time_mode": "old_only", "N_recent": 32, "window": [0, 32]},
                   "params": {"dropout_p": 0.02, "bitflip_p": 0.0005, "bitflip_eps_jump": 8.0, "quant_bits": 8,
                              "rotation_seed": 999, "overwrite_window": [16, 48], "donor_prompt": "x y z"}},
    "train": {"steps": 100, "lr": 2e-4, "batch_size": 1, "prefix_len": 96, "temperature": 2.0, "lambda_id": 1.0,
              "lambda_contr": 0.5, "alpha_contr": 0.8, "clean_batch_prob": 0.2, "grad_clip": 1.0,
              "log_every": 10, "save_every": 50},
    "baseline": {"smoothing_beta": 0.3, "dropout_p": 0.02, "clip_val": 6.0, "target_rms": 1.0},
    "eval": {"tasks": [{"name": "wikitext2_ppl", "num_examples": 8}],
             "corruption_eval": {"eps": [0.0, 0.08, 0.16], "types": ["gaussian"]}, "max_seq_len": 256,
             "measure_overhead": False, "ood_protocol": None, "ood_splits_path": None},
    "stability": {"num_prompts": 4, "delta_norms": [0, 0.5, 1, 2], "num_directions": 2, "topk_logits": 1000,
                  "layers": [8, 9], "head_subset": None, "time_mode": "old_only", "N_recent": 32},
    "data": {"use_offline": True, "offline_paths": {"wikitext2": "data/offline/wikitext2_eval.txt",
                                                     "sst2": "data/offline/sst2_eval.tsv"},
             "long_context": {"seed": 2025, "context_len": 200, "needle_token": "the_key",
                              "needle_value": "violet-7", "position_frac": 0.35,
                              "question_template": "Question: What is {needle_token}? Answer:"}},
}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert len(cfg.hash) == 16
    assert abs(sum(cfg.corruption.mixture.values()) - 1.0) < 1e-9


def test_shipped_sweeps_and_mixtures_are_valid_yaml():
    for p in (ROOT / "configs").rglob("*.yaml"):
        assert isinstance(yaml.safe_load(p.read_text()), dict), p


def test_reference_key_set_validates_and_resolves():
    cfg = load_config(data=REFERENCE_KEYS)
    assert cfg.train.cont_len == 32  # a documented default filled in
    assert cfg.corruption.eps_ref == 0.08
    assert set(cfg.corruption.mixture) == set(STATISTICAL_TYPES)  # the fault models are in faults_mix only


def test_defaults_are_filled_everywhere():
    cfg = load_config(data={})
    schema = load_schema("config")
    for section, sub in schema["properties"].items():
        if "properties" in sub:
            assert set(sub["properties"]) <= set(cfg[section].keys()), section


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load_config(data={"train": {"stesp": 3}})
    assert "train.stesp" in str(e.value) and "train.steps" in str(e.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(data={"train": {"steps": -1, "lr": "fast"}, "repair": {"family": "Z"}, "bogus": 1})
    text = str(e.value)
    for key in ("train.steps", "train.lr", "repair.family", "bogus"):
        assert key in text
    assert len(e.value.problems) >= 4


def test_overrides_yaml_typed_and_nested():
    ov = parse_set_args(["train.steps=7", "repair.protect_layers=[1, 2]", "eval.ood_protocol=null",
                         "model.name=foo/bar", "eval.tasks.0.num_examples=3"])
    assert ov["train.steps"] == 7 and ov["repair.protect_layers"] == [1, 2] and ov["eval.ood_protocol"] is None
    data = apply_overrides({"eval": {"tasks": [{"name": "wikitext2_ppl", "num_examples": 9}]}}, ov)
    assert data["train"]["steps"] == 7 and data["eval"]["tasks"][0]["num_examples"] == 3
    with pytest.raises(ConfigError):
        parse_set_args(["no_equals_sign"])
    with pytest.raises(ConfigError):
        apply_overrides({"eval": {"tasks": []}}, {"eval.tasks.4.name": "x"})


def test_hash_is_stable_and_sensitive():
    a = load_config(data={"seed": 1})
    b = load_config(data={"seed": 1})
    c = load_config(data={"seed": 2})
    assert a.hash == b.hash != c.hash
    # the resolved config re-resolves to itself (config_resolved.yaml round trip)
    again = load_config(data=yaml.safe_load(yaml.safe_dump(a.to_dict())))
    assert again.hash == a.hash and again.to_dict() == a.to_dict()
    # paths excluded from the hash
    d = load_config(data={"seed": 1, "stability": {"paired_run_dir": "/somewhere/else"}})
    assert d.hash == a.hash
    # and how the eval units are spread over processes: the results do not depend on it
    assert load_config(data={"seed": 1, "eval": {"workers": 3}}).hash == a.hash
    with pytest.raises(ConfigError, match="eval.workers"):
        load_config(data={"eval": {"workers": 0}})


def test_ood_split_applied_and_renormalised():
    cfg = load_config(data={"eval": {"ood_protocol": "loto_holdout_contiguous_overwrite"}})
    assert "contiguous_overwrite" not in cfg.corruption.mixture
    assert abs(sum(cfg.corruption.mixture.values()) - 1.0) < 1e-9
    assert abs(cfg.corruption.mixture["gaussian"] - 0.25 / 0.9) < 1e-9
    assert list(cfg.eval.corruption_eval.types) == ["contiguous_overwrite"]
    assert cfg.eval.ood_split.test_type == "contiguous_overwrite"
    with pytest.raises(ConfigError) as e:
        load_config(data={"eval": {"ood_protocol": "loto_holdout_gausian"}})
    assert "loto_holdout_gaussian" in str(e.value)


def test_kv_quant_is_held_out_against_the_six_default_types():
    cfg = load_config(data={"eval": {"ood_protocol": "loto_holdout_kv_quant"}})
    assert set(cfg.corruption.mixture) == set(STATISTICAL_TYPES)  # the default mixture, whole
    assert list(cfg.eval.corruption_eval.types) == ["kv_quant"]
    assert "kv_quant" not in load_config(data={}).corruption.mixture
    assert load_config(data={}).corruption.params.kv_quant_group == 32
    with pytest.raises(ConfigError, match="kv_quant_group"):
        load_config(data={"corruption": {"params": {"kv_quant_group": 0}}})


def test_mixture_params_and_user_params():
    cfg = load_config(data={"corruption": {"params": {"quant_bits": 4}}})
    assert cfg.corruption.params.quant_bits == 4 and cfg.corruption.params.dropout_p == 0.02
    with pytest.raises(ConfigError):
        load_config(data={"corruption": {"mixture": {"gaussian": 1.0, "laser": 2.0}}})
    inline = load_config(data={"corruption": {"mixture": {"gaussian": 3.0, "dropout_zero": 1.0}}})
    assert inline.corruption.mixture == {"gaussian": 0.75, "dropout_zero": 0.25}


def test_validate_reports_schema_errors_by_key():
    with pytest.raises(ConfigError) as e:
        validate({"sweep_name": "x", "runs": []}, load_schema("sweep"), "sweep")
    assert "base_config" in str(e.value)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("phase", ["train", "eval", "stability"])
def test_bad_configs_exit_2_naming_culprit(tmp_path, phase):
    missing = _cli(f"cachemedicpp.{phase}", "--config", str(tmp_path / "nope.yaml"), "--run_dir", str(tmp_path / "r"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [unclosed\n")
    r = _cli(f"cachemedicpp.{phase}", "--config", str(bad), "--run_dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "Traceback" not in r.stderr
    unk = tmp_path / "unknown.yaml"
    unk.write_text("repair: {rnak: 4}\n")
    r = _cli(f"cachemedicpp.{phase}", "--config", str(unk), "--run_dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "repair.rnak" in r.stderr and "repair.rank" in r.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.pt"))


def test_unloadable_model_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(tmp_path / "no_such_model_dir/")}, "device": "cpu"}))
    r = _cli("cachemedicpp.train", "--config", str(cfg), "--run_dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "no_such_model_dir" in r.stderr and "Traceback" not in r.stderr
