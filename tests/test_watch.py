"""watch on heartbeats written by `rundir.Heartbeat` (the writer every phase uses) and on hand-made edge
cases: missing and truncated snapshots, torn timelines, stale processes, sweeps, follow mode; the next
command per state (running, paused, failed, interrupted, phase complete, all complete, a partial sweep),
each run as printed on a tiny model; --json against its schema; a moved run dir; bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cachemedicpp import ROOT, watch
from conftest import pause_after
from cachemedicpp.fileio import atomic_write_json
from cachemedicpp.phase import Heartbeat


def beat(run_dir: Path, phase: str, status: str, step: int, total: int = 10, run_id: str = "run-1", **kw) -> dict:
    """One real heartbeat (snapshot + timeline) from a fresh writer; returns the snapshot record."""
    hb = Heartbeat(run_dir / "logs", run_id, phase, total, min_interval=0)
    hb.latest = {"checkpoint": kw.pop("checkpoint", None), "state": kw.pop("state", None)}
    hb.beat(status, step, force=True, **kw)
    return json.loads((run_dir / "logs" / f"{phase}_heartbeat.json").read_text())


def show(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = watch.main([str(a) for a in args])
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def field(text: str, name: str) -> str:
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts and parts[0] == name:
            return parts[1] if len(parts) > 1 else ""
    raise AssertionError(f"no {name!r} line in:\n{text}")


def status_part(text: str) -> str:
    """The output above the closing `next:` block."""
    assert "\n\nnext: " in text, text
    return text.split("\n\nnext: ", 1)[0]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


# --------------------------------------------------------------------------------------------------


def test_run_dir_shows_newest_phase_with_all_fields(tmp_path):
    run = tmp_path / "run"
    hb = Heartbeat(run / "logs", "run-1", "train", 8, min_interval=0)
    hb.beat("running", 0, force=True)
    time.sleep(0.02)
    hb.latest = {"checkpoint": str(run / "checkpoints/repair_step_4.pt"),
                 "state": str(run / "checkpoints/train_state_latest.pt")}
    hb.beat("running", 4, force=True, tokens_per_sec=2048.0, unit="step 4")
    code, out, _ = show("--run_dir", run)
    assert code == 0
    assert field(out, "phase") == "train"
    assert field(out, "status") == "running"
    assert field(out, "progress") == "4/8 (50.0%)"
    assert field(out, "checkpoint") == str(run / "checkpoints/repair_step_4.pt")
    assert field(out, "state") == str(run / "checkpoints/train_state_latest.pt")
    assert field(out, "unit") == "step 4"
    assert field(out, "tokens/s") == "2,048"
    assert field(out, "steps/s") != "-"  # a rate from two beats
    assert field(out, "eta") != "-"

    # train completes, eval starts: eval is the newest state; the table lists both phases
    hb.beat("completed", 8, force=True)
    time.sleep(0.02)
    beat(run, "eval", "running", 3, total=40, unit="wikitext2_ppl/eps=0.08")
    code, out, _ = show("--run_dir", run)
    assert code == 0
    assert field(out, "phase") == "eval" and field(out, "progress") == "3/40 (7.5%)"
    assert field(out, "unit") == "wikitext2_ppl/eps=0.08"
    table = {line.split()[0]: line.split() for line in status_part(out).splitlines()[-2:]}
    assert table["train"][1:4] == ["completed", "8/8", "100.0%"]
    assert table["eval"][1:4] == ["running", "3/40", "7.5%"]


def test_missing_snapshot_falls_back_to_timeline(tmp_path):
    run = tmp_path / "run"
    beat(run, "stability", "running", 2, total=6, unit="prompt 2")
    beat(run, "stability", "paused", 3, total=6, reason="pause.request")
    (run / "logs" / "stability_heartbeat.json").unlink()
    code, out, _ = show("--run_dir", run)
    assert code == 0
    assert field(out, "status") == "paused" and field(out, "progress") == "3/6 (50.0%)"
    assert field(out, "reason") == "pause.request"
    assert "[from timeline]" in out


def test_truncated_snapshot_and_torn_timeline(tmp_path):
    run = tmp_path / "run"
    beat(run, "train", "running", 5)
    rec = beat(run, "train", "running", 6)
    logs = run / "logs"
    (logs / "train_heartbeat.json").write_text(json.dumps(rec)[:40])  # truncated snapshot
    with open(logs / "train_heartbeat.jsonl", "a") as f:  # torn last line from a kill mid-append
        f.write('{"run_id": "run-1", "phase": "train", "status": "compl')
    code, out, _ = show("--run_dir", run)
    assert code == 0
    assert field(out, "progress") == "6/10 (60.0%)" and field(out, "status") == "running"
    # the timeline wins over an older (but valid) snapshot too
    old = dict(rec, step=1, timestamp_utc="2000-01-01T00:00:00.000Z")
    atomic_write_json(logs / "train_heartbeat.json", old)
    assert field(show("--run_dir", run)[1], "progress") == "6/10 (60.0%)"


def test_stale_when_process_gone_or_silent(tmp_path):
    run = tmp_path / "run"
    rec = beat(run, "train", "running", 2)
    atomic_write_json(run / "logs" / "train_heartbeat.json", dict(rec, pid=dead_pid()))
    (run / "logs" / "train_heartbeat.jsonl").unlink()
    _, out, _ = show("--run_dir", run)
    assert field(out, "status").startswith("stale (process ") and "is gone; last said running" in out

    # alive pid (this process) but no update for longer than --stale_after
    old_ts = "2000-01-01T00:00:00.000Z"
    atomic_write_json(run / "logs" / "train_heartbeat.json", dict(rec, timestamp_utc=old_ts))
    _, out, _ = show("--run_dir", run, "--stale_after", "60")
    assert field(out, "status").startswith("stale (no update for ")
    # fresh and alive: not stale; and another host's pid is never checked here
    atomic_write_json(run / "logs" / "train_heartbeat.json", dict(rec, pid=dead_pid(), host="elsewhere"))
    _, out, _ = show("--run_dir", run)
    assert field(out, "status") == "running"
    # a terminal status is never stale, however old
    atomic_write_json(run / "logs" / "train_heartbeat.json", dict(rec, status="completed", timestamp_utc=old_ts,
                                                                  pid=dead_pid()))
    code, out, _ = show("--run_dir", run, "--stop_on_terminal")
    assert field(out, "status") == "completed" and code == 0


def test_sweep_dir_shows_every_run(tmp_path):
    sweep = tmp_path / "out" / "my_sweep"
    beat(sweep, "sweep", "running", 1, total=3, run_id="my_sweep", unit="run_b/eval")
    beat(sweep / "run_a", "train", "completed", 10, run_id="run_a")
    beat(sweep / "run_a", "stability", "completed", 4, total=4, run_id="run_a")
    beat(sweep / "run_b", "train", "completed", 10, run_id="run_b")
    time.sleep(0.02)
    beat(sweep / "run_b", "eval", "running", 5, total=20, run_id="run_b", unit="sst2/eps=0.16")
    (sweep / "run_c").mkdir()
    (sweep / "run_c" / "config_resolved.yaml").write_text("seed: 0\n")
    (sweep / "control").mkdir()  # the sweep's own folders are not runs
    # the sweep's plan lists a run that has not started yet
    (sweep / "sweep_resolved.yaml").write_text("execution_order: [run_b, run_a, run_d]\n")

    code, out, _ = show("--run_dir", sweep)
    assert code == 0
    assert field(out, "phase") == "sweep" and field(out, "progress") == "1/3 (33.3%)"
    assert field(out, "unit") == "run_b/eval"
    assert "runs (4)" in out
    runs_part = out.split("runs (4)", 1)[1]
    rows = {line.split()[0]: line.split() for line in runs_part.splitlines() if line.startswith("  run_")}
    assert list(rows) == ["run_b", "run_a", "run_d", "run_c"]  # plan order, then other run folders
    assert rows["run_a"][1:5] == ["stability", "completed", "4/4", "100.0%"]
    assert rows["run_b"][1:5] == ["eval", "running", "5/20", "25.0%"]
    assert rows["run_b"][-1] == "sst2/eps=0.16"
    assert "no heartbeat" in " ".join(rows["run_c"])
    assert rows["run_d"][1:] == ["-", "pending"]
    # the sweep heartbeat decides the sweep's terminal state
    beat(sweep, "sweep", "paused", 1, total=3, run_id="my_sweep")
    assert show("--run_dir", sweep, "--stop_on_terminal")[0] == 3


def test_sweep_without_its_heartbeat_uses_newest_run(tmp_path):
    sweep = tmp_path / "s"
    beat(sweep / "r1", "train", "completed", 10)
    time.sleep(0.02)
    beat(sweep / "r2", "train", "failed", 3, reason="RuntimeError: boom")
    code, out, _ = show("--run_dir", sweep, "--stop_on_terminal")
    assert code == 1
    assert "(no sweep heartbeat yet)" in out and "runs (2)" in out


@pytest.mark.parametrize("status,code", [("completed", 0), ("paused", 3), ("failed", 1), ("running", 0)])
def test_stop_on_terminal_once(tmp_path, status, code):
    beat(tmp_path, "eval", status, 4)
    assert show("--run_dir", tmp_path, "--stop_on_terminal")[0] == code
    assert show("--run_dir", tmp_path)[0] == 0


def test_missing_dir_or_no_heartbeat_is_exit_2(tmp_path):
    code, out, err = show("--run_dir", tmp_path / "nope")
    assert code == 2 and "does not exist" in err and out == ""
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    code, _, err = show("--run_dir", tmp_path / "empty")
    assert code == 2 and "no heartbeat" in err
    assert show("--run_dir", tmp_path / "empty", "--interval", "0")[0] == 2


def test_follow_redraws_only_on_change_and_stops_on_failed(tmp_path):
    run = tmp_path / "run"
    hb = Heartbeat(run / "logs", "run-1", "train", 10, min_interval=0)
    hb.beat("running", 1, force=True)
    script = [lambda: None,  # nothing changed: no redraw
              lambda: hb.beat("running", 2, force=True),
              lambda: hb.beat("failed", 2, reason="ValueError: bad", force=True),
              lambda: pytest.fail("watch kept following a failed run")]
    calls = []

    def fake_sleep(_):
        calls.append(1)
        time.sleep(0.01)  # distinct mtimes
        script[len(calls) - 1]()

    out = io.StringIO()
    code = watch.watch(run, follow=True, stop_on_terminal=True, interval=0.01, out=out, sleep=fake_sleep)
    assert code == 1 and len(calls) == 3
    text = out.getvalue()
    assert text.count("progress") == 3  # initial + step 2 + failed; the idle poll drew nothing
    assert "1/10 (10.0%)" in text and "2/10 (20.0%)" in text and "ValueError: bad" in text


def _start_follow(run_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cachemedicpp.watch", "--run_dir", str(run_dir), "--follow", "--stop_on_terminal",
         "--interval", "0.1"], stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"watch exited early ({proc.returncode}):\n{log.read_text()}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{text!r} not shown within {timeout}s:\n{log.read_text()}")


def test_follow_subprocess_exits_0_on_completed(tmp_path):
    run, log = tmp_path / "run", tmp_path / "watch.log"
    hb = Heartbeat(run / "logs", "run-1", "train", 10, min_interval=0)
    hb.beat("running", 3, force=True)
    proc = _start_follow(run, log)
    try:
        _wait_for(log, "3/10 (30.0%)", proc)
        hb.beat("completed", 10, force=True)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "10/10 (100.0%)" in log.read_text()


def test_follow_subprocess_waits_for_first_heartbeat_and_exits_3_on_paused(tmp_path):
    run, log = tmp_path / "run", tmp_path / "watch.log"
    run.mkdir()
    proc = _start_follow(run, log)
    try:
        _wait_for(log, "waiting for a heartbeat", proc)
        hb = Heartbeat(run / "logs", "run-1", "eval", 12, min_interval=0)
        hb.beat("resumed", 4, force=True)
        _wait_for(log, "4/12 (33.3%)", proc)
        hb.beat("paused", 5, reason="SIGTERM", force=True)
        assert proc.wait(timeout=20) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM" in log.read_text()


def test_pid_alive():
    assert watch.pid_alive(os.getpid())
    assert not watch.pid_alive(dead_pid())


def test_formatting():
    assert watch.fmt_duration(None) == "-"
    assert watch.fmt_duration(42) == "42s"
    assert watch.fmt_duration(125) == "2m05s"
    assert watch.fmt_duration(3 * 3600 + 61) == "3h01m01s"
    assert watch.fmt_duration(2 * 86400 + 3600) == "2d01h00m"
    assert watch.fmt_progress({"step": 1, "total_steps": 3}) == ("1/3", "33.3%")
    assert watch.fmt_progress({}) == ("-/-", "-")


def test_watch_a_real_train_run(tmp_path, tiny_cfg):
    """Heartbeats from the train phase itself: pause (exit 3), then resume to completion (exit 0)."""
    train = pytest.importorskip("cachemedicpp.train")
    from cachemedicpp.config import load_config

    cfg = load_config(data=tiny_cfg("gpt2", **{"train.steps": 4, "train.save_every": 2}))
    run = tmp_path / "run"
    (run / "control").mkdir(parents=True)
    (run / "control" / "pause.request").write_text("")
    assert train.run(cfg, run) == 3
    code, out, _ = show("--run_dir", run, "--stop_on_terminal")
    assert code == 3
    assert field(out, "phase") == "train" and field(out, "status") == "paused"
    assert field(out, "progress") == "0/4 (0.0%)" and field(out, "reason") == "pause.request"

    assert train.run(cfg, run) == 0
    code, out, _ = show("--run_dir", run, "--stop_on_terminal")
    assert code == 0
    assert field(out, "status") == "completed" and field(out, "progress") == "4/4 (100.0%)"
    ckpt, state = field(out, "checkpoint"), field(out, "state")
    assert ckpt.endswith("repair_step_4.pt") and state.endswith("train_state_latest.pt")
    assert (run / ckpt).is_file() and (run / state).is_file()


# --------------------------------------------------------------------------------------------------
# the next command: per state, run as printed on a tiny model


NEXT_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = {"train.steps": 8, "train.save_every": 3, "train.log_every": 1, "train.prefix_len": 24, "train.cont_len": 8}


def small_config(tiny_cfg, **over) -> dict:
    """The conftest tiny config with few steps, examples and prompts: every phase runs in seconds."""
    cfg = tiny_cfg("llama", **{**TRAIN, **over})
    cfg["eval"]["tasks"] = [{"name": "wikitext2_ppl", "num_examples": 2}, {"name": "sst2_prompted", "num_examples": 2},
                            {"name": "needle_long_context", "num_examples": 1}]
    cfg["eval"]["corruption_eval"]["eps"] = [0.0, 0.16]
    cfg["stability"].update({"num_prompts": 2, "num_directions": 2, "delta_norms": [0.0, 1.0]})
    return cfg


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory, tiny_model_dir) -> Path:
    from conftest import tiny_config

    path = tmp_path_factory.mktemp("next_cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(small_config(lambda arch, **o: tiny_config(tiny_model_dir(arch), **o))))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cfg_file) -> Path:
    """An uninterrupted training run of cfg_file (one torch thread, as in the subprocesses)."""
    import torch

    from cachemedicpp import train
    from cachemedicpp.config import load_config

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rd = tmp_path_factory.mktemp("next_ref") / "run"
        assert train.run(load_config(cfg_file), rd, config_path=str(cfg_file)) == 0
    finally:
        torch.set_num_threads(old)
    return rd


def status(path: Path) -> dict:
    """watch --json, checked against its schema."""
    import jsonschema

    from cachemedicpp.config import load_schema

    code, out, err = show("--run_dir", path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    errors = [e.message for e in jsonschema.Draft202012Validator(load_schema("watch_status")).iter_errors(doc)]
    assert errors == [], errors
    return doc


def next_block(text: str) -> str:
    assert "\n\nnext: " in text, text
    return "next: " + text.split("\n\nnext: ", 1)[1]


def commands(text: str) -> list[str]:
    """The commands of the closing `next:` block, as printed."""
    return [line[len("  $ "):] for line in next_block(text).splitlines() if line.startswith("  $ ")]


def run_printed(cmd: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A printed command, run by a shell exactly as printed (`python` is this interpreter's), from a folder
    that is neither the repository nor the run dir."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, shell=True, cwd=cwd, env=NEXT_ENV, capture_output=True, text=True, timeout=timeout)


def same_checkpoints(run: Path, ref: Path) -> None:
    import torch

    names = sorted(p.name for p in (ref / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    for name in names:
        a, b = (torch.load(d / "checkpoints" / name, map_location="cpu", weights_only=True) for d in (run, ref))
        ta, tb = (x.get("operator", x.get("state_dict")) for x in (a, b))  # a training state, a repair checkpoint
        assert ta and set(ta) == set(tb) and all(torch.equal(v, tb[k]) for k, v in ta.items()), name
        assert a["step"] == b["step"], name


def test_next_when_paused_is_the_command_that_resumes(tmp_path, cfg_file, reference, monkeypatch, one_thread):
    from cachemedicpp import train
    from cachemedicpp.config import load_config

    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        pause_after(m, rd, 4)
        assert train.run(load_config(cfg_file), rd, config_path=str(cfg_file)) == 3
    code, out, _ = show("--run_dir", rd)
    assert code == 0
    nxt = next_block(out)
    assert nxt.startswith("next: train is paused at step 4/8 (pause.request); resume it with:")
    own = f"--config {rd / 'config_resolved.yaml'} --run_dir {rd}"
    assert commands(out) == [f"python -m cachemedicpp.train {own}", f"python -m cachemedicpp.pipeline {own}"]
    # the run's own resolved config loads to the run's config hash, so a moved run dir's command works too
    doc = status(rd)
    assert doc["next"]["state"] == "paused" and doc["next"]["phase"] == "train"
    assert doc["next"]["config"] == {"path": str(rd / "config_resolved.yaml"), "sets": [], "verified": True,
                                     "source": "run_dir", "note": None}
    chash = json.loads((rd / "run_record.json").read_text())["config_hash"]
    assert load_config(rd / "config_resolved.yaml").hash == chash

    res = run_printed(doc["next"]["command"], tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]
    same_checkpoints(rd, reference)
    doc = status(rd)
    assert doc["next"]["state"] == "phase_complete" and doc["next"]["phase"] == "eval"


def test_next_when_failed_names_the_error_and_retries(tmp_path, cfg_file, reference, monkeypatch, one_thread):
    from cachemedicpp import train
    from cachemedicpp.config import load_config

    rd = tmp_path / "run"
    orig = train.Trainer.step

    def step(self, s):
        if s == 5:
            raise RuntimeError("injected failure at step 5")
        return orig(self, s)

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "step", step)
        with pytest.raises(RuntimeError):
            train.run(load_config(cfg_file), rd, config_path=str(cfg_file))
    code, out, _ = show("--run_dir", rd, "--stop_on_terminal")
    assert code == 1
    nxt = next_block(out).splitlines()
    assert nxt[0] == "next: train failed at step 4/8: RuntimeError: injected failure at step 5"
    assert f"the error is recorded in {rd / 'logs' / 'train_heartbeat.jsonl'}" in next_block(out)
    assert f"train log: {rd / 'logs' / 'train.jsonl'}" in next_block(out)
    doc = status(rd)
    assert doc["next"]["state"] == "failed" and doc["next"]["error"] == "RuntimeError: injected failure at step 5"
    assert doc["next"]["logs"] == [str(rd / "logs" / "train_heartbeat.jsonl"), str(rd / "logs" / "train.jsonl")]
    assert all(Path(p).is_file() for p in doc["next"]["logs"])

    res = run_printed(commands(out)[0], tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]
    same_checkpoints(rd, reference)


def test_next_when_running_is_how_to_pause(tmp_path, cfg_file):
    rd = tmp_path / "run"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["train"].update(steps=400, save_every=100)
    long_cfg = tmp_path / "long.yaml"
    long_cfg.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "cachemedicpp.train", "--config", str(long_cfg),
                             "--run_dir", str(rd)], env=NEXT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "train never reported running"
            hb = rd / "logs" / "train_heartbeat.json"
            if hb.is_file() and json.loads(hb.read_text()).get("step", 0) >= 2:
                break
            time.sleep(0.05)
        code, out, _ = show("--run_dir", rd)
        assert code == 0
        assert next_block(out).startswith("next: nothing to do: train is running (step ")
        assert commands(out) == [f"touch {rd / 'control' / 'pause.request'}"]
        doc = status(rd)
        assert doc["next"]["state"] == "running" and doc["next"]["command"] == commands(out)[0]

        assert run_printed(commands(out)[0], tmp_path / "elsewhere").returncode == 0
        assert proc.wait(timeout=120) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = status(rd)
    assert doc["next"]["state"] == "paused" and 2 <= doc["current"]["step"] < 400
    assert doc["next"]["command"].startswith("python -m cachemedicpp.train --config ")


def test_next_when_interrupted_or_the_run_dir_is_locked(tmp_path, reference):
    from cachemedicpp.rundir import RunDir

    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    (rd / "logs" / "train_heartbeat.jsonl").unlink()
    rec = json.loads((rd / "logs" / "train_heartbeat.json").read_text())
    gone = dead_pid()
    atomic_write_json(rd / "logs" / "train_heartbeat.json", dict(rec, status="running", step=5, pid=gone))
    code, out, _ = show("--run_dir", rd, "--stop_on_terminal")
    assert code == 0
    assert next_block(out).startswith(f"next: train stopped without saying so (process {gone} is gone; last said "
                                      "running at step 5/8); resume it with:")
    assert commands(out)[0] == f"python -m cachemedicpp.train --config {rd / 'config_resolved.yaml'} --run_dir {rd}"
    assert status(rd)["next"]["state"] == "interrupted"

    # a process holding the run dir (a phase loading its model, a pipeline between phases) is at work
    lock = RunDir(rd)
    lock.lock()
    try:
        _, out, _ = show("--run_dir", rd)
        assert next_block(out).startswith(f"next: nothing to do: pid {os.getpid()} is working on this run dir "
                                          "(starting train)")
        assert commands(out) == [f"touch {rd / 'control' / 'pause.request'}"]
    finally:
        lock.unlock()
    assert status(rd)["next"]["state"] == "interrupted"


def test_follow_json_is_one_document_per_redraw(tmp_path):
    import jsonschema

    from cachemedicpp.config import load_schema

    run = tmp_path / "run"
    hb = Heartbeat(run / "logs", "run-1", "train", 10, min_interval=0)
    hb.beat("running", 1, force=True)
    script = [lambda: hb.beat("paused", 2, reason="pause.request", force=True)]

    def fake_sleep(_):
        time.sleep(0.01)
        if not script:
            pytest.fail("kept following a paused run")
        script.pop(0)()

    out = io.StringIO()
    assert watch.watch(run, follow=True, stop_on_terminal=True, interval=0.01, out=out, sleep=fake_sleep,
                       as_json=True) == 3
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    validator = jsonschema.Draft202012Validator(load_schema("watch_status"))
    assert [d["next"]["state"] for d in docs] == ["running", "paused"]
    assert all(not list(validator.iter_errors(d)) for d in docs)
    # no config in this run dir: the command is still there, marked unverified with the reason
    assert docs[1]["next"]["config"]["verified"] is False and "missing" in docs[1]["next"]["config"]["note"]


def _absolute_paths(text: str) -> list[str]:
    import re

    return re.findall(r"(?<![\w.])/[^\s'\",]+", text)


def test_next_phase_then_all_complete_then_moved(tmp_path, reference):
    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    code, out, _ = show("--run_dir", rd)
    own = f"--config {rd / 'config_resolved.yaml'} --run_dir {rd}"
    assert next_block(out).startswith("next: train is complete; run eval next:")
    assert commands(out) == [f"python -m cachemedicpp.eval {own}",
                             f"python -m cachemedicpp.pipeline {own} --phases eval,stability,plots"]
    res = run_printed(commands(out)[0], tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (rd / "metrics" / "task_metrics.json").is_file() and not (rd / "metrics" / "stability_metrics.json").exists()

    code, out, _ = show("--run_dir", rd)
    assert next_block(out).startswith("next: eval is complete; run stability next:")
    rest = commands(out)[1]
    assert rest == f"python -m cachemedicpp.pipeline {own} --phases stability,plots"
    res = run_printed(rest, tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]

    code, out, _ = show("--run_dir", rd, "--stop_on_terminal")
    assert code == 0
    assert next_block(out).splitlines() == [
        "next: nothing to do: every phase is complete (train, eval, stability, plots); results:",
        f"  report   {rd / 'paper' / 'report.md'}", f"  figures  {rd / 'paper' / 'figures'}/",
        f"  tables   {rd / 'paper' / 'tables'}/"]
    assert commands(out) == []
    doc = status(rd)
    assert doc["next"]["state"] == "complete" and doc["next"]["command"] is None
    assert all(Path(p).exists() for p in doc["next"]["outputs"].values())

    # moved after completion: every path shown is inside the new location
    moved = tmp_path / "elsewhere" / "moved_run"
    shutil.move(str(rd), str(moved))
    code, out, _ = show("--run_dir", moved)
    assert code == 0 and str(rd) not in out
    paths = _absolute_paths(out)
    assert paths and all(p.startswith(str(moved) + "/") or p == str(moved) for p in paths), paths
    text = json.dumps(status(moved))
    assert str(rd) not in text
    paths = _absolute_paths(text)
    assert paths and all(p.startswith(str(moved) + "/") or p == str(moved) for p in paths), paths


def test_next_for_a_run_started_with_overrides(tmp_path, cfg_file, one_thread):
    """The run's own resolved config of a leave-one-type-out run does not load to its hash (the mixture is
    renormalised on every load); the config file it was started with, plus --set, does."""
    from cachemedicpp import train
    from cachemedicpp.config import load_config, parse_set_args

    rd = tmp_path / "run"
    (rd / "control").mkdir(parents=True)
    (rd / "control" / "pause.request").write_text("")
    sets = ["eval.ood_protocol=loto_holdout_gaussian", "train.steps=4"]
    assert train.main(["--config", str(cfg_file), "--run_dir", str(rd), *[a for s in sets for a in ("--set", s)]]) == 3
    doc = status(rd)
    cfg, cmd = doc["next"]["config"], doc["next"]["command"]
    chash = json.loads((rd / "run_record.json").read_text())["config_hash"]
    assert cfg["verified"] and load_config(cfg["path"], parse_set_args(cfg["sets"])).hash == chash
    if cfg["source"] == "record":  # while config_resolved.yaml does not round-trip (see the xfail below)
        assert cfg["path"] == str(cfg_file) and sorted(cfg["sets"]) == sorted(sets)
        assert cfg["note"].startswith("config_resolved.yaml loads to config ")
        assert cmd.startswith(f"python -m cachemedicpp.train --config {cfg_file} --run_dir {rd} --set ")
    else:
        assert cfg["path"] == str(rd / "config_resolved.yaml") and cfg["sets"] == []
    res = run_printed(cmd, tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]  # the run dir accepted the config: it is the run's
    assert status(rd)["phases"][0]["said"] == "completed"


def test_resolved_config_of_an_ood_run_loads_to_its_hash(tmp_path, tiny_cfg):
    from cachemedicpp.config import dump_yaml, load_config

    cfg = load_config(data=tiny_cfg("llama", **{"eval.ood_protocol": "loto_holdout_contiguous_overwrite"}))
    path = tmp_path / "config_resolved.yaml"
    path.write_text(dump_yaml(cfg.to_dict()))
    assert load_config(path).hash == cfg.hash


def test_sweep_partial_next_resumes_the_sweep(tmp_path, cfg_file, monkeypatch, one_thread):
    from cachemedicpp import sweep, train

    doc = {"sweep_name": "three", "base_config": str(cfg_file), "phases": ["train"], "runs": [
        {"name": "a", "overrides": {"seed": 0}}, {"name": "b", "overrides": {"seed": 1}},
        {"name": "c", "overrides": {"seed": 2}}]}
    sweep_file = tmp_path / "sweeps" / "three.yaml"
    sweep_file.parent.mkdir()
    sweep_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    out_root = tmp_path / "out"
    sweep_dir = out_root / "three"
    orig = train.Trainer.step

    def step(self, i):  # the sweep's pause request arrives while run b trains
        result = orig(self, i)
        if self.cfg.seed == 1 and i == 3:
            (sweep_dir / "control" / "pause.request").write_text("test\n")
        return result

    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "step", step)
        assert sweep.main(["--sweep_config", str(sweep_file), "--out_root", str(out_root)]) == 3

    code, out, _ = show("--run_dir", sweep_dir, "--stop_on_terminal")
    assert code == 3
    want = f"python -m cachemedicpp.sweep --sweep_config {sweep_file} --out_root {out_root}"
    assert next_block(out).splitlines()[0] == ("next: the sweep is paused (1 done, 1 paused, 0 failed, 1 pending "
                                               "of 3 runs; sweep pause.request); resume it with:")
    assert commands(out) == [want]
    st = status(sweep_dir)
    assert st["kind"] == "sweep" and st["next"]["state"] == "paused" and st["next"]["command"] == want
    assert st["counts"] == {"done": 1, "running": 0, "paused": 1, "failed": 0, "interrupted": 0, "pending": 1,
                            "over_budget": 0}
    assert {r["name"]: r["state"] for r in st["runs"]} == {"a": "done", "b": "paused", "c": "pending"}
    # a run of the sweep points at the sweep's command too
    assert commands(show("--run_dir", sweep_dir / "b")[1])[-1] == want

    res = run_printed(want, tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr[-3000:]
    code, out, _ = show("--run_dir", sweep_dir, "--stop_on_terminal")
    assert code == 0
    assert next_block(out).splitlines() == [
        "next: nothing to do: every run is complete (3 done, 0 paused, 0 failed, 0 pending of 3 runs); summary:",
        f"  summary       {sweep_dir / 'summary.md'}", f"  summary_json  {sweep_dir / 'summary.json'}"]
    assert status(sweep_dir)["counts"]["done"] == 3


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, never a traceback


@pytest.mark.parametrize("snapshot, timeline", [
    (b"\x00\xffgarbage", None),
    (b'{"run_id": "r", "status": "runn', None),
    (b"[1, 2, 3]", None),
    (b'{"step": 3}', None),
    (None, b"not json\n\xff\xfe\n"),
    (b"", b""),
    (b'{"status": ["a list"]}', b'{"status": 7}\n'),
])
@pytest.mark.parametrize("mode", [[], ["--json"], ["--follow", "--stop_on_terminal"]])
def test_corrupted_heartbeat_is_one_line_and_exit_2(tmp_path, snapshot, timeline, mode):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    if snapshot is not None:
        (logs / "train_heartbeat.json").write_bytes(snapshot)
    if timeline is not None:
        (logs / "train_heartbeat.jsonl").write_bytes(timeline)
    code, out, err = show("--run_dir", tmp_path / "run", "--interval", "0.01", *mode)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: heartbeat of train cannot be read: ")
    assert str(logs / ("train_heartbeat.json" if snapshot is not None else "train_heartbeat.jsonl")) in err
    assert "Traceback" not in err


def test_run_dir_without_heartbeats_is_one_line_and_exit_2(tmp_path, cfg_file):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config_resolved.yaml").write_text(cfg_file.read_text())
    for mode in ([], ["--json"]):
        code, out, err = show("--run_dir", rd, *mode)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "no heartbeat in" in err
    (tmp_path / "a_file").write_text("")
    code, _, err = show("--run_dir", tmp_path / "a_file")
    assert code == 2 and err.strip() == f"error: run dir {tmp_path / 'a_file'} is not a directory"
    # the real command too: one line on stderr, no traceback
    res = subprocess.run([sys.executable, "-m", "cachemedicpp.watch", "--run_dir", str(rd)], capture_output=True,
                         text=True, env=NEXT_ENV, timeout=60)
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
