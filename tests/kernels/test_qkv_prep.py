"""Fused q/k RMSNorm + 3D RoPE + head split of the qkv GEMM output."""
import pytest
import torch

from longcat.kernels.qkv_prep import qkv_norm_rope, qkv_norm_rope_reference
from longcat.kernels.rope import rms_norm_reference, rope_3d_reference
from oracle import assert_by_rule

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(gen, B=2, heads=3, D=16, grid=(2, 3, 5), dtype=torch.float32, wdtype=None, device="cpu"):
    N = grid[0] * grid[1] * grid[2]
    qkv = (torch.randn(B, N, 3 * heads * D, generator=gen) * 2).to(dtype)
    wq = (1 + 0.3 * torch.randn(D, generator=gen)).to(wdtype or dtype)
    wk = (1 + 0.3 * torch.randn(D, generator=gen)).to(wdtype or dtype)
    return qkv.to(device), wq.to(device), wk.to(device)


@pytest.mark.parametrize(
    "dtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
)
@pytest.mark.parametrize("D,grid,offset", [(16, (2, 3, 5), 3), (48, (1, 2, 5), 0)])
def test_qkv_norm_rope_matches_oracle(gen, dtype, wdtype, D, grid, offset):
    heads = 3
    qkv, wq, wk = _inputs(gen, heads=heads, D=D, grid=grid, dtype=dtype, wdtype=wdtype)
    qkv0 = qkv.clone()
    outs = qkv_norm_rope(qkv, wq, wk, heads, grid, frame_offset=offset, return_k_pre_rope=True)
    lowp = qkv_norm_rope_reference(qkv, wq, wk, heads, grid, offset, return_k_pre_rope=True)
    oracle = qkv_norm_rope_reference(qkv.double(), wq.double(), wk.double(), heads, grid, offset, return_k_pre_rope=True)
    B, N = qkv.shape[:2]
    for i, (out, lp, orc) in enumerate(zip(outs, lowp, oracle)):
        assert out.shape == (B, heads, N, D) and out.dtype == dtype and (i == 2 or out.is_contiguous())
        assert_by_rule(out, lp, orc, atol=ATOL[dtype])
    # v is a view of qkv, not a copy
    assert outs[2].data_ptr() == qkv.data_ptr() + 2 * heads * D * qkv.element_size()
    assert torch.equal(outs[2], qkv.view(B, N, 3, heads, D)[:, :, 2].transpose(1, 2))
    assert torch.equal(qkv, qkv0)
    if dtype == torch.float16:
        # the fused pass reproduces the unfused sequence except for rare one-ulp flips (the sum of
        # squares is accumulated in another order)
        for out, lp in zip(outs, lowp):
            assert (out != lp).float().mean().item() < 0.01


def test_qkv_norm_rope_three_outputs_and_kv_cache_semantics(gen):
    qkv, wq, wk = _inputs(gen, grid=(2, 3, 5))
    q, k, v = qkv_norm_rope(qkv, wq, wk, 3, (2, 3, 5), frame_offset=2)
    _, _, _, k_pre = qkv_norm_rope(qkv, wq, wk, 3, (2, 3, 5), frame_offset=2, return_k_pre_rope=True)
    # the cache stores k_pre; RoPE applied to it later gives the same k
    torch.testing.assert_close(rope_3d_reference(k_pre, (2, 3, 5), 2), k, rtol=1e-6, atol=1e-6)
    B, N = qkv.shape[:2]
    ref_kpre = rms_norm_reference(qkv.view(B, N, 3, 3, 16)[:, :, 1].transpose(1, 2), wk)
    torch.testing.assert_close(k_pre, ref_kpre, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parts", ["q", "kv"])
def test_qkv_norm_rope_parts(gen, parts):
    """The frame-chunked block's inputs: q alone [B, N, C], or k and v [B, N, 2C]."""
    heads, D, grid, offset = 4, 16, (2, 3, 5), 3
    qkv, wq, wk = _inputs(gen, heads=heads, D=D, grid=grid)
    B, N = qkv.shape[:2]
    C = heads * D
    full = qkv_norm_rope_reference(qkv.double(), wq.double(), wk.double(), heads, grid, offset, return_k_pre_rope=True)
    lowp = qkv_norm_rope_reference(qkv, wq, wk, heads, grid, offset, return_k_pre_rope=True)
    if parts == "q":
        src = qkv[..., :C].contiguous()
        outs = qkv_norm_rope(src, wq, None, heads, grid, offset, parts="q")
        expected = [(lowp[0], full[0])]
    else:
        src = qkv[..., C:].contiguous()
        outs = qkv_norm_rope(src, None, wk, heads, grid, offset, return_k_pre_rope=True, parts="kv")
        expected = [(lowp[1], full[1]), (lowp[2], full[2]), (lowp[3], full[3])]
        assert outs[1].data_ptr() == src.data_ptr() + C * src.element_size()  # v is a view
    assert len(outs) == len(expected)
    for out, (lp, orc) in zip(outs, expected):
        assert out.shape == (B, heads, N, D)
        assert_by_rule(out, lp, orc, atol=1e-5)


@pytest.mark.parametrize("parts", ["q", "kv"])
def test_qkv_norm_rope_parts_grads(gen, parts):
    heads, D, grid = 2, 16, (2, 2, 3)
    qkv, wq, wk = _inputs(gen, heads=heads, D=D, grid=grid)
    src = qkv[..., : heads * D] if parts == "q" else qkv[..., heads * D:]
    src = src.contiguous()
    n_out = 1 if parts == "q" else 3
    grads_out = [torch.randn(2, heads, 12, D, generator=gen) for _ in range(n_out)]

    def grads(fn, src, wq, wk):
        leaves = [src.clone().requires_grad_(), (wq if parts == "q" else wk).clone().requires_grad_()]
        weights = (leaves[1], None) if parts == "q" else (None, leaves[1])
        outs = fn(leaves[0], *weights, heads, grid, 1, 1e-6, parts == "kv", parts)
        return torch.autograd.grad(outs, leaves, [g.to(src.dtype) for g in grads_out])

    got = grads(qkv_norm_rope, src, wq, wk)
    lowp = grads(qkv_norm_rope_reference, src, wq, wk)
    oracle = grads(qkv_norm_rope_reference, src.double(), wq.double(), wk.double())
    for g, lg, og in zip(got, lowp, oracle):
        assert_by_rule(g, lg, og, atol=1e-5)


@pytest.mark.parametrize("return_k_pre", [False, True])
def test_qkv_norm_rope_grads(gen, return_k_pre):
    heads, D, grid, offset = 2, 16, (2, 2, 3), 1
    qkv, wq, wk = _inputs(gen, heads=heads, D=D, grid=grid)
    n_out = 4 if return_k_pre else 3
    grads_out = [torch.randn(2, heads, 12, D, generator=gen) for _ in range(n_out)]

    def grads(fn, ts):
        leaves = [t.clone().requires_grad_() for t in ts]
        outs = fn(*leaves, heads, grid, offset, 1e-6, return_k_pre)
        return torch.autograd.grad(outs, leaves, [g.to(ts[0].dtype) for g in grads_out])

    got = grads(qkv_norm_rope, [qkv, wq, wk])
    lowp = grads(qkv_norm_rope_reference, [qkv, wq, wk])
    oracle = grads(qkv_norm_rope_reference, [qkv.double(), wq.double(), wk.double()])
    for g, lg, og in zip(got, lowp, oracle):
        assert g.shape == og.shape
        assert_by_rule(g, lg, og, atol=1e-5)


def test_bad_inputs(gen):
    qkv, wq, wk = _inputs(gen)
    with pytest.raises(ValueError, match="multiple of 8"):
        qkv_norm_rope(torch.randn(1, 30, 3 * 3 * 12), torch.ones(12), torch.ones(12), 3, (2, 3, 5))
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        qkv_norm_rope(qkv, wq, wk, 5, (2, 3, 5))
    with pytest.raises(ValueError, match="q_weight must have shape"):
        qkv_norm_rope(qkv, wq[:8], wk, 3, (2, 3, 5))
    with pytest.raises(ValueError, match="grid=.* holds"):
        qkv_norm_rope(qkv, wq, wk, 3, (2, 3, 4))
    with pytest.raises(TypeError, match="qkv has dtype int64"):
        qkv_norm_rope(qkv.long(), wq, wk, 3, (2, 3, 5))
    with pytest.raises(ValueError, match="same device"):
        qkv_norm_rope(qkv, wq.to("meta"), wk, 3, (2, 3, 5))
    with pytest.raises(ValueError, match="frame_offset"):
        qkv_norm_rope(qkv, wq, wk, 3, (2, 3, 5), frame_offset=-2)
    with pytest.raises(ValueError, match="parts must be one of"):
        qkv_norm_rope(qkv, wq, wk, 3, (2, 3, 5), parts="v")
    with pytest.raises(TypeError, match="k_weight must be a torch.Tensor"):
        qkv_norm_rope(qkv, wq, None, 3, (2, 3, 5))
    with pytest.raises(ValueError, match="not 2 \\* num_heads"):
        qkv_norm_rope(qkv[..., :-16], None, wk, 3, (2, 3, 5), parts="kv")


@pytest.mark.gpu
def test_bf16_real_head_dim(gen):
    grid = (3, 6, 10)
    qkv, wq, wk = _inputs(gen, B=2, heads=32, D=128, grid=grid, dtype=torch.bfloat16, device="cuda")
    outs = qkv_norm_rope(qkv, wq, wk, 32, grid, frame_offset=2, return_k_pre_rope=True)
    lowp = qkv_norm_rope_reference(qkv, wq, wk, 32, grid, 2, return_k_pre_rope=True)
    oracle = qkv_norm_rope_reference(qkv.double(), wq.double(), wk.double(), 32, grid, 2, return_k_pre_rope=True)
    for out, lp, orc in zip(outs, lowp, oracle):
        assert_by_rule(out, lp, orc, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("parts", ["q", "kv"])
def test_bf16_real_head_dim_parts(gen, parts):
    grid = (2, 6, 10)
    qkv, wq, wk = _inputs(gen, B=1, heads=32, D=128, grid=grid, dtype=torch.bfloat16, device="cuda")
    C = 32 * 128
    src = (qkv[..., :C] if parts == "q" else qkv[..., C:]).contiguous()
    outs = qkv_norm_rope(src, wq, wk, 32, grid, frame_offset=3, return_k_pre_rope=True, parts=parts)
    lowp = qkv_norm_rope_reference(src, wq, wk, 32, grid, 3, return_k_pre_rope=True, parts=parts)
    oracle = qkv_norm_rope_reference(src.double(), wq.double(), wk.double(), 32, grid, 3, return_k_pre_rope=True, parts=parts)
    assert len(outs) == (1 if parts == "q" else 3)
    for out, lp, orc in zip(outs, lowp, oracle):
        assert_by_rule(out, lp, orc, atol=1e-2)
