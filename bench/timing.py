"""Timing: CUDA events on a GPU, perf_counter on the CPU; warm-up, then the median of repeats.

``time_fn`` can rotate among several input sets so repeated calls do not measure a warm L2 cache.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

__all__ = ["TimingResult", "time_fn"]


@dataclass
class TimingResult:
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    repeats: int
    warmup: int
    clock: str  # "cuda_event" or "perf_counter"
    times_ms: List[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[..., Any],
    inputs: Optional[Sequence[tuple]] = None,
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: Optional[torch.device | str] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> TimingResult:
    """Time ``fn(*inputs[i % len(inputs)])`` (or ``fn()``) ``repeats`` times after ``warmup`` calls.

    device: where the work runs; CUDA work is timed with events around each call, CPU work with
    perf_counter. Defaults to CUDA when available.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    sets = list(inputs) if inputs else [()]

    def call(i: int):
        return fn(*sets[i % len(sets)])

    for i in range(warmup):
        call(i)
    _sync(device)
    times: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            call(warmup + i)
            ends[i].record()
            if progress:
                progress(i + 1)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        clock = "cuda_event"
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            call(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
            if progress:
                progress(i + 1)
        clock = "perf_counter"
    return TimingResult(
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        min_ms=min(times),
        max_ms=max(times),
        stdev_ms=statistics.stdev(times) if len(times) > 1 else 0.0,
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        times_ms=times,
    )


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else math.nan


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else math.nan
