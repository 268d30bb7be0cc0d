"""Peak memory, measured one way everywhere (train logs, eval overhead, bench).

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) since `reset_peak`.
CPU (Linux): the kernel's peak resident set (`VmHWM`) since `reset_peak`, which moves the peak mark down
to the current RSS through `/proc/self/clear_refs`; where that file cannot be written (old kernels,
other systems) the peak is the process-lifetime `ru_maxrss`, and `method()` says so. Every recorded
peak carries the text of `method()` beside it.
"""

from __future__ import annotations

import ctypes
import re
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak window; False where the CPU peak mark cannot be reset (peak is then lifetime)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(device: torch.device) -> float:
    """Peak memory in MiB since the last `reset_peak` (lifetime where no reset was possible)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = _status_kib()
    return status["VmHWM"] / 1024 if "VmHWM" in status else maxrss_kib() / 1024


def method(device: torch.device, reset: bool = True) -> str:
    """How `peak_mib` measured on this device, for the record beside the number."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated since torch.cuda.reset_peak_memory_stats"
    if reset:
        return "peak RSS (VmHWM) since the peak mark was reset via /proc/self/clear_refs"
    return "peak RSS of the whole process so far (ru_maxrss; the peak mark could not be reset)"


def rss_kib() -> tuple[int, int]:
    """(peak RSS since the last reset, current RSS) in KiB, from /proc/self/status."""
    status = _status_kib()
    return status["VmHWM"], status["VmRSS"]


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB


def pin_mmap_threshold() -> bool:
    """Make glibc serve large blocks by mmap and unmap them on free (no dynamic threshold), so the RSS
    follows the live tensors instead of a heap that keeps freed memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 65536))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _status_kib() -> dict[str, int]:
    try:
        text = _STATUS.read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(Vm\w+):\s+(\d+)\s+kB", text, re.M)}
