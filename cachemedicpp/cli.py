"""Shared command-line plumbing: arguments, overrides, and mapping outcomes to exit codes
(0 completed, 1 failure, 2 bad input, 3 paused)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from cachemedicpp.config import Config, ConfigError, load_config, parse_set_args

# every command's exit codes
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PAUSED = 0, 1, 2, 3


def phase_parser(phase: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m cachemedicpp.{phase}", description=description)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--run_dir", required=True, help="run directory (created if missing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dot path, YAML-typed value); repeatable")
    return p


def add_resume_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from saved progress when present (default)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="discard saved progress and recompute from scratch")


def setup_logging() -> None:
    level = os.environ.get("CACHEMEDICPP_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "huggingface_hub", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def guarded(fn: Callable[[], int]) -> int:
    """Run a command body: bad input -> one clear message and exit 2; anything else -> traceback, exit 1."""
    try:
        return int(fn())
    except ConfigError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED


def run_phase(phase: str, description: str, argv: Sequence[str] | None,
              body: Callable[[Config, str, argparse.Namespace], int], resume_flags: bool = True,
              extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    p = phase_parser(phase, description)
    if resume_flags:
        add_resume_flags(p)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    setup_logging()

    def go() -> int:
        cfg = load_config(args.config, parse_set_args(args.set))
        return body(cfg, args.run_dir, args)

    return guarded(go)
