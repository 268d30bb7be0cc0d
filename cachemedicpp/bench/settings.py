"""What a bench run measures and on what: the OpenMP wait policy (set before torch is imported), the
settings and their command line, the run config of the workloads, and the machine record."""

from __future__ import annotations

import os
import sys

# On a machine shared with other busy processes, OpenMP workers that spin while they wait made a 2-thread
# SmolLM2 forward ~20x slower and its timings pure noise; with OMP_WAIT_POLICY=PASSIVE they sleep instead,
# which costs ~20% on a quiet machine. So: PASSIVE when the 1-minute load average already exceeds the
# cores at start, the OpenMP default otherwise, unless the caller set the variable. Only effective before
# torch is first imported, hence here, above the imports, in the package's first module;
# `machine.omp_wait_policy` records what was in effect and why. (scripts/quickstart.sh has the same rule.)
_OMP_POLICY_BEFORE_TORCH = "torch" not in sys.modules
if "OMP_WAIT_POLICY" in os.environ:
    _OMP_POLICY_REASON = "set by the caller"
elif os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _OMP_POLICY_REASON = "set to PASSIVE: load average above the core count at start"
else:
    _OMP_POLICY_REASON = "OpenMP default (machine not overloaded at start)"

import argparse  # noqa: E402
import platform  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from cachemedicpp import ROOT, hf, repair  # noqa: E402
from cachemedicpp.config import ConfigError, load_config  # noqa: E402
from cachemedicpp.rundir import machine_env  # noqa: E402

FORMAT = "cachemedicpp.bench/1"
TARGETS = {"train_step": ("<=", 1.15), "eval_grid": ("<=", 1.3), "decode_repair": (">=", 0.95),
           "decode_repair_vs_stock": (">=", 0.90), "decode_tags_vs_stock": (">=", 0.97)}
# `stock`: the model as users run it, its fastest kernel (sdpa) and no hook at all; `none`: the hook, no plan;
# `stock_tagged`: stock, writing integrity tags (integrity.extend) as each block of the cache completes
DECODE_VARIANTS = ("none", "repair", "naive", "augmented", "stock", "stock_tagged")  # families A, B, C
# family D: its threshold set on clean windows (a clean cache: nothing gated, the detector scores each new
# entry), and every entry gated (the worst case: every entry corrected and biased)
DETECTING_VARIANTS = ("none", "repair", "repair_all_gated", "stock", "stock_tagged")


# family E: calibrated_repair inside attention with a gate that is not the identity (what it costs where the
# repair flags the prefilled random tokens' entries); its correction is not low-rank, so no naive / augmented form
CALIBRATED_VARIANTS = ("none", "repair", "stock", "stock_tagged")


def decode_variants(family: str) -> tuple[str, ...]:
    fam = repair.family(family)
    return DETECTING_VARIANTS if fam.detects else CALIBRATED_VARIANTS if fam.calibrated else DECODE_VARIANTS
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
MEASUREMENTS = ("train_step", "eval_grid", "defense_overhead", "decode", "memory")
PREFILLS = ("prose", "random")
PROSE = ROOT / "data" / "offline" / "wikitext2_eval.txt"


@dataclass
class Settings:
    config: str = str(DEFAULT_CONFIG)
    model: str | None = None
    protect_layers: list[int] | None = None  # None: the base config's repair.protect_layers (what users run)
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    reps: int = 5
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    decode_tokens: int = 8  # per timed run; each repetition times 2 runs of a variant and 2 of no defense
    memory: str = "subprocess"  # subprocess | inprocess | off
    memory_lengths: list[int] = field(default_factory=lambda: [2048])
    memory_of: list[str] = field(default_factory=lambda: ["train_step", "eval_grid", "decode"])
    memory_decode_tokens: int = 8  # peak memory hardly depends on how many tokens are decoded
    eval_examples: int = 1  # per task of the base config
    eval_eps: list[float] = field(default_factory=lambda: [0.0, 0.16, 0.64])
    eval_end_to_end: bool = True
    eval_reps: int | None = None  # default: reps
    only: list[str] = field(default_factory=lambda: list(MEASUREMENTS))
    threads: int | None = None
    quick: bool = False
    seed: int = 0
    run_dir: str | None = None  # decode with this run dir's trained operator (as `protect` loads it)
    prefill: str = "prose"  # decode's prefilled cache: prose (data/offline/wikitext2_eval.txt) | random tokens


def bench_config(s: Settings, device: str, arch: hf.ArchInfo | None = None, extra_defenses: Sequence[str] = ()):
    """The run config the workloads use: the base config with the model/device overrides, the settings'
    protected layers (the first four when the model is shallower), and a small eval grid (the base
    config's tasks, types and persistence; `eval_examples` per task and `eval_eps`; its defenses plus
    `extra_defenses`)."""
    over: dict[str, Any] = {"device": device, "dtype": "float32"}
    if s.protect_layers is not None:
        over["repair.protect_layers"] = list(s.protect_layers)
    if s.model:
        over["model.name"] = s.model
    cfg = load_config(s.config, over)
    over["eval.tasks"] = [dict(t, num_examples=s.eval_examples) for t in cfg.eval.tasks]
    over["eval.corruption_eval.eps"] = list(s.eval_eps)
    if extra_defenses:
        over["eval.defenses"] = list(cfg.eval.defenses) + [d for d in extra_defenses if d not in cfg.eval.defenses]
    # the calibrated baselines need a calibration; its statistics do not matter for timing: keep it small
    over.update({"baseline.calibration.windows": 2, "baseline.calibration.select_windows": 1,
                 "baseline.calibration.level_examples": 1,
                 "eval.validation.num_examples": 1})
    layers = s.protect_layers if s.protect_layers is not None else list(cfg.repair.protect_layers)
    if arch is not None and max(layers) >= arch.num_layers:
        over["repair.protect_layers"] = list(range(min(4, arch.num_layers)))
    return load_config(s.config, over)


def load_lm(s: Settings, device: str) -> hf.LoadedModel:
    cfg = bench_config(s, device)
    return hf.load_model(cfg.model.to_dict(), device, "float32")


def machine_info() -> dict:
    """The machine (as a run's env.json records it), the versions, and what this bench run ran under."""
    m = machine_env()
    info = hf.versions()
    info.update({
        "cpu_model": m["cpu_model"], "cpu_flags": m["cpu_flags"], "torch_cpu_capability": m["torch_cpu_capability"],
        "nproc": m["cpu_count_usable"],
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
        "omp_wait_policy": {"value": os.environ.get("OMP_WAIT_POLICY"), "reason": _OMP_POLICY_REASON,
                            "set_before_torch_import": _OMP_POLICY_BEFORE_TORCH},
    })
    return info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    summary = (sys.modules[__package__].__doc__ or "").split("\n")[0]  # the package docstring's first line
    p = argparse.ArgumentParser(prog="python -m cachemedicpp.bench", description=summary)
    p.add_argument("--out", default="bench/results.json", help="results JSON (default: bench/results.json)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 5; quick 2)")
    p.add_argument("--lengths", default=None, help="decode cache lengths, comma-separated (default 256,1024,2048)")
    p.add_argument("--quick", action="store_true", help="small settings: about a minute on a 2-core CPU")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base run config (default configs/quickstart.yaml)")
    p.add_argument("--model", default=None, help="override model.name (a hub id, a folder, a GGUF, embedded:...)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CPU, and CUDA too when available (default)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per timed run (default 8; quick 4)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "inprocess", "off"],
                   help="how peak memory is measured on CPU (default: a fresh subprocess per workload)")
    p.add_argument("--memory-lengths", default=None, help="decode lengths whose memory is measured (default: the longest)")
    p.add_argument("--only", default=None, help="subset of " + ",".join(MEASUREMENTS))
    p.add_argument("--layers", default=None,
                   help="protected layers of the repair in every workload (default: the config's repair.protect_layers)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--run_dir", default=None,
                   help="decode with this trained run dir's operator, loaded as cachemedicpp.protect loads it "
                        "(default: a stand-in operator fitted on random windows)")
    p.add_argument("--prefill", default="prose", choices=list(PREFILLS),
                   help="decode's prefilled cache: prose (the offline evaluation text, what users decode after; "
                        "default) or random tokens")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # memory_probe's subprocess entry
    return p.parse_args(argv)


def _ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < minimum for v in vals):
        raise ConfigError(f"{what}: expected integers >= {minimum}, got {text!r}")
    return vals


def _at_least_one(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag}: must be at least 1")
    return value


def settings_from_args(a: argparse.Namespace) -> Settings:
    s = Settings(config=a.config, model=a.model, memory=a.memory, threads=a.threads, quick=a.quick, run_dir=a.run_dir,
                 prefill=a.prefill,
                 protect_layers=sorted(set(_ints(a.layers, "--layers", minimum=0))) if a.layers else None)
    if a.quick:
        s.reps, s.lengths, s.decode_tokens = 2, [256], 4
        s.eval_eps, s.eval_end_to_end, s.eval_reps, s.memory_of = [0.0, 0.16], False, 1, ["decode"]
    if a.reps is not None:
        s.reps, s.eval_reps = _at_least_one(a.reps, "--reps"), None
    if a.lengths:
        s.lengths = _ints(a.lengths, "--lengths")
    if a.decode_tokens is not None:
        s.decode_tokens = _at_least_one(a.decode_tokens, "--decode-tokens")
    s.memory_lengths = _ints(a.memory_lengths, "--memory-lengths") if a.memory_lengths else [max(s.lengths)]
    if a.only:
        only = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in only if x not in MEASUREMENTS]
        if bad:
            raise ConfigError(f"--only: unknown measurement(s) {bad}; known: {list(MEASUREMENTS)}")
        s.only = only
    if not Path(s.config).is_file():
        raise ConfigError(f"--config: file not found: {s.config}")
    if s.run_dir is not None and not Path(s.run_dir).is_dir():
        raise ConfigError(f"--run_dir: not a folder: {s.run_dir}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")
    s.devices = ["cuda"] if a.device == "cuda" else ["cpu"] + (["cuda"] if a.device == "auto" and torch.cuda.is_available() else [])
    return s
