"""8-bit GEMMs and per-token activation quantization against their float64 references.

On the CPU the kernels run in the Triton interpreter (fp32/fp16 activations, small grids); bf16,
the real LongCat shapes and timings are under the gpu marker.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import assert_by_rule, assert_meaningful, max_abs_err

from longcat.kernels import quant_gemm as qg
from longcat.kernels.quantize_activations import (
    dequantize_per_token,
    quantize_per_token,
    quantize_per_token_reference,
)

FP8 = torch.float8_e4m3fn
QMAX = {torch.int8: 127.0, FP8: 448.0}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def quant_weight(w, qdtype):
    scale = w.abs().amax(1).clamp_min(1e-12) / QMAX[qdtype]
    v = (w / scale[:, None]).clamp(-QMAX[qdtype], QMAX[qdtype])
    return (v.round().to(torch.int8) if qdtype == torch.int8 else v.to(qdtype)), scale.float()


def lowp_weight_only(x, w_q, scale, bias, swiglu):
    """The same computation done by PyTorch in x's dtype (the error budget of the rule)."""
    w = (w_q.float() * scale[:, None]).to(x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if swiglu:
        a, b = y.chunk(2, -1)
        y = F.silu(a) * b
    return y


def code_step(v, qdtype):
    """Distance to the next code above |v|: 1 for int8, one e4m3 ulp for fp8."""
    if qdtype == torch.int8:
        return torch.ones_like(v)
    e = torch.floor(torch.log2(v.clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


# ---------------------------------------------------------------------------------------------
# quantize_per_token
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("shape", [(37, 80), (1, 80), (2, 5, 33), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_per_token_matches_reference(gen, qdtype, shape, dtype):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero token must not divide by zero
    x_before = x.clone()
    q, s = quantize_per_token(x.to(DEV), qdtype)
    q_ref, s_ref = quantize_per_token_reference(x, qdtype)
    assert q.dtype == qdtype and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(s.cpu(), s_ref)
    # Both round half to even on identical float32 values: bit-exact (fp8 too, see the kernel's rounding).
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(x, x_before)
    # Dequantised values are within half a step of x (fp8: relative half-ulp of e4m3 or its subnormal step).
    deq = dequantize_per_token(q_ref, s_ref, torch.float64)
    err = (deq - x.double()).abs()
    if qdtype == torch.int8:
        assert (err <= s_ref.double().unsqueeze(-1) * (0.5 + 1e-4)).all()
    else:
        bound = torch.maximum(x.double().abs() * 2.0 ** -4, s_ref.double().unsqueeze(-1) * 2.0 ** -10)
        assert (err <= bound + 1e-12).all()


def test_quantize_per_token_extremes(gen):
    x = torch.randn(20, 64, generator=gen)
    x[1] *= 1e-30   # subnormal-sized token
    x[2] *= 1e6
    x[3, 5] = 1e4   # one outlier dominates its token
    for qdtype in (torch.int8, FP8):
        q, s = quantize_per_token(x.to(DEV), qdtype)
        q_ref, s_ref = quantize_per_token_reference(x, qdtype)
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.isfinite(s).all() and (s > 0).all()


def test_quantize_per_token_bad_inputs():
    with pytest.raises(TypeError, match="qdtype"):
        quantize_per_token(torch.randn(4, 8), torch.float16)
    with pytest.raises(TypeError, match="x has dtype"):
        quantize_per_token(torch.randint(0, 3, (4, 8)), torch.int8)
    with pytest.raises(ValueError, match="channel"):
        quantize_per_token(torch.randn(4, 0), torch.int8)


# ---------------------------------------------------------------------------------------------
# W8A16
# ---------------------------------------------------------------------------------------------

SHAPES = [(37, 96, 80), (1, 96, 80), (5, 34, 70), (64, 64, 64), (97, 130, 150)]


@pytest.mark.parametrize("wdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_linear(gen, wdtype, dtype, M, N, K, bias):
    x = torch.randn(M, K, generator=gen).to(dtype)
    w_q, scale = quant_weight(torch.randn(N, K, generator=gen), wdtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    op = qg.int8_weight_only_linear if wdtype == torch.int8 else qg.fp8_weight_only_linear
    assert qg.triton_runs_on(x.to(DEV)), "the kernel must run (GPU or interpreter), not the fallback"
    out = op(x.to(DEV), w_q.to(DEV), scale.to(DEV), None if b is None else b.to(DEV)).cpu()
    assert out.dtype == dtype and out.shape == (M, N)
    oracle = qg.weight_only_linear_reference(x.double(), w_q, scale.double(), None if b is None else b.double())
    assert_by_rule(out, lowp_weight_only(x, w_q, scale, b, False), oracle, atol=1e-4)


@pytest.mark.parametrize("wdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_only_linear_swiglu_and_batch_dims(gen, wdtype, dtype):
    H, K = 40, 72
    x = torch.randn(2, 19, K, generator=gen).to(dtype)
    w_q, scale = quant_weight(torch.randn(2 * H, K, generator=gen) * 0.2, wdtype)
    b = (torch.randn(2 * H, generator=gen) * 0.1).to(dtype)
    out = qg.weight_only_linear(x.to(DEV), w_q.to(DEV), scale.to(DEV), b.to(DEV), swiglu=True).cpu()
    assert out.shape == (2, 19, H)
    oracle = qg.weight_only_linear_reference(x.double(), w_q, scale.double(), b.double(), swiglu=True)
    assert_by_rule(out, lowp_weight_only(x, w_q, scale, b, True), oracle, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# W8A8
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_dynamic_linear(gen, qdtype, M, N, K, out_dtype, swiglu):
    x = torch.randn(M, K, generator=gen) * 2
    x_q, x_scale = quantize_per_token_reference(x, qdtype)
    w_q, scale = quant_weight(torch.randn(N, K, generator=gen) * 0.3, qdtype)
    b = torch.randn(N, generator=gen)
    op = qg.int8_dynamic_linear if qdtype == torch.int8 else qg.fp8_dynamic_linear
    out = op(x_q.to(DEV), x_scale.to(DEV), w_q.to(DEV), scale.to(DEV), b.to(DEV), out_dtype, swiglu=swiglu).cpu()
    assert out.dtype == out_dtype and out.shape == (M, N // 2 if swiglu else N)
    oracle = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, b.double(), torch.float64, swiglu=swiglu)
    # The same math in PyTorch, rounded to out_dtype: the sums are exact, so what remains is the
    # fp32 epilogue and the output rounding.
    lowp = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, b, out_dtype, swiglu=swiglu)
    assert_by_rule(out, lowp, oracle, atol=1e-4)


def test_int8_dynamic_accumulates_exactly_in_int32(gen):
    # Large K with saturated codes: float32 accumulation would drift, int32 is exact.
    M, N, K = 4, 32, 1040
    x_q = torch.full((M, K), 127, dtype=torch.int8)
    x_q[:, ::3] = -127
    w_q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    ones_m, ones_n = torch.ones(M), torch.ones(N)
    out = qg.int8_dynamic_linear(x_q.to(DEV), ones_m.to(DEV), w_q.to(DEV), ones_n.to(DEV), None, torch.float32).cpu()
    exact = (x_q.long() @ w_q.long().t()).double()
    assert_meaningful(exact)
    # Only the final int32 -> float32 conversion rounds (values < 2**24 here are exact).
    assert exact.abs().max() < 2 ** 24
    assert torch.equal(out.double(), exact)


def test_every_output_element_written(gen, monkeypatch):
    """Outputs are allocated poisoned (NaN, or int8 -128, a code the symmetric range never uses)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype == torch.int8:
            t.fill_(-128)
        elif t.dtype == FP8:
            t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        elif t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    x = torch.randn(45, 100, generator=gen).to(DEV)
    for qdtype in (torch.int8, FP8):
        w_q, scale = quant_weight(torch.randn(70, 100, generator=gen), qdtype)
        w_q, scale = w_q.to(DEV), scale.to(DEV)
        x_q, xs = quantize_per_token(x, qdtype)
        assert torch.isfinite(xs).all() and torch.isfinite(x_q.float()).all()
        if qdtype == torch.int8:
            assert (x_q != -128).all()
        assert torch.isfinite(qg.weight_only_linear(x, w_q, scale)).all()
        assert torch.isfinite(qg.dynamic_linear(x_q, xs, w_q, scale, None, torch.float32)).all()
        assert torch.isfinite(qg.dynamic_linear(x_q, xs, w_q, scale, None, torch.float32, swiglu=True)).all()


def test_empty_batch():
    w_q, scale = quant_weight(torch.randn(16, 32), torch.int8)
    out = qg.int8_weight_only_linear(torch.randn(0, 32).to(DEV), w_q.to(DEV), scale.to(DEV))
    assert out.shape == (0, 16)


def test_bad_inputs():
    x = torch.randn(4, 32)
    w_q, scale = quant_weight(torch.randn(16, 32), torch.int8)
    with pytest.raises(TypeError, match="w_q has dtype"):
        qg.int8_weight_only_linear(x, w_q.float(), scale)
    with pytest.raises(TypeError, match="w_q has dtype"):
        qg.fp8_weight_only_linear(x, w_q, scale)
    with pytest.raises(ValueError, match="last dimension K=32"):
        qg.int8_weight_only_linear(torch.randn(4, 31), w_q, scale)
    with pytest.raises(ValueError, match=r"w_scale must have shape \[N=16\]"):
        qg.int8_weight_only_linear(x, w_q, scale[:8])
    with pytest.raises(TypeError, match="w_scale has dtype"):
        qg.int8_weight_only_linear(x, w_q, scale.half())
    with pytest.raises(ValueError, match="bias must have shape"):
        qg.int8_weight_only_linear(x, w_q, scale, torch.randn(15))
    with pytest.raises(ValueError, match="swiglu"):
        qg.int8_weight_only_linear(x, w_q[:15], scale[:15], swiglu=True)
    with pytest.raises(TypeError, match="x has dtype"):
        qg.int8_weight_only_linear(x.double(), w_q, scale)
    x_q, xs = quantize_per_token_reference(x, torch.int8)
    with pytest.raises(TypeError, match="int8_dynamic_linear expects int8"):
        qg.int8_dynamic_linear(x_q.float().to(FP8), xs, w_q, scale)
    with pytest.raises(TypeError, match="w_q has dtype"):
        qg.dynamic_linear(x_q, xs, w_q.float().to(FP8), scale)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        qg.int8_dynamic_linear(x_q, xs[:2], w_q, scale)
    with pytest.raises(TypeError, match="out_dtype"):
        qg.int8_dynamic_linear(x_q, xs, w_q, scale, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="same device"):
        qg.int8_weight_only_linear(x, w_q.to("meta"), scale)


def test_fallback_without_interpreter_uses_reference(gen, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the fallback is the CPU path without the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(5, 32, generator=gen)
    w_q, scale = quant_weight(torch.randn(16, 32, generator=gen), torch.int8)
    out = qg.int8_weight_only_linear(x, w_q, scale)
    assert torch.allclose(out, qg.weight_only_linear_reference(x, w_q, scale))


def test_custom_ops_fake_and_compile(gen):
    x = torch.randn(6, 32, generator=gen)
    w_q, scale = quant_weight(torch.randn(16, 32, generator=gen), torch.int8)
    b = torch.randn(16, generator=gen)
    # Fake (meta) propagation: shapes and dtypes without running anything.
    y = qg.int8_weight_only_linear(x.to("meta"), w_q.to("meta"), scale.to("meta"), b.to("meta"))
    assert y.device.type == "meta" and y.shape == (6, 16) and y.dtype == torch.float32
    xq, xs = quantize_per_token(x.to("meta"), torch.int8)
    assert xq.shape == (6, 32) and xq.dtype == torch.int8 and xs.shape == (6,)
    torch.library.opcheck(torch.ops.longcat.weight_only_linear.default, (x, w_q, scale, b, False),
                          test_utils=("test_schema", "test_faketensor"))
    xq, xs = quantize_per_token_reference(x, torch.int8)
    torch.library.opcheck(torch.ops.longcat.dynamic_linear.default, (xq, xs, w_q, scale, b, torch.float32, False),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x):
        q, s = quantize_per_token(x, torch.int8)
        return qg.int8_dynamic_linear(q, s, w_q, scale, b, torch.float32)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), f(x))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at the real LongCat shapes, and timings
# ---------------------------------------------------------------------------------------------

REAL = [(12288, 4096), (4096, 4096), (8192, 4096), (11008, 4096), (4096, 11008), (24576, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", REAL)
@pytest.mark.parametrize("M", [1, 37, 4096 + 17])
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_gpu_bf16_real_shapes(N, K, M, qdtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w_q, scale = quant_weight(torch.randn(N, K, device="cuda", generator=g) * 0.02, qdtype)
    b = (torch.randn(N, device="cuda", generator=g) * 0.1).bfloat16()
    out = qg.weight_only_linear(x, w_q, scale, b)
    oracle = qg.weight_only_linear_reference(x.double(), w_q, scale.double(), b.double())
    assert_by_rule(out, lowp_weight_only(x, w_q, scale, b, False), oracle, atol=1e-2)
    x_q, xs = quantize_per_token(x, qdtype)
    q_ref, s_ref = quantize_per_token_reference(x, qdtype)
    # GPU division may differ from the reference by an ulp, moving a code by one step on a few values.
    torch.testing.assert_close(xs, s_ref, rtol=1e-6, atol=0)
    assert ((x_q.float() - q_ref.float()).abs() <= code_step(torch.maximum(x_q.float().abs(), q_ref.float().abs()), qdtype)).all()
    out = qg.dynamic_linear(x_q, xs, w_q, scale, b, torch.bfloat16)
    oracle = qg.dynamic_linear_reference(x_q, xs, w_q, scale, b.double(), torch.float64)
    lowp = qg.dynamic_linear_reference(x_q, xs, w_q, scale, b, torch.bfloat16)
    assert_by_rule(out, lowp, oracle, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dynamic", [False, True])
def test_gpu_swiglu_ffn_shape(qdtype, dynamic):
    g = torch.Generator(device="cuda").manual_seed(0)
    M, H, K = 2048 + 5, 11008, 4096
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w_q, scale = quant_weight(torch.randn(2 * H, K, device="cuda", generator=g) * 0.02, qdtype)
    if dynamic:
        x_q, xs = quantize_per_token(x, qdtype)
        out = qg.dynamic_linear(x_q, xs, w_q, scale, None, torch.bfloat16, swiglu=True)
        oracle = qg.dynamic_linear_reference(x_q, xs, w_q, scale, None, torch.float64, swiglu=True)
        lowp = qg.dynamic_linear_reference(x_q, xs, w_q, scale, None, torch.bfloat16, swiglu=True)
    else:
        out = qg.weight_only_linear(x, w_q, scale, swiglu=True)
        oracle = qg.weight_only_linear_reference(x.double(), w_q, scale.double(), swiglu=True)
        lowp = lowp_weight_only(x, w_q, scale, None, True)
    assert out.shape == (M, H)
    assert_by_rule(out, lowp, oracle, atol=1e-2)


@pytest.mark.gpu
def test_gpu_timings_report(capsys):
    """Prints TFLOP/s of every variant against bf16 F.linear at the 480p token count (no assertion on speed)."""
    import triton

    M = 37440
    rows = []
    for N, K in REAL[:5]:
        x = torch.randn(M, K, device="cuda").bfloat16()
        w = torch.randn(N, K, device="cuda") * 0.02
        flops = 2 * M * N * K
        t_bf16 = triton.testing.do_bench(lambda: F.linear(x, w.bfloat16()))
        line = [f"{N}x{K}", f"bf16 {flops / t_bf16 / 1e9:.0f}"]
        for qdtype in (torch.int8, FP8):
            w_q, scale = quant_weight(w, qdtype)
            t_wo = triton.testing.do_bench(lambda: qg.weight_only_linear(x, w_q, scale))
            x_q, xs = quantize_per_token(x, qdtype)
            t_dyn = triton.testing.do_bench(lambda: qg.dynamic_linear(x_q, xs, w_q, scale, None, torch.bfloat16))
            t_q = triton.testing.do_bench(lambda: quantize_per_token(x, qdtype))
            line += [f"{qdtype} W8A16 {flops / t_wo / 1e9:.0f}", f"W8A8 {flops / t_dyn / 1e9:.0f}",
                     f"act-quant {x.numel() * 3 / t_q / 1e6:.0f} GB/s"]
        rows.append("  ".join(line))
    with capsys.disabled():
        print("\nTFLOP/s at M=37440:\n" + "\n".join(rows))


def test_weight_only_backward_gives_input_gradient(gen):
    # LoRA training on a W8A16 base layer needs d(out)/dx; the 8-bit weight itself is frozen.
    x = torch.randn(5, 3, 48, generator=gen, requires_grad=True)
    w_q, scale = quant_weight(torch.randn(40, 48, generator=gen), torch.int8)
    b = torch.randn(40, generator=gen, requires_grad=True)
    g = torch.randn(5, 3, 40, generator=gen)
    qg.int8_weight_only_linear(x.to(DEV), w_q.to(DEV), scale.to(DEV), b.to(DEV)).backward(g.to(DEV))
    w = (w_q.double() * scale.double()[:, None])
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config rule, fp8 accumulation rule, cuBLASLt dispatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [1, 16, 200, 1024, 1025, 37440, 168960])
@pytest.mark.parametrize("swiglu", [False, True])
def test_every_config_a_launcher_can_pick_fits(M, swiglu):
    """The autotuner only ever sees configs that pass the sm_90 resource rule (shared memory and
    accumulator registers), for every M range, epilogue and fp8 accumulation mode."""
    cases = [(qg._W8A8_CONFIGS, 1, promote, 0) for promote in (False, True)]
    cases += [(qg._W8A16_CONFIGS, 2, False, convert) for convert in (2, 4)]  # int8 / e4m3 weight, bf16 x
    for table, x_bytes, promote, convert in cases:
        prune = qg._prune(table, lambda a: x_bytes, lambda a: convert)
        kept = prune([c for _, c in table], {"M": M}, SWIGLU=swiglu, PROMOTE_FP8=promote)
        assert kept, (M, swiglu, promote, convert)
        assert all(qg._fits(c, x_bytes, swiglu, promote, convert) for c in kept)
        assert all(c.kwargs["BLOCK_M"] <= 64 for c in kept) or M > 256
    # Configs autotuning used to keep for the fused SwiGLU GEMM spill on sm_90 (3.4-3.6 KB): rejected.
    assert not qg._fits(qg._cfg(128, 256, 64, 8, 8, 3), 1, True)
    assert not qg._fits(qg._cfg(128, 256, 128, 8, 8, 3), 1, True)
    assert not qg._fits(qg._cfg(128, 256, 128, 8, 8, 3), 1, False, promote_fp8=True)
    # W8A16: the 128x128 SwiGLU pair on 4 warps spills 2.4 KB (8 warps: clean).
    assert not qg._fits(qg._cfg(128, 128, 64, 8, 4, 4), 2, True, weight_convert_bytes=2)
    assert qg._fits(qg._cfg(128, 128, 64, 8, 8, 4), 2, True, weight_convert_bytes=2)


def test_fp8_long_k_takes_the_promoted_accumulation(gen):
    """K above FP8_PROMOTE_ABOVE_K compiles the promoted fp8 dot (max_num_imprecise_acc); ragged K."""
    M, N, K = 5, 48, qg.FP8_PROMOTE_ABOVE_K + 36
    x_q, x_scale = quantize_per_token_reference(torch.randn(M, K, generator=gen), FP8)
    w_q, scale = quant_weight(torch.randn(N, K, generator=gen) * 0.3, FP8)
    out = qg.fp8_dynamic_linear(x_q.to(DEV), x_scale.to(DEV), w_q.to(DEV), scale.to(DEV), None, torch.float32).cpu()
    oracle = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, None, torch.float64)
    lowp = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, None, torch.float32)
    assert_by_rule(out, lowp, oracle, atol=1e-4)


def test_scaled_mm_dispatch(gen):
    """The cuBLASLt path (``torch._scaled_mm`` with row-wise scales and a bias) computes the same
    GEMM as the reference; the rule sends it only plain fp8 GEMMs with a bf16 output on sm_90."""
    M, N, K = 33, 48, 64
    x_q, x_scale = quantize_per_token_reference(torch.randn(M, K, generator=gen), FP8)
    w_q, scale = quant_weight(torch.randn(N, K, generator=gen) * 0.3, FP8)
    b = torch.randn(N, generator=gen).bfloat16()
    out = qg.scaled_mm_linear(x_q, x_scale, w_q, scale, b, torch.bfloat16)
    oracle = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, b.double(), torch.float64)
    lowp = qg.dynamic_linear_reference(x_q, x_scale, w_q, scale, b, torch.bfloat16)
    assert_by_rule(out, lowp, oracle, atol=1e-2)
    assert not qg._prefers_scaled_mm(x_q, w_q, b, torch.bfloat16, False)  # CPU: never
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        xc, wc = x_q.cuda(), w_q.cuda()
        assert qg._prefers_scaled_mm(xc, wc, b.cuda(), torch.bfloat16, False)
        assert not qg._prefers_scaled_mm(xc, wc, None, torch.bfloat16, True)  # SwiGLU: our epilogue
        assert not qg._prefers_scaled_mm(xc, wc, None, torch.float16, False)
