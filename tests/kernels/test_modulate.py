"""LayerNorm-modulate (adaLN) and its quantizing variant against the float64 reference."""
import pytest
import torch

from longcat.kernels import _runtime
from longcat.kernels import modulate as mod
from longcat.kernels.modulate import (
    layer_norm_modulate,
    layer_norm_modulate_quant,
    layer_norm_modulate_quant_reference,
    layer_norm_modulate_reference,
)
from longcat.kernels.quantize_activations import AMAX_EPS, QMAX, quantize_per_token
from oracle import assert_by_rule, max_abs_err

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(gen, B=2, T=3, L=7, C=200, dtype=torch.float32, device="cpu", variant="mod"):
    x = (torch.randn(B, T * L, C, generator=gen) * 2 + 0.5).to(dtype)
    shift = scale = weight = bias = None
    if variant in ("mod", "both"):
        # distinct per frame: a wrong frame broadcast fails the comparison
        shift = torch.randn(B, T, C, generator=gen) + torch.arange(T).view(1, T, 1)
        scale = 0.5 * torch.randn(B, T, C, generator=gen) - 0.3 * torch.arange(T).view(1, T, 1)
    if variant in ("affine", "both"):
        weight = (1 + 0.5 * torch.randn(C, generator=gen)).to(dtype)
        bias = (0.5 * torch.randn(C, generator=gen)).to(dtype)
    return [t.to(device) if t is not None else None for t in (x, shift, scale, weight, bias)]


def _f64(ts):
    return [t.double() if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["mod", "affine", "both"])
@pytest.mark.parametrize("T,L", [(3, 7), (1, 5)])
def test_layer_norm_modulate_matches_oracle(gen, dtype, variant, T, L):
    ins = _inputs(gen, T=T, L=L, dtype=dtype, variant=variant)
    before = [t.clone() if t is not None else None for t in ins]
    out = layer_norm_modulate(*ins)
    assert out.dtype == dtype and out.shape == ins[0].shape
    oracle = layer_norm_modulate_reference(*_f64(ins))
    assert_by_rule(out, layer_norm_modulate_reference(*ins), oracle, atol=ATOL[dtype])
    for a, b in zip(ins, before):  # inputs untouched
        assert a is None or torch.equal(a, b)


def test_layer_norm_modulate_out_dtype_float32(gen):
    x, shift, scale, _, _ = _inputs(gen, dtype=torch.float16)
    out = layer_norm_modulate(x, shift, scale, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    oracle = layer_norm_modulate_reference(*_f64([x, shift, scale]))
    lowp = layer_norm_modulate_reference(x, shift, scale, out_dtype=torch.float32)
    assert_by_rule(out, lowp, oracle, atol=1e-5)
    assert max_abs_err(out, oracle) < 1e-4  # not rounded to float16 on the way


def test_layer_norm_modulate_strided_modulation(gen):
    # shift/scale as chunks of one [B, T, 2C] adaLN output (non-contiguous views)
    x, _, _, _, _ = _inputs(gen)
    ada = torch.randn(2, 3, 400, generator=gen)
    shift, scale = ada.chunk(2, dim=-1)
    out = layer_norm_modulate(x, shift, scale)
    assert_by_rule(out, layer_norm_modulate_reference(x, shift, scale), layer_norm_modulate_reference(*_f64([x, shift, scale])))


@pytest.mark.parametrize("variant", ["mod", "affine", "both"])
def test_layer_norm_modulate_grads(gen, variant):
    ins = _inputs(gen, T=2, L=5, C=96, variant=variant)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in ins]
    out = layer_norm_modulate(*leaves)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    lowp_leaves = [t.clone().requires_grad_() if t is not None else None for t in ins]
    lowp = torch.autograd.grad(layer_norm_modulate_reference(*lowp_leaves), [t for t in lowp_leaves if t is not None], grad)
    o_leaves = [t.double().requires_grad_() if t is not None else None for t in ins]
    oracle = torch.autograd.grad(layer_norm_modulate_reference(*o_leaves), [t for t in o_leaves if t is not None], grad.double())
    for g, lg, og in zip(got, lowp, oracle):
        assert g.shape == og.shape
        assert_by_rule(g, lg, og, atol=1e-5)


def test_layer_norm_modulate_gradcheck_shapes_fp16(gen):
    x, shift, scale, _, _ = _inputs(gen, T=2, L=3, C=40, dtype=torch.float16)
    xl = x.clone().requires_grad_()
    out = layer_norm_modulate(xl, shift, scale)
    out.float().sum().backward()
    assert xl.grad.dtype == torch.float16 and torch.isfinite(xl.grad).all()


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("variant", ["mod", "affine"])
def test_layer_norm_modulate_quant(gen, qdtype, variant):
    x, shift, scale, weight, bias = _inputs(gen, dtype=torch.float16, variant=variant)
    q, s = layer_norm_modulate_quant(x, shift, scale, weight, bias, qdtype=qdtype)
    assert q.dtype == qdtype and q.shape == x.shape and s.dtype == torch.float32 and s.shape == x.shape[:2]
    q_ref, s_ref = layer_norm_modulate_quant_reference(x, shift, scale, weight, bias, qdtype=qdtype)
    y64 = layer_norm_modulate_reference(*_f64([x, shift, scale, weight, bias]))
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.double(), y64.abs().amax(-1) / qmax, rtol=1e-5, atol=0)
    deq = q.double() * s.double().unsqueeze(-1)
    if qdtype == torch.int8:
        # float32 rounding may flip a value sitting on a .5 boundary: at most one step
        assert (q.int() - q_ref.int()).abs().max().item() <= 1
        assert ((q.int() - q_ref.int()) != 0).float().mean().item() < 0.01
        assert (deq - y64).abs().max().item() <= 0.5001 * s.double().max().item() + 1e-6
    else:
        # fp8 e4m3 has 3 mantissa bits: relative step 2**-3, so half a step is 2**-4 (the kernel
        # rounds to e4m3 itself: exact in the interpreter too)
        err = (deq - y64).abs()
        bound = 2.0**-4 * y64.abs() * 1.0001 + 2.0**-10 * s.double().unsqueeze(-1) * 1.0001
        assert (err <= bound + 1e-7).all(), (err - bound).max().item()
        differ = (q.float() != q_ref.float()).float().mean().item()
        assert differ <= 0.01, differ


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_layer_norm_modulate_quant_zero_row(gen, qdtype):
    x = torch.randn(1, 6, 40, generator=gen)
    x[0, 2] = 3.0  # a constant row normalises to exactly 0
    q, s = layer_norm_modulate_quant(x, qdtype=qdtype)
    assert s[0, 2].item() == (torch.tensor(AMAX_EPS) / QMAX[qdtype]).item() and (q[0, 2].float() == 0).all()
    assert (s[0, torch.arange(6) != 2] > 1e-6).all()


def test_bad_inputs(gen):
    x, shift, scale, weight, bias = _inputs(gen, variant="both")
    with pytest.raises(ValueError, match="shift must have shape"):
        layer_norm_modulate(x, shift[..., :-1], scale[..., :-1])
    with pytest.raises(ValueError, match="does not divide"):
        layer_norm_modulate(x[:, :20], shift, scale)
    with pytest.raises(TypeError, match="shift has dtype float16"):
        layer_norm_modulate(x, shift.half(), scale)
    with pytest.raises(TypeError, match="x has dtype int32"):
        layer_norm_modulate(x.int(), shift, scale)
    with pytest.raises(ValueError, match="scale must have the shape of shift"):
        layer_norm_modulate(x, shift, scale[:, :1])
    with pytest.raises(ValueError, match="together"):
        layer_norm_modulate(x, shift, None)
    with pytest.raises(ValueError, match="weight must have last dimension"):
        layer_norm_modulate(x, weight=weight[:-1])
    with pytest.raises(ValueError, match="same device"):
        layer_norm_modulate(x, shift.to("meta"), scale.to("meta"))
    with pytest.raises(TypeError, match="qdtype"):
        layer_norm_modulate_quant(x, shift, scale, qdtype=torch.float16)


def test_fallback_without_triton(gen, monkeypatch):
    monkeypatch.setattr(mod, "triton_runs_on", lambda *t: False)
    monkeypatch.setattr(_runtime, "_WARNED", set())
    x, shift, scale, _, _ = _inputs(gen)
    with pytest.warns(RuntimeWarning, match="layer_norm_modulate"):
        out = layer_norm_modulate(x, shift, scale)
    assert torch.equal(out, layer_norm_modulate_reference(x, shift, scale))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mod", "affine"])
def test_layer_norm_modulate_bf16_real_width(gen, variant):
    ins = _inputs(gen, B=2, T=3, L=331, C=4096, dtype=torch.bfloat16, device="cuda", variant=variant)
    out = layer_norm_modulate(*ins)
    assert_by_rule(out, layer_norm_modulate_reference(*ins), layer_norm_modulate_reference(*_f64(ins)), atol=ATOL[torch.bfloat16])
    q, s = layer_norm_modulate_quant(*ins, qdtype=torch.int8)
    q_ref, s_ref = layer_norm_modulate_quant_reference(*ins, qdtype=torch.int8)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (q.int() - q_ref.int()).abs().max().item() <= 1
    qf, sf = layer_norm_modulate_quant(*ins, qdtype=torch.float8_e4m3fn)
    qf_ref, _ = layer_norm_modulate_quant_reference(*ins, qdtype=torch.float8_e4m3fn)
    assert ((qf.float() - qf_ref.float()).abs() > 0).float().mean().item() < 0.01
    # one rounding rule: the fused kernel's codes are quantize_per_token of its own float32 output
    y32 = layer_norm_modulate(*ins, out_dtype=torch.float32)
    for qdtype, (qq, ss) in ((torch.int8, (q, s)), (torch.float8_e4m3fn, (qf, sf))):
        q2, s2 = quantize_per_token(y32, qdtype)
        assert torch.equal(ss, s2) and torch.equal(qq.view(torch.uint8), q2.view(torch.uint8))
