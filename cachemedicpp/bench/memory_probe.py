"""Peak memory of the workloads (`memory.py` measures; this module isolates and names the workloads).

On CPU every workload runs in a fresh subprocess (`python -m cachemedicpp.bench --probe SPEC`) with
glibc's mmap threshold pinned, so freed tensors leave the resident set and no earlier workload's heap
is counted; on CUDA, and with `--memory inprocess`, in this process.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from cachemedicpp import ROOT, hf, memory
from cachemedicpp.bench.settings import Settings, bench_config, decode_variants, load_lm
from cachemedicpp.bench.timing import Workload
from cachemedicpp.bench.workloads import decode_workload, eval_workloads, perturbed_operator, train_workloads

log = logging.getLogger("cachemedicpp")


def measure_memory(w: Workload, dev: torch.device) -> dict:
    """Peak memory of one unit of `w` above what was resident before it (setup and a warm-up done)."""
    w.run(w.prepare())  # warm-up: lazy allocations, optimizer state, kernel caches
    arg = w.prepare()
    gc.collect()
    if dev.type == "cuda":
        memory.reset_peak(dev)
        before = torch.cuda.memory_allocated(dev)
        w.run(arg)
        peak = memory.peak_mib(dev)
        return {"peak_delta_mib": peak - before / 2**20, "peak_mib": peak, "before_mib": before / 2**20,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the unit"}
    reset = memory.reset_peak(dev)
    _, before = memory.rss_kib()
    max_before = memory.maxrss_kib()
    w.run(arg)
    hwm, after = memory.rss_kib()
    res = {"before_mib": before / 1024, "peak_mib": hwm / 1024, "after_mib": after / 1024,
           "process_maxrss_mib": memory.maxrss_kib() / 1024}
    if reset:
        res.update(peak_delta_mib=(hwm - before) / 1024,
                   method="VmHWM after the unit - VmRSS before it (peak mark reset via /proc/self/clear_refs)")
    else:  # no reset possible: a maxrss delta can only see growth above the earlier high-water mark
        res.update(peak_delta_mib=(memory.maxrss_kib() - max_before) / 1024,
                   method="ru_maxrss delta (lower bound: peak RSS mark could not be reset)")
    return res


def memory_specs(s: Settings) -> list[dict]:
    specs = []
    want = [m for m in s.memory_of if m in s.only]
    if "train_step" in want:
        specs += [{"kind": "train_step"}, {"kind": "train_bare"}]
    if "eval_grid" in want:
        specs += [{"kind": "eval_grid"}, {"kind": "eval_bare"}]
    if "decode" in want:
        family = bench_config(s, "cpu").repair.family
        for length in s.memory_lengths:
            specs += [{"kind": "decode", "variant": v, "length": length} for v in decode_variants(family)]
    return specs


def spec_name(spec: dict) -> str:
    if spec["kind"] == "decode":
        return f"decode_{spec['variant']}_{spec['length']}"
    return spec["kind"]


def workload_for(spec: dict, s: Settings, lm: hf.LoadedModel) -> Workload:
    cfg = bench_config(s, str(lm.device), lm.arch)
    if spec["kind"] in ("train_step", "train_bare"):
        train, bare = train_workloads(cfg, lm)
        return train if spec["kind"] == "train_step" else bare
    if spec["kind"] in ("eval_grid", "eval_bare"):
        grid, bare, _ = eval_workloads(s, lm)
        return grid if spec["kind"] == "eval_grid" else bare
    if spec["kind"] == "decode":
        op = perturbed_operator(cfg, lm)
        return decode_workload(lm, op, spec["length"], min(s.decode_tokens, s.memory_decode_tokens), spec["variant"],
                               s.seed)
    raise ValueError(f"unknown memory workload {spec}")


def bench_memory(s: Settings, device: str, lm: hf.LoadedModel) -> dict:
    """Every workload's peak; `s.memory` says where it runs (a fresh subprocess, or in process on `lm`)."""
    out: dict[str, Any] = {}
    for spec in memory_specs(s):
        name = spec_name(spec)
        t0 = time.perf_counter()
        if s.memory == "subprocess":
            res = probe_subprocess(spec, s, device)
            res["isolation"] = "fresh subprocess"
        else:
            res = probe_inprocess(spec, s, lm)
            res["isolation"] = "in process"
        res["wall_sec"] = time.perf_counter() - t0
        out[name] = res
        peak = res.get("peak_delta_mib")
        log.info("memory %s: %s", name, "-" if peak is None else f"{peak:.3f}")
    for k in [k for k in out if k.startswith("decode_none_")]:
        length = k.rsplit("_", 1)[1]
        base = out[k].get("peak_delta_mib")
        for v in {n.split("_", 1)[1].rsplit("_", 1)[0] for n in out if n.startswith("decode_")} - {"none"}:
            r = out.get(f"decode_{v}_{length}", {})
            if "peak_delta_mib" in r and base is not None:
                r["extra_vs_none_mib"] = r["peak_delta_mib"] - base
    return out


def probe_inprocess(spec: dict, s: Settings, lm: hf.LoadedModel) -> dict:
    if lm.device.type == "cpu":
        memory.pin_mmap_threshold()
    w = workload_for(spec, s, lm)
    res = measure_memory(w, lm.device)
    del w
    gc.collect()
    return res


def probe(spec: dict, s: Settings, device: str) -> dict:
    """One memory measurement in this (fresh) process: the `--probe` entry point."""
    if device == "cpu":
        memory.pin_mmap_threshold()  # before the model is loaded (the subprocess's environment pins it too)
    return probe_inprocess(spec, s, load_lm(s, device))


def probe_subprocess(spec: dict, s: Settings, device: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    payload = json.dumps({"spec": spec, "settings": asdict(s), "device": device})
    cmd = [sys.executable, "-m", "cachemedicpp.bench", "--probe", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"probe exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])
