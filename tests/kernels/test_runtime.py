"""longcat.kernels._runtime: where a Triton kernel runs, bfloat16 under the CPU interpreter (which
computes it wrongly), and the one fallback warning per process."""
import logging
import warnings

import pytest
import torch

from longcat.kernels import _runtime
from longcat.kernels.attention import dense_attention, dense_attention_reference
from longcat.kernels.modulate import layer_norm_modulate
from longcat.kernels.quant_gemm import weight_only_linear, weight_only_linear_reference
from longcat.kernels.rope import rms_norm
from longcat.kernels.swiglu import swiglu, swiglu_reference
from oracle import assert_by_rule

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _runtime.interpreter_enabled(),
    reason="checks the CPU interpreter path",
)


@needs_interpreter
def test_triton_runs_on_refuses_bf16_under_the_interpreter():
    x = torch.zeros(2, 3)
    assert _runtime.triton_runs_on(x, None)
    assert not _runtime.triton_runs_on(x, x.bfloat16())
    assert not _runtime.triton_runs_on(x, x.to("meta"))


@needs_interpreter
def test_bf16_through_the_kernels_gives_the_reference_numbers(gen, monkeypatch):
    # The interpreter's bf16 tl.dot multiplies raw bit patterns (errors ~5e8): such calls must
    # take the reference path, with one warning saying why.
    monkeypatch.setattr(_runtime, "_WARNED", set())
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    oracle = dense_attention_reference(q.double(), k.double(), v.double())
    bf = [t.bfloat16() for t in (q, k, v)]
    with pytest.warns(RuntimeWarning, match="cannot compute in bfloat16"):
        out = dense_attention(*bf)
    assert out.dtype == torch.bfloat16
    assert_by_rule(out, dense_attention_reference(*bf), oracle, atol=1e-2)

    x = torch.randn(5, 32, generator=gen)
    w_q = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(16, generator=gen) * 0.01 + 0.001
    out = weight_only_linear(x.bfloat16(), w_q, w_scale)
    assert_by_rule(out, weight_only_linear_reference(x.bfloat16(), w_q, w_scale),
                   weight_only_linear_reference(x.double(), w_q, w_scale.double()), atol=1e-2)

    a, b = (torch.randn(3, 40, generator=gen) * 3 for _ in range(2))
    assert_by_rule(swiglu(a.bfloat16(), b.bfloat16()), swiglu_reference(a.bfloat16(), b.bfloat16()),
                   swiglu_reference(a.double(), b.double()), atol=1e-2)


def test_fallback_warns_once_per_process_and_logs_each_op(gen, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_runtime, "_WARNED", set())
    x = torch.randn(1, 4, 8, generator=gen)
    mod = torch.randn(1, 2, 8, generator=gen)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="longcat.kernels"):
        warnings.simplefilter("always")
        for _ in range(2):
            swiglu(x, x)
            rms_norm(x, torch.ones(8))
            layer_norm_modulate(x, mod, mod)
    fallback = [w for w in caught if "longcat.kernels" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in fallback]
    assert "no CUDA device" in str(fallback[0].message) and "swiglu" in str(fallback[0].message)
    logged = [r.getMessage() for r in caplog.records if r.name == "longcat.kernels"]
    assert len(logged) == 3 and all(op in " ".join(logged) for op in ("swiglu", "rms_norm", "layer_norm_modulate"))
