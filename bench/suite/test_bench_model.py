"""One DiT denoising step as a pytest-benchmark: reference ops (SDPA) and, when available,
``longcat.accelerate`` (bf16 + BSA + fused kernels).

CPU: the tiny preset. GPU: the small preset at the 480p latent grid by default (minutes matter in a
GPU session); LONGCAT_BENCH_FULL_MODEL=1 runs the 13.6B model instead.
"""
import os

import pytest
import torch

import longcat
from longcat.bench.models import build_random_model, random_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if ON_GPU:
    PRESET = "longcat-video" if os.environ.get("LONGCAT_BENCH_FULL_MODEL") == "1" else "small"
    LATENT, DTYPE = (24, 60, 104), torch.bfloat16
else:
    PRESET, LATENT, DTYPE = "tiny", (2, 4, 6), torch.float32


@pytest.mark.parametrize("config", ["reference", "accelerated"])
def test_model_step(benchmark, config):
    model = build_random_model(PRESET, dtype=DTYPE, device=DEVICE, seed=0)
    if config == "reference":
        model.set_ops(longcat.SDPA_OPS)
    else:
        accelerate = getattr(longcat, "accelerate", None)
        if accelerate is None:
            pytest.skip("longcat.accelerate not available yet")
        accelerate(model, attention="auto", fused=True, bsa=True)
    x, t, y, mask = random_inputs(model, 1, LATENT, 32, DEVICE, seed=1)

    def step():
        with torch.no_grad():
            out = model(x, t, y, mask)
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    step()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(step, rounds=3 if ON_GPU else 1, iterations=1, warmup_rounds=0)
    assert torch.isfinite(out).all()
    benchmark.extra_info.update(preset=PRESET, latent=list(LATENT), dtype=str(DTYPE)[6:], config=config, device=str(DEVICE))
    if ON_GPU:
        benchmark.extra_info["peak_bytes"] = int(torch.cuda.max_memory_allocated())
