"""The plots stage: `run(run_dir)` and `main(argv)`.

Every input is validated and every output rendered in memory before the first one is written (each write
atomic), so a missing or malformed input is one clear exit-2 message and leaves no placeholder or
half-updated artefacts. The task metrics are required; without stability metrics figures C and D are
skipped, figure E without bit-class scores and figure F without a recomputing defense's cost. A skipped figure left by an earlier plots run is
removed, so every figure in the run dir matches the metrics it now holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from cachemedicpp.cli import guarded
from cachemedicpp.fileio import atomic_write_bytes
from cachemedicpp.plots.figures import render_figures
from cachemedicpp.plots.inputs import Inputs, load_inputs
from cachemedicpp.plots.outputs import FIGURES, OPTIONAL_FIGURES, TABLE_ABLATION, TABLE_MAIN
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


def stale_figures(rd: RunDir, outputs: dict[Path, bytes]) -> list[Path]:
    """Figures on disk that this render skipped: drawn earlier from metrics the run dir no longer has (or
    never had since), they would otherwise pass for current results."""
    return [rd.figure(n) for n in FIGURES + OPTIONAL_FIGURES
            if rd.figure(n) not in outputs and rd.figure(n).is_file()]


def run(run_dir: str | Path) -> int:
    """Draw the figures, tables and report of one run dir. Bad input raises ConfigError (exit 2)."""
    rd = RunDir(run_dir)
    inp = load_inputs(rd.path)
    outputs = render(inp)
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    for note in (inp.stability_note, inp.bits_note, inp.recompute_note):
        if note:
            print(f"note: {note}")
    for path in stale_figures(rd, outputs):
        path.unlink()
        print(f"note: removed {rd.rel(path)} from an earlier plots run: these metrics do not support it")
    print(f"wrote {len(outputs)} files under {rd.paper}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.plots",
                                description="Figures, tables and report from a run's metrics JSON.")
    p.add_argument("--run_dir", required=True, help=f"run directory holding {RunDir.METRICS}/")
    args = p.parse_args(argv)
    return guarded(lambda: run(args.run_dir))
