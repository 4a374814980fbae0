"""Every kernel case (subject, reference, peers) as a pytest-benchmark, one test per implementation.

GPU: real shapes (480p and 720p; LONGCAT_BENCH_SIZES=480p to narrow), bf16, each round ends with
torch.cuda.synchronize() so the wall clock covers the kernel. CPU: the tiny shapes. Inputs rotate
between rounds; extra_info carries TFLOP/s or GB/s, peak memory and the error against the reference.
"""
import itertools
import os

import pytest
import torch

from longcat.bench.cases import build_cases, kernel_path

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SIZES = os.environ.get("LONGCAT_BENCH_SIZES", "").split(",") if os.environ.get("LONGCAT_BENCH_SIZES") else None
if not ON_GPU:
    SIZES = ["cpu-tiny"]
# Attention at 720p takes ~1 s a call: fewer rounds there keep the whole suite within minutes.
ROUNDS = {"attention": 3, "default": 10} if ON_GPU else {"attention": 2, "default": 2}
# CPU: the torch.compile peers would spend minutes compiling for a functional run; off there.
CASES = build_cases(DEVICE, sizes=SIZES, use_compile=ON_GPU)
PARAMS = [pytest.param(case, impl, id=f"{case.op}-{case.label}-{impl.name}") for case in CASES for impl in case.impls]

_outputs = {}


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,impl", PARAMS)
def test_kernel(benchmark, case, impl):
    if impl.unavailable or impl.fn is None:
        pytest.skip(f"{impl.name}: {impl.unavailable or 'not available'}")
    sets = [case.make_inputs(i) for i in range(case.input_sets)]
    prepared = [impl.prepare(s) for s in sets] if impl.prepare else sets
    cycle = itertools.cycle(prepared)

    def run():
        with torch.no_grad():
            out = impl.fn(*next(cycle))
        _sync()
        return out

    run()  # compile / autotune outside the measurement
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    rounds = ROUNDS["attention"] if case.op.startswith("attention") else ROUNDS["default"]
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(op=case.op, shape=case.label, impl=impl.name, role=impl.role, device=str(DEVICE),
                path=kernel_path(DEVICE) if impl.role == "subject" else "pytorch", params=case.params)
    if case.flops:
        info["tflops"] = case.flops / median_s / 1e12
    if case.nbytes:
        info["gbps"] = case.nbytes / median_s / 1e9
    if ON_GPU:
        info["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    with torch.no_grad():
        out = impl.fn(*prepared[0])
    if impl.output is not None:
        out = impl.output(out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    assert torch.isfinite(out.float()).all(), f"{impl.name} produced non-finite values"
    if case.error_metric == "max_abs" and impl.role == "reference":
        _outputs[(case.op, case.label)] = out.float().cpu()
    ref = _outputs.get((case.op, case.label))
    if ref is not None and impl.role != "reference" and case.error_metric == "max_abs":
        info["max_abs_err_vs_reference"] = float((out.float().cpu() - ref).abs().max())
