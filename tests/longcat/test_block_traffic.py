"""The planner's HBM-traffic-per-block model."""
import pytest

from longcat.bench.report import render_block_traffic
from longcat.memory_plan import block_traffic
from longcat.model import ffn_hidden_size


def test_block_traffic_counts_passes():
    latent = (4, 8, 12)  # 4 * 4 * 6 = 96 tokens after 2x2 patching
    t = block_traffic("tiny", latent=latent, weights="bf16")
    n, C, a = 96, 256, 2
    act = n * C * a
    assert t.tokens == n
    assert t.passes["LayerNorm-modulate"] == 2 * act
    assert t.passes["QKV-prep (q, k norm + RoPE; v a view)"] == 4 * act  # v is not copied
    assert t.activation_bytes == sum(t.passes.values()) and t.total_bytes == t.activation_bytes + t.weight_bytes
    assert block_traffic("tiny", latent=latent, weights="int8").weight_bytes < t.weight_bytes


@pytest.mark.parametrize("weights", ["int8-dynamic", "fp8-dynamic"])
def test_quantizing_once_saves_the_per_layer_passes(weights):
    latent = (4, 8, 12)
    n, C, a = 96, 256, 2
    codes = n * C + 4 * n  # 8-bit codes and float32 per-token scales
    once = block_traffic("tiny", latent=latent, weights=weights, quantize_once=True)
    per_layer = block_traffic("tiny", latent=latent, weights=weights, quantize_once=False)
    # qkv and the packed w1|w3 GEMM (one consumer each): the norm writes codes instead of bf16, and
    # the Linear's read-quantize-write pass goes (bf16 write + read, against codes write + read)
    assert per_layer.activation_bytes - once.activation_bytes == 2 * (2 * n * C * a)
    F = ffn_hidden_size(C, 4)
    assert once.passes["w1|w3 GEMM + SwiGLU epilogue (activations)"] == codes + n * F * a  # no [n, 2F] write
    assert once.quantize_once and not per_layer.quantize_once
    assert not block_traffic("tiny", latent=latent, weights="bf16", quantize_once=True).quantize_once


def test_bad_format_and_rendering():
    with pytest.raises(ValueError, match="weights must be one of"):
        block_traffic("tiny", latent=(4, 8, 12), weights="int4")
    text = render_block_traffic(latent=(4, 8, 12))
    assert "(model)" in text and "fp8-dynamic (activations quantized once)" in text
