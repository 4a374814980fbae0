"""pytest-benchmark suite of the toolkit: ``pytest bench/ --benchmark-only``.

On a GPU the benchmarks run at the real LongCat-Video shapes (bf16) with CUDA-synchronised timing;
without one, at tiny shapes with the Triton kernels in the CPU interpreter (which must be switched
on here, before anything imports triton).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the GPU (pytest-benchmark records only the CPU) and the versions that matter."""
    from longcat.bench.machine import machine_info as longcat_machine_info

    info = longcat_machine_info()
    machine_info["gpu"] = info.get("gpu")  # None on a CPU run (tiny shapes, Triton interpreter)
    for key in ("driver", "torch", "triton", "cuda_runtime", "commit", "triton_interpret", "compute_capability"):
        if key in info:
            machine_info[key] = info[key]


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"longcat benchmarks: GPU {torch.cuda.get_device_name(0)}, real shapes, CUDA-synchronised timing"
    return ("longcat benchmarks: NO CUDA GPU - tiny shapes on the CPU (Triton interpreter); "
            "a functional run, not a performance measurement")
