"""Timing: wall and CPU seconds of a span, and the two interleaved designs every ratio comes from
(round-robin repetitions, and ABBA blocks against a baseline)."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class Workload:
    """prepare() -> arg (untimed, not counted in memory), run(arg) -> one unit of work."""

    name: str
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    info: dict = field(default_factory=dict)
    self_timed: bool = False  # run() returns the (wall, cpu) seconds that count, excluding its bookkeeping


class Clock:
    """Wall seconds and process CPU seconds (all threads) of a span; CPU time is reported beside wall
    time because it is far less sensitive to other processes competing for the cores."""

    def __init__(self, dev: torch.device):
        self.dev, self.wall, self.cpu = dev, 0.0, 0.0

    @contextlib.contextmanager
    def span(self):
        _sync(self.dev)
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            _sync(self.dev)
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_unit(dev: torch.device, w: Workload) -> tuple[float, float]:
    """(wall, cpu) seconds of one unit of `w`, its prepare() untimed."""
    arg = w.prepare()
    if w.self_timed:
        tw, tc = w.run(arg)
        return float(tw), float(tc)
    clock = Clock(dev)
    with clock.span():
        w.run(arg)
    return clock.wall, clock.cpu


def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return float(a / b) if a is not None and b else None


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den) if b > 0]


def interleaved(dev: torch.device, workloads: Sequence[Workload], reps: int,
                warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, cpu) seconds per unit for each workload, run round-robin after warm-up; the order rotates
    every repetition so no workload always runs first (or right after the same neighbour)."""
    for _ in range(warmup):
        for w in workloads:
            w.run(w.prepare())
    wall: dict[str, list[float]] = {w.name: [] for w in workloads}
    cpu: dict[str, list[float]] = {w.name: [] for w in workloads}
    for r in range(reps):
        for w in _rotated(workloads, r):
            tw, tc = timed_unit(dev, w)
            wall[w.name].append(tw)
            cpu[w.name].append(tc)
        gc.collect()
    return wall, cpu


def abba(dev: torch.device, base: Workload, others: Sequence[Workload], reps: int) -> dict:
    """Each of `others` timed against `base` in ABBA blocks (base, x, x, base; then x, base, base, x),
    so a drift in machine speed cancels within a block. One ratio per block and workload:
    base time / x time (a throughput ratio). Returns raw (wall, cpu) run times and the ratios."""
    for w in (base, *others):  # warm-up
        w.run(w.prepare())
    res = {w.name: {"wall": [], "cpu": []} for w in (base, *others)}
    ratios = {w.name: {"wall": [], "cpu": []} for w in others}
    for r in range(reps):
        for x in _rotated(others, r):
            order = (base, x, x, base) if r % 2 == 0 else (x, base, base, x)
            sums = {base.name: [0.0, 0.0], x.name: [0.0, 0.0]}
            for w in order:
                tw, tc = timed_unit(dev, w)
                res[w.name]["wall"].append(tw)
                res[w.name]["cpu"].append(tc)
                sums[w.name][0] += tw
                sums[w.name][1] += tc
            ratios[x.name]["wall"].append(sums[base.name][0] / sums[x.name][0])
            ratios[x.name]["cpu"].append(sums[base.name][1] / sums[x.name][1])
        gc.collect()
    return {"runs": res, "ratios": ratios}


def _rotated(items: Sequence, r: int) -> list:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])
