"""The sweep itself: lock, heartbeat and pause handling around the local or Ray launcher; the command."""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from cachemedicpp import pipeline
from cachemedicpp.cli import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED, add_resume_flags, guarded,
                              setup_logging)
from cachemedicpp.config import ConfigError, dump_yaml
from cachemedicpp.fileio import atomic_write_json, atomic_write_text, read_json, utc_now
from cachemedicpp.phase import Heartbeat
from cachemedicpp.sweep.jobs import import_ray, pause_reason, ray_task, run_job
from cachemedicpp.sweep.plan import Plan, RunSpec, load_plan
from cachemedicpp.sweep.summary import Summary

TICK_SEC = 15.0  # the sweep heartbeat keeps beating while a long phase runs
PHASE = "sweep"  # the sweep's own heartbeat and pause acknowledgement


class Sweep:
    def __init__(self, plan: Plan, *, resume: bool, verbose: bool = True):
        self.plan, self.resume, self.verbose = plan, resume, verbose
        self.dir = plan.dir
        self.summary = Summary(plan)
        self.active = plan.active()
        self.hb: Heartbeat | None = None
        self.unit: str | None = None
        self.signal_name: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- helpers -------------------------------------------------------------------------------
    def completed(self) -> int:
        return sum(1 for r in self.active if self.complete(r))

    def complete(self, r: RunSpec) -> bool:
        return all(pipeline.phase_done(r.run_dir, p) for p in self.plan.phases)

    def skip(self, r: RunSpec) -> bool:
        return self.resume and self.complete(r)

    def beat(self, status: str, reason: str = "", force: bool = True) -> None:
        with self._lock:
            if self.hb is not None:
                self.hb.beat(status, self.completed(), reason=reason, unit=self.unit, force=force,
                             sweep_name=self.plan.name)

    def job(self, r: RunSpec) -> dict:
        return {"name": r.name, "config": r.cfg.to_dict(), "config_path": str(self.plan.base_config),
                "run_dir": str(r.run_dir), "phases": list(self.plan.phases), "resume": self.resume,
                "sweep_pause": str(self.plan.pause_file),
                "paired_run_dir": str(self.plan.by_name(r.paired_with).run_dir) if r.paired_with else None,
                "verbose": self.verbose}

    def log(self, msg: str) -> None:
        print(f"sweep {self.plan.name}: {msg}", file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame) -> None:
        # A phase that is running has its own handler (pause); between phases the request file makes
        # the next phase pause at its first unit, so no signal is lost in the gap.
        self.signal_name = signal.Signals(signum).name
        self._request_pause(self.signal_name)

    def _request_pause(self, reason: str) -> None:
        if not self.plan.pause_file.exists():
            atomic_write_text(self.plan.pause_file, reason + "\n")

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SEC):
            self.beat("running", force=False)

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, launcher: str) -> int:
        self.dir.lock()
        old: dict = {}
        timer = None
        try:
            self._start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    old[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
            hours = self.plan.budget.get("max_wall_hours")
            if hours:
                timer = threading.Timer(hours * 3600, self._request_pause, args=("budget.max_wall_hours",))
                timer.daemon = True
                timer.start()
            threading.Thread(target=self._tick, daemon=True).start()
            try:
                outcome = self._run_ray() if launcher == "ray" else self._run_local()
            except BaseException as e:  # the sweep itself broke (not a run): say so where watch looks
                self.beat("failed", reason=f"{type(e).__name__}: {e}")
                self.summary.write("failed")
                raise
            return self._finish(outcome)
        finally:
            self._stop.set()
            if timer is not None:
                timer.cancel()
            for sig, h in old.items():
                signal.signal(sig, h)
            self.dir.unlock()

    def _start(self) -> None:
        """The sweep dir's plan, the first heartbeat (carrying the elapsed time of earlier invocations)
        and a summary."""
        self.dir.ensure()
        atomic_write_text(self.dir.plan, _resolved_yaml(self.plan))
        prev = _previous_elapsed(self.dir.heartbeat(PHASE))
        self.hb = Heartbeat(self.dir.logs, self.plan.run_id, PHASE, len(self.active))
        self.hb.elapsed_before = prev
        started = self.completed() > 0 or prev > 0
        self.beat("resumed" if started else "running", reason="resume" if started else "start")
        self.summary.write("running")

    def _run_local(self) -> dict | None:
        """In-process, one run after another; returns the result that stopped the sweep (a pause) or None."""
        for r in self.active:
            if self.skip(r):
                self.summary.live[r.name] = {"action": "skipped (complete)"}
                continue
            twin = self.summary.live.get(r.paired_with or "", {})
            if r.paired_with and not self.complete(self.plan.by_name(r.paired_with)):
                self.summary.live[r.name] = {"status": "blocked", "action": "not run",
                                             "error": f"paired twin {r.paired_with} {twin.get('status', 'incomplete')}"}
                self.summary.write("running")
                continue
            if self.plan.pause_file.exists():
                return {"name": r.name, "status": "paused", "phase": None, "reason": pause_reason(self.plan.pause_file)}
            self.log(f"run {r.name} ({self.active.index(r) + 1}/{len(self.active)})")

            def on_phase(phase: str, name: str = r.name) -> None:
                self.unit = f"{name}/{phase}"
                self.beat("running")

            res = run_job({**self.job(r), "on_phase": on_phase})
            res["action"] = "ran " + (",".join(res["ran"]) or "nothing") if res["status"] != "paused" else "paused"
            self.summary.live[r.name] = res
            self.beat("running")
            self.summary.write("running")
            if res["status"] == "paused":
                return res
        return None

    def _run_ray(self) -> dict | None:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kw = {} if address else {"include_dashboard": False}  # a cluster's own settings win
            ray.init(address=address, log_to_driver=self.verbose, **kw)
            started = True
        try:
            return self._collect_ray(ray, self._submit_ray(ray))
        finally:
            if started:
                ray.shutdown()

    def _submit_ray(self, ray) -> dict[str, Any]:
        """One Ray task per run to execute; Ray holds a partner until its twin is done."""
        res = self.plan.resources
        task = ray.remote(num_cpus=res["cpus"], num_gpus=res["gpus"], max_retries=0)(ray_task)
        refs: dict[str, Any] = {}
        for r in self.active:
            if self.skip(r):
                self.summary.live[r.name] = {"action": "skipped (complete)"}
                continue
            deps = [refs[r.paired_with]] if r.paired_with in refs else []
            refs[r.name] = task.remote(self.job(r), *deps)
        return refs

    def _collect_ray(self, ray, refs: dict[str, Any]) -> dict | None:
        """Each task's result as it arrives; returns the first pause, if any."""
        pending = {ref: name for name, ref in refs.items()}
        self.unit = ",".join(refs) or None
        self.beat("running")
        stopper = None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=TICK_SEC)
            for ref in ready:
                name = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as e:  # a worker that died (OOM, node lost) fails its run only
                    out = {"name": name, "status": "failed", "rc": EXIT_FAILED, "ran": [],
                           "error": f"{type(e).__name__}: {e}"}
                out["action"] = f"ray: {out['status']}"
                self.summary.live[name] = out
                if out["status"] == "paused" and stopper is None:
                    stopper = out
                self.unit = ",".join(pending.values()) or None
                self.beat("running")
                self.summary.write("running")
        return stopper

    def _finish(self, stopper: dict | None) -> int:
        pause = self.plan.pause_file
        if stopper is None and pause.exists() and self.completed() == len(self.active):
            pause.unlink(missing_ok=True)  # the request came after the last unit of work: nothing to pause
        if stopper is not None or pause.exists():
            return self._paused(stopper)
        bad = {n: x for n, x in self.summary.live.items() if x.get("status") in ("failed", "bad_input", "blocked")}
        self.unit = None
        if bad:
            why = "; ".join(f"{n}: {x['status']} ({x.get('error')})" for n, x in bad.items())
            self.beat("failed", reason=why)
            self.summary.write("failed")
            self.log(f"{len(bad)} run(s) did not complete: {why}")
            return EXIT_FAILED if any(x["status"] == "failed" for x in bad.values()) else EXIT_BAD_INPUT
        self.beat("completed", reason="done")
        doc = self.summary.write("completed")
        if self.summary.over_budget:
            self.log(f"budget.max_runs = {self.plan.budget['max_runs']}: not run: {sorted(self.summary.over_budget)}")
        self.log(f"{doc['runs_completed']}/{doc['runs_total']} runs complete; summary {self.dir.summary_md}")
        return EXIT_OK

    def _paused(self, stopper: dict | None) -> int:
        """Acknowledge the pause where watch and the user look, and consume the request."""
        pause, stop = self.plan.pause_file, stopper or {}
        reason = self.signal_name or stop.get("reason") or (pause_reason(pause) if pause.exists() else "paused")
        atomic_write_json(self.dir.pause_ack(PHASE), {
            "run_id": self.plan.run_id, "phase": PHASE, "timestamp_utc": utc_now(), "step": self.completed(),
            "reason": reason, "run": stop.get("name"), "run_phase": stop.get("phase"), "pid": os.getpid()})
        pause.unlink(missing_ok=True)
        self.beat("paused", reason=reason)
        self.summary.write("paused")
        self.log(f"paused ({reason}) with {self.completed()}/{len(self.active)} runs complete; "
                 "rerun the same command to continue")
        return EXIT_PAUSED


def _previous_elapsed(snapshot: Path) -> float:
    try:
        return float(read_json(snapshot, "sweep heartbeat").get("elapsed_wall_sec") or 0.0)
    except (ConfigError, OSError, AttributeError, ValueError, TypeError):
        return 0.0


def _resolved_yaml(plan: Plan) -> str:
    doc = copy.deepcopy(plan.raw)
    doc["base_config_resolved"] = str(plan.base_config)
    doc["sweep_file"] = str(plan.sweep_file)
    doc["execution_order"] = [r.name for r in plan.runs]
    doc["config_hashes"] = {r.name: r.cfg.hash for r in plan.runs}
    return dump_yaml(doc)


def dry_run(plan: Plan, resume: bool) -> int:
    print(f"sweep {plan.name}: {len(plan.runs)} runs in {plan.sweep_dir} (phases {', '.join(plan.phases)})")
    active = {r.name for r in plan.active()}
    for i, r in enumerate(plan.runs, 1):
        done = [p for p in plan.phases if pipeline.phase_done(r.run_dir, p)]
        state = ("over budget" if r.name not in active else
                 "complete, skipped" if resume and len(done) == len(plan.phases) else
                 f"resume after {done[-1]}" if resume and done else "to run")
        split = r.cfg.eval.ood_split
        print(f"  {i:>3}. {r.name:<28} config {r.cfg.hash} seed {r.cfg.seed} lambda_contr {r.cfg.train.lambda_contr:g}"
              f"{' held-out ' + split['test_type'] if split else ''}"
              f"{' paired with ' + r.paired_with if r.paired_with else ''}{' group ' + r.group if r.group else ''}"
              f": {state}")
    return EXIT_OK


def run(sweep_config: str | Path, out_root: str | None = None, *, resume: bool = True, launcher: str | None = None,
        dry: bool = False, verbose: bool = True) -> int:
    """Validate, then run (or only list, with dry=True) the sweep. Bad input raises ConfigError."""
    plan = load_plan(sweep_config, out_root)
    if dry:
        return dry_run(plan, resume)
    launcher = launcher or plan.launcher
    if launcher == "ray":
        import_ray()  # fail before anything is written
    return Sweep(plan, resume=resume, verbose=verbose).run(launcher)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.sweep",
                                description="Run a sweep of train -> eval -> stability -> plots runs.")
    p.add_argument("--sweep_config", required=True, help="sweep YAML (schemas/sweep.schema.json)")
    p.add_argument("--out_root", default=None,
                   help="output folder; runs go to <out_root>/<sweep_name>/<run>/ (default: the file's out_root)")
    add_resume_flags(p)
    p.add_argument("--launcher", choices=("local", "ray"), default=None,
                   help="local: in this process (default); ray: one Ray task per run (RAY_ADDRESS for a cluster)")
    p.add_argument("--dry_run", action="store_true", help="validate and list the runs, run nothing")
    args = p.parse_args(argv)
    setup_logging()
    return guarded(lambda: run(args.sweep_config, args.out_root, resume=args.resume, launcher=args.launcher,
                               dry=args.dry_run))
