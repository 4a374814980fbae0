"""Hardware ceilings measured in the same run as the kernels they judge.

- copy: a large device-to-device copy, counting read + write bytes (the bound of element-wise and
  norm kernels, which are memory-bound);
- matmul: an 8192^3 bf16 matmul (the bound of GEMMs and attention).
On the CPU both are measured at small sizes in float32 so that the ratios printed there are at
least self-consistent; they say nothing about a GPU.
"""
from __future__ import annotations

import torch

from .timing import gbps, tflops, time_fn

__all__ = ["measure_ceilings"]


def measure_ceilings(device, copy_bytes: int | None = None, matmul_n: int | None = None, repeats: int = 10) -> dict:
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    copy_bytes = copy_bytes or (4 * 1024**3 if on_gpu else 64 * 1024**2)
    matmul_n = matmul_n or (8192 if on_gpu else 512)
    dtype = torch.bfloat16 if on_gpu else torch.float32

    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_t = time_fn(lambda: dst.copy_(src), warmup=3, repeats=repeats, device=device)
    del src, dst

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype, generator=g)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype, generator=g)
    mm_t = time_fn(lambda: a @ b, warmup=3, repeats=repeats, device=device)
    del a, b
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "device": str(device),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_t.median_ms,
        "copy_gbps": gbps(2 * copy_bytes, copy_t.median_ms),  # read + write
        "matmul_n": matmul_n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_ms": mm_t.median_ms,
        "matmul_tflops": tflops(2 * matmul_n**3, mm_t.median_ms),
    }
