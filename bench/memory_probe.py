"""Peak memory of one call, shared by the bench scripts (imported as a sibling module).

On CUDA: the allocator's peak above what was allocated before. On CPU: the resident set, sampled
every millisecond by a thread while the call runs (run the caller with MALLOC_MMAP_THRESHOLD_
low so freed blocks return to the OS and the resident set follows live memory).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(call: Callable[[], T], device: str) -> tuple[int, T]:
    """(peak bytes above the starting point while ``call`` runs, its result)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    before = rss_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes()) - before, result
