"""Block-sparse 3D attention (Triton gating, forward, backward) against the float64 reference
and the upstream golden output."""
import json
import os

import pytest
import torch

from oracle import assert_by_rule

from longcat.kernels.attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_selection,
    block_sparse_selection_reference,
    dense_attention,
    dense_attention_reference,
)
from longcat.kernels.attention.block_sparse import reverse_selection, selection_to_tile_mask, token_tile_ids

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _qkv(gen, B, H, grid_q, grid_k, D, dtype, device="cpu"):
    sq = grid_q[0] * grid_q[1] * grid_q[2]
    sk = grid_k[0] * grid_k[1] * grid_k[2]
    q = torch.randn((B, H, sq, D), generator=gen).to(device=device, dtype=dtype)
    k = torch.randn((B, H, sk, D), generator=gen).to(device=device, dtype=dtype)
    v = torch.randn((B, H, sk, D), generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def _assert_same_selection(sel, sel_ref):
    """Same counts and the same set of kept key tiles per query tile (order within ties free)."""
    indices, counts = sel
    indices_ref, counts_ref = sel_ref
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    assert indices.shape == indices_ref.shape and counts.shape == counts_ref.shape
    assert torch.equal(counts, counts_ref)
    assert torch.equal(indices.sort(-1).values, torch.arange(indices.shape[-1], dtype=torch.int32,
                                                             device=indices.device).expand_as(indices))
    assert torch.equal(selection_to_tile_mask(indices, counts), selection_to_tile_mask(indices_ref, counts_ref))


def _check_against_oracle(q, k, v, grid_q, grid_k, sparsity, cdf, tile, grads=True):
    dtype = q.dtype
    args = (grid_q, grid_k, sparsity, cdf, tile)
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out, lse, sel = block_sparse_attention(*leaves, *args, return_lse=True, return_selection=True)
    lowp = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out_lowp, lse_lowp = block_sparse_attention_reference(*lowp, *args, return_lse=True)
    exact = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    out_ref, lse_ref, sel_ref = block_sparse_attention_reference(*exact, *args, return_lse=True, return_selection=True)
    _assert_same_selection(sel, sel_ref)
    assert out.dtype == dtype
    assert_by_rule(out, out_lowp, out_ref, atol=ATOL[dtype])
    assert_by_rule(lse, lse_lowp, lse_ref, atol=1e-5)
    if not grads:
        return sel
    gen = torch.Generator().manual_seed(7)
    d_out = torch.randn(out.shape, generator=gen).to(out.device)
    d_lse = torch.randn(lse.shape, generator=gen).to(out.device)
    for o, l in ((out, lse), (out_lowp, lse_lowp), (out_ref, lse_ref)):
        ((o.double() * d_out.double()).sum() + (l.double() * d_lse.double()).sum()).backward()
    for name, t, t_lowp, t_ref in zip("qkv", leaves, lowp, exact):
        assert t.grad.dtype == dtype, name
        assert_by_rule(t.grad, t_lowp.grad, t_ref.grad, atol=GRAD_ATOL[dtype])
    return sel


def test_reproduces_upstream_golden(golden_dir):
    from safetensors import safe_open

    path = os.path.join(golden_dir, "bsa_golden.safetensors")
    with safe_open(path, "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert cases
    for name, case in cases.items():
        q, k, v, expected = (tensors[f"{name}.{x}"] for x in ("q", "k", "v", "out"))
        out = block_sparse_attention(
            q, k, v, case["latent_shape_q"], case["latent_shape_k"], case["sparsity"], case["cdf_threshold"],
            case["tile"],
        )
        assert torch.isfinite(out).all()
        err = (out - expected).abs().max().item()
        assert err <= 1e-5 * max(1.0, expected.abs().max().item()), f"{name}: max error {err:.2e} vs golden"


@pytest.mark.parametrize(
    "dtype,grid_q,grid_k,sparsity,cdf,tile",
    [
        # top-k; grids not multiples of the tile; Sq != Skv
        (torch.float32, (3, 5, 6), (5, 5, 7), 0.6, None, (2, 2, 4)),
        # CDF only, fp16
        (torch.float16, (4, 4, 5), (4, 4, 5), None, 0.6, (2, 2, 4)),
        # both rules: the larger count wins
        (torch.float32, (4, 6, 4), (2, 6, 9), 0.7, 0.5, (2, 3, 2)),
    ],
)
def test_forward_backward_matches_oracle(gen, dtype, grid_q, grid_k, sparsity, cdf, tile):
    q, k, v = _qkv(gen, 2, 2, grid_q, grid_k, 32, dtype)
    indices, counts = _check_against_oracle(q, k, v, grid_q, grid_k, sparsity, cdf, tile)
    # the test must exercise real sparsity: some but not all tiles kept
    assert counts.min() >= 1 and counts.max() < indices.shape[-1]


def test_tiles_larger_than_a_block_with_empty_edge_sub_blocks(gen):
    """A 128-slot tile is processed as several sub-blocks; the grid's edge tiles hold one frame
    of two, so whole sub-blocks are empty there (forward and backward)."""
    grid = (3, 5, 20)
    q, k, v = _qkv(gen, 1, 1, grid, grid, 64, torch.float32)
    _check_against_oracle(q, k, v, grid, grid, 0.5, None, (2, 4, 16))


@pytest.mark.parametrize(
    "grid_q,grid_k,sparsity,cdf,tile",
    [
        ((4, 8, 8), (4, 8, 8), 0.75, None, (2, 2, 4)),
        ((5, 7, 9), (6, 7, 9), None, 0.3, (2, 4, 4)),
        ((5, 7, 9), (3, 7, 9), 0.9, 0.4, (1, 4, 4)),
        ((2, 3, 3), (2, 3, 3), 0.99, None, (2, 2, 2)),  # top-k count rounds to 0: clamped to 1
    ],
)
def test_selection_matches_reference(gen, grid_q, grid_k, sparsity, cdf, tile):
    q, k, _ = _qkv(gen, 2, 2, grid_q, grid_k, 64, torch.float32)
    sel = block_sparse_selection(q, k, grid_q, grid_k, sparsity, cdf, tile)
    sel_ref = block_sparse_selection_reference(q, k, grid_q, grid_k, sparsity, cdf, tile)
    _assert_same_selection(sel, sel_ref)
    # kept tiles come first, by descending score
    from longcat.kernels.attention.block_sparse import tile_means_reference

    score = tile_means_reference(q, grid_q, tile) @ tile_means_reference(k, grid_k, tile).transpose(-1, -2)
    ordered = torch.gather(score, -1, sel[0].long())
    assert (ordered[..., :-1] >= ordered[..., 1:]).all()


def test_reverse_selection_is_the_transpose(gen):
    q, k, _ = _qkv(gen, 1, 2, (4, 4, 8), (2, 4, 8), 32, torch.float32)
    indices, counts = block_sparse_selection(q, k, (4, 4, 8), (2, 4, 8), 0.6, None, (2, 2, 4))
    rev_indices, rev_counts = reverse_selection(indices, counts, indices.shape[-1])
    mask = selection_to_tile_mask(indices, counts)  # [B, H, nQ, nK]
    assert torch.equal(rev_counts, mask.sum(-2).int())
    for kt in range(mask.shape[-1]):
        for h in range(2):
            listed = rev_indices[0, h, kt, : rev_counts[0, h, kt]].long()
            assert torch.equal(listed, mask[0, h, :, kt].nonzero().flatten())


def test_sparsity_zero_equals_dense(gen):
    grid = (3, 4, 6)
    q, k, v = _qkv(gen, 1, 2, grid, grid, 32, torch.float32)
    out = block_sparse_attention(q, k, v, grid, grid, sparsity=0.0, tile=(2, 2, 4))
    assert torch.allclose(out, dense_attention(q, k, v), atol=1e-6)
    assert_by_rule(out, dense_attention_reference(q, k, v), dense_attention_reference(q.double(), k.double(), v.double()))


def test_layouts_and_strided_views(gen):
    """q, k, v as views of a packed [B, N, 3, heads, D] tensor; out's memory is [B, N, heads, D]."""
    grid = (2, 4, 8)
    qkv = torch.randn((1, 64, 3, 2, 32), generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = block_sparse_attention(q, k, v, grid, grid, 0.5, None, (1, 2, 8))
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), grid, grid, 0.5, None, (1, 2, 8))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()


def test_rejects_bad_inputs(gen):
    grid = (2, 4, 8)
    q, k, v = _qkv(gen, 1, 1, grid, grid, 32, torch.float32)
    call = lambda *a, **kw: block_sparse_attention(*a, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="head_dim 48"):
        q48 = torch.randn((1, 1, 64, 48), generator=gen)
        call(q48, q48, q48, grid, grid)
    with pytest.raises(TypeError, match="share a dtype"):
        call(q, k.half(), v, grid, grid)
    with pytest.raises(TypeError, match="Triton kernel supports"):
        call(q.double(), k.double(), v.double(), grid, grid)
    with pytest.raises(ValueError, match="same device"):
        call(q, k, v.to("meta"), grid, grid)
    with pytest.raises(ValueError, match=r"latent_shape_q=\(2, 4, 9\) holds 72 tokens but the sequence has 64"):
        call(q, k, v, (2, 4, 9), grid)
    with pytest.raises(ValueError, match="latent_shape_k"):
        call(q, k, v, grid, (1, 4, 8))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        call(q, k, v, grid, grid, sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        call(q, k, v, grid, grid, sparsity=-0.1)
    with pytest.raises(ValueError, match="tile must be three positive ints"):
        call(q, k, v, grid, grid, tile=(0, 4, 8))
    with pytest.raises(ValueError, match="give sparsity, cdf_threshold, or both"):
        call(q, k, v, grid, grid, sparsity=None, cdf_threshold=None)
    with pytest.raises(ValueError, match=r"cdf_threshold must be in \(0, 1\]"):
        call(q, k, v, grid, grid, cdf_threshold=1.5)
    with pytest.raises(ValueError, match="head_dim 48"):
        block_sparse_selection(q48, q48, grid, grid)


def test_torch_compile_fullgraph(gen):
    grid = (2, 4, 4)
    q, k, v = (t.requires_grad_() for t in _qkv(gen, 1, 1, grid, grid, 32, torch.float32))
    fn = lambda q, k, v: block_sparse_attention(q, k, v, grid, grid, 0.5, None, (1, 2, 4))  # noqa: E731
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    ref = block_sparse_attention_reference(q.detach().double(), k.detach().double(), v.detach().double(),
                                           grid, grid, 0.5, None, (1, 2, 4))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_refinement_like_shapes(gen, dtype):
    """Model tile (4, 4, 8), head_dim 128, a grid that is not a multiple of the tile, Sq != Skv."""
    grid_q, grid_k = (8, 22, 40), (10, 22, 40)
    q, k, v = _qkv(gen, 1, 2, grid_q, grid_k, 128, dtype, "cuda")
    _check_against_oracle(q, k, v, grid_q, grid_k, 0.875, None, (4, 4, 8))
    _check_against_oracle(q, k, v, grid_q, grid_k, 0.875, 0.3, (4, 4, 8), grads=False)


@pytest.mark.gpu
def test_gpu_720p_grid_sampled_tiles(gen):
    """The 720p refinement grid (48, 44, 80): 1320 key tiles per row (a 2048-wide sort). The
    selection equals the reference; a sample of query tiles is checked against exact attention
    over their selected tokens."""
    grid = (48, 44, 80)
    tile = (4, 4, 8)
    q, k, v = _qkv(gen, 1, 2, grid, grid, 128, torch.bfloat16, "cuda")
    out, lse, sel = block_sparse_attention(q, k, v, grid, grid, 0.875, None, tile, return_lse=True,
                                           return_selection=True)
    sel_ref = block_sparse_selection_reference(q, k, grid, grid, 0.875, None, tile)
    assert torch.equal(sel[1], sel_ref[1])
    # 2640 rows of 1320 scores: a near-tie at the cut may flip on summation order, nothing more
    rows_differ = (selection_to_tile_mask(*sel) != selection_to_tile_mask(*sel_ref)).any(-1)
    assert rows_differ.float().mean().item() <= 0.01
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ids = token_tile_ids(grid, tile, q.device)
    mask = selection_to_tile_mask(*sel)
    for qt in (0, 7, 660, 1319):
        rows = (ids == qt).nonzero().flatten()
        for h in range(2):
            cols = mask[0, h, qt][ids].nonzero().flatten()
            s = q[0, h, rows].double() @ k[0, h, cols].double().T * 128 ** -0.5
            expected = torch.softmax(s, -1) @ v[0, h, cols].double()
            assert (out[0, h, rows].double() - expected).abs().max().item() < 2e-2
            assert (lse[0, h, rows].double() - torch.logsumexp(s, -1)).abs().max().item() < 1e-3
