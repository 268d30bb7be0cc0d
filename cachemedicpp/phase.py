"""The lifecycle every phase shares: the session (lock, config guard, the resumed progress record, pause
control, a `failed` heartbeat on error), the heartbeat and record log, and the unit loop (check pause,
save, acknowledge, heartbeat, progress bar, exit code) that train, eval and stability run their units of
work through, in this process (`run_units`) or spread over worker processes (`run_units_spread`).

A phase's unit is the smallest piece of work whose result is saved: a training step (saved periodically,
and always on pause), an evaluation example, a stability prompt. A kill loses at most the units in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from cachemedicpp import progress, workers
from cachemedicpp.cli import EXIT_OK, EXIT_PAUSED
from cachemedicpp.config import Config, ConfigError, config_hash
from cachemedicpp.fileio import append_jsonl, atomic_write_json, repair_jsonl_tail, utc_now
from cachemedicpp.rundir import RunDir

T = TypeVar("T")


class JsonlLog:
    """Schema-shaped log records: run_id, phase, timestamp_utc, step + fields."""

    def __init__(self, path: Path, run_id: str, phase: str):
        self.path, self.run_id, self.phase = path, run_id, phase
        repair_jsonl_tail(path)

    def write(self, step: int, **fields) -> dict:
        rec = {"run_id": self.run_id, "phase": self.phase, "timestamp_utc": utc_now(), "step": int(step), **fields}
        append_jsonl(self.path, rec)
        return rec


class Heartbeat:
    """Snapshot `<phase>_heartbeat.json` (atomic) + timeline `<phase>_heartbeat.jsonl` (append)."""

    def __init__(self, logs_dir: Path, run_id: str, phase: str, total_steps: int, min_interval: float = 2.0):
        self.snapshot = logs_dir / RunDir.heartbeat_name(phase)
        self.timeline = logs_dir / RunDir.timeline_name(phase)
        repair_jsonl_tail(self.timeline)
        self.run_id, self.phase, self.total = run_id, phase, int(total_steps)
        self.min_interval = min_interval
        self.t0 = time.monotonic()
        self.elapsed_before = 0.0
        self._last_write = 0.0
        self._rate_ref: tuple[float, int] | None = None
        self.tokens_per_sec: float | None = None
        self.latest: dict[str, Any] = {"checkpoint": None, "state": None}
        self.extra: dict[str, Any] = {}  # fields every record of this session carries (e.g. resumed_from)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def beat(self, status: str, step: int, reason: str = "", unit: str | None = None, force: bool = False,
             tokens_per_sec: float | None = None, **extra) -> None:
        now = time.monotonic()
        if tokens_per_sec is not None:
            self.tokens_per_sec = tokens_per_sec
        if not force and status == "running" and now - self._last_write < self.min_interval:
            return
        if self._rate_ref is None:
            self._rate_ref = (now, step)
        dt, ds = now - self._rate_ref[0], step - self._rate_ref[1]
        sps = ds / dt if dt > 0 and ds > 0 else None
        remaining = max(self.total - step, 0)
        rec = {
            "run_id": self.run_id, "phase": self.phase, "timestamp_utc": utc_now(), "status": status,
            "reason": reason, "step": int(step), "total_steps": self.total,
            "progress": round(step / self.total, 4) if self.total else 1.0,
            "eta_sec": round(remaining / sps, 1) if sps else (0.0 if remaining == 0 else None),
            "steps_per_sec": round(sps, 4) if sps else None,
            "tokens_per_sec": round(self.tokens_per_sec, 1) if self.tokens_per_sec else None,
            "elapsed_wall_sec": round(self.elapsed(), 2), "pid": os.getpid(), "host": socket.gethostname(),
            "latest_checkpoint": self.latest.get("checkpoint"), "latest_state": self.latest.get("state"),
            "current_unit": unit, **self.extra, **extra,
        }
        atomic_write_json(self.snapshot, rec)
        append_jsonl(self.timeline, rec)
        self._last_write = now


class PauseControl:
    """Pause requests: `control/pause.request`, SIGTERM or SIGINT. Checked between units of work."""

    def __init__(self, control_dir: Path, phase: str, extra_request: Path | None = None):
        self.control_dir, self.phase = control_dir, phase
        self.request = control_dir / RunDir.PAUSE_REQUEST
        self.extra_request = extra_request  # a sweep-level request also pauses the running phase
        self.signal_name: str | None = None
        self._old: dict = {}

    def install(self) -> "PauseControl":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread (e.g. a Ray worker thread)
                pass
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _on_signal(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> str | None:
        if self.signal_name:
            return self.signal_name
        if self.request.exists():
            return RunDir.PAUSE_REQUEST
        if self.extra_request is not None and self.extra_request.exists():
            return f"sweep {RunDir.PAUSE_REQUEST}"  # no path: a heartbeat records none outside its run dir
        return None

    def acknowledge(self, run_id: str, step: int, reason: str, state_path: str | None = None) -> Path:
        if self.request.exists():
            self.request.unlink()
        ack = self.control_dir / RunDir.pause_ack_name(self.phase)
        atomic_write_json(ack, {"run_id": run_id, "phase": self.phase, "timestamp_utc": utc_now(), "step": step,
                                "reason": reason, "state": state_path, "pid": os.getpid()})
        return ack


class PhaseSession:
    """Lifecycle shared by train, eval and stability: lock the run dir, bind the config, heartbeat,
    pause control; on an exception a `failed` heartbeat names the error. Use as a context manager.

    With `resume`, a unit-resumable phase's progress file is read and checked (`progress.read`) before the
    run dir is bound; the record is `saved` (None when there is none or without `resume`)."""

    def __init__(self, cfg: Config, run_dir: str | Path, phase: str, config_path: str | None = None,
                 command: str | None = None, sweep_pause: Path | None = None, resume: bool = False):
        self.cfg, self.phase, self.resume = cfg, phase, resume
        self.saved: dict | None = None
        self.rd = RunDir(run_dir)
        self.config_path = config_path
        self.command = command or f"python -m cachemedicpp.{phase}"
        self.sweep_pause = sweep_pause
        self.run_id = ""
        self.hb: Heartbeat | None = None
        self.pause: PauseControl | None = None
        self.step = 0

    def __enter__(self) -> "PhaseSession":
        self.rd.lock()
        try:
            self.rd.ensure()
            self.rd.clear_stale_temps()
            self.saved = self._read_progress() if self.resume else None
            self.run_id = self.rd.bind_config(self.cfg, self.command, self.config_path)
            self.pause = PauseControl(self.rd.control, self.phase, self.sweep_pause).install()
        except BaseException:
            self.rd.unlock()
            raise
        return self

    def _read_progress(self) -> dict | None:
        """The phase's saved progress record, checked before `bind_config` so that a refusal writes nothing.
        A run dir bound to another config is left to `bind_config`: its refusal (a new run dir or the same
        config) is the one that applies, where --no-resume would not help."""
        stored = self.rd.stored_config()
        if stored is not None and config_hash(stored) != self.cfg.hash:
            return None
        return progress.read(self.rd.progress(self.phase), self.cfg)

    def heartbeat(self, total_steps: int, elapsed_before: float = 0.0) -> Heartbeat:
        self.hb = Heartbeat(self.rd.logs, self.run_id, self.phase, total_steps)
        self.hb.elapsed_before = elapsed_before
        return self.hb

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and self.hb is not None and not isinstance(exc, ConfigError):
                self.hb.beat("failed", self.step, reason=f"{type(exc).__name__}: {exc}", force=True)
        finally:
            if self.pause is not None:
                self.pause.uninstall()
            self.rd.unlock()
        return False



@dataclass
class Done:
    """What a unit of work reports back to the loop (all optional)."""

    tokens_per_sec: float | None = None
    postfix: dict[str, str] | None = None  # shown on the progress bar


def _bar(s: PhaseSession, total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=s.step, desc=s.phase, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def _advance(s: PhaseSession, bar, key: str, done: Done) -> None:
    s.step += 1
    s.hb.beat("running", s.step, unit=key, tokens_per_sec=done.tokens_per_sec)
    bar.update(1)
    if done.postfix:
        bar.set_postfix(done.postfix)


def _pause(s: PhaseSession, reason: str, key: str, save: Callable[[], None], state: Path | None, total: int,
           unit: str) -> int:
    save()
    s.pause.acknowledge(s.run_id, s.step, reason, s.rd.rel(state))
    s.hb.beat("paused", s.step, reason=reason, unit=key, force=True)
    print(f"{s.phase}: paused at {unit} {s.step}/{total} ({reason}); rerun the same command to resume",
          file=sys.stderr)
    return EXIT_PAUSED


def run_units(s: PhaseSession, pending: Iterable[T], *, name: Callable[[T], str], work: Callable[[T], Done | None],
              save: Callable[[], None], state: Path | None, total: int, unit: str) -> int:
    """Run the phase's pending units in order; EXIT_OK when all are done, EXIT_PAUSED on a pause request.

    Before each unit a pause request (file or signal) is honoured: `save()` writes the resume point, the
    request is acknowledged (naming `state`, relative to the run dir), a `paused` heartbeat is written and
    the loop returns EXIT_PAUSED. After each unit `s.step` counts it, the heartbeat says `running` and the
    progress bar moves. `work` saves its own result (every unit, or periodically for training steps).
    """
    bar = _bar(s, total, unit)
    try:
        for item in pending:
            key = name(item)
            reason = s.pause.requested()
            if reason:
                return _pause(s, reason, key, save, state, total, unit)
            _advance(s, bar, key, work(item) or Done())
        return EXIT_OK
    finally:
        bar.close()


def run_units_spread(s: PhaseSession, pending: Iterable[T], *, name: Callable[[T], str], pool: workers.Pool,
                     payload: Callable[[T], Any], finish: Callable[[T, Any], Done | None], save: Callable[[], None],
                     state: Path | None, total: int, unit: str, rank: Callable[[T], int] | None = None) -> int:
    """`run_units` with the units computed by the worker processes of `pool`; this process alone writes the
    run's files (progress, heartbeat, acknowledgement) and shows the progress bar.

    Units are handed out in order, `payload(item)` made as each is handed out; one of a higher `rank` only
    once no unit of a lower rank is in flight (a barrier: a later group may depend on an earlier one's
    results). Each result goes to `finish(item, value)` as it arrives (it saves it), then counts as in
    `run_units`. A pause request stops the handing out: the units in flight finish and are kept, then the
    pause is honoured as in `run_units`. A worker that raises or ends with a unit fails the phase
    (`workers.WorkerFailed`, naming the unit) once the results that arrived with it are finished.
    """
    todo = deque(pending)
    inflight: dict[int, T] = {}
    reason: str | None = None
    bar = _bar(s, total, unit)
    try:
        while todo or inflight:
            while todo and not reason and pool.idle():
                if rank is not None and any(rank(it) < rank(todo[0]) for it in inflight.values()):
                    break
                reason = s.pause.requested()
                if reason:
                    break
                item = todo.popleft()
                worker = pool.idle()[0]
                pool.give(worker, name(item), payload(item))
                inflight[worker] = item
            if not inflight:
                break  # paused, the units in flight finished
            failed = []
            for out in pool.collect():
                item = inflight.pop(out.worker, None)
                if out.error is not None:
                    failed.append((out, item))
                    continue
                _advance(s, bar, name(item), finish(item, out.value) or Done())
            if failed:
                out, item = failed[0]
                what = f"{s.phase}: {unit} {name(item)}:" if item is not None else f"{s.phase}:"
                raise workers.WorkerFailed(f"{what} worker {out.worker} failed ({out.error.strip().splitlines()[-1]})") \
                    from workers.RemoteTraceback(out.error)
        if todo:
            return _pause(s, reason, name(todo[0]), save, state, total, unit)
        return EXIT_OK
    finally:
        bar.close()
