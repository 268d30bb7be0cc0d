"""watch on heartbeats written by `rundir.Heartbeat` (the writer every phase uses) and on hand-made edge
cases: missing and truncated snapshots, torn timelines, stale processes, sweeps, follow mode."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachemedicpp import ROOT, watch
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
    table = {line.split()[0]: line.split() for line in out.splitlines()[-2:]}
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
