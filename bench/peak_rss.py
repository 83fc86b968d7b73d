"""Peak resident memory of a call, sampled from a background thread (torch allocations included)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def measure(fn: Callable[[], T], interval: float = 0.005) -> tuple[T, float, float]:
    """(result, seconds, peak RSS above the starting RSS in MiB)."""
    process = psutil.Process()
    start_rss = process.memory_info().rss
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return result, seconds, (peak - start_rss) / 2**20
