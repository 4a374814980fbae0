"""Standalone 3D RoPE and per-head RMSNorm against the float64 reference."""
import pytest
import torch

from longcat.kernels.rope import (
    rms_norm,
    rms_norm_reference,
    rope_3d,
    rope_3d_frequencies,
    rope_3d_reference,
    rope_3d_split,
    rope_pair_tables,
)
from oracle import assert_by_rule

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("head_dim", [16, 48, 128])
def test_pair_tables_equal_reference_table(head_dim):
    # the kernels' compact table holds exactly the reference table's cos/sin values
    grid, offset = (3, 4, 5), 2
    cos_ref, sin_ref = rope_3d_frequencies(head_dim, grid, offset)
    cos_p, sin_p = rope_pair_tables(head_dim, grid, offset, "cpu")
    T, H, W = grid
    d_t, d_h, _ = rope_3d_split(head_dim)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    t, h, w = t.reshape(-1, 1), h.reshape(-1, 1), w.reshape(-1, 1)
    i = torch.arange(head_dim // 2).view(1, -1)
    row = torch.where(i < d_t // 2, t, torch.where(i < (d_t + d_h) // 2, T + h, T + H + w))
    for pair_tab, full in ((cos_p, cos_ref), (sin_p, sin_ref)):
        gathered = pair_tab[row, i]
        assert torch.equal(gathered.repeat_interleave(2, dim=-1), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,grid,offset", [(16, (2, 3, 5), 0), (48, (1, 4, 3), 3), (128, (3, 2, 2), 7)])
def test_rope_3d_matches_oracle(gen, dtype, head_dim, grid, offset):
    S = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, 3, S, head_dim, generator=gen).to(dtype)
    x0 = x.clone()
    out = rope_3d(x, grid, frame_offset=offset)
    assert out.dtype == dtype and out.is_contiguous()
    assert_by_rule(out, rope_3d_reference(x, grid, offset), rope_3d_reference(x.double(), grid, offset), atol=ATOL[dtype])
    assert torch.equal(x, x0)


def test_rope_3d_offset_matters(gen):
    x = torch.randn(1, 2, 12, 16, generator=gen)
    assert not torch.allclose(rope_3d(x, (2, 2, 3), 0), rope_3d(x, (2, 2, 3), 1))


def test_rope_3d_kv_cache_positions(gen):
    # keys over (num_cond + T, H, W) vs queries of the last T frames placed with frame_offset=num_cond
    num_cond, T, H, W, D = 2, 3, 2, 3, 16
    k = torch.randn(2, 2, (num_cond + T) * H * W, D, generator=gen)
    full = rope_3d(k, (num_cond + T, H, W))
    tail = rope_3d(k[:, :, num_cond * H * W :], (T, H, W), frame_offset=num_cond)
    torch.testing.assert_close(full[:, :, num_cond * H * W :], tail, rtol=0, atol=0)


def test_rope_3d_non_contiguous_input(gen):
    x = torch.randn(2, 12, 3, 16, generator=gen).transpose(1, 2)  # [B, heads, S, D] view
    out = rope_3d(x, (1, 3, 4), 1)
    torch.testing.assert_close(out, rope_3d_reference(x, (1, 3, 4), 1), rtol=1e-6, atol=1e-6)


def test_rope_3d_grad(gen):
    x = torch.randn(2, 2, 12, 48, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    xl = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(rope_3d(xl, (2, 2, 3), 2), xl, grad)
    xd = x.double().requires_grad_()
    (oracle,) = torch.autograd.grad(rope_3d_reference(xd, (2, 2, 3), 2), xd, grad.double())
    xf = x.clone().requires_grad_()
    (lowp,) = torch.autograd.grad(rope_3d_reference(xf, (2, 2, 3), 2), xf, grad)
    assert_by_rule(got, lowp, oracle)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_rms_norm_matches_oracle(gen, dtype, wdtype):
    x = (torch.randn(2, 7, 3, 40, generator=gen) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(40, generator=gen)).to(wdtype)
    out = rms_norm(x, w)
    assert out.dtype == torch.promote_types(dtype, wdtype)
    assert_by_rule(out, rms_norm_reference(x, w), rms_norm_reference(x.double(), w.double()), atol=ATOL[dtype])


def test_rms_norm_grads(gen):
    x = torch.randn(2, 5, 3, 40, generator=gen)
    w = 1 + 0.5 * torch.randn(40, generator=gen)
    grad = torch.randn(x.shape, generator=gen)

    def grads(fn, a, b):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        return torch.autograd.grad(fn(a, b), (a, b), grad.to(a.dtype))

    for g, lg, og in zip(grads(rms_norm, x, w), grads(rms_norm_reference, x, w), grads(rms_norm_reference, x.double(), w.double())):
        assert_by_rule(g, lg, og, atol=1e-5)


def test_bad_inputs(gen):
    x = torch.randn(1, 2, 12, 16, generator=gen)
    with pytest.raises(ValueError, match="multiple of 8"):
        rope_3d(torch.randn(1, 2, 12, 12), (1, 3, 4))
    with pytest.raises(ValueError, match="grid=.* holds 24 tokens"):
        rope_3d(x, (2, 3, 4))
    with pytest.raises(ValueError, match="frame_offset"):
        rope_3d(x, (1, 3, 4), frame_offset=-1)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        rope_3d(x[0], (1, 3, 4))
    with pytest.raises(TypeError, match="x has dtype float64"):
        rope_3d(x.double(), (1, 3, 4))
    with pytest.raises(ValueError, match="weight must have last dimension 16"):
        rms_norm(x, torch.ones(8))
    with pytest.raises(ValueError, match="same device"):
        rms_norm(x, torch.ones(16, device="meta"))


@pytest.mark.gpu
def test_bf16_real_shapes(gen):
    grid = (3, 10, 12)
    x = torch.randn(1, 32, 360, 128, generator=gen).to("cuda", torch.bfloat16)
    assert_by_rule(rope_3d(x, grid, 2), rope_3d_reference(x, grid, 2), rope_3d_reference(x.double(), grid, 2), atol=1e-2)
    w = (1 + 0.1 * torch.randn(128, generator=gen)).to("cuda", torch.bfloat16)
    assert_by_rule(rms_norm(x, w), rms_norm_reference(x, w), rms_norm_reference(x.double(), w.double()), atol=1e-2)
