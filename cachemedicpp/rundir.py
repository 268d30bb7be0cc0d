"""The run directory and the sweep directory: one owner for every file name in them, the config guard
and the lock. Stages talk only through these files; paths recorded in them are relative to the folder."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from cachemedicpp import ROOT
from cachemedicpp.config import Config, ConfigError, config_hash, dump_yaml
from cachemedicpp.fileio import atomic_write_json, atomic_write_text, utc_now


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


class _Layout:
    """What a run dir and a sweep dir share: logs/ with heartbeats, control/ with pause files, a lock.
    Every file name of both folders is spelled in this class or its two subclasses, nowhere else."""

    LOGS, CONTROL = "logs", "control"
    PAUSE_REQUEST = "pause.request"
    LOCK = ".lock"
    _ACK = {"train": "pause_ack.json", "eval": "pause_ack_eval.json", "stability": "pause_ack_stability.json",
            "sweep": "pause_ack_sweep.json"}
    _HEARTBEAT, _TIMELINE = "_heartbeat.json", "_heartbeat.jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.logs = self.path / self.LOGS
        self.control = self.path / self.CONTROL
        self._lock_fd: int | None = None

    # -- names that do not need a folder (heartbeats are written by objects given only logs/)
    @classmethod
    def heartbeat_name(cls, phase: str) -> str:
        return f"{phase}{cls._HEARTBEAT}"

    @classmethod
    def timeline_name(cls, phase: str) -> str:
        return f"{phase}{cls._TIMELINE}"

    @classmethod
    def heartbeat_phase(cls, file_name: str) -> str | None:
        """The phase a heartbeat file (snapshot or timeline) belongs to; None for other files."""
        for suffix in (cls._HEARTBEAT, cls._TIMELINE):
            if file_name.endswith(suffix) and not file_name.startswith("."):
                return file_name[: -len(suffix)]
        return None

    @classmethod
    def pause_ack_name(cls, phase: str) -> str:
        return cls._ACK[phase]

    # -- paths
    def heartbeat(self, phase: str) -> Path:
        return self.logs / self.heartbeat_name(phase)

    def timeline(self, phase: str) -> Path:
        return self.logs / self.timeline_name(phase)

    def heartbeat_files(self) -> list[Path]:
        if not self.logs.is_dir():
            return []
        return sorted(p for p in self.logs.iterdir() if self.heartbeat_phase(p.name))

    @property
    def pause_request(self) -> Path:
        return self.control / self.PAUSE_REQUEST

    @property
    def lock_file(self) -> Path:
        """The file `lock()` holds while a process works on the folder."""
        return self.path / self.LOCK

    def pause_ack(self, phase: str) -> Path:
        return self.control / self.pause_ack_name(phase)

    def rel(self, path: str | Path | None) -> str | None:
        """A path as recorded in the run's files: relative to this folder (absolute if outside it)."""
        if path is None:
            return None
        p = Path(path)
        try:
            return p.resolve().relative_to(self.path).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, recorded: str | None) -> Path | None:
        """A recorded path read back against this folder (wherever the folder has been moved)."""
        if not recorded:
            return None
        p = Path(recorded)
        return p if p.is_absolute() else self.path / p

    # -- ownership -------------------------------------------------------------------------------
    def lock(self) -> None:
        """Exclusive lock for this process's lifetime: two processes never write one run dir."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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

    def clear_stale_temps(self) -> None:
        """Temp files of a process killed mid-write (call only while holding the lock)."""
        for folder in self._work_folders():
            if folder.is_dir():
                for p in folder.glob(".*.tmp*"):
                    p.unlink(missing_ok=True)

    def _work_folders(self) -> list[Path]:
        return [self.logs, self.control]

class RunDir(_Layout):
    """A run directory (see README "Run directory"). Stages talk only through these files."""

    CHECKPOINTS, METRICS, PAPER = "checkpoints", "metrics", "paper"
    PARTS = (_Layout.LOGS, CHECKPOINTS, METRICS, _Layout.CONTROL, PAPER)  # sub-folders, never run names
    CONFIG, RECORD, ENV = "config_resolved.yaml", "run_record.json", "env.json"
    TASK_METRICS, STABILITY_METRICS = "task_metrics.json", "stability_metrics.json"
    REPORT = "report.md"
    _REPAIR, _STATE = "repair_step_", "train_state_"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.checkpoints = self.path / self.CHECKPOINTS
        self.metrics = self.path / self.METRICS
        self.paper = self.path / self.PAPER
        self.figures = self.paper / "figures"
        self.tables = self.paper / "tables"

    def ensure(self) -> "RunDir":
        for d in (self.logs, self.checkpoints, self.metrics, self.control):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def _work_folders(self) -> list[Path]:
        return [self.logs, self.checkpoints, self.metrics, self.control]

    # -- files
    @property
    def record(self) -> Path:
        return self.path / self.RECORD

    @property
    def env(self) -> Path:
        return self.path / self.ENV

    def log(self, phase: str) -> Path:
        """The phase's JSONL record log (train.jsonl, eval.jsonl)."""
        return self.logs / f"{phase}.jsonl"

    def progress(self, phase: str) -> Path:
        """A unit-resumable phase's progress file (eval, stability)."""
        return self.metrics / f"{phase}_progress.json"

    @property
    def task_metrics(self) -> Path:
        return self.metrics / self.TASK_METRICS

    @property
    def stability_metrics(self) -> Path:
        return self.metrics / self.STABILITY_METRICS

    @property
    def report(self) -> Path:
        return self.paper / self.REPORT

    def figure(self, name: str) -> Path:
        return self.figures / name

    def table(self, name: str) -> Path:
        return self.tables / name

    def repair_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{self._REPAIR}{int(step)}.pt"

    def train_state(self, step: int | None = None) -> Path:
        """The resume point (`train_state_latest.pt`) or a periodic state of one step."""
        return self.checkpoints / (f"{self._STATE}latest.pt" if step is None else f"{self._STATE}step_{int(step)}.pt")

    def _stepped(self, prefix: str) -> dict[int, Path]:
        out = {}
        if self.checkpoints.is_dir():
            for p in self.checkpoints.glob(f"{prefix}*.pt"):
                tail = p.stem[len(prefix):]
                if tail.isdigit():
                    out[int(tail)] = p
        return dict(sorted(out.items()))

    def repair_checkpoints(self) -> dict[int, Path]:
        """{step: path} of the repair checkpoints, by step."""
        return self._stepped(self._REPAIR)

    def periodic_states(self) -> dict[int, Path]:
        """{step: path} of the periodic training states, by step."""
        return self._stepped(f"{self._STATE}step_")

    @staticmethod
    def checkpoint_step(path: Path) -> int:
        """The step in a repair checkpoint's or periodic state's file name."""
        return int(Path(path).stem.rsplit("_", 1)[1])

    def latest_repair_checkpoint(self) -> Path | None:
        ckpts = self.repair_checkpoints()
        return ckpts[max(ckpts)] if ckpts else None

    @property
    def calibration(self) -> Path:
        """Clean-cache statistics of the calibrated baselines (computed once per run, by eval or stability)."""
        return self.checkpoints / "calibration.pt"

    def training_files(self) -> list[Path]:
        """What training writes (removed by --no-resume)."""
        files = [*self.repair_checkpoints().values(), *self.periodic_states().values(), self.train_state()]
        files += [self.log("train"), self.heartbeat("train"), self.timeline("train")]
        return [p for p in files if p.exists()]

    @property
    def resolved_config_path(self) -> Path:
        return self.path / self.CONFIG

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
        from cachemedicpp.hf import versions  # here, not at the top: watch reads run directories without torch

        env = versions()
        rec_path = self.record
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
        atomic_write_json(self.env, {**env, **machine_env()})


class SweepDir(_Layout):
    """A sweep directory: its plan, summary, logs/ and control/, and one run dir per run."""

    PLAN, SUMMARY_JSON, SUMMARY_MD = "sweep_resolved.yaml", "summary.json", "summary.md"
    PARTS = (_Layout.LOGS, _Layout.CONTROL, PLAN, SUMMARY_JSON, SUMMARY_MD)  # names a run may not take

    def ensure(self) -> "SweepDir":
        for d in (self.logs, self.control):
            d.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def plan(self) -> Path:
        return self.path / self.PLAN

    @property
    def summary_json(self) -> Path:
        return self.path / self.SUMMARY_JSON

    @property
    def summary_md(self) -> Path:
        return self.path / self.SUMMARY_MD

    @property
    def loto_figure(self) -> Path:
        """Recovered fractions per held-out type across the leave-one-type-out runs (written with the summary)."""
        return self.path / "loto_summary.png"

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)


# ISA extensions that decide which CPU kernels torch dispatches to (vector width, fused multiply-add,
# half/bf16 conversion and dot products, matrix tiles): two machines that differ in them may differ in
# the last bits of a float result. x86 names from /proc/cpuinfo `flags`, Arm names from its `Features`.
NUMERIC_CPU_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                     "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                     "asimd", "asimdhp", "fphp", "sve", "sve2", "bf16", "i8mm")


def machine_env() -> dict:
    """env.json's machine part: what a result needs to be checked on another machine. Every probe fails
    soft (None where this system does not tell)."""
    cpuinfo = _cpuinfo()
    flags = _cpuinfo_field(cpuinfo, "flags", "Features")
    threads, capability = _torch_cpu()
    return {
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()}".strip() or None,  # OS name and kernel release
        "machine": platform.machine() or None,  # x86_64, aarch64, arm64, ...
        "cpu_model": _cpuinfo_field(cpuinfo, "model name", "Model", "Hardware") or platform.processor() or None,
        # the NUMERIC_CPU_FLAGS this CPU has, sorted; None where the system lists no flags (not Linux)
        "cpu_flags": None if flags is None else sorted(set(flags.split()) & set(NUMERIC_CPU_FLAGS)),
        "cpu_count": os.cpu_count(),  # logical CPUs of the machine
        # logical CPUs this process may run on (a container or a taskset can hold fewer)
        "cpu_count_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,  # torch's intra-op threads (torch.get_num_threads())
        # the ISA level torch's CPU kernels were dispatched for (DEFAULT, AVX2, AVX512, ...); None before torch 2.1
        "torch_cpu_capability": capability,
    }


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(text: str, *names: str) -> str | None:
    """The first CPU's value of the first of `names` that /proc/cpuinfo has."""
    for name in names:
        m = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.M)
        if m:
            return m.group(1).strip()
    return None


def _torch_cpu() -> tuple[int, str | None]:
    import torch  # here, not at the top: watch reads run directories without torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        capability = str(get()) if get is not None else None
    except RuntimeError:
        capability = None
    return torch.get_num_threads(), capability


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'config'}: {a!r} vs {b!r}"
