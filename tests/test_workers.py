"""Units spread over worker processes (`phase.run_units_spread`, `workers.Pool`), with work functions of
tests/helpers_workers.py: results in any order, the barrier between ranks, a pause that lets the units in
flight finish, a failing or vanishing worker failing the phase with its unit named and the finished units
kept, and workers that end with their parent. Eval's use of it: tests/test_eval.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers_workers
import pytest

from cachemedicpp import ROOT, cli, workers
from cachemedicpp.cli import EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.config import load_config
from cachemedicpp.phase import PhaseSession, run_units_spread

KEYS = ["a", "b", "c", "d", "e"]


@pytest.fixture
def session(tmp_path):
    with PhaseSession(load_config(data={}), tmp_path / "run", "eval") as s:
        s.heartbeat(len(KEYS))
        yield s


def spread(s: PhaseSession, pool: workers.Pool, finished: dict, **kw) -> int:
    def finish(key, value):
        finished[key] = value

    return run_units_spread(s, KEYS, name=lambda k: k, pool=pool, payload=lambda k: k, finish=finish,
                            save=lambda: None, state=None, total=len(KEYS), unit="ex", **kw)


def test_results_and_the_barrier(session):
    """Every unit once; no unit of rank 1 handed out while one of rank 0 is in flight."""
    finished: dict = {}
    handed: list = []
    rank = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1}

    def finish(key, value):
        finished[key] = value

    def payload(key):
        handed.append((key, set(finished)))
        return key

    with workers.Pool(2, helpers_workers.echo) as pool:
        code = run_units_spread(session, KEYS, name=lambda k: k, pool=pool, payload=payload, finish=finish,
                                save=lambda: None, state=None, total=len(KEYS), unit="ex", rank=rank.get)
    assert code == EXIT_OK
    assert finished == {k: k.upper() for k in KEYS} and session.step == len(KEYS)
    for key, done_before in handed:
        if rank[key] == 1:
            assert {"a", "b", "c"} <= done_before, key


def test_pause_lets_the_units_in_flight_finish(session):
    finished: dict = {}
    saves = []

    def finish(key, value):
        finished[key] = value
        if len(finished) == 1:
            session.pause.request.write_text("")

    with workers.Pool(2, helpers_workers.echo, (None, None, 0.3)) as pool:
        code = run_units_spread(session, KEYS, name=lambda k: k, pool=pool, payload=lambda k: k, finish=finish,
                                save=lambda: saves.append(dict(finished)), state=None, total=len(KEYS), unit="ex")
    assert code == EXIT_PAUSED
    assert set(finished) == {"a", "b"} and saves == [finished]  # both in flight kept, then one save
    ack = json.loads((session.rd.control / "pause_ack_eval.json").read_text())
    assert ack["step"] == 2 and ack["reason"] == "pause.request"
    hb = json.loads((session.rd.logs / "eval_heartbeat.json").read_text())
    assert hb["status"] == "paused" and hb["step"] == 2 and hb["current_unit"] == "c"


@pytest.mark.parametrize("args, why", [(("c", None), "ValueError: cannot do c"),
                                       ((None, "c"), "the worker process ended (exit code 3)")])
def test_a_failing_worker_fails_the_phase_naming_the_unit(session, capsys, args, why):
    finished: dict = {}
    with workers.Pool(1, helpers_workers.echo, args) as pool:
        code = cli.guarded(lambda: spread(session, pool, finished))
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"WorkerFailed: eval: ex c: worker 0 failed ({why})" in err
    assert finished == {"a": "A", "b": "B"}  # the units before it are kept
    assert not pool.procs  # every worker stopped


def test_a_worker_that_cannot_start_fails_the_phase(session, capsys):
    with workers.Pool(1, helpers_workers.broken) as pool:
        with pytest.raises(workers.WorkerFailed, match=r"ex a: worker 0 failed \(OSError: no model here\)") as e:
            spread(session, pool, {})
    assert "while starting" in str(e.value.__cause__)


PARENT = """
import sys, time
sys.path.insert(0, {tests!r})
import helpers_workers
from cachemedicpp import workers

if __name__ == "__main__":
    with workers.Pool(2, helpers_workers.nap) as pool:
        pool.give(0, "a", "0")
        pool.give(1, "b", "0")
        while pool.busy:  # both serving
            pool.collect()
        pool.give(0, "c", "60")  # one busy worker, one idle
        print(" ".join(str(p.pid) for p in pool.procs), flush=True)
        time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_their_parent(tmp_path, sig):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(ROOT / "tests")))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        time.sleep(0.1)
    assert not alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
