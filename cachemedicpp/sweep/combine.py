"""`python -m cachemedicpp.sweep.combine SWEEP_DIR... --out DIR`: one leave-one-type-out table and figure
from several sweeps, for instance the same sweep run once per seed (`summary.combine`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK
from cachemedicpp.config import ConfigError
from cachemedicpp.sweep import summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cachemedicpp.sweep.combine SWEEP_DIR... --out DIR`: the combined table and figure."""
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.sweep.combine",
                                description="One leave-one-type-out table and figure from several sweeps "
                                            "(e.g. one per seed).")
    p.add_argument("sweep_dirs", nargs="+", help="finished sweep dirs (each with its summary.json)")
    p.add_argument("--out", required=True, help="where loto_combined.{json,md,png} go")
    args = p.parse_args(argv)
    try:
        loto = summary.combine([Path(d) for d in args.sweep_dirs], Path(args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{len(loto['rows'])} runs; wrote {Path(args.out) / 'loto_combined.md'} and loto_combined.png")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
