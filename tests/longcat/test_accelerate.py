"""longcat.accelerate / restore on our model and on an upstream-structured one."""
import pytest
import torch
import torch.nn as nn

import longcat
from longcat import LongCatVideoTransformer3DModel, accelerate, restore
from longcat.accelerate import UnsupportedModelError, acceleration_report
from dit_cases import assert_paths_close, forward_paths, random_inputs
from upstream_like import UpstreamLikeDiT

BACKENDS = ["sdpa", "reference"]


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(7)
    m = LongCatVideoTransformer3DModel.from_preset("tiny").eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.state_dict()


def _ours(weights):
    m = LongCatVideoTransformer3DModel.from_preset("tiny").eval()
    m.load_state_dict(weights)
    return m.set_ops(longcat.REFERENCE_OPS)


def _upstream(weights):
    m = UpstreamLikeDiT().eval()
    m.load_state_dict(weights)
    return m


def _inputs(gen, B=2, T=4, H=4, W=6, L=6):
    return random_inputs(gen, B, T, H, W, L)


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_upstream_structure_matches_our_reference(weights, gen, attention, fused):
    inputs = _inputs(gen)
    expected = forward_paths(_ours(weights), *inputs)
    up = _upstream(weights)
    with pytest.raises(RuntimeError, match="Unsupported attention"):
        up(*inputs)
    accelerate(up, attention=attention, fused=fused)
    assert_paths_close(forward_paths(up, *inputs), expected, rtol=1e-4, atol=2e-5)
    report = acceleration_report(up)
    assert report.kind == "upstream" and report.blocks_patched == 2
    restore(up)
    with pytest.raises(RuntimeError, match="Unsupported attention"):
        up(*inputs)


@pytest.mark.parametrize("attention", BACKENDS)
def test_our_model_matches_reference(weights, gen, attention):
    inputs = _inputs(gen)
    expected = forward_paths(_ours(weights), *inputs)
    m = accelerate(_ours(weights), attention=attention, fused=True, ffn_chunk_frames=1)
    assert_paths_close(forward_paths(m, *inputs), expected, rtol=1e-4, atol=2e-5)
    assert acceleration_report(m).kind == "longcat"


def test_idempotent_and_restore(weights, gen):
    inputs = _inputs(gen)
    up = _upstream(weights)
    accelerate(up, attention="sdpa")
    first = up(*inputs)
    accelerate(up, attention="sdpa")
    second = up(*inputs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert all("forward" in vars(b) for b in up.blocks)
    restore(up)
    assert not any("forward" in vars(b) for b in up.blocks)
    restore(up)  # restoring twice is harmless

    ours = _ours(weights)
    before = ours.ops
    accelerate(ours, attention="sdpa", fused=False)
    assert ours.ops is not before
    restore(ours)
    assert ours.ops is before


def test_bsa_switches_keep_working(weights, gen):
    x, t, y, mask = _inputs(gen, T=4, H=8, W=8)
    params = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    ours = _ours(weights)
    with torch.no_grad():
        dense = ours(x, t, y, mask)
    up = _upstream(weights)
    accelerate(up, attention="reference", bsa=params)
    assert acceleration_report(up).bsa_blocks == 2
    with torch.no_grad():
        sparse = up(x, t, y, mask)
        up.disable_bsa()
        dense_again = up(x, t, y, mask)
        up.enable_bsa()
        sparse_again = up(x, t, y, mask)
    torch.testing.assert_close(dense_again, dense, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(sparse_again, sparse)
    assert (sparse - dense).abs().max() > 1e-4
    restore(up)
    assert not any(b.attn.enable_bsa for b in up.blocks)  # restore puts the flags back


def test_block_offload_hooks_round_trip(weights, gen):
    inputs = _inputs(gen)
    ours = _ours(weights)
    expected = ours(*inputs)
    accelerate(ours, attention="reference", fused=False, offload="blocks")
    assert acceleration_report(ours).offload == "blocks"
    torch.testing.assert_close(ours(*inputs), expected)
    restore(ours)
    assert not ours.blocks[0]._forward_pre_hooks and not ours.blocks[0]._forward_hooks
    torch.testing.assert_close(ours(*inputs), expected)


def test_unrecognised_structure_is_left_untouched():
    class NotADiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    m = NotADiT()
    with pytest.raises(UnsupportedModelError, match=r"missing: x_embedder"):
        accelerate(m)
    assert "forward" not in vars(m.blocks[0]) and not hasattr(m, "_longcat_acceleration")


def test_partly_matching_structure_is_refused_before_any_patch(weights):
    up = _upstream(weights)
    del up.blocks[1].ffn.w3
    with pytest.raises(UnsupportedModelError, match=r"blocks.1.ffn.w3"):
        accelerate(up)
    assert not any("forward" in vars(b) for b in up.blocks)


def test_bad_arguments(weights):
    m = _ours(weights)
    with pytest.raises(ValueError, match="attention must be one of"):
        accelerate(m, attention="flash")
    with pytest.raises(ValueError, match="offload must be"):
        accelerate(m, offload="disk")
    with pytest.raises(TypeError, match="bsa must be"):
        accelerate(m, bsa="yes")
    with pytest.raises(ValueError, match="unknown keys"):
        accelerate(m, bsa={"sparsity": 0.5, "chunk": 3})
    assert acceleration_report(m) is None


@pytest.mark.parametrize("attention", ["bsa", "dense"])
def test_triton_attention_backends(weights, gen, attention):
    """Triton BSA where blocks enable it (Triton dense elsewhere), or Triton dense everywhere."""
    x, t, y, mask = _inputs(gen, T=4, H=8, W=8)
    params = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    ref = _ours(weights)
    ref.blocks[0].attn.enable_bsa, ref.blocks[0].attn.bsa_params = True, params
    up = _upstream(weights)
    up.blocks[0].attn.enable_bsa, up.blocks[0].attn.bsa_params = True, params
    accelerate(up, attention=attention, fused=True)
    with torch.no_grad():
        expected = ref(x, t, y, mask)
        got = up(x, t, y, mask)
        if attention == "dense":
            ref.blocks[0].attn.enable_bsa = False
            expected = ref(x, t, y, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def test_compiled_blocks_have_no_graph_breaks(weights, gen):
    """Every block compiles as one graph (fullgraph=True) with the Triton kernels and fused ops."""
    torch._dynamo.reset()
    x, t, y, mask = _inputs(gen, T=2, H=4, W=4)
    ours = _ours(weights)
    with torch.no_grad():
        expected = ours(x, t, y, mask)
    accelerate(ours, attention="bsa", fused=True, compile={"backend": "aot_eager", "fullgraph": True})
    assert acceleration_report(ours).compiled
    with torch.no_grad():
        got = ours(x, t, y, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
    restore(ours)
    assert "forward" not in vars(ours.blocks[0])


@pytest.mark.parametrize("fmt", ["int8", "fp8-dynamic"])
def test_quantize_through_accelerate_and_undo(weights, gen, fmt):
    x, t, y, mask = _inputs(gen, T=2, H=4, W=4)
    ours = _ours(weights)
    with torch.no_grad():
        expected = ours(x, t, y, mask)
    accelerate(ours, attention="sdpa", fused=False, quantize=fmt)
    rep = acceleration_report(ours)
    assert rep.quantized_linears > 0 and rep.quantization == fmt
    qkv = ours.blocks[0].attn.qkv
    assert type(qkv).__name__ == "QuantizedLinear" and (qkv.in_features, qkv.out_features) == (256, 768)
    assert type(ours.final_layer.linear) is nn.Linear  # default skip list keeps it high precision
    with torch.no_grad():
        got = ours(x, t, y, mask)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.05, rel
    restore(ours)
    assert type(ours.blocks[0].attn.qkv) is nn.Linear
    with torch.no_grad():
        undone = ours(x, t, y, mask)
    assert ((undone - expected).norm() / expected.norm()).item() < 0.05
