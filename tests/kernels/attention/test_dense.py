"""Dense flash attention (Triton) against the float64 reference: forward, lse, gradients, strided
views, layouts, validation, torch.compile and the fallback."""
import pytest
import torch

from oracle import assert_by_rule

from longcat.kernels import _runtime
from longcat.kernels.attention import dense_attention, dense_attention_reference

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _randn(gen, shape, dtype, device="cpu"):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _check_against_oracle(q, k, v, scale=None, grads=True):
    """Triton forward (+ backward through out and lse) against the reference at the test dtype
    and in float64, by the tolerance rule."""
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out, lse = dense_attention(*leaves, scale=scale, return_lse=True)
    lowp = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out_lowp, lse_lowp = dense_attention_reference(*lowp, scale=scale, return_lse=True)
    exact = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    out_ref, lse_ref = dense_attention_reference(*exact, scale=scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_by_rule(out, out_lowp, out_ref, atol=ATOL[dtype])
    assert_by_rule(lse, lse_lowp, lse_ref, atol=1e-5)
    if not grads:
        return
    gen = torch.Generator().manual_seed(7)
    d_out = torch.randn(out.shape, generator=gen).to(out.device)
    d_lse = torch.randn(lse.shape, generator=gen).to(out.device)
    for o, l, ts in ((out, lse, leaves), (out_lowp, lse_lowp, lowp), (out_ref, lse_ref, exact)):
        ((o.double() * d_out.double()).sum() + (l.double() * d_lse.double()).sum()).backward()
    for name, t, t_lowp, t_ref in zip("qkv", leaves, lowp, exact):
        assert t.grad.dtype == dtype, name
        assert_by_rule(t.grad, t_lowp.grad, t_ref.grad, atol=GRAD_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,H,Sq,Skv,D",
    [
        (2, 2, 150, 97, 64),  # Sq != Skv, neither a multiple of the blocks, batch > 1
        (1, 1, 33, 70, 128),
        (1, 2, 5, 3, 16),  # shorter than one block
        (1, 1, 20, 300, 64),  # full key blocks of every config, then a masked tail
        (1, 1, 130, 256, 32),  # whole key blocks only: no tail
    ],
)
def test_forward_backward_matches_oracle(gen, dtype, B, H, Sq, Skv, D):
    q = _randn(gen, (B, H, Sq, D), dtype)
    k = _randn(gen, (B, H, Skv, D), dtype)
    v = _randn(gen, (B, H, Skv, D), dtype)
    _check_against_oracle(q, k, v)


@pytest.mark.parametrize("D", [32, 256])
def test_other_head_dims_and_scale(gen, D):
    q = _randn(gen, (1, 1, 40, D), torch.float32)
    k = _randn(gen, (1, 1, 45, D), torch.float32)
    v = _randn(gen, (1, 1, 45, D), torch.float32)
    _check_against_oracle(q, k, v, scale=0.3, grads=(D == 32))


def test_very_negative_scores_with_a_key_tail(gen):
    """All scores near -140 (lse too): a padded key of the tail block scores 0, and exp(0 - lse)
    overflows unless the tail is masked, which would turn dq into NaN."""
    q = 5 + 0.1 * _randn(gen, (1, 1, 9, 32), torch.float32)
    k = -5 + 0.1 * _randn(gen, (1, 1, 45, 32), torch.float32)  # 45: full key blocks plus a tail
    v = _randn(gen, (1, 1, 45, 32), torch.float32)
    _check_against_oracle(q, k, v)


def test_strided_views_of_packed_qkv(gen):
    """The model passes q, k, v as views of a [B, N, 3, heads, D] tensor: no copies needed."""
    B, N, H, D = 2, 77, 2, 64
    qkv = _randn(gen, (B, N, 3, H, D), torch.float32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check_against_oracle(q, k, v)
    # the output's memory is [B, N, heads, D], so merging heads is free
    out = dense_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


def test_expanded_grad_output(gen):
    """An upstream sum() hands the backward a stride-0 gradient; it must still be right."""
    q, k, v = (_randn(gen, (1, 2, 20, 32), torch.float32).requires_grad_() for _ in range(3))
    dense_attention(q, k, v).sum().backward()
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    dense_attention_reference(*exact).sum().backward()
    for t, t_ref in zip((q, k, v), exact):
        assert torch.allclose(t.grad.double(), t_ref.grad, atol=1e-5)


def test_rejects_bad_inputs(gen):
    q = _randn(gen, (1, 1, 8, 48), torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        dense_attention(q, q, q)
    q = _randn(gen, (1, 1, 8, 32), torch.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        dense_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="float64"):
        dense_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="same device"):
        dense_attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="disagree"):
        dense_attention(q, q[:, :, :, :16], q[:, :, :, :16])
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            dense_attention(q, q, q, scale=bad)


def test_torch_compile_fullgraph(gen):
    q, k, v = (_randn(gen, (1, 2, 24, 32), torch.float32).requires_grad_() for _ in range(3))
    compiled = torch.compile(lambda q, k, v: dense_attention(q, k, v) * 2.0, fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    expected = dense_attention_reference(*(t.detach().double() for t in (q, k, v))) * 2.0
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_fallback_without_triton_uses_reference(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_runtime, "_WARNED", set())
    q, k, v = (_randn(gen, (1, 1, 6, 48), torch.float32) for _ in range(3))  # any head_dim works there
    with pytest.warns(RuntimeWarning, match="reference"):
        out = dense_attention(q, k, v)
    assert torch.equal(out, dense_attention_reference(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_model_shapes(gen, dtype, D):
    B, N, H = 2, 1000, 4
    qkv = _randn(gen, (B, N, 3, H, D), dtype, "cuda")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _check_against_oracle(q, k, v)
    k2 = _randn(gen, (B, H, 333, D), dtype, "cuda")
    _check_against_oracle(q, k2, k2.flip(2), grads=False)


def test_configs_follow_the_resource_rule():
    """Every launcher config fits the shared memory of the GPU it runs on (the shared rule of
    kernels._configs picks the first fitting candidate), and Hopper gets 128-key blocks with at
    least two tiles in flight for the model's D=128 bf16 self-attention."""
    from longcat.kernels._configs import ARCH_LIMITS
    from longcat.kernels.attention import _common

    for arch in (80, 89, 90):
        limit = ARCH_LIMITS[arch]["smem_per_block"]
        for D in _common.SUPPORTED_HEAD_DIMS:
            for varlen in (False, True):
                fwd = _common.flash_fwd_config(D, torch.bfloat16, limit, varlen)
                bwd = _common.flash_bwd_config(D, torch.bfloat16, limit, varlen)
                assert _common.fwd_shared_bytes(fwd, D, 2) <= limit, (arch, D, fwd)
                assert _common.bwd_shared_bytes(bwd, D, 2) <= limit, (arch, D, bwd)
    hopper = _common.flash_fwd_config(128, torch.bfloat16, ARCH_LIMITS[90]["smem_per_block"])
    assert hopper["BLOCK_N"] == 128 and hopper["num_stages"] >= 3
