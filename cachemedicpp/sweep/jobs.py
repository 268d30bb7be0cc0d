"""One run of a sweep: its remaining phases, the same function in-process and in a Ray worker."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from cachemedicpp import pipeline
from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.config import Config, ConfigError
from cachemedicpp.fileio import read_json
from cachemedicpp.rundir import RunDir

PAUSABLE = ("train", "eval", "stability")  # the phases that acknowledge a pause in their run dir


def outcome(job: dict, status: str, rc: int | None, phase: str | None, ran: list[str], **why) -> dict:
    """What a job reports back: plain data, so it can travel from a worker process."""
    return {"name": job["name"], "status": status, "rc": rc, "phase": phase, "ran": ran, **why}


def run_job(job: dict) -> dict:
    """Run the remaining phases of one run. `job` is plain data so it can travel to a worker process."""
    cfg = Config(job["config"], job.get("config_path"))
    run_dir, pause = Path(job["run_dir"]), Path(job["sweep_pause"])
    extra = {"paired_run_dir": job["paired_run_dir"]} if job.get("paired_run_dir") else None
    on_phase: Callable[[str], None] = job.get("on_phase") or (lambda phase: None)
    verbose = job.get("verbose", True)
    ran: list[str] = []
    for phase in job["phases"]:
        if job["resume"] and pipeline.phase_done(run_dir, phase):
            continue
        if pause.exists():
            return outcome(job, "paused", EXIT_PAUSED, phase, ran, reason=pause_reason(pause))
        on_phase(phase)
        t0 = time.perf_counter()
        if verbose:
            print(f"== {job['name']}: {phase} ==", file=sys.stderr, flush=True)
        try:
            rc = pipeline.run(cfg, run_dir, resume=job["resume"], config_path=job.get("config_path"), phases=(phase,),
                              sweep_pause=pause, stability_extra=extra, verbose=False)
        except ConfigError as e:
            msg = "; ".join(e.problems)
            print(f"sweep: run {job['name']}, {phase}: error: {msg}", file=sys.stderr)
            return outcome(job, "bad_input", EXIT_BAD_INPUT, phase, ran, error=msg)
        except Exception as e:  # one failing run must not take the rest of the sweep down
            traceback.print_exc()
            return outcome(job, "failed", EXIT_FAILED, phase, ran, error=f"{type(e).__name__}: {e}")
        if verbose:
            print(f"== {job['name']}: {phase}: exit {rc} after {time.perf_counter() - t0:.1f}s ==", file=sys.stderr,
                  flush=True)
        if rc == EXIT_PAUSED:
            return outcome(job, "paused", rc, phase, ran, reason=_phase_ack_reason(run_dir, phase))
        if rc != EXIT_OK:
            return outcome(job, "bad_input" if rc == EXIT_BAD_INPUT else "failed", rc, phase, ran,
                           error=f"{phase} exited with {rc}")
        ran.append(phase)
    return outcome(job, "completed", EXIT_OK, None, ran)


def pause_reason(pause: Path) -> str:
    """The first line of a pause request (who asked and why), or the request's file name."""
    try:
        text = pause.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text.splitlines()[0][:200] if text else pause.name


def _phase_ack_reason(run_dir: Path, phase: str) -> str:
    if phase not in PAUSABLE:
        return "paused"
    try:
        return str(read_json(RunDir(run_dir).pause_ack(phase), "pause acknowledgement").get("reason") or "paused")
    except (ConfigError, OSError, AttributeError):
        return "paused"


def ray_task(job: dict, *twins: dict) -> dict:
    """A Ray task: skip when a twin it depends on did not complete, else the same per-run function."""
    for t in twins:
        if t.get("status") != "completed":
            return outcome(job, "blocked", None, None, [], error=f"paired twin {t.get('name')} {t.get('status')}")
    import torch  # Ray sets OMP_NUM_THREADS from num_cpus; make torch agree even if it was imported already

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
    return run_job(job)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--launcher ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[default]')") from None
    return ray
