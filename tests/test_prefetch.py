"""prefetch against a local hub look-alike (tests/helpers_hub.py) reached through HF_ENDPOINT, with the
real huggingface_hub client in a subprocess (it reads HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE at import)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cachemedicpp import ROOT, prefetch
from helpers_hub import FakeHub, files_from_dir

REPO = "tiny-org/tiny-gpt2"
BIN_REPO = "tiny-org/bin-only"
# files a real repo carries that loading does not need
EXTRAS = {"README.md": b"# tiny\n", "onnx/decoder_model.onnx": b"onnx", "flax_model.msgpack": b"flax",
          "pytorch_model.bin": b"duplicate weights in the old format"}


@pytest.fixture(scope="module")
def hub(tiny_root, tmp_path_factory):
    from cachemedicpp import hf

    rev_b_dir = hf.build_tiny_model("gpt2", tmp_path_factory.mktemp("rev_b") / "gpt2", tiny_root / "tokenizer", seed=1)
    h = FakeHub()
    repo = h.repo(REPO)
    h.sha_a = repo.add_commit(files_from_dir(tiny_root / "gpt2", EXTRAS), refs=("v1",))
    h.sha_b = repo.add_commit(files_from_dir(rev_b_dir, {"README.md": b"# tiny v2\n"}), refs=("main",))
    h.files_a, h.files_b = repo.commits[h.sha_a], repo.commits[h.sha_b]
    h.repo(BIN_REPO).add_commit({"config.json": b"{}", "pytorch_model.bin": b"weights", "README.md": b"x",
                                 "onnx/model.onnx": b"onnx"})
    # whatever the default preset names (its configs, or the preset's own model names)
    h.preset = [t.name for t in prefetch.resolve_targets() if prefetch.classify(t) == "hub"]
    for name in h.preset:
        h.repo(name).add_commit({"config.json": b"{}", "model.safetensors": b"w" * 64, "vocab.json": b"{}"})
    h.start()
    yield h
    h.stop()


def run_prefetch(args, hf_home: Path, endpoint: str | None, offline: bool = False, timeout: float = 60):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "cachemedicpp.prefetch", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(hf_home: Path, repo: str, sha: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / sha


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------------------


def test_fetch_pins_revisions_into_hf_home_and_loads(hub, tmp_path, tiny_model_dir):
    from cachemedicpp import hf

    home = tmp_path / "hf_home"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": REPO, "revision": "v1"}}))
    hub.downloads.clear()
    p = run_prefetch(["--config", str(cfg), "--model", REPO], home, hub.endpoint)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"ready: {REPO}@v1 (hub) commit {hub.sha_a}" in p.stdout
    assert f"ready: {REPO} (hub) commit {hub.sha_b}" in p.stdout
    assert "2/2 target(s) ok" in p.stdout
    assert not hub.unexpected, hub.unexpected

    snap_a, snap_b = snapshot(home, REPO, hub.sha_a), snapshot(home, REPO, hub.sha_b)
    assert str(snap_a) in p.stdout and str(snap_b) in p.stdout  # HF_HOME honoured
    repo_dir = snap_a.parents[1]
    assert (repo_dir / "refs" / "v1").read_text() == hub.sha_a
    assert (repo_dir / "refs" / "main").read_text() == hub.sha_b
    # only what loading needs: config + tokenizer + safetensors; not the README, ONNX, flax or .bin copy
    need = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    got_a = {f.name for f in snap_a.iterdir()}
    assert need & set(hub.files_a) <= got_a
    assert got_a == {f for f in hub.files_a if "/" not in f} - set(EXTRAS)
    assert not any(d.endswith(tuple(EXTRAS)) for d in hub.downloads), hub.downloads
    assert (snap_a / "model.safetensors").read_bytes() == hub.files_a["model.safetensors"]
    assert (snap_b / "model.safetensors").read_bytes() == hub.files_b["model.safetensors"]
    assert hub.files_a["model.safetensors"] != hub.files_b["model.safetensors"]

    # the fetched snapshot is enough to load the model, and it is revision A's model
    import torch

    ids = torch.tensor([[5, 17, 42, 7, 99]])
    got = hf.load_model({"name": str(snap_a)}, "cpu", "float32")
    ref = hf.load_model({"name": str(tiny_model_dir("gpt2"))}, "cpu", "float32")
    with torch.no_grad():
        torch.testing.assert_close(hf.forward(got.model, ids)[0], hf.forward(ref.model, ids)[0], rtol=0, atol=0)


def test_commit_sha_spec_and_offline_reuse(hub, tmp_path):
    home = tmp_path / "hf_home"
    p = run_prefetch(["--model", f"{REPO}@{hub.sha_a}"], home, hub.endpoint)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"commit {hub.sha_a}" in p.stdout
    assert (snapshot(home, REPO, hub.sha_a) / "model.safetensors").is_file()
    assert not snapshot(home, REPO, hub.sha_b).exists()

    # offline afterwards: the cached snapshot is reported (not an error); an uncached one fails clearly
    p = run_prefetch(["--model", f"{REPO}@{hub.sha_a}", "--model", f"{REPO}@v1"], home, hub.endpoint, offline=True)
    assert p.returncode == 1
    assert f"cached: {REPO}@{hub.sha_a} (hub) commit {hub.sha_a}" in p.stdout
    assert f"error: {REPO}@v1: offline mode is on (HF_HUB_OFFLINE=1)" in p.stderr
    assert "1/2 target(s) ok, 1 failed" in p.stdout


def test_bin_weights_only_when_no_safetensors(hub, tmp_path):
    home = tmp_path / "hf_home"
    p = run_prefetch(["--model", BIN_REPO], home, hub.endpoint)
    assert p.returncode == 0, p.stdout + p.stderr
    sha = hub.repos[BIN_REPO].refs["main"]
    assert {f.name for f in snapshot(home, BIN_REPO, sha).iterdir()} == {"config.json", "pytorch_model.bin"}


def test_dry_run_resolves_without_downloading(hub, tmp_path):
    home = tmp_path / "hf_home"
    hub.downloads.clear()
    p = run_prefetch(["--model", REPO, "--model", f"{REPO}@v1", "--dry_run"], home, hub.endpoint)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"would-fetch: {REPO} (hub) commit {hub.sha_b}" in p.stdout
    assert f"would-fetch: {REPO}@v1 (hub) commit {hub.sha_a}" in p.stdout
    assert "model.safetensors" in p.stdout and "README.md" not in p.stdout and "pytorch_model.bin" not in p.stdout
    assert hub.downloads == []
    assert not list(home.rglob("*.safetensors"))


def test_default_preset_dry_run(hub, tmp_path):
    assert hub.preset, "the default preset names no hub model"
    p = run_prefetch(["--dry_run"], tmp_path / "hf_home", hub.endpoint)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in hub.preset:
        assert f"would-fetch: {name}" in p.stdout
        assert hub.repos[name].refs["main"] in p.stdout


def test_preset_resolution(tmp_path):
    # preset files absent: the preset's own models
    ts = prefetch.resolve_targets(root=tmp_path)
    assert [(t.name, t.revision) for t in ts] == [("gpt2-medium", None), ("gpt2-large", None)]
    assert "absent" in ts[0].sources[0]
    # preset files present: read through load_config; duplicates merge, order kept
    for rel, name, rev in (("configs/mve.yaml", "org/medium", "abc"),
                           ("configs/second_model_smoke_gpt2_large.yaml", "org/large", None)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(yaml.safe_dump({"model": {"name": name, "revision": rev}}))
    ts = prefetch.resolve_targets(root=tmp_path)
    assert [(t.name, t.revision) for t in ts] == [("org/medium", "abc"), ("org/large", None)]
    # explicit targets replace the preset
    ts = prefetch.resolve_targets([str(tmp_path / "configs/mve.yaml")], ["org/medium@abc", "org/x@v2", "embedded:foo"])
    assert [(t.name, t.revision) for t in ts] == [("org/medium", "abc"), ("org/x", "v2"), ("embedded:foo", None)]
    assert len(ts[0].sources) == 2


def test_classify_and_select_files(tmp_path, tiny_model_dir):
    T = prefetch.Target
    assert prefetch.classify(T("embedded:smollm2-135m-instruct")) == "embedded"
    assert prefetch.classify(T(str(tiny_model_dir("gpt2")))) == "local"
    assert prefetch.classify(T("./nowhere")) == "missing-local"
    assert prefetch.classify(T("a/b/c")) == "missing-local"
    assert prefetch.classify(T("gpt2-medium")) == "hub"
    assert prefetch.classify(T("openai-community/gpt2")) == "hub"
    files, problem = prefetch.select_files(["config.json", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                            "pytorch_model.bin", "tokenizer.model", "sub/model.safetensors", "x.md"])
    assert problem is None
    assert files == ["config.json", "tokenizer.model", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert prefetch.select_files(["config.json", "README.md"])[1].startswith("the repo has no")
    assert "config.json" in prefetch.select_files(["model.safetensors"])[1]


def test_unreachable_endpoint_fails_per_target(tmp_path, tiny_model_dir):
    local = str(tiny_model_dir("gpt2"))
    p = run_prefetch(["--model", REPO, "--model", local, "--model", f"{BIN_REPO}@v3"], tmp_path / "hf_home",
                     f"http://127.0.0.1:{closed_port()}")
    assert p.returncode == 1
    err = p.stderr.splitlines()
    assert any(line.startswith(f"error: {REPO}: cannot reach the hub at http://127.0.0.1:") for line in err), p.stderr
    assert any(line.startswith(f"error: {BIN_REPO}@v3: cannot reach the hub") for line in err), p.stderr
    assert f"ready: {local} (local)" in p.stdout  # the other targets still ran
    assert "1/3 target(s) ok, 2 failed" in p.stdout


def test_offline_mode_fails_clearly(tmp_path):
    p = run_prefetch(["--model", REPO], tmp_path / "hf_home", None, offline=True)
    assert p.returncode == 1
    assert f"error: {REPO}: offline mode is on (HF_HUB_OFFLINE=1)" in p.stderr
    assert str(tmp_path / "hf_home" / "hub") in p.stderr


def test_not_found_errors(hub, tmp_path):
    p = run_prefetch(["--model", "tiny-org/missing", "--model", f"{REPO}@nope"], tmp_path / "hf_home", hub.endpoint)
    assert p.returncode == 1
    assert "error: tiny-org/missing: repository tiny-org/missing not found" in p.stderr
    assert f"error: {REPO}@nope: revision 'nope' does not exist" in p.stderr


def test_bad_arguments_exit_2(tmp_path):
    p = run_prefetch(["--config", str(tmp_path / "missing.yaml")], tmp_path / "hf_home", None, offline=True)
    assert p.returncode == 2 and "missing.yaml" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"nmae": "gpt2"}}))
    p = run_prefetch(["--config", str(bad)], tmp_path / "hf_home", None, offline=True)
    assert p.returncode == 2 and "model.nmae" in p.stderr
    p = run_prefetch(["--model", "@v1"], tmp_path / "hf_home", None, offline=True)
    assert p.returncode == 2 and "REPO[@REVISION]" in p.stderr


def test_local_targets(tmp_path, tiny_model_dir):
    ok = prefetch.prepare(prefetch.Target(str(tiny_model_dir("llama"))))
    assert ok.ok and ok.kind == "local" and ok.path == str(tiny_model_dir("llama").resolve())
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = prefetch.prepare(prefetch.Target(str(empty)))
    assert not bad.ok and "config.json" in bad.note
    missing = prefetch.prepare(prefetch.Target(str(tmp_path / "nope.gguf")))
    assert not missing.ok and "does not exist" in missing.note


def test_embedded_dry_run_names_the_conversion_cache():
    from cachemedicpp import hf

    r = prefetch.prepare(prefetch.Target("embedded:smollm2-135m-instruct"), dry_run=True)
    assert r.ok and r.kind == "embedded" and r.status in ("cached", "would-fetch")
    assert Path(r.path).parent == hf.cache_root() / "converted"
    unknown = prefetch.prepare(prefetch.Target("embedded:nope"))
    assert not unknown.ok and "known:" in unknown.note


@pytest.mark.slow
def test_embedded_prepare_converts_once():
    r = prefetch.prepare(prefetch.Target("embedded:smollm2-135m-instruct"))
    assert r.status == "ready", r.note
    assert (Path(r.path) / ".complete").is_file() and (Path(r.path) / "config.json").is_file()
    again = prefetch.prepare(prefetch.Target("embedded:smollm2-135m-instruct"), dry_run=True)
    assert again.status == "cached" and again.path == r.path


# --------------------------------------------------------------------------------------------------
# datasets


def _fake_fetch(monkeypatch) -> list:
    got = []

    def fetch(t):
        got.append((t.kind, t.name, t.include_path))
        return f"fetched {t.label}"

    monkeypatch.setattr(prefetch, "fetch_dataset", fetch)
    return got


def test_datasets_planned_from_configs_and_arguments(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from conftest import tiny_config

    got = _fake_fetch(monkeypatch)
    data = tiny_config(tiny_model_dir("gpt2"), **{
        "data": {"source": "auto"},
        "eval.tasks": [{"name": "wikitext2_ppl"}, {"name": "sst2_prompted", "few_shot": 2},
                       {"name": "lmeval:my_task", "include_path": str(tmp_path)}]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert prefetch.run([str(cfg)], datasets=True, dataset_keys=["sst2"], lmeval_tasks=["arc_easy"]) == 0
    assert got == [("dataset", "sst2", None), ("lmeval", "arc_easy", None), ("dataset", "wikitext2", None),
                   ("dataset", "sst2_train", None), ("dataset", "train_corpus", None),
                   ("lmeval", "my_task", str(tmp_path))]
    out = capsys.readouterr().out
    assert "ready: lmeval:my_task (lmeval)" in out and "7/7 target(s) ok" in out  # the local model too
    # without --datasets a config fetches no dataset; an offline config none of its built-in ones
    got.clear()
    assert prefetch.run([str(cfg)]) == 0 and got == []
    data["data"] = {"source": "offline"}
    cfg.write_text(yaml.safe_dump(data))
    assert prefetch.run([str(cfg)], datasets=True) == 0
    assert got == [("lmeval", "my_task", str(tmp_path))]


def test_dataset_arguments_alone_fetch_no_model(monkeypatch, capsys):
    got = _fake_fetch(monkeypatch)
    assert prefetch.main(["--dataset", "sst2", "--lmeval_task", "hellaswag", "--include_path", "x"]) == 0
    assert got == [("dataset", "sst2", None), ("lmeval", "hellaswag", "x")]
    assert "2/2 target(s) ok" in capsys.readouterr().out
    assert prefetch.main(["--dataset", "sst3"]) == 2
    assert "unknown dataset 'sst3' (did you mean sst2?)" in capsys.readouterr().err
    assert prefetch.main(["--dataset", "wikitext2", "--dry_run"]) == 0
    assert "would-fetch: dataset:wikitext2" in capsys.readouterr().out and len(got) == 2


def test_dataset_unreachable_fails_clearly(monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert prefetch.main(["--dataset", "sst2"]) == 1
    err = capsys.readouterr().err
    assert "error: dataset:sst2: offline mode is on" in err and "run prefetch where the hub is reachable" in err
