"""The one peak-memory method (cachemedicpp.memory)."""

from __future__ import annotations

import pytest
import torch

from cachemedicpp import memory

CPU = torch.device("cpu")


def test_cpu_peak_mark_reset_follows_the_work():
    # the peak mark is per window (one defense's timed runs), not the process's lifetime peak
    if not memory.reset_peak(CPU):
        pytest.skip("this kernel cannot reset the peak RSS mark")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    high = memory.peak_mib(CPU)
    del big
    assert memory.reset_peak(CPU)
    assert memory.peak_mib(CPU) < high - 32


def test_method_text_says_what_was_measured():
    assert "VmHWM" in memory.method(CPU, reset=True)
    assert "ru_maxrss" in memory.method(CPU, reset=False)
    assert "cuda" in memory.method(torch.device("cuda"))


def test_rss_reads_peak_and_current():
    hwm, rss = memory.rss_kib()
    assert hwm >= rss > 0
    assert memory.maxrss_kib() > 0
