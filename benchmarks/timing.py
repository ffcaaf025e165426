"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def time_call(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1,
              reduce: Callable = statistics.median) -> float:
    """Seconds per call of ``fn`` (``reduce`` of ``repeats`` timed calls after ``warmup``
    untimed ones), synchronising CUDA around each."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return reduce(times)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_mb() -> float:
    """This process's resident memory now (Linux)."""
    return _status_mb("VmRSS")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's resident high-water mark
    (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA memory allocated, or the process's resident
    high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _status_mb("VmHWM")


def peak_growth_mb(fn: Callable[[], object], device: torch.device) -> float:
    """How much memory one call of ``fn`` adds at its peak over what was in use before it
    (CUDA: allocated; CPU: resident)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device) / 2 ** 20
    else:
        base = rss_mb()
    reset_peak_memory(device)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_memory_mb(device) - base
