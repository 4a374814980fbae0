"""Benchmark harness: timing, memory, machine info and results files, and the ``longcat-bench``
command. Nothing in the package imports ``longcat.bench``."""
from .machine import machine_info
from .memory import MemoryReport, nvml_snapshot, track_memory
from .results import load_results, make_results, write_results
from .timing import TimingResult, gbps, tflops, time_fn

__all__ = [
    "machine_info", "MemoryReport", "nvml_snapshot", "track_memory", "load_results", "make_results",
    "write_results", "TimingResult", "gbps", "tflops", "time_fn",
]
