"""The one rounding rule of 8-bit activations: quantize_per_token, the fused LayerNorm-modulate
and residual+norm kernels and their references agree bit for bit."""
import pytest
import torch

from longcat.kernels.modulate import layer_norm_modulate, layer_norm_modulate_quant, layer_norm_modulate_quant_reference
from longcat.kernels.quantize_activations import (
    AMAX_EPS,
    QMAX,
    QuantizedActivations,
    quantize_per_token,
    quantize_per_token_reference,
)
from longcat.kernels.residual import (
    gated_residual_layer_norm,
    gated_residual_layer_norm_quant,
    gated_residual_layer_norm_quant_reference,
)

FP8 = torch.float8_e4m3fn


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_ties_round_half_to_even(qdtype):
    # amax = QMAX makes the scale exactly 1, so v / scale are the values themselves
    qmax = QMAX[qdtype]
    if qdtype == torch.int8:
        ties = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.5, -0.5, 126.5])
        expected = torch.tensor([0, 2, 2, -2, 4, 0, 126], dtype=torch.int8)
    else:
        # midpoints of neighbouring e4m3 values (3 mantissa bits), and of subnormals (step 2**-9)
        ties = torch.tensor([1.0625, 1.1875, -1.0625, 2.0 ** -9 * 1.5, 2.0 ** -9 * 2.5, 416.0])
        expected = torch.tensor([1.0, 1.25, -1.0, 2.0 ** -9 * 2, 2.0 ** -9 * 2, 416.0]).to(FP8)
    x = torch.cat([ties, torch.tensor([qmax])]).unsqueeze(0)
    q, s = quantize_per_token(x, qdtype)
    q_ref, s_ref = quantize_per_token_reference(x, qdtype)
    assert s.item() == 1.0 and s_ref.item() == 1.0
    assert torch.equal(_bits(q[0, :-1]), _bits(expected)), q[0, :-1]
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("C", [40, 300])
def test_fused_norm_kernels_quantize_like_quantize_per_token(gen, qdtype, C):
    """The quantizing kernels' codes and scales are exactly quantize_per_token (and its reference)
    of the same kernel's float32 output: one rule, one rounding."""
    B, T, L = 2, 3, 5
    x = torch.randn(B, T * L, C, generator=gen) * 3 + 1
    y = torch.randn(B, T * L, C, generator=gen)
    gate = torch.randn(B, T, C, generator=gen)
    shift = torch.randn(B, T, C, generator=gen)
    scale = 0.5 * torch.randn(B, T, C, generator=gen)
    q, s = layer_norm_modulate_quant(x, shift, scale, qdtype=qdtype)
    y32 = layer_norm_modulate(x, shift, scale, out_dtype=torch.float32)
    for ref in (quantize_per_token, quantize_per_token_reference):
        q2, s2 = ref(y32, qdtype)
        assert torch.equal(s, s2.cpu()) and torch.equal(_bits(q), _bits(q2.cpu()))
    h, q, s = gated_residual_layer_norm_quant(x, y, gate, shift, scale, qdtype=qdtype)
    h2, _ = gated_residual_layer_norm(x, y, gate, shift, scale)
    assert torch.equal(h, h2)
    # the normed values of the fused kernel in float32: LayerNorm-modulate of the stored residual
    y32 = layer_norm_modulate(h, shift, scale, out_dtype=torch.float32)
    q2, s2 = quantize_per_token_reference(y32, qdtype)
    assert torch.equal(s, s2) and torch.equal(_bits(q), _bits(q2))


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_gated_residual_layer_norm_quant_matches_reference(gen, qdtype):
    B, T, L, C = 1, 2, 7, 96
    x = (torch.randn(B, T * L, C, generator=gen) * 2).half()
    y = torch.randn(B, T * L, C, generator=gen).half()
    weight = (1 + 0.3 * torch.randn(C, generator=gen)).half()
    bias = (0.3 * torch.randn(C, generator=gen)).half()
    x0 = x.clone()
    h, q, s = gated_residual_layer_norm_quant(x, y, None, None, None, weight, bias, qdtype=qdtype)
    h_ref, q_ref, s_ref = gated_residual_layer_norm_quant_reference(x, y, None, None, None, weight, bias, qdtype=qdtype)
    assert torch.equal(x, x0)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    # the kernel's float32 statistics may differ from torch's in the last ulp: codes within one step
    step = (q.float() - q_ref.float()).abs() / torch.maximum(q_ref.float().abs(), torch.ones(()))
    assert (step <= (1.0 if qdtype == torch.int8 else 0.126)).all()
    assert ((q.float() != q_ref.float()).float().mean() < 0.01)


def test_zero_rows_and_bad_inputs(gen):
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16, generator=gen)
    for qdtype in (torch.int8, FP8):
        q, s = quantize_per_token(x, qdtype)
        assert s[0].item() == (torch.tensor(AMAX_EPS) / QMAX[qdtype]).item() and (q[0].float() == 0).all()
    xx = torch.randn(1, 4, 16, generator=gen)
    with pytest.raises(TypeError, match="qdtype"):
        gated_residual_layer_norm_quant(xx, xx, qdtype=torch.float16)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        gated_residual_layer_norm_quant(xx, xx[:, :2])
    with pytest.raises(ValueError, match="at most 65536"):
        quantize_per_token(torch.zeros(1, 65537), torch.int8)


def test_quantized_activations_rows(gen):
    x = torch.randn(2, 6, 16, generator=gen)
    q, s = quantize_per_token(x, torch.int8)
    qa = QuantizedActivations(q, s, torch.float16).rows(2, 5)
    assert torch.equal(qa.q, q[:, 2:5]) and torch.equal(qa.scale, s[:, 2:5]) and qa.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_one_rule_on_the_gpu_bf16_real_width(gen, qdtype):
    """bf16 activations at C = 4096 (and the w2 input width 11008 for quantize_per_token): the fused
    kernels' codes are quantize_per_token of their own float32 output, bit for bit, on the GPU."""
    B, T, L, C = 1, 3, 333, 4096
    dev = "cuda"
    x = (torch.randn(B, T * L, C, generator=gen) * 2).to(dev, torch.bfloat16)
    y = torch.randn(B, T * L, C, generator=gen).to(dev, torch.bfloat16)
    gate, shift, scale = (0.3 * torch.randn(B, T, C, generator=gen)).to(dev), torch.randn(B, T, C, generator=gen).to(dev), (0.3 * torch.randn(B, T, C, generator=gen)).to(dev)
    q, s = layer_norm_modulate_quant(x, shift, scale, qdtype=qdtype)
    q2, s2 = quantize_per_token(layer_norm_modulate(x, shift, scale, out_dtype=torch.float32), qdtype)
    assert torch.equal(s, s2) and torch.equal(_bits(q), _bits(q2))
    h, q, s = gated_residual_layer_norm_quant(x, y, gate, shift, scale, qdtype=qdtype)
    q2, s2 = quantize_per_token(layer_norm_modulate(h, shift, scale, out_dtype=torch.float32), qdtype)
    assert torch.equal(s, s2) and torch.equal(_bits(q), _bits(q2))
    for K in (4096, 11008):
        a = (torch.randn(777, K, generator=gen) * 3).to(dev, torch.bfloat16)
        q, s = quantize_per_token(a, qdtype)
        q_ref, s_ref = quantize_per_token_reference(a, qdtype)
        assert torch.equal(s, s_ref) and torch.equal(_bits(q), _bits(q_ref))
