"""python -m cachemedicpp.watch: the live status of a run or a sweep, ending with the exact next command.

    python -m cachemedicpp.watch --run_dir DIR [--follow] [--stop_on_terminal] [--json] [--interval S] [--stale_after S]

`read` reads the heartbeats (snapshot or timeline), staleness and the run and sweep views, `next` decides
what to do next and with which config, `render` prints it as text or as the --json document, `stage` is
the command (once or --follow, exit codes). What the command does is described in `stage`.
"""

from cachemedicpp.watch.fmt import fmt_duration, fmt_num, fmt_progress
from cachemedicpp.watch.next import (DERIVED, PYTHON, RUN_STATES, ConfigArgs, Next, SweepCommand, command,
                                     config_args, phase_command, phase_done, pipeline_command, run_next,
                                     sweep_command, sweep_next, sweep_phases, sweep_run_states)
from cachemedicpp.watch.read import (LIVE, PHASE_ORDER, SWEEP, HeartbeatError, PhaseState, RunView, SweepView,
                                     has_heartbeat, heartbeat_files, heartbeat_phases, is_sweep_dir, lock_holder,
                                     parse_ts, pid_alive, read_phase, read_run, read_view, signature, stale_reason,
                                     sweep_runs)
from cachemedicpp.watch.render import PHASE_COLUMNS, phase_doc, render, render_next, render_state, status_doc
from cachemedicpp.watch.stage import TERMINAL_EXIT, main, show, terminal_exit, watch

__all__ = [
    "fmt_duration", "fmt_num", "fmt_progress",
    "SWEEP", "PHASE_ORDER", "LIVE", "HeartbeatError", "PhaseState", "RunView", "SweepView", "parse_ts",
    "read_phase", "heartbeat_phases", "pid_alive", "stale_reason", "lock_holder", "read_run", "sweep_runs",
    "is_sweep_dir", "read_view", "has_heartbeat", "heartbeat_files", "signature",
    "PYTHON", "DERIVED", "RUN_STATES", "ConfigArgs", "SweepCommand", "Next", "command", "config_args",
    "phase_command", "pipeline_command", "sweep_command", "phase_done", "run_next", "sweep_phases",
    "sweep_run_states", "sweep_next",
    "PHASE_COLUMNS", "render_state", "render_next", "render", "phase_doc", "status_doc",
    "TERMINAL_EXIT", "terminal_exit", "show", "watch", "main",
]
