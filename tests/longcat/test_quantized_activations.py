"""W8A8 layers get their input quantized once, by the fused norm kernel that produces it: qkv
from LayerNorm-modulate, w1 and w3 from the residual + norm. Same results as quantizing in every
layer (one rounding rule), fewer quantization passes; wrapped layers keep the float input."""
import types

import pytest
import torch

import longcat.quant.linear as qlinear
from longcat import LongCatVideoTransformer3DModel, accelerate
from longcat.ops import kernel_ops

from dit_cases import random_inputs


def _model(fmt):
    torch.manual_seed(5)
    m = LongCatVideoTransformer3DModel.from_preset("tiny", num_heads=4, depth=1).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return accelerate(m, attention="sdpa", fused=True, quantize=fmt)


def _counted_forward(model, inputs, monkeypatch):
    calls = []
    real = qlinear.quantize_per_token

    def counting(x, qdtype):
        calls.append(tuple(x.shape))
        return real(x, qdtype)

    monkeypatch.setattr(qlinear, "quantize_per_token", counting)
    with torch.no_grad():
        out = model(*inputs)
    monkeypatch.setattr(qlinear, "quantize_per_token", real)
    return out, len(calls)


def _per_layer_ops(ops):
    return ops.replace(layer_norm_modulate_quant=None, gated_residual_layer_norm_quant=None)


@pytest.mark.parametrize("fmt", ["int8-dynamic", "fp8-dynamic"])
def test_quantized_once_equals_quantized_per_layer(gen, fmt, monkeypatch):
    inputs = random_inputs(gen, B=1, T=2, H=4, W=4)
    model = _model(fmt)
    assert model.ops.layer_norm_modulate_quant is not None
    once, n_once = _counted_forward(model, inputs, monkeypatch)
    model.set_ops(_per_layer_ops(model.ops))
    per_layer, n_per_layer = _counted_forward(model, inputs, monkeypatch)
    # float32 model: the norm's float32 output is what a layer would quantize, and both use one
    # rule, so the codes and the outputs are the same
    torch.testing.assert_close(once, per_layer, rtol=1e-5, atol=1e-6)
    assert per_layer.std() > 0
    # qkv and the packed w1|w3 GEMM (which quantizes its input once even per layer) quantize nothing themselves
    assert n_per_layer - n_once == 2 * len(model.blocks)


def test_wrapped_layer_gets_the_float_input_and_chunks_agree(gen, monkeypatch):
    inputs = random_inputs(gen, B=1, T=2, H=4, W=4)
    model = _model("int8-dynamic")
    model.set_ops(_per_layer_ops(model.ops))
    want, n_per_layer = _counted_forward(model, inputs, monkeypatch)
    model = _model("int8-dynamic")
    for block in model.blocks:  # a LoRA-style wrapper replaces forward: it needs the float input
        block.attn.qkv.forward = types.MethodType(qlinear.QuantizedLinear.forward, block.attn.qkv)
    got, n_once = _counted_forward(model, inputs, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert n_per_layer - n_once == 1 * len(model.blocks)  # only the packed w1|w3 GEMM takes 8-bit input
    # frame-chunked blocks and FFN slice the 8-bit input by tokens
    model = _model("int8-dynamic")
    model.set_ops(model.ops.replace(attention_chunk_frames=1, ffn_chunk_frames=1))
    chunked, n_chunked = _counted_forward(model, inputs, monkeypatch)
    torch.testing.assert_close(chunked, want, rtol=1e-5, atol=1e-6)


def test_weight_only_layer_refuses_quantized_activations(gen):
    lin = qlinear.QuantizedLinear.from_linear(torch.nn.Linear(16, 8), torch.int8, dynamic=False)
    x = torch.randn(2, 3, 16, generator=gen)
    from longcat.kernels.quantize_activations import QuantizedActivations, quantize_per_token

    qa = QuantizedActivations(*quantize_per_token(x, torch.int8), x.dtype)
    with pytest.raises(TypeError, match="weight-only"):
        lin(qa)
    dyn = qlinear.QuantizedLinear.from_linear(torch.nn.Linear(16, 8), torch.float8_e4m3fn, dynamic=True)
    with pytest.raises(TypeError, match="multiplies"):
        dyn(qa)
    assert lin.activation_qdtype is None and dyn.activation_qdtype == torch.float8_e4m3fn
