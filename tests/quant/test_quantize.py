"""quantize(): layer selection, QuantizedLinear's contract, meta-device quantization, forward accuracy."""
import re

import pytest
import torch
import torch.nn as nn

import longcat.quant as lq
from longcat.quant.accuracy import cosine_similarity, sqnr_db

FP8 = torch.float8_e4m3fn
ALL = ["int8", "fp8", "int8-dynamic", "fp8-dynamic"]


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, lq.QuantizedLinear))]


def test_config_names_and_errors():
    assert isinstance(lq.resolve_config("int8"), lq.Int8WeightOnlyConfig)
    assert isinstance(lq.resolve_config("FP8_dynamic"), lq.Fp8DynamicConfig)
    assert lq.resolve_config(lq.Int8DynamicConfig).dynamic
    assert lq.Fp8WeightOnlyConfig().weight == "fp8"
    with pytest.raises(ValueError, match="unknown quantization config 'int4'"):
        lq.resolve_config("int4")
    with pytest.raises(TypeError, match="config must be"):
        lq.resolve_config(8)
    with pytest.raises(ValueError, match="adaln must be one of"):
        lq.Int8DynamicConfig(adaln="dynamic")
    with pytest.raises(TypeError, match="skip must be a sequence"):
        lq.Int8WeightOnlyConfig(skip="final_layer.*")


def test_default_skip_list_and_adaln_weight_only(mini_dit):
    lq.quantize(mini_dit, "int8-dynamic")
    mods = dict(mini_dit.named_modules())
    for name in linear_names(mini_dit):
        m = mods[name]
        if name.startswith(("final_layer.", "x_embedder.", "t_embedder.", "y_embedder.")):
            assert type(m) is nn.Linear, name
        elif "adaLN_modulation" in name:
            assert isinstance(m, lq.QuantizedLinear) and not m.dynamic and m.weight_dtype == torch.int8, name
        else:
            assert isinstance(m, lq.QuantizedLinear) and m.dynamic, name
    assert len(lq.quantized_layers(mini_dit)) == 2 * 9


@pytest.mark.parametrize("adaln,expect", [("same", "dyn"), ("skip", "float"), ("weight_only", "wo")])
def test_adaln_modes(mini_dit, adaln, expect):
    lq.quantize(mini_dit, lq.Fp8DynamicConfig(adaln=adaln))
    m = mini_dit.blocks[0].adaLN_modulation[1]
    if expect == "float":
        assert type(m) is nn.Linear
    else:
        assert isinstance(m, lq.QuantizedLinear) and m.weight_dtype == FP8 and m.dynamic == (expect == "dyn")
    # final_layer's adaLN is under the skip list whatever the adaln mode
    assert type(mini_dit.final_layer.adaLN_modulation[1]) is nn.Linear


def test_include_exclude_globs_and_regex(mini_dit, MiniDiT_cls):
    MiniDiT = MiniDiT_cls
    lq.quantize(mini_dit, "int8", include=["blocks.*.attn.*", "re:blocks\\.1\\.ffn\\.w[13]"], exclude="blocks.0.attn.proj")
    q = set(lq.quantized_layers(mini_dit))
    assert q == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.ffn.w1", "blocks.1.ffn.w3"}
    m2 = MiniDiT()
    lq.quantize(m2, "int8", include=[re.compile(r"final_layer\.linear")])
    assert not lq.quantized_layers(m2), "the skip list wins over include"
    m3 = MiniDiT()
    lq.quantize(m3, lq.Int8WeightOnlyConfig(skip=()), include="final_layer.linear")
    assert set(lq.quantized_layers(m3)) == {"final_layer.linear"}
    with pytest.raises(ValueError, match="invalid regular expression"):
        lq.quantize(MiniDiT(), "int8", include="re:(")
    with pytest.raises(TypeError, match="include must hold"):
        lq.quantize(MiniDiT(), "int8", include=[3])


def test_quantized_linear_contract(gen):
    lin = nn.Linear(80, 96)
    q = lq.QuantizedLinear.from_linear(lin, torch.int8)
    assert type(q).__name__ == "QuantizedLinear"
    assert (q.in_features, q.out_features) == (80, 96) and q.bias is not None
    assert not hasattr(q, "weight")
    assert q.weight_q.dtype == torch.int8 and q.weight_q.shape == (96, 80)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (96,)
    assert torch.equal(q.weight_scale, lin.weight.detach().abs().amax(1) / 127)
    w_err = (q.dequantized_weight() - lin.weight.detach()).abs()
    assert (w_err <= q.weight_scale[:, None] / 2 * (1 + 1e-5)).all()
    # dtype casts of the model never touch the 8-bit weight or its float32 scale
    q.half()
    assert q.weight_q.dtype == torch.int8 and q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float16
    q.to(torch.float32)
    f = lq.QuantizedLinear.from_linear(nn.Linear(16, 8), FP8, dynamic=True).to(torch.bfloat16)
    assert f.weight_q.dtype == FP8 and f.weight_scale.dtype == torch.float32
    assert "weight=fp8" in repr(f) and "per-token dynamic" in repr(f)


def test_upstream_lora_target_contract():
    # Upstream's LoRA loader: class name, in/out features, and a forward that can be wrapped.
    q = lq.QuantizedLinear.from_linear(nn.Linear(32, 24))
    assert q.__class__.__name__ in ("Linear", "QuantizedLinear")
    assert (q.in_features, q.out_features) == (32, 24)
    org_forward = q.forward
    down, up = nn.Linear(32, 4, bias=False), nn.Linear(4, 24, bias=False)
    q.forward = lambda x: org_forward(x) + up(down(x))
    x = torch.randn(3, 32)
    assert torch.allclose(q(x), org_forward(x) + up(down(x)))
    # ... and a Linear already wrapped that way is refused by quantize() instead of silently dropping the LoRA.
    model = nn.Sequential(nn.Linear(32, 24))
    org = model[0].forward
    model[0].forward = lambda x: org(x) * 2
    with pytest.raises(ValueError, match="patched"):
        lq.quantize(model, "int8")


@pytest.mark.parametrize("fmt", ALL)
def test_meta_device_quantize(fmt, MiniDiT_cls):
    with torch.device("meta"):
        model = MiniDiT_cls(hidden=4096, depth=1, caption=4096, tdim=512, mlp_hidden=11008)
    lq.quantize(model, fmt)
    qkv = model.blocks[0].attn.qkv
    wdtype = torch.int8 if fmt.startswith("int8") else FP8
    assert qkv.weight_q.device.type == "meta" and qkv.weight_q.dtype == wdtype and qkv.weight_q.shape == (12288, 4096)
    assert qkv.weight_scale.dtype == torch.float32 and qkv.weight_scale.shape == (12288,)
    assert model.blocks[0].adaLN_modulation[1].weight_q.shape == (24576, 512)
    # a forward on meta propagates shapes through the custom ops' fake implementations
    out = model(torch.empty(1, 5, 16, device="meta"), torch.empty(1, 16, device="meta"), torch.empty(1, 3, 4096, device="meta"))
    assert out.shape == (1, 5, 16)


# Measured on the stand-in (fp32 activations): int8 59.9 dB, fp8 44.7, int8-dynamic 54.8, fp8-dynamic 41.2.
@pytest.mark.parametrize("fmt,floor_db", [("int8", 52.0), ("fp8", 38.0), ("int8-dynamic", 47.0), ("fp8-dynamic", 35.0)])
def test_small_model_output_close_to_float(dit_inputs, mini_dit, fmt, floor_db):
    x, t, y = dit_inputs
    with torch.no_grad():
        ref = mini_dit(x, t, y)
        lq.quantize(mini_dit, fmt)
        out = mini_dit(x, t, y)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    s = sqnr_db(ref, out)
    assert s > floor_db, f"{fmt}: end-to-end SQNR {s:.1f} dB <= {floor_db}"
    assert cosine_similarity(ref, out) > 0.99


def test_forward_fp16_activations(gen):
    lin = nn.Linear(80, 96).half()
    x = torch.randn(37, 80, generator=gen).half()
    for fmt in ALL:
        q = lq.QuantizedLinear.from_linear(lin, torch.int8 if fmt.startswith("int8") else FP8, dynamic=fmt.endswith("dynamic"))
        out = q(x)
        assert out.dtype == torch.float16
        assert sqnr_db(lin(x.float().half()).float(), out.float()) > 18


@pytest.mark.parametrize("dynamic", [False, True])
def test_matmul_with_packed_swiglu_weight_matches_separate_layers(gen, dynamic):
    """``QuantizedLinear.matmul`` on a packed [2H, K] w1|w3 weight with the SwiGLU epilogue (what
    the packed FFN runs) equals the gate of the two layers."""
    w1, w3 = nn.Linear(64, 40, bias=True), nn.Linear(64, 40, bias=True)
    q1 = lq.QuantizedLinear.from_linear(w1, torch.int8, dynamic)
    q3 = lq.QuantizedLinear.from_linear(w3, torch.int8, dynamic)
    x = torch.randn(2, 9, 64, generator=gen)
    expected = torch.nn.functional.silu(q1(x)) * q3(x)
    got = q1.matmul(x, torch.cat([q1.weight_q, q3.weight_q]), torch.cat([q1.weight_scale, q3.weight_scale]),
                    torch.cat([q1.bias, q3.bias]), swiglu=True)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    # rows [start, stop) of the layer are the same GEMM on a slice
    assert torch.allclose(q1.forward_rows(x, 8, 30), q1(x)[..., 8:30], atol=1e-6)


def test_input_not_modified_and_bad_model():
    lin = nn.Linear(16, 8)
    q = lq.QuantizedLinear.from_linear(lin, torch.int8, dynamic=True)
    x = torch.randn(3, 16)
    x0 = x.clone()
    q(x)
    assert torch.equal(x, x0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lq.quantize("model", "int8")
    with pytest.raises(ValueError, match="unknown backend"):
        lq.quantize(nn.Sequential(nn.Linear(4, 4)), "int8", backend="tensorrt")
    with pytest.raises(ValueError, match="2-D"):
        lq.quantize_weight(torch.randn(4), torch.int8)


def test_real_model_on_meta_if_available(real_model):
    cls, get_preset = real_model
    with torch.device("meta"):
        model = cls(**get_preset("tiny"))
    lq.quantize(model, "int8")
    names = set(lq.quantized_layers(model))
    assert any(n.endswith("attn.qkv") for n in names) and any(n.endswith("ffn.w2") for n in names)
    assert not any(n.startswith(("final_layer.", "t_embedder.", "y_embedder.", "x_embedder.")) for n in names)
