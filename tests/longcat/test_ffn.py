"""The packed w1|w3 FFN (``longcat.ffn``): one GEMM per FFN in every weight format, the same results
as the two layers, upstream's names and LoRA wrappers kept, undone by ``restore``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import longcat
from longcat import LongCatVideoTransformer3DModel, accelerate, restore
from longcat.ffn import _usable_packed, ffn_gate, is_packed, pack_ffn, unpack_ffn
from longcat.model import FeedForwardSwiGLU
from longcat.ops import kernel_ops
import longcat.quant as lq
from longcat.quant import QuantizedLinear
from dit_cases import random_inputs
from upstream_like import UpstreamLikeDiT


def _model(cls=LongCatVideoTransformer3DModel):
    torch.manual_seed(11)
    m = (cls.from_preset("tiny") if cls is LongCatVideoTransformer3DModel else cls()).eval()
    if cls is LongCatVideoTransformer3DModel:
        m.set_ops(longcat.REFERENCE_OPS)
    return m


def _inputs(gen):
    return random_inputs(gen, B=1, T=2, H=4, W=4, L=6)


def _packed(ffn):
    """The packed tensors an inference (no-grad) forward of ``ffn`` uses, or None."""
    with torch.no_grad():
        return _usable_packed(ffn)


def _lora(linear: nn.Linear, gen, rank=4):
    """Upstream's LoRA: the target is found by name, its class name must be Linear/QuantizedLinear,
    and its ``forward`` is wrapped (org_forward(x) + up(down(x)) * scale)."""
    assert type(linear).__name__ in ("Linear", "QuantizedLinear")
    down = torch.randn(rank, linear.in_features, generator=gen) * 0.2
    up = torch.randn(linear.out_features, rank, generator=gen) * 0.2
    org_forward = linear.forward

    def forward(x):
        return org_forward(x) + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))

    linear.forward = forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_ffn_float_matches_two_layers(gen, dtype):
    ffn = FeedForwardSwiGLU(48, 80).to(dtype).requires_grad_(False)  # inference: the packed path runs
    x = torch.randn(3, 5, 48, generator=gen, dtype=dtype)
    expected = F.silu(ffn.w1(x)) * ffn.w3(x)
    names = dict(ffn.state_dict())
    assert pack_ffn(ffn) and is_packed(ffn) and pack_ffn(ffn)  # idempotent
    assert _packed(ffn) is not None
    # upstream's names and shapes; the halves are views of one [2H, K] tensor
    assert ffn.state_dict().keys() == names.keys() and all(torch.equal(ffn.state_dict()[k], v) for k, v in names.items())
    packed = _packed(ffn)[1][0]
    assert packed.shape == (160, 48) and ffn.w3.weight.data_ptr() == packed[80:].data_ptr()
    got = ffn_gate(ffn, x, longcat.REFERENCE_OPS)
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    # a load_state_dict writes through the views into the packed weight
    w1 = torch.randn(80, 48, generator=gen, dtype=dtype)
    ffn.load_state_dict({**names, "w1.weight": w1})
    torch.testing.assert_close(ffn_gate(ffn, x, longcat.REFERENCE_OPS), F.silu(F.linear(x, w1)) * ffn.w3(x))
    unpack_ffn(ffn)
    assert not is_packed(ffn) and ffn.w1.weight.untyped_storage().data_ptr() != ffn.w3.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(ffn_gate(ffn, x, longcat.REFERENCE_OPS), F.silu(F.linear(x, w1)) * ffn.w3(x))


@pytest.mark.parametrize("fmt", [(torch.int8, False), (torch.int8, True), (torch.float8_e4m3fn, False), (torch.float8_e4m3fn, True)])
def test_pack_ffn_quantized_matches_two_layers(gen, fmt):
    """The 8-bit pair runs as one GEMM with the SwiGLU epilogue (Triton interpreter); the separate
    layers give the same result (for dynamic layers the per-token activation scales are the same)."""
    wdtype, dynamic = fmt
    ffn = FeedForwardSwiGLU(64, 40)
    ffn.w1 = QuantizedLinear.from_linear(ffn.w1, wdtype, dynamic)
    ffn.w3 = QuantizedLinear.from_linear(ffn.w3, wdtype, dynamic)
    x = torch.randn(2, 9, 64, generator=gen)
    expected = F.silu(ffn.w1(x)) * ffn.w3(x)
    assert pack_ffn(ffn) and _packed(ffn)[0] == "quantized"
    assert ffn.w1.weight_q.dtype == wdtype and ffn.w1.weight_scale.shape == (40,)
    torch.testing.assert_close(ffn_gate(ffn, x, longcat.REFERENCE_OPS), expected, rtol=1e-4, atol=1e-5)


def test_training_w1_w3_gets_their_gradients(gen):
    """With autograd on and trainable w1/w3 the layers run (the packed tensor is no parameter), so
    the gradients match the unpacked FFN's; under no_grad the packed GEMM runs."""
    torch.manual_seed(2)
    ref = FeedForwardSwiGLU(24, 40)
    ffn = FeedForwardSwiGLU(24, 40)
    ffn.load_state_dict(ref.state_dict())
    pack_ffn(ffn)
    x = torch.randn(5, 24, generator=gen)
    F.silu(ref.w1(x)).mul(ref.w3(x)).square().sum().backward()
    ffn_gate(ffn, x, longcat.REFERENCE_OPS).square().sum().backward()
    for name in ("w1", "w3"):
        torch.testing.assert_close(getattr(ffn, name).weight.grad, getattr(ref, name).weight.grad)
    assert _usable_packed(ffn) is None
    with torch.no_grad():
        assert _usable_packed(ffn) is not None


def test_mismatched_pairs_are_not_packed():
    ffn = FeedForwardSwiGLU(32, 16)
    ffn.w3 = QuantizedLinear.from_linear(ffn.w3, torch.int8)
    assert not pack_ffn(ffn) and not is_packed(ffn)
    ffn = FeedForwardSwiGLU(32, 16)
    ffn.w1 = QuantizedLinear.from_linear(ffn.w1, torch.int8)
    ffn.w3 = QuantizedLinear.from_linear(ffn.w3, torch.float8_e4m3fn)
    assert not pack_ffn(ffn)
    ffn = FeedForwardSwiGLU(32, 16)
    _lora(ffn.w1, torch.Generator().manual_seed(0))
    assert not pack_ffn(ffn)  # a wrapped target keeps its own weight


def test_moved_weights_fall_back_to_the_layers(gen):
    """``.to`` converts each registered view on its own: the packed tensor is then stale, and the
    FFN must use the layers (which hold the truth) instead."""
    ffn = FeedForwardSwiGLU(24, 40)
    pack_ffn(ffn)
    ffn.double()
    with torch.no_grad():
        ffn.w1.weight.mul_(2)
    x = torch.randn(4, 24, generator=gen, dtype=torch.float64)
    assert _packed(ffn) is None
    assert not is_packed(ffn)  # the stale packed copy is released
    torch.testing.assert_close(ffn_gate(ffn, x, longcat.REFERENCE_OPS), F.silu(ffn.w1(x)) * ffn.w3(x))


@pytest.mark.parametrize("cls", [LongCatVideoTransformer3DModel, UpstreamLikeDiT])
def test_accelerate_packs_and_restore_unpacks(gen, cls):
    x, t, y, mask = _inputs(gen)
    ref = _model()
    with torch.no_grad():
        expected = ref(x, t, y, mask)
    m = cls.from_preset("tiny") if cls is LongCatVideoTransformer3DModel else cls()
    m.eval().load_state_dict(ref.state_dict())
    keys = list(m.state_dict())
    accelerate(m, attention="reference", fused=True, ffn_chunk_frames=1)
    assert all(is_packed(b.ffn) and _packed(b.ffn) is not None for b in m.blocks)
    assert any("packed into one GEMM in 2 of 2" in n for n in longcat.acceleration_report(m).notes)
    assert list(m.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y, mask), expected, rtol=1e-4, atol=2e-5)
    restore(m)
    assert not any(is_packed(b.ffn) for b in m.blocks)
    ffn = m.blocks[0].ffn
    assert ffn.w1.weight.untyped_storage().data_ptr() != ffn.w3.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(m.state_dict()["blocks.0.ffn.w3.weight"], ref.state_dict()["blocks.0.ffn.w3.weight"])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_upstream_style_lora_on_packed_ffn(gen, quantize):
    """A LoRA wrapped around ``w1``/``w3`` after ``accelerate`` (upstream's loader) is applied: the
    block then runs the two layers. Same result as the same LoRA on the unpacked model."""
    x, t, y, mask = _inputs(gen)
    ref = _model()
    if quantize:  # the FFN's w1/w3 only, to keep the interpreted GEMMs few
        lq.quantize(ref, quantize, include="blocks.*.ffn.w[13]")
    accelerate(ref, attention="reference", fused=False)
    for b in ref.blocks:
        unpack_ffn(b.ffn)
    lora_gen = torch.Generator().manual_seed(3)
    for b in ref.blocks:
        _lora(b.ffn.w1, lora_gen)
        _lora(b.ffn.w3, lora_gen)
    with torch.no_grad():
        expected = ref(x, t, y, mask)
    m = _model()
    if quantize:
        lq.quantize(m, quantize, include="blocks.*.ffn.w[13]")
    accelerate(m, attention="reference", fused=False)
    assert all(_packed(b.ffn) is not None for b in m.blocks)
    assert type(m.blocks[0].ffn.w1).__name__ == ("QuantizedLinear" if quantize else "Linear")
    with torch.no_grad():
        without_lora = m(x, t, y, mask)
    lora_gen = torch.Generator().manual_seed(3)
    for b in m.blocks:
        _lora(b.ffn.w1, lora_gen)
        _lora(b.ffn.w3, lora_gen)
    assert all(_packed(b.ffn) is None for b in m.blocks)
    with torch.no_grad():
        got = m(x, t, y, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
    assert (got - without_lora).abs().max() > 1e-3  # the LoRA changed the output


def test_lora_merged_before_accelerate_is_packed(gen):
    """The other route: merge the LoRA into w1/w3, then accelerate packs the merged weights."""
    x, t, y, mask = _inputs(gen)
    ref = _model()
    lora_gen = torch.Generator().manual_seed(5)
    for b in ref.blocks:
        _lora(b.ffn.w1, lora_gen)
    with torch.no_grad():
        expected = ref(x, t, y, mask)
    m = _model()
    lora_gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in m.blocks:
            lin = b.ffn.w1
            probe = nn.Linear(lin.in_features, lin.out_features, bias=False)
            probe.weight.copy_(lin.weight)
            _lora(probe, lora_gen)
            lin.weight.copy_(probe(torch.eye(lin.in_features)).t())  # merged W + up @ down
    accelerate(m, attention="reference", fused=False)
    assert all(_packed(b.ffn) is not None for b in m.blocks)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y, mask), expected, rtol=1e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, (torch.int8, False), (torch.float8_e4m3fn, True)])
def test_gpu_packed_ffn_real_shape(fmt):
    """bf16 at the real FFN shape (4096 -> 2 x 11008): the packed gate (cuBLAS + swiglu_packed, or
    the 8-bit GEMM with the SwiGLU epilogue) against the two layers, by the error rule."""
    from oracle import assert_by_rule

    torch.manual_seed(0)
    ffn = FeedForwardSwiGLU(4096, 11008).cuda().bfloat16()
    if fmt is not None:
        ffn.w1 = QuantizedLinear.from_linear(ffn.w1, *fmt)
        ffn.w3 = QuantizedLinear.from_linear(ffn.w3, *fmt)
    x = torch.randn(4096 + 17, 4096, device="cuda").bfloat16()
    with torch.no_grad():
        two_layers = ffn_gate(ffn, x, kernel_ops())
        if fmt is None:
            oracle = F.silu(F.linear(x.double(), ffn.w1.weight.double())) * F.linear(x.double(), ffn.w3.weight.double())
        else:
            w1, w3 = ffn.w1.dequantized_weight(torch.float64), ffn.w3.dequantized_weight(torch.float64)
            oracle = F.silu(F.linear(x.double(), w1)) * F.linear(x.double(), w3)
        assert pack_ffn(ffn) and _packed(ffn) is not None
        packed = ffn_gate(ffn, x, kernel_ops())
    if fmt is None:
        assert_by_rule(packed, two_layers, oracle, atol=1e-2)
    else:
        # Same 8-bit operands (and activation scales) on both paths: what differs is the bf16
        # rounding of the two separate outputs before the gate.
        torch.testing.assert_close(packed, two_layers, rtol=2e-2, atol=2e-2)
        assert ((packed.double() - oracle).norm() / oracle.norm()).item() < 0.05
