"""The bench stage: every measurement on every device, the summary against the targets, the printed
table, and `main` (argv -> results JSON + table -> exit code)."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from cachemedicpp.bench.measure import bench_decode, bench_defense_overhead, bench_eval, bench_train
from cachemedicpp.bench.memory_probe import bench_memory, probe
from cachemedicpp.bench.settings import (decode_variants, FORMAT, MEASUREMENTS, TARGETS, Settings, load_lm,
                                         machine_info, parse_args, settings_from_args)
from cachemedicpp.cli import guarded, setup_logging
from cachemedicpp.fileio import atomic_write_json

log = logging.getLogger("cachemedicpp")


def run_device(s: Settings, device: str) -> dict:
    dev_res: dict[str, Any] = {}
    lm = load_lm(s, device)
    dev_res["load_sec"] = lm.load_seconds
    if "train_step" in s.only:
        log.info("[%s] train step vs bare step (%d reps)", device, s.reps)
        dev_res["train_step"] = bench_train(s, lm)
    if "eval_grid" in s.only:
        log.info("[%s] eval grid vs bare forwards (%d reps)", device, s.eval_reps or s.reps)
        dev_res["eval_grid"] = bench_eval(s, lm)
    if "defense_overhead" in s.only:
        log.info("[%s] defense overhead vs no_defense, checksum_recompute included (%d reps)", device,
                 s.eval_reps or s.reps)
        dev_res["defense_overhead"] = bench_defense_overhead(s, lm)
    if "decode" in s.only:
        log.info("[%s] decode at lengths %s (%d reps x %d tokens)", device, s.lengths, s.reps, s.decode_tokens)
        dev_res["decode"] = bench_decode(s, lm)
    if "memory" in s.only and s.memory != "off":
        log.info("[%s] peak memory (%s)", device, s.memory)
        if s.memory == "subprocess" and device != "cpu":
            s = Settings(**{**asdict(s), "memory": "inprocess"})  # CUDA peak stats are exact in process
        dev_res["memory"] = bench_memory(s, device, lm)
    del lm
    gc.collect()
    return dev_res


def run(s: Settings) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"format": FORMAT, "created_unix": time.time(), "machine": machine_info(),
                               "settings": asdict(s), "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}}
    per_device = {d: run_device(s, d) for d in s.devices}
    for key in MEASUREMENTS:
        results[key] = {d: r[key] for d, r in per_device.items() if key in r}
    results["load_sec"] = {d: r["load_sec"] for d, r in per_device.items()}
    results["summary"] = summary(results)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_sec"] = time.perf_counter() - t0
    return results


def summary(results: dict) -> dict:
    out: dict[str, Any] = {}
    for dev, r in results.get("train_step", {}).items():
        out.setdefault(dev, {})["train_step"] = r.get("ratio")
    for dev, r in results.get("eval_grid", {}).items():
        out.setdefault(dev, {})["eval_grid"] = r.get("ratio")
    for dev, r in results.get("defense_overhead", {}).items():
        rc = r["defenses"].get("checksum_recompute")
        if rc is not None:
            out.setdefault(dev, {})["checksum_recompute_wall_ratio"] = rc.get("wall_ratio_vs_no_defense")
    for dev, r in results.get("decode", {}).items():
        for length, row in r["lengths"].items():
            for v, x in row["ratios"].items():
                out.setdefault(dev, {})[f"decode_{v}@{length}"] = x
            rs, st, tg = (row["ratios"].get(v) for v in ("repair", "stock", "stock_tagged"))
            if rs is not None and st:
                # none/repair over none/stock = stock time / repair time: the repair against the model as users run it
                out.setdefault(dev, {})[f"decode_repair_vs_stock@{length}"] = rs / st
            if tg is not None and st:  # writing integrity tags as blocks complete, against the stock model
                out.setdefault(dev, {})[f"decode_tags_vs_stock@{length}"] = tg / st
            if "tags" in row:
                out.setdefault(dev, {})[f"tags_verify_vs_prefill@{length}"] = row["tags"]["verify_vs_prefill"]
    for dev, vals in out.items():
        met = {}
        for k, x in vals.items():
            base = k.split("@")[0] if k.startswith(("decode_repair@", "decode_repair_vs_stock@",
                                                    "decode_tags_vs_stock@")) else k
            if base in TARGETS and x is not None:
                op, target = TARGETS[base]
                met[k] = bool(x <= target) if op == "<=" else bool(x >= target)
        vals["meets_target"] = met
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu_model']} | nproc {m['nproc']} | torch threads {m['torch_threads']} | "
             f"torch {m['torch']} | transformers {m['transformers']} | gpu {m['gpu_name'] or '-'} | "
             f"loadavg {m['loadavg_start'][0]:.1f} -> {m.get('loadavg_end', [float('nan')])[0]:.1f} | "
             f"OMP_WAIT_POLICY {m['omp_wait_policy']['value'] or 'default'}"]
    for dev, r in results.get("train_step", {}).items():
        lines.append(f"[{dev}] train step: {_fmt(r['median_train_step_sec'])} s vs bare {_fmt(r['median_bare_step_sec'])} s"
                     f"  ratio {_fmt(r['ratio'])} (target <= 1.15; CPU-time ratio {_fmt(r.get('cpu_time_ratio'))})")
    for dev, r in results.get("eval_grid", {}).items():
        lines.append(f"[{dev}] eval grid: {_fmt(r.get('median_grid_sec'))} s vs bare {_fmt(r.get('median_bare_sec'))} s"
                     f"  ratio {_fmt(r.get('ratio'))} (target <= 1.3; CPU-time ratio {_fmt(r.get('cpu_time_ratio'))};"
                     f" vs computed cells only {_fmt(r.get('ratio_vs_computed_cells'))})  [{r.get('cells', '?')} cells]")
        if "end_to_end" in r:
            e = r["end_to_end"]
            lines.append(f"  eval.run end to end on the same grid: {_fmt(e['wall_sec'], '.1f')} s "
                         f"({_fmt(e['ratio_vs_bare'], '.2f')}x the bare forwards; model load and files included)")
    for dev, r in results.get("defense_overhead", {}).items():
        lines += _defense_table(dev, r)
    for dev, r in results.get("decode", {}).items():
        lines += _decode_table(dev, r)
    for dev, r in results.get("memory", {}).items():
        lines.append(f"[{dev}] peak memory above the pre-unit resident set (MiB):")
        for name, res in r.items():
            extra = f"  (+{_fmt(res['extra_vs_none_mib'], '.1f')} vs none)" if "extra_vs_none_mib" in res else ""
            note = res.get("error", "")
            lines.append(f"  {name:<22} {_fmt(res.get('peak_delta_mib'), '.1f'):>8}  "
                         f"peak {_fmt(res.get('peak_mib'), '.0f'):>6}{extra} {note}")
    return "\n".join(lines)


def _defense_table(dev: str, r: dict) -> list[str]:
    c = r["cell"]
    lines = [f"[{dev}] defense overhead ({c['corruption_type']} at eps {c['epsilon']:g}, {r['reps']} reps x "
             f"{len(r['examples'])} examples; wall time relative to no_defense):",
             f"  {'defense':<20} {'wall s':>8} {'tokens/s':>9} {'x no_def':>8}  recomputed"]
    for d, row in r["defenses"].items():
        re = "-"
        if "recompute_tokens" in row:
            re = (f"{row['recompute_tokens']} tokens ({_fmt(row.get('recompute_tokens_per_run'), '.0f')}/run), "
                  f"{_fmt(row.get('recompute_sec'), '.3f')} s ({_fmt(row.get('recompute_share_of_wall'), '.0%')} of wall)")
        lines.append(f"  {d:<20} {_fmt(row['wall_sec']):>8} {_fmt(row.get('tokens_per_sec'), '.1f'):>9} "
                     f"{_fmt(row.get('wall_ratio_vs_no_defense'), '.2f'):>8}  {re}")
    return lines


def _decode_table(dev: str, r: dict) -> list[str]:
    variants = decode_variants(r.get("family", "A"))
    lines = [f"[{dev}] decode tokens/s (wall-time ratio to none; repair target >= 0.95); CPU-time ratios below; "
             f"operator: {r.get('operator', 'stand-in (random windows)')}, prefill: {r.get('prefill', 'random')}:",
             f"  {'length':>7} " + " ".join(f"{v:>16}" for v in variants)]
    for length, row in r["lengths"].items():
        cells = []
        for v in variants:
            tps = row["tokens_per_sec"][v]
            rat = row["ratios"].get(v)
            cells.append(f"{_fmt(tps, '.1f'):>7} ({_fmt(rat, '.3f') if v != 'none' else '1':>6})")
        lines.append(f"  {length:>7} " + " ".join(f"{c:>16}" for c in cells))
        cpu = row.get("cpu_time_ratios", {})
        lines.append(f"  {'cpu':>7} " + " ".join(f"{'':>16}" if v == "none" else f"{'(' + _fmt(cpu.get(v)) + ')':>16}"
                                                  for v in variants))
        st, tg, t = row["ratios"].get("stock"), row["ratios"].get("stock_tagged"), row.get("tags")
        if tg is not None and st:
            lines.append(f"  {'':>7} integrity tags written while decoding: {_fmt(tg / st)} of stock (target >= 0.97)"
                         + (f"; verifying all {t['tags']} tags {_fmt(t['verify_sec'], '.4f')} s = "
                            f"{_fmt(t['verify_vs_prefill'])} of the prefill they spare" if t else ""))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    setup_logging()
    if a.probe:
        return guarded(lambda: _probe_main(a.probe))

    def go() -> int:
        results = run(settings_from_args(a))
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        print(table(results))
        print(f"results: {out}")
        return 0

    return guarded(go)


def _probe_main(payload: str) -> int:
    """The subprocess side of `memory_probe.probe_subprocess`: one measurement, printed as a JSON line."""
    p = json.loads(payload)
    s = Settings(**p["settings"])
    if s.threads:
        torch.set_num_threads(s.threads)
    print(json.dumps(probe(p["spec"], s, p["device"])), flush=True)
    return 0
