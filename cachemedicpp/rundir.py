"""The run directory: fixed layout, atomic writes, config guard, lock, logs, heartbeats and pause.

Stages talk only through these files. Every JSON/YAML/checkpoint write goes to a temp file in the same
folder and is renamed into place, so a kill at any instant leaves the old or the new file, never a
truncated one. JSONL files are append-only; a torn last line (kill mid-append) is cut off on reopen.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from cachemedicpp import ROOT
from cachemedicpp.config import Config, ConfigError, config_hash, dump_yaml, load_schema

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PAUSED = 0, 1, 2, 3
PHASES = ("train", "eval", "stability", "plots", "sweep")
ACK_FILES = {"train": "pause_ack.json", "eval": "pause_ack_eval.json", "stability": "pause_ack_stability.json",
             "sweep": "pause_ack_sweep.json"}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON; a missing or corrupted file is bad input (exit 2) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is corrupted ({e}); delete it or rerun with --no-resume") from None


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise ConfigError(f"{what} {path} is corrupted or unreadable ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# JSONL


def repair_jsonl_tail(path: Path) -> None:
    """Cut a torn last line left by a kill during an append."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a kill mid-append
    return out


def append_jsonl(path: str | Path, record: Mapping) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite a JSONL keeping records for which keep(record) is true (used on resume)."""
    path = Path(path)
    if path.is_file():
        recs = [r for r in read_jsonl(path) if keep(r)]
        atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in recs))


# --------------------------------------------------------------------------------------------------
# run directory


def git_info() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.logs = self.path / "logs"
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics"
        self.control = self.path / "control"
        self.paper = self.path / "paper"
        self._lock_fd: int | None = None

    def ensure(self) -> "RunDir":
        for d in (self.logs, self.checkpoints, self.metrics, self.control):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # -- ownership -------------------------------------------------------------------------------
    def lock(self) -> None:
        """Exclusive lock for this process's lifetime: two processes never write one run dir."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(f"run dir {self.path} is in use by another process ({holder or 'unknown'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def resolved_config_path(self) -> Path:
        return self.path / "config_resolved.yaml"

    def stored_config(self) -> dict | None:
        p = self.resolved_config_path
        if not p.is_file():
            return None
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is corrupted ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} is corrupted (not a mapping)")
        return data

    def bind_config(self, cfg: Config, command: str, config_path: str | None) -> str:
        """Write config_resolved.yaml + run_record.json + env.json, or refuse a different config."""
        stored = self.stored_config()
        if stored is not None:
            stored_hash = config_hash(stored)
            if stored_hash != cfg.hash:
                diff = _first_difference(stored, cfg.to_dict())
                raise ConfigError(
                    f"run dir {self.path} belongs to config {stored_hash}, not {cfg.hash} ({diff}); "
                    "use a new --run_dir or the same config")
        else:
            atomic_write_text(self.resolved_config_path, dump_yaml(cfg.to_dict()))
        run_id = self.run_id(cfg.hash)
        self._write_record(run_id, cfg, command, config_path)
        return run_id

    def run_id(self, chash: str) -> str:
        return f"{self.path.name}-{chash[:8]}"

    def _write_record(self, run_id: str, cfg: Config, command: str, config_path: str | None) -> None:
        from cachemedicpp.hf import versions

        env = versions()
        rec_path = self.path / "run_record.json"
        record = {
            "run_id": run_id,
            "created_utc": utc_now(),
            "command": command,
            "config_path": config_path,
            "config_hash": cfg.hash,
            "git": git_info(),
            "env": env,
        }
        if rec_path.is_file():
            try:
                old = json.loads(rec_path.read_text())
                record["created_utc"] = old.get("created_utc", record["created_utc"])
                record["commands"] = list(old.get("commands", [old.get("command")]))
            except json.JSONDecodeError:
                pass
        record.setdefault("commands", [])
        record["commands"] = [c for c in record["commands"] if c] + [command]
        atomic_write_json(rec_path, record)
        atomic_write_json(self.path / "env.json", {
            **env, "hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
            "torch_threads": _torch_threads(), "platform": os.uname().sysname + " " + os.uname().release,
        })


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'config'}: {a!r} vs {b!r}"


# --------------------------------------------------------------------------------------------------
# heartbeat, logger, pause


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
        self.snapshot = logs_dir / f"{phase}_heartbeat.json"
        self.timeline = logs_dir / f"{phase}_heartbeat.jsonl"
        repair_jsonl_tail(self.timeline)
        self.run_id, self.phase, self.total = run_id, phase, int(total_steps)
        self.min_interval = min_interval
        self.t0 = time.monotonic()
        self.elapsed_before = 0.0
        self._last_write = 0.0
        self._rate_ref: tuple[float, int] | None = None
        self.tokens_per_sec: float | None = None
        self.latest: dict[str, Any] = {"checkpoint": None, "state": None}

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
            "current_unit": unit, **extra,
        }
        atomic_write_json(self.snapshot, rec)
        append_jsonl(self.timeline, rec)
        self._last_write = now


class PauseControl:
    """Pause requests: `control/pause.request`, SIGTERM or SIGINT. Checked between units of work."""

    def __init__(self, control_dir: Path, phase: str, extra_request: Path | None = None):
        self.control_dir, self.phase = control_dir, phase
        self.request = control_dir / "pause.request"
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
            return "pause.request"
        if self.extra_request is not None and self.extra_request.exists():
            return f"sweep pause.request ({self.extra_request})"
        return None

    def acknowledge(self, run_id: str, step: int, reason: str, state_path: str | None = None) -> Path:
        if self.request.exists():
            self.request.unlink()
        ack = self.control_dir / ACK_FILES[self.phase]
        atomic_write_json(ack, {"run_id": run_id, "phase": self.phase, "timestamp_utc": utc_now(), "step": step,
                                "reason": reason, "state": state_path, "pid": os.getpid()})
        return ack


def validate_records(records: Iterable[Mapping], schema_name: str) -> list[str]:
    """Schema problems of records (empty when all valid)."""
    import jsonschema

    v = jsonschema.Draft202012Validator(load_schema(schema_name))
    return [f"record {i}: {e.message}" for i, r in enumerate(records) for e in v.iter_errors(r)]


class PhaseSession:
    """Lifecycle shared by train, eval and stability: lock the run dir, bind the config, heartbeat,
    pause control; on an exception a `failed` heartbeat names the error. Use as a context manager."""

    def __init__(self, cfg: Config, run_dir: str | Path, phase: str, config_path: str | None = None,
                 command: str | None = None, sweep_pause: Path | None = None):
        self.cfg, self.phase = cfg, phase
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
            self.run_id = self.rd.bind_config(self.cfg, self.command, self.config_path)
            self.pause = PauseControl(self.rd.control, self.phase, self.sweep_pause).install()
        except BaseException:
            self.rd.unlock()
            raise
        return self

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
