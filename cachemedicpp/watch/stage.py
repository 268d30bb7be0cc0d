"""Watch a run or a sweep through its heartbeat files, and say what to do next.

    python -m cachemedicpp.watch --run_dir DIR [--follow] [--stop_on_terminal] [--json] [--interval S] [--stale_after S]

A phase writes a snapshot `logs/<phase>_heartbeat.json` (atomically) and appends the same record to the
timeline `logs/<phase>_heartbeat.jsonl`. The newest record across phases (by `timestamp_utc`) is the run's
current state; a missing, truncated or unreadable snapshot falls back to the last valid timeline line.
A sweep directory (`<out_root>/<sweep_name>`) shows its own `sweep_heartbeat` plus one line per run.
Paths in the records are relative to the run (or sweep) dir and are shown against the folder given, so a
moved or copied run dir reads right.

The output ends with a `next:` block for the state found, with the exact command to run: how to pause a
running phase, the command that resumes a paused or interrupted one, the failed phase's error and the
command that retries it, the next phase's command, or where the report, figures and tables are. Commands
use the run's own `config_resolved.yaml` when it loads to the run's config hash, else the config file the
run was started with (plus `--set` for what differs), checked the same way. A sweep's next command is the
one that resumes the sweep. `--json` prints the same status and next command as one JSON document
(`schemas/watch_status.schema.json`; one line per redraw with `--follow`).

A record that says `running` is shown as `stale` when its process is gone (same host, pid not alive) or
when it has not been updated for `--stale_after` seconds: a killed job cannot write `failed` itself.

Exit codes: 0 printed (or completed), 2 no such directory, no heartbeat at all, or a heartbeat that cannot
be read. With `--stop_on_terminal` the status decides: completed 0, paused 3, failed 1 (with `--follow` it
waits for one of them; without it, a non-terminal status exits 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PAUSED
from cachemedicpp.rundir import RunDir
from cachemedicpp.watch.next import run_next, sweep_next
from cachemedicpp.watch.read import (HeartbeatError, RunView, SweepView, has_heartbeat, read_view,
                                     signature)
from cachemedicpp.watch.render import render, status_doc

TERMINAL_EXIT = {"completed": EXIT_OK, "paused": EXIT_PAUSED, "failed": EXIT_FAILED}


def terminal_exit(view: RunView | SweepView) -> int | None:
    cur = view.current
    if cur is None or cur.stale:
        return None
    return TERMINAL_EXIT.get(cur.record.get("status"))


def _statuses(view: RunView | SweepView) -> tuple:
    runs = view.runs if isinstance(view, SweepView) else [view]
    sweep = [view.sweep] if isinstance(view, SweepView) and view.sweep else []
    return tuple(s.status for s in sweep + [st for r in runs for st in r.phases])


def show(view: RunView | SweepView, as_json: bool, indent: int | None = 2) -> str:
    """The status text (or JSON document) of a view, with its next command."""
    now = time.time()
    if isinstance(view, SweepView):
        nxt, counts, runs = sweep_next(view)
        doc = status_doc(view, nxt, now, counts, runs) if as_json else None
    else:
        nxt = run_next(view)
        doc = status_doc(view, nxt, now) if as_json else None
    return json.dumps(doc, indent=indent) if as_json else render(view, now, nxt)


def _no_heartbeat(path: Path) -> str:
    where = f"{RunDir.LOGS}/{RunDir.heartbeat_name('<phase>')}[l]"
    return f"error: no heartbeat in {path} (looked for {where} in the dir and in its run sub-folders)"


def watch(path: Path, follow: bool = False, stop_on_terminal: bool = False, interval: float = 2.0,
          stale_after: float = 300.0, out: TextIO | None = None,
          sleep: Callable[[float], None] = time.sleep, as_json: bool = False) -> int:
    out = out or sys.stdout
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        print(f"error: run dir {path} {what}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        view = read_view(path, stale_after)
        if not follow:
            if not has_heartbeat(view):
                print(_no_heartbeat(path), file=sys.stderr)
                return EXIT_BAD_INPUT
            print(show(view, as_json), file=out, flush=True)
            code = terminal_exit(view) if stop_on_terminal else None
            return EXIT_OK if code is None else code
        return _follow(path, stop_on_terminal, interval, stale_after, out, sleep, as_json)
    except HeartbeatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _follow(path: Path, stop_on_terminal: bool, interval: float, stale_after: float, out: TextIO,
            sleep: Callable[[float], None], as_json: bool) -> int:
    clear = out.isatty() and not as_json
    last_key = None
    waiting_said = False
    while True:
        sig = signature(path)
        view = read_view(path, stale_after)
        if not has_heartbeat(view):
            if not waiting_said:
                print(f"waiting for a heartbeat in {path} ...", file=sys.stderr if as_json else out, flush=True)
                waiting_said = True
        else:
            key = (sig, _statuses(view))  # a run turning stale redraws too
            if key != last_key:
                text = show(view, as_json, indent=None)
                if clear:
                    out.write("\x1b[H\x1b[2J")
                elif last_key is not None and not as_json:
                    out.write("\n" + "-" * 40 + f" {time.strftime('%H:%M:%S')}\n")
                out.write(text + "\n")
                out.flush()
                last_key = key
            code = terminal_exit(view)
            if stop_on_terminal and code is not None:
                return code
        sleep(interval)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.watch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a run directory or a sweep directory (<out_root>/<sweep_name>)")
    p.add_argument("--follow", action="store_true", help="keep watching; redraw when a heartbeat changes")
    p.add_argument("--stop_on_terminal", action="store_true",
                   help="exit on completed (0), paused (3) or failed (1)")
    p.add_argument("--json", action="store_true",
                   help="print the status and next command as JSON (schemas/watch_status.schema.json); "
                        "one line per redraw with --follow")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks in --follow (default 2)")
    p.add_argument("--stale_after", type=float, default=300.0,
                   help="a running heartbeat older than this many seconds is shown as stale (default 300)")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.stale_after <= 0:
        print("error: --interval and --stale_after must be positive", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return watch(Path(args.run_dir), args.follow, args.stop_on_terminal, args.interval, args.stale_after,
                     as_json=args.json)
    except KeyboardInterrupt:
        return EXIT_OK  # stopping a follow is the normal way to end it
