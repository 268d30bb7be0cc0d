"""The plots stage: `run(run_dir)` and `main(argv)`.

Every input is validated and every output rendered in memory before the first one is written (each write
atomic), so a missing or malformed input is one clear exit-2 message and leaves no placeholder or
half-updated artefacts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from cachemedicpp.cli import guarded
from cachemedicpp.fileio import atomic_write_bytes
from cachemedicpp.plots.figures import render_figures
from cachemedicpp.plots.inputs import Inputs, load_inputs
from cachemedicpp.plots.outputs import TABLE_ABLATION, TABLE_MAIN
from cachemedicpp.plots.report import report_md
from cachemedicpp.plots.tables import table_ablation, table_main
from cachemedicpp.rundir import RunDir


def render(inp: Inputs) -> dict[Path, bytes]:
    """Every output, rendered in memory, by the path it is written to."""
    rd = RunDir(inp.run_dir)
    out = {rd.figure(name): png for name, png in render_figures(inp).items()}
    out[rd.table(TABLE_MAIN)] = table_main(inp).encode("utf-8")
    out[rd.table(TABLE_ABLATION)] = table_ablation(inp).encode("utf-8")
    out[rd.report] = report_md(inp).encode("utf-8")
    return out


def run(run_dir: str | Path) -> int:
    """Draw the figures, tables and report of one run dir. Bad input raises ConfigError (exit 2)."""
    inp = load_inputs(run_dir)
    outputs = render(inp)
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    if inp.bits_note:
        print(f"note: {inp.bits_note}")
    print(f"wrote {len(outputs)} files under {RunDir(run_dir).paper}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.plots",
                                description="Figures, tables and report from a run's metrics JSON.")
    p.add_argument("--run_dir", required=True, help=f"run directory holding {RunDir.METRICS}/")
    args = p.parse_args(argv)
    return guarded(lambda: run(args.run_dir))
