"""Block-sparse 3D attention (BSA) of the LongCat-Video 720p refinement stage.

Tokens in (T, H, W) order are grouped into 3D tiles of ``tile = (t, h, w)`` tokens (tile index
ordered T-tiles, H-tiles, W-tiles). Each query tile keeps the key tiles whose mean key scores
highest against its mean query (``score = mean(q_tile) @ mean(k_tile)^T``, unscaled):
- top-k: ``int((1 - sparsity) * num_key_tiles)`` tiles;
- CDF: ``softmax(score / sqrt(D))`` sorted descending, the number of cumulative sums that are
  <= ``cdf_threshold`` times their total (``torch.searchsorted(..., right=True)``, upstream's
  rule, with the sums normalised by the last one: in floating point the softmax need not sum to
  exactly 1, and this way ``cdf_threshold=1.0`` keeps every tile, in the kernel and the reference);
- both: the larger of the two counts.
Ties in score keep the lower key-tile index. Every query then attends exactly (softmax, scale
D^-0.5) to the tokens of its selected tiles.

A selection is ``(indices, counts)``: indices int32 [B, heads, nQ, max_keep] hold the kept key
tiles of each query tile in ascending tile order (the forward visits them in that order, so the
key tiles shared by neighbouring query tiles are read while they are still in L2), -1 after
``counts`` int32 [B, heads, nQ]. ``max_keep`` is the top-k count, or nK when the CDF rule (whose
count depends on the data) is used.

Beyond upstream: grids need not be multiples of the tile (edge tiles are partial and their
means are over the tokens they hold); a tile larger than both grids along an axis is clamped to
the larger grid (the same single tile along that axis); a query tile always keeps at least one
key tile (upstream leaves the output undefined when a rule selects nothing). Non-finite inputs
propagate: a +Inf key gives NaN in the rows that attend to it, as in plain attention.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .._runtime import check_latent_shape, check_tensor
from .dense import _check_qkv, masked_attention_math

__all__ = [
    "DEFAULT_TILE",
    "check_block_sparse_args",
    "tile_grid",
    "token_tile_ids",
    "tile_means_reference",
    "num_topk_tiles",
    "block_sparse_selection_reference",
    "block_sparse_attention_reference",
]

DEFAULT_TILE = (4, 4, 8)


def check_block_sparse_args(
    q_len: int,
    k_len: int,
    latent_shape_q,
    latent_shape_k,
    sparsity,
    cdf_threshold,
    tile,
):
    """Validate the BSA arguments; returns (grid_q, grid_k, tile) as int triples."""
    grid_q = check_latent_shape("latent_shape_q", latent_shape_q, num_tokens=q_len)
    grid_k = check_latent_shape("latent_shape_k", latent_shape_k, num_tokens=k_len)
    try:
        tile = tuple(int(s) for s in tile)
    except TypeError:
        raise TypeError(f"tile must be a (t, h, w) sequence of ints, got {tile!r}") from None
    if len(tile) != 3 or any(s <= 0 for s in tile):
        raise ValueError(f"tile must be three positive ints (t, h, w), got {tile!r}")
    if sparsity is None and cdf_threshold is None:
        raise ValueError("give sparsity, cdf_threshold, or both")
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if cdf_threshold is not None and not (0.0 < float(cdf_threshold) <= 1.0):
        raise ValueError(f"cdf_threshold must be in (0, 1], got {cdf_threshold}")
    # A tile longer than both grids along an axis is one tile along it either way; clamping keeps
    # the kernels' per-tile work proportional to the tokens that exist.
    tile = tuple(min(t, max(a, b)) for t, a, b in zip(tile, grid_q, grid_k))
    return grid_q, grid_k, tile


def tile_grid(latent_shape: Sequence[int], tile: Sequence[int]) -> tuple[int, int, int]:
    """Number of tiles along T, H, W (edge tiles may be partial)."""
    return tuple(math.ceil(s / t) for s, t in zip(latent_shape, tile))


def tile_lengths(latent_shape, tile, device=None) -> torch.Tensor:
    """Tokens in each tile (int32, tile order; partial edge tiles hold fewer). Computed from the
    tile coordinates with device ops only: no host copy (CUDA-graph safe) and meta-friendly."""
    grid = tuple(int(s) for s in latent_shape)
    nt, nh, nw = tile_grid(grid, tile)
    idx = torch.arange(nt * nh * nw, device=device, dtype=torch.int32)
    coords = (idx // (nh * nw), (idx // nw) % nh, idx % nw)
    length = torch.ones_like(idx)
    for c, size, t in zip(coords, grid, tile):
        length = length * (size - c * t).clamp(max=t)
    return length


def token_tile_ids(latent_shape, tile, device=None) -> torch.Tensor:
    """Tile index of every token of a (T, H, W) grid, as int64 [T*H*W]."""
    T, H, W = latent_shape
    _, nh, nw = tile_grid(latent_shape, tile)
    t = torch.arange(T, device=device) // tile[0]
    h = torch.arange(H, device=device) // tile[1]
    w = torch.arange(W, device=device) // tile[2]
    return ((t[:, None, None] * nh + h[None, :, None]) * nw + w[None, None, :]).reshape(-1)


def tile_means_reference(x: torch.Tensor, latent_shape, tile) -> torch.Tensor:
    """Mean of x [B, heads, S, D] over each tile's tokens, [B, heads, n_tiles, D] in float32
    (float64 for float64 input)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    ids = token_tile_ids(latent_shape, tile, x.device)
    n = math.prod(tile_grid(latent_shape, tile))
    B, Hd, S, D = x.shape
    sums = torch.zeros(B, Hd, n, D, dtype=compute, device=x.device)
    sums.index_add_(2, ids, x.to(compute))
    counts = tile_lengths(latent_shape, tile, x.device).to(compute)
    return sums / counts[:, None]


def num_topk_tiles(sparsity: float, num_key_tiles: int) -> int:
    """Key tiles kept by the top-k rule (upstream's expression, at least one)."""
    return max(1, int((1 - sparsity) * num_key_tiles))


def selection_width(sparsity: float | None, cdf_threshold: float | None, num_key_tiles: int) -> int:
    """max_keep, the width of the index rows of a selection: the top-k count, or every key tile
    when the CDF rule decides the count from the data (no host sync to find its maximum)."""
    if cdf_threshold is not None:
        return num_key_tiles
    return num_topk_tiles(sparsity, num_key_tiles)


def block_sparse_selection_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    tile=DEFAULT_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gating of BSA by a full sort (the oracle of the kernel's threshold select). Returns
    (indices, counts) as described in the module docstring."""
    _check_qkv(q, k, k)
    grid_q, grid_k, tile = check_block_sparse_args(
        q.shape[2], k.shape[2], latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    qm = tile_means_reference(q, grid_q, tile)
    km = tile_means_reference(k, grid_k, tile)
    score = torch.matmul(qm, km.transpose(-1, -2))  # [B, heads, nQ, nK]
    n_k = score.shape[-1]
    # stable: equal scores keep ascending index order (ties by lower index); NaN sorts first
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    counts = None
    if cdf_threshold is not None:
        weights = torch.softmax(score / math.sqrt(q.shape[-1]), dim=-1)
        cdf = torch.cumsum(torch.gather(weights, -1, order), dim=-1)
        counts = (cdf <= cdf_threshold * cdf[..., -1:]).sum(-1)  # == searchsorted(cdf / total, thr, right=True)
    if sparsity is not None:
        topk = torch.full(score.shape[:-1], num_topk_tiles(sparsity, n_k), device=score.device)
        counts = topk if counts is None else torch.maximum(counts, topk)
    counts = counts.clamp(1, n_k)
    width = selection_width(sparsity, cdf_threshold, n_k)
    kept = order[..., :width]
    keep = torch.arange(width, device=q.device) < counts.unsqueeze(-1)
    ascending = torch.sort(torch.where(keep, kept, n_k), dim=-1).values
    indices = torch.where(keep, ascending, -1)
    return indices.to(torch.int32), counts.to(torch.int32)


def selection_to_tile_mask(indices: torch.Tensor, counts: torch.Tensor, n_k: int) -> torch.Tensor:
    """Bool [B, heads, nQ, nK]: True where a key tile is selected for a query tile."""
    keep = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1).long()
    cols = torch.where(keep, indices.long(), n_k)  # unused slots go to a spare column
    mask = torch.zeros(indices.shape[:-1] + (n_k + 1,), dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, cols, True)[..., :n_k]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    tile=DEFAULT_TILE,
    scale: float | None = None,
    return_lse: bool = False,
    return_selection: bool = False,
):
    """Plain-PyTorch oracle of BSA (token-level mask; for tests and small shapes only).

    q: [B, heads, Sq, D], k, v: [B, heads, Skv, D] in (T, H, W) token order. Returns out in
    q.dtype, then lse [B, heads, Sq] if ``return_lse``, then (indices, counts) if
    ``return_selection``.
    """
    _check_qkv(q, k, v)
    indices, counts = block_sparse_selection_reference(
        q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    _, _, tile = check_block_sparse_args(
        q.shape[2], k.shape[2], latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    tile_mask = selection_to_tile_mask(indices, counts, math.prod(tile_grid(latent_shape_k, tile)))
    q_ids = token_tile_ids(tuple(latent_shape_q), tile, q.device)
    k_ids = token_tile_ids(tuple(latent_shape_k), tile, q.device)
    mask = tile_mask[:, :, q_ids][:, :, :, k_ids]  # [B, heads, Sq, Skv]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = masked_attention_math(q, k, v, scale, mask)
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_selection:
        result += ((indices, counts),)
    return result[0] if len(result) == 1 else result


# ---------------------------------------------------------------------------------------------
# Triton path
#
# Tiles are never materialised: every kernel turns (tile index, token slot within the tile) into
# the token's row of the (T, H, W) layout, masking slots outside the grid (partial edge tiles) and
# the power-of-two padding of the tile. A tile of more tokens than one block holds is processed
# as SPLIT sub-blocks.
# ---------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .._runtime import fallback_warning, triton_runs_on  # noqa: E402
from ._common import (  # noqa: E402
    LOG2E,
    bwd_delta,
    check_kernel_inputs,
    dot_precision,
    last_dim_contiguous,
    next_pow2,
)
from .dense import _bhsd_buffer_like  # noqa: E402

__all__ += ["block_sparse_attention", "block_sparse_selection", "block_sparse_keys"]


@triton.jit
def _tile_rows(tile, sub, T, H, W,
               TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK: tl.constexpr):
    """Rows (int64) in the (T, H, W) token layout of slots [sub*BLOCK, (sub+1)*BLOCK) of a tile,
    and which of them are real tokens."""
    n_h = (H + TILE_H - 1) // TILE_H
    n_w = (W + TILE_W - 1) // TILE_W
    tile_t = tile // (n_h * n_w)
    tile_h = (tile // n_w) % n_h
    tile_w = tile % n_w
    slot = sub * BLOCK + tl.arange(0, BLOCK)
    t = tile_t * TILE_T + slot // (TILE_H * TILE_W)
    h = tile_h * TILE_H + (slot // TILE_W) % TILE_H
    w = tile_w * TILE_W + slot % TILE_W
    valid = (slot < TILE_T * TILE_H * TILE_W) & (t < T) & (h < H) & (w < W)
    rows = (t.to(tl.int64) * H + h) * W + w
    return rows, valid


@triton.jit
def _bsa_tile_mean_kernel(
    X, Means,
    stride_xb, stride_xh, stride_xs,
    num_heads, T, H, W, n_tiles,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + b * stride_xb + h * stride_xh
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    count = 0.0
    for sub in tl.static_range(SPLIT):
        rows, valid = _tile_rows(tile, sub, T, H, W, TILE_T, TILE_H, TILE_W, BLOCK)
        x = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
        count += tl.sum(valid.to(tl.float32), 0)
    tl.store(Means + (bh.to(tl.int64) * n_tiles + tile) * HEAD_DIM + offs_d, acc / count)


@triton.jit
def _bsa_score_kernel(QM, KM, Score, n_q, n_k,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """score[bh] = q_means[bh] @ k_means[bh]^T in fp32 (unscaled, as upstream). The fp32 "ieee"
    dot runs on FMA units, so head_dim is reduced BLOCK_D at a time: whole [BLOCK, HEAD_DIM] fp32
    operands in registers spilled on sm_90."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_n = offs_n < n_k
    q_ptrs = QM + (bh * n_q + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    k_ptrs = KM + (bh * n_k + offs_n[None, :]) * HEAD_DIM + offs_d[:, None]
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        qm = tl.load(q_ptrs + d0, mask=mask_m[:, None], other=0.0)
        kmt = tl.load(k_ptrs + d0, mask=mask_n[None, :], other=0.0)
        s = tl.dot(qm, kmt, s, input_precision="ieee")
    tl.store(Score + (bh * n_q + offs_m[:, None]) * n_k + offs_n[None, :], s,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsa_select_kernel(
    Score, Indices, Counts,
    n_q, n_k, topk, max_keep, cdf_threshold, cdf_scale,
    USE_CDF: tl.constexpr, NK_PAD: tl.constexpr,
):
    """The kept key tiles of one query tile, without sorting: a radix select.

    Scores map to unsigned 32-bit keys of the same order (NaN highest, as in torch's sort). The
    count is the top-k count, or the larger of it and the CDF count; the kept set is every key
    above the count-th largest key, plus the lowest-index keys equal to it. Written in ascending
    tile order (a prefix sum gives each kept tile its slot), -1 after the count.
    """
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh.to(tl.int64) * n_q + q_tile
    offs = tl.arange(0, NK_PAD)
    valid = offs < n_k
    s = tl.load(Score + row * n_k + offs, mask=valid, other=0.0)
    bits = s.to(tl.int32, bitcast=True)
    signed = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    signed = tl.where(s != s, 0x7FFFFFFF, signed)  # NaN: above +inf
    # unsigned order in an int64; padding below every real key
    key = tl.where(valid, signed.to(tl.int64) + 2147483648, -1)

    count = tl.zeros([], dtype=tl.int32) + topk  # a tensor even when topk is specialised to 1
    if USE_CDF:
        # count = how many prefix sums of the descending weights stay <= threshold * total. The
        # prefix of the n largest keys is the mass of the keys >= the n-th key: find the largest
        # key v whose mass (keys >= v) exceeds the limit; every key above v is kept, and of the
        # keys equal to v (equal weights) as many as still fit.
        weights = tl.where(valid, tl.exp((s - tl.max(tl.where(valid, s, float("-inf")), 0)) * cdf_scale), 0.0)
        total = tl.sum(weights, 0)
        limit = total * cdf_threshold
        v = tl.zeros([], dtype=tl.int64)
        for i in tl.static_range(32):
            cand = v | (1 << (31 - i))
            if tl.sum(tl.where(key >= cand, weights, 0.0), 0) > limit:
                v = cand
        if tl.sum(tl.where(key >= 0, weights, 0.0), 0) > limit:
            above = key > v
            mass_above = tl.sum(tl.where(above, weights, 0.0), 0)
            n_above = tl.sum(above.to(tl.int32), 0)
            at_v = key == v
            n_at_v = tl.sum(at_v.to(tl.int32), 0)
            w_v = tl.max(tl.where(at_v, weights, 0.0), 0)
            fit = tl.where(w_v > 0, tl.floor((limit - mass_above) / w_v), 0.0)
            extra = tl.minimum(tl.maximum(fit, 0.0), (n_at_v - 1).to(tl.float32)).to(tl.int32)
            cdf_count = n_above + extra
        else:  # the limit is the total (cdf_threshold 1.0): every tile
            cdf_count = tl.zeros([], dtype=tl.int32) + n_k
        # a +Inf score makes every weight NaN: no prefix compares <= the limit (as in the reference)
        cdf_count = tl.where(total == total, cdf_count, 0)
        count = tl.maximum(count, cdf_count)
    count = tl.minimum(tl.maximum(count, 1), n_k)

    # the count-th largest key, bit by bit from the top
    t = tl.zeros([], dtype=tl.int64)
    for i in tl.static_range(32):
        cand = t | (1 << (31 - i))
        if tl.sum((key >= cand).to(tl.int32), 0) >= count:
            t = cand
    greater = key > t
    ties = key == t
    tie_rank = tl.cumsum(ties.to(tl.int32), 0)  # ties keep the lower indices
    keep = greater | (ties & (tie_rank <= count - tl.sum(greater.to(tl.int32), 0)))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    out_row = Indices + row * max_keep
    tl.store(out_row + slot, offs, mask=keep)
    tl.store(out_row + offs, tl.full([NK_PAD], -1, tl.int32), mask=(offs >= count) & (offs < max_keep))
    tl.store(Counts + row, count)


@triton.jit
def _bsa_pack_kv_kernel(
    K, V, KP, VP, KMeans,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    num_heads, T, H, W, n_tiles,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    TILE_PAD: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One key tile of one head: its tokens' k and v copied from the (T, H, W) layout to the
    tile-major buffers KP, VP [B*heads, n_tiles, TILE_PAD, D] (the tile's tokens first, in t, h, w
    order, then zeros up to TILE_PAD), and its mean key (fp32) for the gating."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    n_h = (H + TILE_H - 1) // TILE_H
    n_w = (W + TILE_W - 1) // TILE_W
    tile_t = tile // (n_h * n_w)
    tile_h = (tile // n_w) % n_h
    tile_w = tile % n_w
    # extents of this (possibly partial) tile
    ext_h = tl.minimum(H - tile_h * TILE_H, TILE_H)
    ext_w = tl.minimum(W - tile_w * TILE_W, TILE_W)
    n_valid = tl.minimum(T - tile_t * TILE_T, TILE_T) * ext_h * ext_w
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    out_base = (bh.to(tl.int64) * n_tiles + tile) * TILE_PAD * HEAD_DIM
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for sub in tl.static_range(SPLIT):
        rows, valid = _tile_rows(tile, sub, T, H, W, TILE_T, TILE_H, TILE_W, BLOCK)
        slot = sub * BLOCK + tl.arange(0, BLOCK)
        dt = slot // (TILE_H * TILE_W)
        dh = (slot // TILE_W) % TILE_H
        dw = slot % TILE_W
        packed = (dt * ext_h + dh) * ext_w + dw  # the token's rank among the tile's tokens
        k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        dst = out_base + packed[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        tl.store(KP + dst, k, mask=valid[:, None])
        tl.store(VP + dst, v, mask=valid[:, None])
        pad = out_base + slot[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        is_pad = (slot >= n_valid)[:, None]
        tl.store(KP + pad, tl.zeros([BLOCK, HEAD_DIM], dtype=k.dtype), mask=is_pad)
        tl.store(VP + pad, tl.zeros([BLOCK, HEAD_DIM], dtype=v.dtype), mask=is_pad)
        acc += tl.sum(k.to(tl.float32), 0)
    tl.store(KMeans + (bh.to(tl.int64) * n_tiles + tile) * HEAD_DIM + offs_d, acc / n_valid.to(tl.float32))


@triton.jit
def _bsa_fwd_kernel(
    Q, KP, VP, Out, Lse, Indices, Counts, TileLen,
    qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_os,
    num_heads, Tq, Hq, Wq, n_q_tiles, n_k_tiles, max_keep,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr, TILE_PAD: tl.constexpr, EVEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One block of BLOCK_M query slots of one query tile, over the kept key tiles in ascending
    order. Queries are gathered from the (T, H, W) layout once and the output scattered back once;
    K and V come tile-major (``_bsa_pack_kv_kernel``): a key block is one contiguous
    [BLOCK_N, D] run at ``tile * TILE_PAD``, so the loop has no index arithmetic and the
    pipeliner sees ordinary loads. Masks only when some tile is partial (EVEN false)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    q_tile = pid // Q_SPLIT
    q_sub = pid % Q_SPLIT
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rows_q, valid_q = _tile_rows(q_tile, q_sub, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :],
                mask=valid_q[:, None], other=0.0)
    kv_head = bh.to(tl.int64) * n_k_tiles * TILE_PAD * HEAD_DIM
    kt_offs = offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # [D, BLOCK_N]: K^T of a key block
    v_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    sel = bh.to(tl.int64) * n_q_tiles + q_tile
    n_blocks = tl.load(Counts + sel) * K_SPLIT
    index_row = Indices + sel * max_keep

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the next block's tile index is read one step ahead, so the K/V addresses of a step are known
    # at its start (a loop-carried value) and the pipeliner can issue them stages in advance
    k_tile = tl.load(index_row)
    for j in range(0, n_blocks):
        next_tile = tl.load(index_row + (j + 1) // K_SPLIT, mask=j + 1 < n_blocks, other=0)
        start = (j % K_SPLIT) * BLOCK_N
        block = kv_head + (k_tile.to(tl.int64) * TILE_PAD + start) * HEAD_DIM
        kt = tl.load(KP + block + kt_offs)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        if not EVEN:
            # the first block of every tile holds a token, so m_i is finite after the first step
            qk = tl.where((start + offs_n < tl.load(TileLen + k_tile))[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VP + block + v_offs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_tile = next_tile

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Out + b * stride_ob + h * stride_oh + rows_q[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=valid_q[:, None])
    seqlen_q = Tq * Hq * Wq
    tl.store(Lse + bh.to(tl.int64) * seqlen_q + rows_q, lse, mask=valid_q)


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, KP, VP, DO, Lse, Delta, DQ, Indices, Counts, TileLen,
    sm_scale, qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    num_heads, Tq, Hq, Wq, n_q_tiles, n_k_tiles, max_keep,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr, TILE_PAD: tl.constexpr, EVEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq of one block of query slots: the forward's loop (packed K/V, ascending kept tiles, the
    next index read a step ahead) with p from the saved lse."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    q_tile = pid // Q_SPLIT
    q_sub = pid % Q_SPLIT
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rows_q, valid_q = _tile_rows(q_tile, q_sub, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :],
                mask=valid_q[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_q[:, None] * stride_dos + offs_d[None, :],
                 mask=valid_q[:, None], other=0.0)
    l_off = bh.to(tl.int64) * (Tq * Hq * Wq) + rows_q
    lse = tl.load(Lse + l_off, mask=valid_q, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=valid_q, other=0.0)
    kv_head = bh.to(tl.int64) * n_k_tiles * TILE_PAD * HEAD_DIM
    kt_offs = offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # [D, BLOCK_N]
    sel = bh.to(tl.int64) * n_q_tiles + q_tile
    n_blocks = tl.load(Counts + sel) * K_SPLIT
    index_row = Indices + sel * max_keep

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_tile = tl.load(index_row)
    for j in range(0, n_blocks):
        next_tile = tl.load(index_row + (j + 1) // K_SPLIT, mask=j + 1 < n_blocks, other=0)
        start = (j % K_SPLIT) * BLOCK_N
        block = kv_head + (k_tile.to(tl.int64) * TILE_PAD + start) * HEAD_DIM
        kt = tl.load(KP + block + kt_offs)
        vt = tl.load(VP + block + kt_offs)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.exp2(qk - lse[:, None])
        if not EVEN:
            p = tl.where((start + offs_n < tl.load(TileLen + k_tile))[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
        k_tile = next_tile
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_q[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=valid_q[:, None])


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, RevIndices, RevCounts, Order,
    sm_scale, qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    num_heads, Tq, Hq, Wq, Tk, Hk, Wk, n_q_tiles, n_k_tiles,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk, dv of one key (sub-)tile, summed over the query tiles that selected it (the CSR
    transpose of the selection: RevIndices[bh, k_tile, :RevCounts[bh, k_tile]]). Programs take
    the (head, key tile) pairs in ``Order``, by descending number of selecting query tiles: the
    longest programs start first and the short ones fill the tail."""
    pid = tl.program_id(0)
    item = tl.load(Order + pid // K_SPLIT)
    bh = item // n_k_tiles
    k_tile = item % n_k_tiles
    k_sub = pid % K_SPLIT
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_k, valid_k = _tile_rows(k_tile, k_sub, Tk, Hk, Wk, TILE_T, TILE_H, TILE_W, BLOCK_N)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows_k[:, None] * stride_ks + offs_d[None, :],
                mask=valid_k[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_k[:, None] * stride_vs + offs_d[None, :],
                mask=valid_k[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    l_base = bh.to(tl.int64) * (Tq * Hq * Wq)
    rev = bh.to(tl.int64) * n_k_tiles + k_tile
    count = tl.load(RevCounts + rev)
    index_base = RevIndices + rev * n_q_tiles

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # one flat loop over (query tile, sub-block): a body per step, not Q_SPLIT unrolled copies
    # (unrolled, the 128-token tiles spilled and serialized their wgmma on sm_90)
    for j in range(0, count * Q_SPLIT):
        q_tile = tl.load(index_base + j // Q_SPLIT)
        rows_q, valid_q = _tile_rows(q_tile, j % Q_SPLIT, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
        qt = tl.load(q_base + rows_q[None, :] * stride_qs + offs_d[:, None], mask=valid_q[None, :], other=0.0)
        do = tl.load(do_base + rows_q[:, None] * stride_dos + offs_d[None, :], mask=valid_q[:, None], other=0.0)
        lse = tl.load(Lse + l_base + rows_q, mask=valid_q, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + l_base + rows_q, mask=valid_q, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2
        pt = tl.where(valid_q[None, :], tl.exp2(qkt - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows_k[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=valid_k[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows_k[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=valid_k[:, None])


def _bsa_fwd_config(tile, head_dim: int, dtype: torch.dtype) -> dict:
    """Forward blocks for one tile shape. BLOCK_M x BLOCK_N = 64 x 64 for 16-bit inputs: a 64-token
    tile (the published 4x4x4) is one block, not padded to 128; a 128-token tile is two query
    programs and two key blocks per kept tile. Three K/V stages of 64 x 128 bf16 take 96 KiB of
    shared memory (limit 227 KiB), so two blocks are in flight while one is computed."""
    slots = max(16, next_pow2(math.prod(tile)))
    if dtype == torch.float32:
        block_m, block_n, warps, stages = 32, 32, 4, 2
    elif head_dim >= 256:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    block_m, block_n = min(block_m, slots), min(block_n, slots)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, Q_SPLIT=slots // block_m, K_SPLIT=slots // block_n,
                TILE_PAD=slots, num_warps=warps, num_stages=stages)


def _bsa_bwd_blocks(tile, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block, split) of the backward kernels for one tile shape."""
    slots = max(16, next_pow2(math.prod(tile)))
    block = 32 if dtype == torch.float32 or head_dim > 128 else 64
    block = min(block, slots)
    return block, slots // block


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _tile_means_launch(x, grid, tile, n_tiles):
    B, H, S, D = x.shape
    means = torch.empty((B * H, n_tiles, D), dtype=torch.float32, device=x.device)
    slots = max(16, next_pow2(math.prod(tile)))
    block = min(slots, 64)
    _bsa_tile_mean_kernel[(n_tiles, B * H)](
        x, means, *_bhs_strides(x), H, *grid, n_tiles,
        TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2], BLOCK=block, SPLIT=slots // block, HEAD_DIM=D,
        num_warps=4,
    )
    return means


class PackedKV:
    """K and V of one attention call in tile-major order, with the mean key of every tile.

    Layout (one way, for every kernel that reads key tiles): [B*heads, n_tiles, TILE_PAD, D],
    each tile's tokens contiguous (t, h, w order), then zeros up to TILE_PAD = next power of two
    of the tile size, so every tile starts at a multiple of TILE_PAD and a key block is one
    contiguous run. Packing costs one read of K and V and one write of both; at 720p (168,960
    tokens, 32 heads of 128, bf16) that is 2.8 GB of traffic, ~0.65 ms at the H200's copy rate
    (model), against ~4% of the K/V reads of the attention itself at 0.9375 sparsity. The
    alternative, a tile-major token order for the whole block stack, would leak into RoPE, the
    norms and every caller; this keeps the (T, H, W) layout everywhere else."""

    def __init__(self, k, v, means, tile_len, grid_k, tile):
        self.k, self.v, self.means, self.tile_len = k, v, means, tile_len
        self.grid, self.tile = tuple(grid_k), tuple(tile)
        self.n_tiles, self.tile_pad = k.shape[1], k.shape[2]
        self.even = all(a % t == 0 for a, t in zip(self.grid, self.tile)) and math.prod(self.tile) == self.tile_pad

    @classmethod
    def pack(cls, k, v, grid_k, tile) -> "PackedKV":
        B, H, S, D = k.shape
        n_tiles = math.prod(tile_grid(grid_k, tile))
        slots = max(16, next_pow2(math.prod(tile)))
        kp = torch.empty((B * H, n_tiles, slots, D), dtype=k.dtype, device=k.device)
        vp = torch.empty((B * H, n_tiles, slots, D), dtype=v.dtype, device=v.device)
        means = torch.empty((B * H, n_tiles, D), dtype=torch.float32, device=k.device)
        block = min(slots, 64)
        _bsa_pack_kv_kernel[(n_tiles, B * H)](
            k, v, kp, vp, means, *_bhs_strides(k), *_bhs_strides(v), H, *grid_k, n_tiles,
            TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2], TILE_PAD=slots, BLOCK=block, SPLIT=slots // block,
            HEAD_DIM=D, num_warps=4,
        )
        return cls(kp, vp, means, tile_lengths(grid_k, tile, k.device), grid_k, tile)


def _select_launch(q, k_means, grid_q, n_k, sparsity, cdf_threshold, tile):
    """Selection from the query tiles' means and precomputed key means [B*heads, nK, D]."""
    B, H, _, D = q.shape
    n_q = math.prod(tile_grid(grid_q, tile))
    q_means = _tile_means_launch(q, grid_q, tile, n_q)
    score = torch.empty((B * H, n_q, n_k), dtype=torch.float32, device=q.device)
    block = 32
    _bsa_score_kernel[(triton.cdiv(n_q, block), triton.cdiv(n_k, block), B * H)](
        q_means, k_means, score, n_q, n_k, HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block, BLOCK_D=min(D, 32), num_warps=4,
    )
    width = selection_width(sparsity, cdf_threshold, n_k)
    indices = torch.empty((B, H, n_q, width), dtype=torch.int32, device=q.device)
    counts = torch.empty((B, H, n_q), dtype=torch.int32, device=q.device)
    nk_pad = max(16, next_pow2(n_k))
    _bsa_select_kernel[(n_q, B * H)](
        score, indices, counts,
        n_q, n_k,
        num_topk_tiles(sparsity, n_k) if sparsity is not None else 0, width,
        float(cdf_threshold) if cdf_threshold is not None else 0.0,
        1.0 / math.sqrt(D),
        USE_CDF=cdf_threshold is not None, NK_PAD=nk_pad,
        num_warps=8 if nk_pad >= 1024 else 4,
    )
    return indices, counts


def _selection_launch(q, k, grid_q, grid_k, sparsity, cdf_threshold, tile):
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    n_k = math.prod(tile_grid(grid_k, tile))
    k_means = _tile_means_launch(k, grid_k, tile, n_k)
    return _select_launch(q, k_means, grid_q, n_k, sparsity, cdf_threshold, tile)


def _kernel_geometry(latent_shape_q, latent_shape_k, tile):
    grid_q, grid_k, tile = tuple(latent_shape_q), tuple(latent_shape_k), tuple(tile)
    n_q = math.prod(tile_grid(grid_q, tile))
    n_k = math.prod(tile_grid(grid_k, tile))
    return grid_q, grid_k, tile, n_q, n_k


def _check_selection_tensors(indices, counts, q, n_q, n_k):
    B, H = q.shape[:2]
    if (indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, n_q) or not 1 <= indices.shape[3] <= n_k
            or tuple(counts.shape) != (B, H, n_q)):
        raise ValueError(
            f"selection shapes {tuple(indices.shape)}, {tuple(counts.shape)} do not match "
            f"[B, heads, nQ, max_keep <= nK] = {(B, H, n_q)} with nK = {n_k}"
        )
    return indices.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def _bsa_attend(q, packed: PackedKV, indices, counts, grid_q, scale):
    """The forward kernel over packed K/V; returns (out, lse)."""
    q = last_dim_contiguous(q)
    B, H, Sq, D = q.shape
    n_q = math.prod(tile_grid(grid_q, packed.tile))
    indices, counts = _check_selection_tensors(indices, counts, q, n_q, packed.n_tiles)
    out = _bhsd_buffer_like(q)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    cfg = _bsa_fwd_config(packed.tile, D, q.dtype)
    # grid: the query tiles of one head are adjacent (program_id 0), so the CTAs resident at one
    # time are neighbouring query tiles of the same head, whose kept key tiles overlap most; a
    # head's K/V (2 x 43 MB at 720p) is then read mostly from L2 rather than once per query tile.
    _bsa_fwd_kernel[(n_q * cfg["Q_SPLIT"], B * H)](
        q, packed.k, packed.v, out, lse, indices, counts, packed.tile_len,
        scale * LOG2E,
        *_bhs_strides(q), *_bhs_strides(out),
        H, *grid_q, n_q, packed.n_tiles, indices.shape[-1],
        TILE_T=packed.tile[0], TILE_H=packed.tile[1], TILE_W=packed.tile[2], EVEN=packed.even,
        HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out, lse


def _bsa_forward_launch(q, k, v, indices, counts, latent_shape_q, latent_shape_k, tile, scale):
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    packed = PackedKV.pack(k, v, tuple(latent_shape_k), tuple(tile))
    return _bsa_attend(q, packed, indices, counts, tuple(latent_shape_q), scale)


def reverse_selection(indices: torch.Tensor, counts: torch.Tensor, n_k: int):
    """CSR transpose of a selection, without host sync: for every (batch, head, key tile) the
    query tiles that selected it, ascending (int32 [B, heads, nK, nQ]), and how many (int32
    [B, heads, nK])."""
    by_key = selection_to_tile_mask(indices, counts, n_k).transpose(-1, -2).to(torch.uint8)
    rev_counts = by_key.sum(-1, dtype=torch.int32)
    rev_indices = torch.sort(by_key, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return rev_indices.contiguous(), rev_counts.contiguous()


def _bsa_backward_launch(grad_out, grad_lse, q, k, v, out, lse, indices, counts,
                         latent_shape_q, latent_shape_k, tile, scale):
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    grid_q, grid_k, tile, n_q, n_k = _kernel_geometry(latent_shape_q, latent_shape_k, tile)
    indices, counts = _check_selection_tensors(indices, counts, q, n_q, n_k)
    B, H, Sq, D = q.shape
    delta = bwd_delta(out, grad_out, grad_lse, lse.contiguous(), "bhsd", B, H, Sq, D)
    lse = lse.contiguous()
    rev_indices, rev_counts = reverse_selection(indices, counts, n_k)
    # (head, key tile) pairs by descending in-degree: the longest dk/dv programs are launched first
    order = torch.argsort(rev_counts.reshape(-1), descending=True, stable=True).to(torch.int32)
    dq, dk, dv = _bhsd_buffer_like(q), _bhsd_buffer_like(k), _bhsd_buffer_like(v)
    block, split = _bsa_bwd_blocks(tile, D, q.dtype)
    common = dict(
        TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2], Q_SPLIT=split, K_SPLIT=split,
        HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block * D >= 64 * 128 else 4, num_stages=2,
    )
    shape_args = (H, *grid_q, *grid_k, n_q, n_k)
    strides = (*_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(grad_out))
    packed = PackedKV.pack(k, v, grid_k, tile)
    _bsa_bwd_dq_kernel[(n_q * split, B * H)](
        q, packed.k, packed.v, grad_out, lse, delta, dq, indices, counts, packed.tile_len, scale, scale * LOG2E,
        *_bhs_strides(q), *_bhs_strides(grad_out), *_bhs_strides(dq), H, *grid_q, n_q, n_k, indices.shape[-1],
        TILE_PAD=packed.tile_pad, EVEN=packed.even, **{**common, "num_stages": 3},  # 3 K/V blocks in flight
    )
    _bsa_bwd_dkdv_kernel[(B * H * n_k * split,)](
        q, k, v, grad_out, lse, delta, dk, dv, rev_indices, rev_counts, order, scale, scale * LOG2E,
        *strides, *_bhs_strides(dk), *_bhs_strides(dv), *shape_args, **common,
    )
    return dq, dk, dv


@torch.library.custom_op("longcat::block_sparse_selection", mutates_args=())
def _bsa_selection_op(
    q: torch.Tensor, k: torch.Tensor, latent_shape_q: list[int], latent_shape_k: list[int],
    sparsity: float | None, cdf_threshold: float | None, tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _selection_launch(q, k, tuple(latent_shape_q), tuple(latent_shape_k), sparsity, cdf_threshold, tuple(tile))


@_bsa_selection_op.register_fake
def _(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile):
    B, H = q.shape[:2]
    n_q = math.prod(tile_grid(latent_shape_q, tile))
    n_k = math.prod(tile_grid(latent_shape_k, tile))
    width = selection_width(sparsity, cdf_threshold, n_k)
    return (q.new_empty((B, H, n_q, width), dtype=torch.int32), q.new_empty((B, H, n_q), dtype=torch.int32))


@torch.library.custom_op("longcat::block_sparse_attention", mutates_args=())
def _bsa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, latent_shape_q: list[int], latent_shape_k: list[int],
    sparsity: float | None, cdf_threshold: float | None, tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gating and forward in one op: K and V are packed once, and the pass that packs them also
    gives the key means the gating needs. Returns (out, lse, indices, counts)."""
    grid_q, grid_k, tile = tuple(latent_shape_q), tuple(latent_shape_k), tuple(tile)
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    packed = PackedKV.pack(k, v, grid_k, tile)
    indices, counts = _select_launch(last_dim_contiguous(q), packed.means, grid_q, packed.n_tiles,
                                     sparsity, cdf_threshold, tile)
    out, lse = _bsa_attend(q, packed, indices, counts, grid_q, scale)
    return out, lse, indices, counts


@_bsa_op.register_fake
def _(q, k, v, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile, scale):
    B, H, Sq, _ = q.shape
    n_q = math.prod(tile_grid(latent_shape_q, tile))
    n_k = math.prod(tile_grid(latent_shape_k, tile))
    width = selection_width(sparsity, cdf_threshold, n_k)
    return (_bhsd_buffer_like(q), q.new_empty((B, H, Sq), dtype=torch.float32),
            q.new_empty((B, H, n_q, width), dtype=torch.int32), q.new_empty((B, H, n_q), dtype=torch.int32))


@torch.library.custom_op("longcat::block_sparse_attention_packed", mutates_args=())
def _bsa_packed_op(
    q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, k_means: torch.Tensor, tile_len: torch.Tensor,
    latent_shape_q: list[int], latent_shape_k: list[int], sparsity: float | None, cdf_threshold: float | None,
    tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_bsa_op`` against keys packed once (``block_sparse_keys``) for several query calls
    (inference: no backward)."""
    grid_q, tile = tuple(latent_shape_q), tuple(tile)
    packed = PackedKV(kp, vp, k_means, tile_len, tuple(latent_shape_k), tile)
    indices, counts = _select_launch(last_dim_contiguous(q), packed.means, grid_q, packed.n_tiles,
                                     sparsity, cdf_threshold, tile)
    out, lse = _bsa_attend(q, packed, indices, counts, grid_q, scale)
    return out, lse, indices, counts


@_bsa_packed_op.register_fake
def _(q, kp, vp, k_means, tile_len, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile, scale):
    B, H, Sq, _ = q.shape
    n_q = math.prod(tile_grid(latent_shape_q, tile))
    width = selection_width(sparsity, cdf_threshold, kp.shape[1])
    return (_bhsd_buffer_like(q), q.new_empty((B, H, Sq), dtype=torch.float32),
            q.new_empty((B, H, n_q, width), dtype=torch.int32), q.new_empty((B, H, n_q), dtype=torch.int32))


@torch.library.custom_op("longcat::block_sparse_attention_backward", mutates_args=())
def _bsa_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    latent_shape_q: list[int], latent_shape_k: list[int], tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bsa_backward_launch(grad_out, grad_lse, q, k, v, out, lse, indices, counts,
                                latent_shape_q, latent_shape_k, tile, scale)


@_bsa_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, indices, counts, latent_shape_q, latent_shape_k, tile, scale):
    return _bhsd_buffer_like(q), _bhsd_buffer_like(k), _bhsd_buffer_like(v)


def _bsa_setup_context(ctx, inputs, output):
    q, k, v, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile, scale = inputs
    out, lse, indices, counts = output
    ctx.mark_non_differentiable(indices, counts)
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)
    ctx.params = (latent_shape_q, latent_shape_k, tile, scale)


def _bsa_backward(ctx, grad_out, grad_lse, _grad_indices, _grad_counts):
    q, k, v, out, lse, indices, counts = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bsa_backward_op(grad_out, grad_lse, q, k, v, out, lse, indices, counts, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


_bsa_op.register_autograd(_bsa_backward, setup_context=_bsa_setup_context)


def _opt_float(x):
    return None if x is None else float(x)


def block_sparse_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    tile=DEFAULT_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BSA gating (Triton threshold select, no sort): (indices int32 [B, heads, nQ, max_keep],
    the kept key tiles of each query tile in ascending order, -1 after the count; counts int32
    [B, heads, nQ]). Not differentiable. The same selection as
    ``block_sparse_selection_reference``."""
    _check_qkv(q, k, k)
    grid_q, grid_k, tile = check_block_sparse_args(
        q.shape[2], k.shape[2], latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    if not triton_runs_on(q, k):
        fallback_warning("block_sparse_selection")
        return block_sparse_selection_reference(q, k, grid_q, grid_k, sparsity, cdf_threshold, tile)
    check_kernel_inputs(q.shape[-1], q=q, k=k)
    return _bsa_selection_op(q.detach(), k.detach(), list(grid_q), list(grid_k),
                             _opt_float(sparsity), _opt_float(cdf_threshold), list(tile))


def block_sparse_keys(k: torch.Tensor, v: torch.Tensor, latent_shape_k, tile=DEFAULT_TILE) -> PackedKV | None:
    """K and V packed tile-major with their key-tile means, to be passed as ``keys=`` to several
    ``block_sparse_attention`` calls against the same k and v (query chunks): the packing and the
    key means are then computed once per call site, not once per chunk. Inference only. Returns
    None where the Triton path does not run (the attention call then falls back as usual)."""
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    if not triton_runs_on(k, v):
        return None
    grid_k = check_latent_shape("latent_shape_k", latent_shape_k, num_tokens=k.shape[2])
    _, _, tile = check_block_sparse_args(k.shape[2], k.shape[2], grid_k, grid_k, 0.0, None, tile)
    check_kernel_inputs(k.shape[-1], k=k, v=v)
    k, v = last_dim_contiguous(k.detach()), last_dim_contiguous(v.detach())
    return PackedKV.pack(k, v, grid_k, tile)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    tile=DEFAULT_TILE,
    scale: float | None = None,
    return_lse: bool = False,
    return_selection: bool = False,
    keys: PackedKV | None = None,
):
    """Block-sparse 3D attention (Triton forward and backward; the selection is not differentiated).

    q: [B, heads, Sq, D], k, v: [B, heads, Skv, D] in (T, H, W) token order, any strides with a
    contiguous last dimension; latent_shape_q/k: (T, H, W) with T*H*W == Sq / Skv; tile need not
    divide the grid. Returns out [B, heads, Sq, D] in q.dtype (memory laid out [B, Sq, heads, D]),
    then lse [B, heads, Sq] float32 if ``return_lse``, then (indices, counts) as
    ``block_sparse_selection`` if ``return_selection`` (a bare tensor when neither is asked).
    ``keys``: from ``block_sparse_keys(k, v, latent_shape_k, tile)``, to reuse the packed keys
    across calls (inference).
    """
    _check_qkv(q, k, v)
    grid_q, grid_k, tile = check_block_sparse_args(
        q.shape[2], k.shape[2], latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not triton_runs_on(q, k, v):
        fallback_warning("block_sparse_attention")
        return block_sparse_attention_reference(
            q, k, v, grid_q, grid_k, sparsity, cdf_threshold, tile, scale, return_lse, return_selection
        )
    check_kernel_inputs(q.shape[-1], q=q, k=k, v=v)
    if keys is not None:
        B, H, _, D = k.shape
        if keys.grid != grid_k or keys.tile != tile or tuple(keys.k.shape) != (B * H, keys.n_tiles, keys.tile_pad, D) \
                or keys.k.dtype != k.dtype or keys.k.device != k.device:
            raise ValueError(f"keys were packed for grid {keys.grid}, tile {keys.tile}, shape {tuple(keys.k.shape)}; "
                             f"this call has grid {grid_k}, tile {tile}, k {tuple(k.shape)} {k.dtype}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("keys= is for inference: it has no backward (call without keys to differentiate)")
        out, lse, indices, counts = _bsa_packed_op(q, keys.k, keys.v, keys.means, keys.tile_len, list(grid_q),
                                                   list(grid_k), _opt_float(sparsity), _opt_float(cdf_threshold),
                                                   list(tile), float(scale))
    else:
        out, lse, indices, counts = _bsa_op(q, k, v, list(grid_q), list(grid_k), _opt_float(sparsity),
                                            _opt_float(cdf_threshold), list(tile), float(scale))
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_selection:
        result += ((indices, counts),)
    return result[0] if len(result) == 1 else result
