"""train: the files a run writes, log and record schemas, bit-identical resume after a pause request,
SIGTERM or SIGKILL or from the newest intact state when the latest one is torn, --no-resume, bad input,
and a frozen model with a learning operator."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cachemedicpp import ROOT, train
from cachemedicpp.config import load_config
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PAUSED
from cachemedicpp.fileio import read_jsonl, validate_records
from conftest import pause_after

FAST = {"train.steps": 8, "train.prefix_len": 24, "train.cont_len": 8, "train.log_every": 1,
        "train.save_every": 3}
LONG = {**FAST, "train.steps": 30, "train.save_every": 10}  # long enough to be interrupted from outside
SPEC_FIELDS = ("run_id", "phase", "timestamp_utc", "step", "loss_total", "loss_kd", "loss_id", "loss_contr",
               "rho_mean", "rho_p95", "corruption", "tokens_per_sec", "peak_memory_mb", "lr")
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_cfg(folder: Path, data: dict, name: str = "cfg.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def args(cfg_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--run_dir", str(run_dir), *extra]


def files_of(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*") if p.is_file()}


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (Path(run_dir) / name).read_bytes() for name in files_of(run_dir)}


def assert_same(a, b, where: str = "") -> None:
    """Deep equality with torch.equal on tensors (bit-identical, not close)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            if k != "elapsed_sec":  # wall time is the one thing a resumed run may not reproduce
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoints(run: Path, ref: Path) -> None:
    names = sorted(p.name for p in (ref / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    for name in names:
        assert_same(load_pt(run / "checkpoints" / name), load_pt(ref / "checkpoints" / name), name)


def losses(run_dir: Path) -> list[tuple]:
    keys = ("step", *train.LOSS_KEYS, "grad_norm", "corruption")
    return [tuple(json.dumps(r[k], sort_keys=True) for k in keys) for r in read_jsonl(run_dir / "logs" / "train.jsonl")]


def heartbeat(run_dir: Path) -> dict:
    return json.loads((run_dir / "logs" / "train_heartbeat.json").read_text())


def expected_files(steps: int, save_every: int) -> set[str]:
    saves = [n for n in range(save_every, steps, save_every)] + [steps]
    return ({".lock", "config_resolved.yaml", "run_record.json", "env.json", "logs/train.jsonl",
             "logs/train_heartbeat.json", "logs/train_heartbeat.jsonl", "checkpoints/train_state_latest.pt"}
            | {f"checkpoints/repair_step_{n}.pt" for n in saves}
            | {f"checkpoints/train_state_step_{n}.pt" for n in saves})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    """Uninterrupted reference runs: FAST (8 steps) and LONG (30 steps)."""
    from conftest import tiny_config

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name, over in (("fast", FAST), ("long", LONG)):
        root = tmp_path_factory.mktemp(f"straight_{name}")
        cfg_path, cfg = write_cfg(root, tiny_config(tiny_model_dir("llama"), **over))
        assert train.run(cfg, root / "run", config_path=str(cfg_path)) == EXIT_OK
        out[name] = (cfg_path, cfg, root / "run")
    torch.set_num_threads(old)
    return out


# --------------------------------------------------------------------------------------------------
# what a run writes


def test_exact_files_and_contents(straight, tiny_lm):
    cfg_path, cfg, rd = straight["fast"]
    assert files_of(rd) == expected_files(8, 3)
    assert {p.name for p in rd.iterdir() if p.is_dir()} == {"logs", "checkpoints", "control", "metrics"}
    assert not any((rd / "control").iterdir()) and not any((rd / "metrics").iterdir())
    assert yaml.safe_load((rd / "config_resolved.yaml").read_text()) == cfg.to_dict()

    op_keys = set(train.build_operator(cfg.repair.to_dict(), tiny_lm("llama").arch, cfg.seed).state_dict())
    for n in (3, 6, 8):
        rep = load_pt(rd / "checkpoints" / f"repair_step_{n}.pt")
        assert rep["format"] == "cachemedicpp.repair/1" and rep["step"] == n and rep["config_hash"] == cfg.hash
        assert set(rep["state_dict"]) == op_keys
        st = load_pt(rd / "checkpoints" / f"train_state_step_{n}.pt")
        assert st["format"] == train.STATE_FORMAT and st["step"] == n and st["config_hash"] == cfg.hash
        assert_same(st["operator"], rep["state_dict"], f"step {n}")
    assert_same(load_pt(rd / "checkpoints" / "train_state_latest.pt"), load_pt(rd / "checkpoints" / "train_state_step_8.pt"))
    # training changed the operator (U starts at zero)
    first, last = (load_pt(rd / "checkpoints" / f"repair_step_{n}.pt")["state_dict"] for n in (3, 8))
    assert any(not torch.equal(first[k], last[k]) for k in first)

    hb = heartbeat(rd)
    assert hb["status"] == "completed" and hb["step"] == hb["total_steps"] == 8 and hb["progress"] == 1.0
    assert hb["latest_checkpoint"] == "checkpoints/repair_step_8.pt"
    assert hb["latest_state"] == "checkpoints/train_state_latest.pt"
    timeline = read_jsonl(rd / "logs" / "train_heartbeat.jsonl")
    assert timeline[0]["status"] == "running" and timeline[0]["step"] == 0 and timeline[-1] == hb


def test_log_records_and_run_record_follow_the_schemas(straight):
    cfg_path, cfg, rd = straight["fast"]
    recs = read_jsonl(rd / "logs" / "train.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert validate_records(recs, "log_record") == []
    t = cfg.train
    kinds = set()
    for r in recs:
        assert all(k in r for k in SPEC_FIELDS), set(SPEC_FIELDS) - set(r)
        assert r["phase"] == "train" and r["lr"] == t.lr and r["peak_memory_mb"] > 0 and r["tokens_per_sec"] > 0
        total = r["loss_kd"] + t.lambda_id * r["loss_id"] + t.lambda_contr * r["loss_contr"]
        assert math.isclose(r["loss_total"], total, rel_tol=1e-5, abs_tol=1e-7)
        c = r["corruption"]
        kinds.add(c["type"] == "clean")
        if c["type"] == "clean":  # L_id on clean steps only, L_contr and rho on corrupted ones only
            assert c["epsilon"] == 0.0 and r["loss_contr"] == 0.0 and r["rho_mean"] is None
            assert r["loss_kd_no_repair"] is None
        else:
            assert c["epsilon"] in t_eps(cfg) and r["loss_id"] == 0.0 and c["persistence"] == "at_rest"
            assert r["loss_kd_no_repair"] >= 0.0  # the paired baseline: same draw, no repair
            assert c["type"] in cfg.corruption.mixture
            if c["changed"]["dK"] + c["changed"]["dV"] > 0:
                assert r["rho_mean"] is not None and 0 < r["rho_p95"]
    assert kinds == {True, False}, "the fixed seed gives both clean and corrupted steps"
    record = json.loads((rd / "run_record.json").read_text())
    assert validate_records([record], "run_record") == []
    assert record["config_hash"] == cfg.hash and record["config_path"] == str(cfg_path)
    assert set(json.loads((rd / "env.json").read_text())) >= {"python", "torch", "transformers"}


def test_kd_trend_is_paired_and_skips_clean_steps():
    recs = ([{"corruption": {"type": "clean"}, "loss_kd": 9.0}]
            + [{"corruption": {"type": "gaussian"}, "loss_kd": kd, "loss_kd_no_repair": base}
               for kd, base in [(2.0, 2.0), (1.0, 1.0), (5.0, None), (1.0, 2.0), (0.5, 2.0)]])
    k = train.kd_trend(recs, frac=0.4)
    assert k["logged"] == 5 and k["kd_first"] == 1.5 and k["kd_last"] == 0.75
    assert k["ratio_first"] == 1.0 and k["ratio_last"] == 0.375
    assert math.isnan(train.kd_trend([])["kd_first"])


def t_eps(cfg) -> list[float]:
    return [float(e) for e in cfg.corruption.eps_grid if e > 0]


# --------------------------------------------------------------------------------------------------
# pause and resume


def test_pause_request_then_resume_is_bit_identical(tmp_path, straight, monkeypatch):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        pause_after(m, rd, 4)
        assert train.run(cfg, rd, config_path=str(cfg_path)) == EXIT_PAUSED
    assert not (rd / "control" / "pause.request").exists()
    ack = json.loads((rd / "control" / "pause_ack.json").read_text())
    assert ack["step"] == 4 and ack["reason"] == "pause.request" and ack["state"] == "checkpoints/train_state_latest.pt"
    hb = heartbeat(rd)
    assert hb["status"] == "paused" and hb["step"] == 4
    assert load_pt(rd / "checkpoints" / "train_state_latest.pt")["step"] == 4
    # a pause saves the resume point only: no repair checkpoint for step 4
    assert sorted(p.name for p in (rd / "checkpoints").glob("repair_step_*.pt")) == ["repair_step_3.pt"]
    assert [r["step"] for r in read_jsonl(rd / "logs" / "train.jsonl")] == [1, 2, 3, 4]

    assert train.main(args(cfg_path, rd)) == EXIT_OK
    assert files_of(rd) == expected_files(8, 3) | {"control/pause_ack.json"}
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)
    statuses = [r["status"] for r in read_jsonl(rd / "logs" / "train_heartbeat.jsonl")]
    assert statuses[0] == "running" and "paused" in statuses and statuses[-1] == "completed"
    assert statuses[statuses.index("paused") + 1] == "resumed"


def test_pre_existing_request_pauses_before_the_first_step(tmp_path, straight):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    (rd / "control").mkdir(parents=True)
    (rd / "control" / "pause.request").write_text("")
    assert train.run(cfg, rd) == EXIT_PAUSED
    assert heartbeat(rd)["status"] == "paused" and heartbeat(rd)["step"] == 0
    assert not list((rd / "checkpoints").glob("repair_step_*.pt"))
    assert train.run(cfg, rd) == EXIT_OK
    assert_same_checkpoints(rd, ref)


def _start(cfg_path: Path, rd: Path, err_path: Path) -> subprocess.Popen:
    with open(err_path, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "cachemedicpp.train", *args(cfg_path, rd)], cwd=ROOT,
                                env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for_step(proc: subprocess.Popen, rd: Path, k: int, err_path: Path) -> int:
    """Poll train.jsonl (one record per step) until step >= k; returns the step seen."""
    deadline = time.monotonic() + 120
    log = rd / "logs" / "train.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train ended early ({proc.returncode}): {err_path.read_text()[-2000:]}"
        recs = read_jsonl(log)
        if recs and recs[-1]["step"] >= k and (rd / "logs" / "train_heartbeat.json").is_file():
            return recs[-1]["step"]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no progress within 120 s: {err_path.read_text()[-2000:]}")


def test_sigterm_pauses_and_the_rerun_matches_a_straight_run(tmp_path, straight):
    cfg_path, cfg, ref = straight["long"]
    rd, err = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(cfg_path, rd, err)
    _wait_for_step(proc, rd, 2, err)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PAUSED, err.read_text()[-2000:]
    ack = json.loads((rd / "control" / "pause_ack.json").read_text())
    assert ack["reason"] == "SIGTERM" and 2 <= ack["step"] < 30
    hb = heartbeat(rd)
    assert hb["status"] == "paused" and hb["step"] == ack["step"] and hb["reason"] == "SIGTERM"
    assert load_pt(rd / "checkpoints" / "train_state_latest.pt")["step"] == ack["step"]
    assert "paused at step" in err.read_text()

    assert train.main(args(cfg_path, rd)) == EXIT_OK
    assert files_of(rd) == expected_files(30, 10) | {"control/pause_ack.json"}
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)


def test_sigkill_at_any_moment_leaves_no_torn_file_and_resumes_exactly(tmp_path, straight):
    cfg_path, cfg, ref = straight["long"]
    rd, err = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(cfg_path, rd, err)
    _wait_for_step(proc, rd, 10, err)  # the save after step 10 is likely under way right now
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    _assert_nothing_truncated(rd, allow_torn_jsonl_tail=True)
    assert not (rd / "checkpoints" / "repair_step_30.pt").exists()

    assert train.main(args(cfg_path, rd)) == EXIT_OK
    _assert_nothing_truncated(rd, allow_torn_jsonl_tail=False)
    assert files_of(rd) == expected_files(30, 10)  # no temp file of the killed writer is left behind
    assert_same(load_pt(rd / "checkpoints" / "repair_step_30.pt"), load_pt(ref / "checkpoints" / "repair_step_30.pt"))
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)  # every step logged exactly once


def _assert_nothing_truncated(rd: Path, allow_torn_jsonl_tail: bool) -> None:
    for p in rd.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            assert isinstance(load_pt(p), dict), p
        elif p.suffix == ".yaml":
            assert isinstance(yaml.safe_load(p.read_text()), dict), p
        elif p.suffix == ".jsonl":
            text = p.read_text()
            lines = text.split("\n")
            tail = lines.pop()  # "" when the file ends with a newline
            assert allow_torn_jsonl_tail or tail == "", p
            for line in lines:
                json.loads(line)


# --------------------------------------------------------------------------------------------------
# starting over, and bad input


def test_no_resume_starts_over(tmp_path, straight, monkeypatch):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        pause_after(m, rd, 4)
        assert train.run(cfg, rd) == EXIT_PAUSED
    old = (rd / "checkpoints" / "repair_step_3.pt").stat().st_mtime_ns
    ran = []
    orig = train.Trainer.step
    monkeypatch.setattr(train.Trainer, "step", lambda self, s: (ran.append(s), orig(self, s))[1])
    assert train.main(args(cfg_path, rd, "--no-resume")) == EXIT_OK
    assert ran == list(range(1, 9))
    assert (rd / "checkpoints" / "repair_step_3.pt").stat().st_mtime_ns > old
    timeline = read_jsonl(rd / "logs" / "train_heartbeat.jsonl")
    assert timeline[0]["status"] == "running" and timeline[0]["step"] == 0
    assert "paused" not in [r["status"] for r in timeline]
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)


def test_a_completed_run_is_not_recomputed(tmp_path, straight, monkeypatch):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    shutil.copytree(ref, rd)
    monkeypatch.setattr(train.hf, "load_model", lambda *a, **k: pytest.fail("a completed run loaded the model"))
    before = {n: b for n, b in snapshot(rd).items() if "checkpoints/" in n}
    assert train.run(cfg, rd) == EXIT_OK
    assert {n: b for n, b in snapshot(rd).items() if "checkpoints/" in n} == before
    assert heartbeat(rd)["status"] == "completed"


def test_different_config_is_refused_naming_the_key(tmp_path, straight, capsys):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    shutil.copytree(ref, rd)
    before = snapshot(rd)
    other, _ = write_cfg(tmp_path, {**yaml.safe_load(cfg_path.read_text()), "seed": 5}, "other.yaml")
    assert train.main(args(other, rd)) == EXIT_BAD_INPUT
    msg = capsys.readouterr().err
    assert "seed" in msg and "Traceback" not in msg
    assert snapshot(rd) == before


def test_corrupted_train_state_is_bad_input_and_touches_nothing(tmp_path, straight, capsys):
    """Only when no state is intact: the latest and every periodic state torn."""
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    shutil.copytree(ref, rd)
    state = rd / "checkpoints" / "train_state_latest.pt"
    for p in [state, *(rd / "checkpoints").glob("train_state_step_*.pt")]:
        p.write_bytes(p.read_bytes()[:200])
    before = snapshot(rd)
    assert train.main(args(cfg_path, rd)) == EXIT_BAD_INPUT
    msg = capsys.readouterr().err
    assert str(state) in msg and "Traceback" not in msg
    assert len(msg.strip().splitlines()) == 1 and "no intact training state" in msg
    assert "train_state_step_8.pt, train_state_step_6.pt, train_state_step_3.pt" in msg
    assert snapshot(rd) == before


def _tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("damage, resumed_step", [
    (("latest",), 6),  # a torn latest state: the newest periodic one
    (("latest", 6), 3),  # the newest periodic one torn too: the one before
    (("missing",), 6),  # no latest state at all, periodic ones beside it
])
def test_torn_latest_state_resumes_from_the_newest_intact_one(tmp_path, straight, monkeypatch, capsys, damage,
                                                              resumed_step):
    from cachemedicpp import watch

    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        pause_after(m, rd, 7)
        assert train.run(cfg, rd, config_path=str(cfg_path)) == EXIT_PAUSED
    ckpts = rd / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("train_state_*.pt")) == [
        "train_state_latest.pt", "train_state_step_3.pt", "train_state_step_6.pt"]
    for what in damage:
        if what == "missing":
            (ckpts / "train_state_latest.pt").unlink()
        else:
            _tear(ckpts / ("train_state_latest.pt" if what == "latest" else f"train_state_step_{what}.pt"))
    capsys.readouterr()

    ran = []
    orig = train.Trainer.step
    monkeypatch.setattr(train.Trainer, "step", lambda self, s: (ran.append(s), orig(self, s))[1])
    assert train.main(args(cfg_path, rd)) == EXIT_OK
    assert ran == list(range(resumed_step + 1, 9))  # at most the steps since that state are lost
    err = capsys.readouterr().err
    state = f"checkpoints/train_state_step_{resumed_step}.pt"
    why = "train_state_latest.pt missing" if "missing" in damage else "train_state_latest.pt unreadable: "
    assert f"train: resume from {state} ({why}" in err and "Traceback" not in err
    resumed = [r for r in read_jsonl(rd / "logs" / "train_heartbeat.jsonl") if r["status"] == "resumed"]
    assert resumed[-1]["step"] == resumed_step and resumed[-1]["reason"].startswith(f"resume from {state} ({why}")
    assert resumed[-1]["resumed_from"] == state and heartbeat(rd)["resumed_from"] == state
    if 6 in damage:
        assert "train_state_step_6.pt unreadable" in resumed[-1]["resume_fallback"]

    # the same final checkpoints (tensors), states and losses as an uninterrupted run
    assert files_of(rd) == expected_files(8, 3) | {"control/pause_ack.json"}
    assert_same_checkpoints(rd, ref)
    assert losses(rd) == losses(ref)

    # watch shows where the run resumed from
    out = io.StringIO()
    assert watch.watch(rd, out=out) == EXIT_OK
    line = next(x for x in out.getvalue().splitlines() if x.strip().startswith("resumed "))
    assert f"from {rd / state} ({why}" in line


def test_a_completed_run_with_a_torn_latest_state_stays_complete(tmp_path, straight, monkeypatch):
    cfg_path, cfg, ref = straight["fast"]
    rd = tmp_path / "run"
    shutil.copytree(ref, rd)
    latest = rd / "checkpoints" / "train_state_latest.pt"
    _tear(latest)
    monkeypatch.setattr(train.hf, "load_model", lambda *a, **k: pytest.fail("a completed run loaded the model"))
    assert train.main(args(cfg_path, rd)) == EXIT_OK
    hb = heartbeat(rd)
    assert hb["status"] == "completed" and hb["resumed_from"] == "checkpoints/train_state_step_8.pt"
    assert hb["reason"].startswith("already complete; resume from checkpoints/train_state_step_8.pt")
    assert latest.read_bytes() == (rd / "checkpoints" / "train_state_step_8.pt").read_bytes()  # whole again
    assert_same_checkpoints(rd, ref)


@pytest.mark.parametrize("text, needle", [
    ("train: [steps: 3\n", "not valid YAML"),
    ("train:\n  stpes: 3\n", "did you mean train.steps"),
    (None, "not found"),
])
def test_bad_config_files_exit_2(tmp_path, text, needle, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    if text is not None:
        cfg_path.write_text(text)
    rd = tmp_path / "run"
    assert train.main(args(cfg_path, rd)) == EXIT_BAD_INPUT
    msg = capsys.readouterr().err
    assert needle in msg and "Traceback" not in msg
    assert not rd.exists()


# --------------------------------------------------------------------------------------------------
# the optimisation itself


def _trainer(tiny_cfg, tiny_lm, **over):
    from cachemedicpp.config import load_config as load

    cfg = load(data=tiny_cfg("llama", **{**FAST, **over}))
    return train.Trainer(cfg, tiny_lm("llama"))


def _first_step(trainer, corrupted: bool) -> int:
    """The first step drawing a clean step, or a dense corruption (sparse bit flips may change nothing)."""
    t = trainer.cfg.train
    for s in range(1, 200):
        ctype, _ = trainer.corruptor.sample("train", s, trainer.cfg.corruption.eps_grid, t.clean_batch_prob)
        if (ctype is None) != corrupted and ctype != "bitflipish_sparse":
            return s
    raise AssertionError("no such step")


def test_only_the_operator_learns(tiny_cfg, tiny_lm):
    trainer = _trainer(tiny_cfg, tiny_lm)
    model = trainer.lm.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    op0 = {k: v.clone() for k, v in trainer.op.state_dict().items()}
    assert all(p.dtype == torch.float32 for p in trainer.op.parameters())
    assert {id(p) for g in trainer.opt.param_groups for p in g["params"]} == {id(p) for p in trainer.op.parameters()}

    s = _first_step(trainer, corrupted=True)
    out = trainer.step(s)
    assert out["corruption"]["type"] != "clean" and out["loss_kd"] > 0 and out["grad_norm"] > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    changed = [k for k, v in trainer.op.state_dict().items() if not torch.equal(v, op0[k])]
    assert any(k.endswith(".u") for k in changed)

    # a clean step: the teacher's own K/V are the reference of L_id, so an identity operator pays nothing
    clean = _trainer(tiny_cfg, tiny_lm)
    out = clean.step(_first_step(clean, corrupted=False))
    assert out["corruption"]["type"] == "clean" and out["loss_id"] == 0.0 and abs(out["loss_kd"]) < 1e-6


def test_batch_size_two(tmp_path, tiny_cfg, tiny_lm):
    trainer = _trainer(tiny_cfg, tiny_lm, **{"train.batch_size": 2})
    ids = trainer.batch(1)
    assert ids.shape == (2, 32) and not torch.equal(ids[0], ids[1])
    s = _first_step(trainer, corrupted=True)
    out = trainer.step(s)
    assert all(math.isfinite(out[k]) for k in ("loss_total", "loss_kd", "loss_contr"))
    assert out["tokens"] == 2 * (24 + 8 + 8)
    # each row is its own example: identical rows still get independent corruption draws
    base = torch.randn(1, 2, 24, 8).repeat(2, 1, 1, 1)
    corrupted, report = trainer.corrupt({0: (base, base), 1: (base, base)}, "gaussian", 0.16, 7)
    assert not torch.equal(corrupted[0][0][0], corrupted[0][0][1])
    assert report["dK"] > 0 and set(report["per_layer"]) == {"0", "1"}

    cfg_path, cfg = write_cfg(tmp_path, tiny_cfg("llama", **{**FAST, "train.batch_size": 2, "train.steps": 2}))
    assert train.run(cfg, tmp_path / "run") == EXIT_OK
    recs = read_jsonl(tmp_path / "run" / "logs" / "train.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and validate_records(recs, "log_record") == []
