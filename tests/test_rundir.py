"""Run directory: atomic writes, torn-line repair, lock, config guard, heartbeat, pause control."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cachemedicpp.config import ConfigError, load_config
from cachemedicpp.fileio import (atomic_write_json, load_checkpoint, read_json, read_jsonl, repair_jsonl_tail,
    truncate_jsonl, validate_records)
from cachemedicpp import rundir
from cachemedicpp.phase import Heartbeat, JsonlLog, PauseControl
from cachemedicpp.rundir import NUMERIC_CPU_FLAGS, RunDir


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"v": 1})
    atomic_write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_kill_during_atomic_write_keeps_old_file(tmp_path):
    """A writer killed mid-write leaves the previous complete file in place."""
    p = tmp_path / "x.json"
    atomic_write_json(p, {"old": True})
    code = (
        "import os, sys\n"
        "from cachemedicpp import rundir\n"
        "orig = os.replace\n"
        "os.replace = lambda a, b: os.kill(os.getpid(), 9)\n"
        f"rundir.atomic_write_json({str(p)!r}, {{'new': True}})\n"
    )
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    assert json.loads(p.read_text()) == {"old": True}


def test_corrupted_json_and_checkpoint_are_bad_input(tmp_path):
    (tmp_path / "p.json").write_text('{"a": 1')
    with pytest.raises(ConfigError, match="p.json"):
        read_json(tmp_path / "p.json", "progress file")
    (tmp_path / "c.pt").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="c.pt"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="not found"):
        read_json(tmp_path / "missing.json")


def test_torn_jsonl_line_is_cut(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tor')
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    repair_jsonl_tail(p)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    truncate_jsonl(p, lambda r: r["step"] <= 1)
    assert p.read_text() == '{"step": 1}\n'


def test_lock_excludes_a_second_process(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.lock()
    try:
        code = f"from cachemedicpp.rundir import RunDir\nRunDir({str(rd.path)!r}).lock()\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "in use" in r.stderr and str(os.getpid()) in r.stderr
    finally:
        rd.unlock()
    rd2 = RunDir(tmp_path / "run")
    rd2.lock()
    rd2.unlock()


def test_config_guard_refuses_other_config(tmp_path):
    rd = RunDir(tmp_path / "run").ensure()
    a = load_config(data={"seed": 1})
    rid = rd.bind_config(a, "cmd", None)
    assert rd.bind_config(a, "cmd2", None) == rid
    record = json.loads((rd.path / "run_record.json").read_text())
    assert validate_records([record], "run_record") == []
    assert record["commands"] == ["cmd", "cmd2"]
    with pytest.raises(ConfigError, match="seed"):
        rd.bind_config(load_config(data={"seed": 2}), "cmd", None)
    (rd.path / "config_resolved.yaml").write_text("seed: [\n")
    with pytest.raises(ConfigError, match="corrupted"):
        rd.bind_config(a, "cmd", None)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_env_records_what_a_result_needs_on_another_machine(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run").ensure()
    rd.bind_config(load_config(data={"seed": 1}), "cmd", None)
    env = json.loads(rd.env.read_text())
    for key, kind in {"python": str, "torch": str, "transformers": str, "hostname": str, "platform": str,
                      "machine": str, "cpu_model": str, "cpu_flags": list, "cpu_count": int, "cpu_count_usable": int,
                      "torch_threads": int, "torch_cpu_capability": str}.items():
        assert isinstance(env[key], kind), (key, env[key])
    assert 1 <= env["cpu_count_usable"] <= env["cpu_count"] and env["torch_threads"] == torch.get_num_threads()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # the flags are the numerics-relevant ones this CPU lists, sorted
    listed = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert env["cpu_flags"] == sorted(listed & set(NUMERIC_CPU_FLAGS))
    if env["machine"] == "x86_64":
        assert "sse4_2" in env["cpu_flags"]  # every x86-64 CPU torch builds for has it
    assert env["cpu_model"].strip() and env["cpu_model"] != "unknown"
    # where the system lists nothing, the machine part says so instead of failing
    monkeypatch.setattr(rundir, "_cpuinfo", lambda: "")
    bare = rundir.machine_env()
    assert bare["cpu_flags"] is None and set(bare) == set(env) - {"python", "torch", "transformers", "cuda", "gpu_name"}


def test_heartbeat_snapshot_and_timeline(tmp_path):
    hb = Heartbeat(tmp_path, "r1", "eval", total_steps=10, min_interval=3600)
    hb.beat("running", 0, force=True)
    hb.beat("running", 5)  # rate-limited: not written
    hb.beat("paused", 6, reason="pause.request")
    snap = json.loads((tmp_path / "eval_heartbeat.json").read_text())
    assert snap["status"] == "paused" and snap["step"] == 6 and snap["progress"] == 0.6
    for key in ("run_id", "phase", "timestamp_utc", "eta_sec", "steps_per_sec", "tokens_per_sec",
                "elapsed_wall_sec", "latest_checkpoint", "latest_state", "current_unit", "total_steps"):
        assert key in snap
    assert [r["status"] for r in read_jsonl(tmp_path / "eval_heartbeat.jsonl")] == ["running", "paused"]


def test_log_records_validate(tmp_path):
    log = JsonlLog(tmp_path / "train.jsonl", "r1", "train")
    log.write(3, loss_total=1.0, corruption={"type": "gaussian", "epsilon": 0.08})
    assert validate_records(read_jsonl(tmp_path / "train.jsonl"), "log_record") == []
    assert validate_records([{"run_id": "r", "phase": "train", "step": 1}], "log_record")  # missing timestamp


def test_pause_control_request_signal_and_ack(tmp_path):
    pc = PauseControl(tmp_path, "stability", extra_request=tmp_path / "sweep.request").install()
    try:
        assert pc.requested() is None
        (tmp_path / "sweep.request").touch()
        assert "sweep" in pc.requested()
        (tmp_path / "sweep.request").unlink()
        (tmp_path / "pause.request").touch()
        assert pc.requested() == "pause.request"
        ack = pc.acknowledge("r1", 4, "pause.request")
        assert ack.name == "pause_ack_stability.json" and not (tmp_path / "pause.request").exists()
        os.kill(os.getpid(), signal.SIGTERM)
        assert pc.requested() == "SIGTERM"
    finally:
        pc.uninstall()
