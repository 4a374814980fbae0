"""Block-sparse 3D attention (BSA) of the LongCat-Video 720p refinement stage.

Tokens in (T, H, W) order are grouped into 3D tiles of ``tile = (t, h, w)`` tokens (tile index
ordered T-tiles, H-tiles, W-tiles). Each query tile keeps the key tiles whose mean key scores
highest against its mean query (``score = mean(q_tile) @ mean(k_tile)^T``, unscaled):
- top-k: ``int((1 - sparsity) * num_key_tiles)`` tiles;
- CDF: ``softmax(score / sqrt(D))`` sorted descending, the number of cumulative sums that are
  <= ``cdf_threshold`` (``torch.searchsorted(..., right=True)``, upstream's rule);
- both: the larger of the two counts.
Every query then attends exactly (softmax, scale D^-0.5) to the tokens of its selected tiles.

Beyond upstream: grids need not be multiples of the tile (edge tiles are partial and their
means are over the tokens they hold), and a query tile always keeps at least one key tile (upstream
leaves the output undefined when a rule selects nothing).
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
    return grid_q, grid_k, tile


def tile_grid(latent_shape: Sequence[int], tile: Sequence[int]) -> tuple[int, int, int]:
    """Number of tiles along T, H, W (edge tiles may be partial)."""
    return tuple(math.ceil(s / t) for s, t in zip(latent_shape, tile))


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
    counts = torch.bincount(ids, minlength=n).to(compute)
    return sums / counts[:, None]


def num_topk_tiles(sparsity: float, num_key_tiles: int) -> int:
    """Key tiles kept by the top-k rule (upstream's expression, at least one)."""
    return max(1, int((1 - sparsity) * num_key_tiles))


def block_sparse_selection_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: float | None = 0.875,
    cdf_threshold: float | None = None,
    tile=DEFAULT_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gating of BSA. Returns (indices, counts): indices int32 [B, heads, nQ, nK] are the key
    tiles of each query tile by descending score, counts int32 [B, heads, nQ] how many are kept."""
    _check_qkv(q, k, k)
    grid_q, grid_k, tile = check_block_sparse_args(
        q.shape[2], k.shape[2], latent_shape_q, latent_shape_k, sparsity, cdf_threshold, tile
    )
    qm = tile_means_reference(q, grid_q, tile)
    km = tile_means_reference(k, grid_k, tile)
    score = torch.matmul(qm, km.transpose(-1, -2))  # [B, heads, nQ, nK]
    n_k = score.shape[-1]
    order = torch.argsort(score, dim=-1, descending=True)
    counts = None
    if cdf_threshold is not None:
        weights = torch.softmax(score / math.sqrt(q.shape[-1]), dim=-1)
        cdf = torch.cumsum(torch.gather(weights, -1, order), dim=-1)
        counts = (cdf <= cdf_threshold).sum(-1)  # == searchsorted(cdf, threshold, right=True)
    if sparsity is not None:
        topk = torch.full(score.shape[:-1], num_topk_tiles(sparsity, n_k), device=score.device)
        counts = topk if counts is None else torch.maximum(counts, topk)
    counts = counts.clamp(1, n_k)
    return order.to(torch.int32), counts.to(torch.int32)


def selection_to_tile_mask(indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [B, heads, nQ, nK]: True where a key tile is selected for a query tile."""
    n_k = indices.shape[-1]
    keep = torch.arange(n_k, device=indices.device) < counts.unsqueeze(-1).long()
    mask = torch.zeros(indices.shape, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), keep)


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
    tile = tuple(int(s) for s in tile)
    tile_mask = selection_to_tile_mask(indices, counts)
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

__all__ += ["block_sparse_attention", "block_sparse_selection"]


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
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """score[bh] = q_means[bh] @ k_means[bh]^T in fp32 (unscaled, as upstream)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < n_q
    mask_n = offs_n < n_k
    qm = tl.load(QM + (bh * n_q + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    kmt = tl.load(KM + (bh * n_k + offs_n[None, :]) * HEAD_DIM + offs_d[:, None], mask=mask_n[None, :], other=0.0)
    s = tl.dot(qm, kmt, input_precision="ieee")
    tl.store(Score + (bh * n_q + offs_m[:, None]) * n_k + offs_n[None, :], s,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsa_select_kernel(
    Score, Indices, Counts,
    n_q, n_k, topk, cdf_threshold, cdf_scale,
    USE_CDF: tl.constexpr, NK_PAD: tl.constexpr,
):
    """Sort one query tile's key-tile scores descending (carrying indices) and count the kept ones.

    Score and index travel together as one int64 sort key: the high half is the fp32 score
    mapped to an int32 of the same order, the low half the reversed index (ties: lower index
    first). Padding slots hold -inf and sort last.
    """
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh.to(tl.int64) * n_q + q_tile
    offs = tl.arange(0, NK_PAD)
    valid = offs < n_k
    s = tl.load(Score + row * n_k + offs, mask=valid, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) + (NK_PAD - 1 - offs).to(tl.int64)
    key = tl.sort(key, descending=True)
    high = key >> 32
    index = NK_PAD - 1 - (key - (high << 32)).to(tl.int32)
    tl.store(Indices + row * n_k + offs, index, mask=valid)

    count = tl.zeros([], dtype=tl.int32) + topk  # a tensor even when topk is specialised to 1
    if USE_CDF:
        high32 = high.to(tl.int32)
        sorted_bits = tl.where(high32 >= 0, high32, high32 ^ 0x7FFFFFFF)
        sorted_s = sorted_bits.to(tl.float32, bitcast=True)
        weights = tl.where(valid, tl.exp((sorted_s - tl.max(sorted_s, 0)) * cdf_scale), 0.0)
        cdf = tl.cumsum(weights / tl.sum(weights, 0), 0)
        count = tl.maximum(count, tl.sum((valid & (cdf <= cdf_threshold)).to(tl.int32), 0))
    count = tl.minimum(tl.maximum(count, 1), n_k)
    tl.store(Counts + row, count)


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, Out, Lse, Indices, Counts,
    qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    num_heads, Tq, Hq, Wq, Tk, Hk, Wk, n_q_tiles, n_k_tiles,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    q_tile = pid // Q_SPLIT
    q_sub = pid % Q_SPLIT
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_q, valid_q = _tile_rows(q_tile, q_sub, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :],
                mask=valid_q[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    sel = bh.to(tl.int64) * n_q_tiles + q_tile
    count = tl.load(Counts + sel)
    index_base = Indices + sel * n_k_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, count):
        k_tile = tl.load(index_base + i)
        for k_sub in tl.static_range(K_SPLIT):
            rows_k, valid_k = _tile_rows(k_tile, k_sub, Tk, Hk, Wk, TILE_T, TILE_H, TILE_W, BLOCK_N)
            kt = tl.load(k_base + rows_k[None, :] * stride_ks + offs_d[:, None], mask=valid_k[None, :], other=0.0)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
            qk = tl.where(valid_k[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # an edge sub-block may hold no token at all: keep exp2 away from (-inf) - (-inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rows_k[:, None] * stride_vs + offs_d[None, :], mask=valid_k[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Out + b * stride_ob + h * stride_oh + rows_q[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=valid_q[:, None])
    seqlen_q = Tq * Hq * Wq
    tl.store(Lse + bh.to(tl.int64) * seqlen_q + rows_q, lse, mask=valid_q)


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Indices, Counts,
    sm_scale, qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    num_heads, Tq, Hq, Wq, Tk, Hk, Wk, n_q_tiles, n_k_tiles,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    Q_SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    q_tile = pid // Q_SPLIT
    q_sub = pid % Q_SPLIT
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_q, valid_q = _tile_rows(q_tile, q_sub, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_q[:, None] * stride_qs + offs_d[None, :],
                mask=valid_q[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_q[:, None] * stride_dos + offs_d[None, :],
                 mask=valid_q[:, None], other=0.0)
    l_off = bh.to(tl.int64) * (Tq * Hq * Wq) + rows_q
    lse = tl.load(Lse + l_off, mask=valid_q, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=valid_q, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    sel = bh.to(tl.int64) * n_q_tiles + q_tile
    count = tl.load(Counts + sel)
    index_base = Indices + sel * n_k_tiles

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, count):
        k_tile = tl.load(index_base + i)
        for k_sub in tl.static_range(K_SPLIT):
            rows_k, valid_k = _tile_rows(k_tile, k_sub, Tk, Hk, Wk, TILE_T, TILE_H, TILE_W, BLOCK_N)
            kt = tl.load(k_base + rows_k[None, :] * stride_ks + offs_d[:, None], mask=valid_k[None, :], other=0.0)
            vt = tl.load(v_base + rows_k[None, :] * stride_vs + offs_d[:, None], mask=valid_k[None, :], other=0.0)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
            p = tl.where(valid_k[None, :], tl.exp2(qk - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_q[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=valid_q[:, None])


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, RevIndices, RevCounts,
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
    transpose of the selection: RevIndices[bh, k_tile, :RevCounts[bh, k_tile]])."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    k_tile = pid // K_SPLIT
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
    for i in range(0, count):
        q_tile = tl.load(index_base + i)
        for q_sub in tl.static_range(Q_SPLIT):
            rows_q, valid_q = _tile_rows(q_tile, q_sub, Tq, Hq, Wq, TILE_T, TILE_H, TILE_W, BLOCK_M)
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


def _bsa_blocks(tile, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(forward block, forward split, backward block, backward split) for one tile shape.
    A tile's slots are padded to a power of two >= 16 (tl.dot's minimum)."""
    slots = max(16, next_pow2(math.prod(tile)))
    if dtype == torch.float32:
        fwd, bwd = (64, 32) if head_dim <= 128 else (32, 32)
    else:
        fwd, bwd = (128, 64) if head_dim <= 128 else (64, 32)
    fwd, bwd = min(fwd, slots), min(bwd, slots)
    return fwd, slots // fwd, bwd, slots // bwd


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


def _selection_launch(q, k, grid_q, grid_k, sparsity, cdf_threshold, tile):
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    B, H, _, D = q.shape
    n_q = math.prod(tile_grid(grid_q, tile))
    n_k = math.prod(tile_grid(grid_k, tile))
    q_means = _tile_means_launch(q, grid_q, tile, n_q)
    k_means = _tile_means_launch(k, grid_k, tile, n_k)
    score = torch.empty((B * H, n_q, n_k), dtype=torch.float32, device=q.device)
    block = 32
    _bsa_score_kernel[(triton.cdiv(n_q, block), triton.cdiv(n_k, block), B * H)](
        q_means, k_means, score, n_q, n_k, HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block, num_warps=4,
    )
    indices = torch.empty((B, H, n_q, n_k), dtype=torch.int32, device=q.device)
    counts = torch.empty((B, H, n_q), dtype=torch.int32, device=q.device)
    nk_pad = max(16, next_pow2(n_k))
    _bsa_select_kernel[(n_q, B * H)](
        score, indices, counts,
        n_q, n_k,
        num_topk_tiles(sparsity, n_k) if sparsity is not None else 0,
        float(cdf_threshold) if cdf_threshold is not None else 0.0,
        1.0 / math.sqrt(D),
        USE_CDF=cdf_threshold is not None, NK_PAD=nk_pad,
        num_warps=8 if nk_pad >= 1024 else 4,
    )
    return indices, counts


def _kernel_geometry(latent_shape_q, latent_shape_k, tile):
    grid_q, grid_k, tile = tuple(latent_shape_q), tuple(latent_shape_k), tuple(tile)
    n_q = math.prod(tile_grid(grid_q, tile))
    n_k = math.prod(tile_grid(grid_k, tile))
    return grid_q, grid_k, tile, n_q, n_k


def _check_selection_tensors(indices, counts, q, n_q, n_k):
    B, H = q.shape[:2]
    if tuple(indices.shape) != (B, H, n_q, n_k) or tuple(counts.shape) != (B, H, n_q):
        raise ValueError(
            f"selection shapes {tuple(indices.shape)}, {tuple(counts.shape)} do not match "
            f"[B, heads, nQ, nK] = {(B, H, n_q, n_k)}"
        )
    return indices.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def _bsa_forward_launch(q, k, v, indices, counts, latent_shape_q, latent_shape_k, tile, scale):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    grid_q, grid_k, tile, n_q, n_k = _kernel_geometry(latent_shape_q, latent_shape_k, tile)
    indices, counts = _check_selection_tensors(indices, counts, q, n_q, n_k)
    B, H, Sq, D = q.shape
    out = _bhsd_buffer_like(q)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block, split, _, _ = _bsa_blocks(tile, D, q.dtype)
    _bsa_fwd_kernel[(n_q * split, B * H)](
        q, k, v, out, lse, indices, counts,
        scale * LOG2E,
        *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(out),
        H, *grid_q, *grid_k, n_q, n_k,
        TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2], Q_SPLIT=split, K_SPLIT=split,
        HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block * D >= 128 * 128 else 4, num_stages=2,
    )
    return out, lse


def reverse_selection(indices: torch.Tensor, counts: torch.Tensor, n_k: int):
    """CSR transpose of a selection, without host sync: for every (batch, head, key tile) the
    query tiles that selected it, ascending (int32 [B, heads, nK, nQ]), and how many (int32
    [B, heads, nK])."""
    n_sel = indices.shape[-1]
    keep = torch.arange(n_sel, device=indices.device) < counts.unsqueeze(-1)
    tile_mask = torch.zeros(indices.shape[:-1] + (n_k,), dtype=torch.bool, device=indices.device)
    tile_mask.scatter_(-1, indices.long(), keep)
    by_key = tile_mask.transpose(-1, -2).to(torch.uint8)
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
    dq, dk, dv = _bhsd_buffer_like(q), _bhsd_buffer_like(k), _bhsd_buffer_like(v)
    _, _, block, split = _bsa_blocks(tile, D, q.dtype)
    common = dict(
        TILE_T=tile[0], TILE_H=tile[1], TILE_W=tile[2], Q_SPLIT=split, K_SPLIT=split,
        HEAD_DIM=D, BLOCK_M=block, BLOCK_N=block, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block * D >= 64 * 128 else 4, num_stages=2,
    )
    shape_args = (H, *grid_q, *grid_k, n_q, n_k)
    strides = (*_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(grad_out))
    _bsa_bwd_dq_kernel[(n_q * split, B * H)](
        q, k, v, grad_out, lse, delta, dq, indices, counts, scale, scale * LOG2E,
        *strides, *_bhs_strides(dq), *shape_args, **common,
    )
    _bsa_bwd_dkdv_kernel[(n_k * split, B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, rev_indices, rev_counts, scale, scale * LOG2E,
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
    return (q.new_empty((B, H, n_q, n_k), dtype=torch.int32), q.new_empty((B, H, n_q), dtype=torch.int32))


@torch.library.custom_op("longcat::block_sparse_attention", mutates_args=())
def _bsa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    latent_shape_q: list[int], latent_shape_k: list[int], tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bsa_forward_launch(q, k, v, indices, counts, latent_shape_q, latent_shape_k, tile, scale)


@_bsa_op.register_fake
def _(q, k, v, indices, counts, latent_shape_q, latent_shape_k, tile, scale):
    B, H, Sq, _ = q.shape
    return _bhsd_buffer_like(q), q.new_empty((B, H, Sq), dtype=torch.float32)


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
    q, k, v, indices, counts, latent_shape_q, latent_shape_k, tile, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)
    ctx.params = (latent_shape_q, latent_shape_k, tile, scale)


def _bsa_backward(ctx, grad_out, grad_lse):
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
    """The BSA gating (Triton): (indices int32 [B, heads, nQ, nK], key tiles of each query tile
    by descending score; counts int32 [B, heads, nQ], how many of them are kept). Not
    differentiable. Same semantics as ``block_sparse_selection_reference``."""
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
):
    """Block-sparse 3D attention (Triton forward and backward; the selection is not differentiated).

    q: [B, heads, Sq, D], k, v: [B, heads, Skv, D] in (T, H, W) token order, any strides with a
    contiguous last dimension; latent_shape_q/k: (T, H, W) with T*H*W == Sq / Skv; tile need not
    divide the grid. Returns out [B, heads, Sq, D] in q.dtype (memory laid out [B, Sq, heads, D]),
    then lse [B, heads, Sq] float32 if ``return_lse``, then (indices, counts) as
    ``block_sparse_selection`` if ``return_selection`` (a bare tensor when neither is asked).
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
    indices, counts = _bsa_selection_op(q.detach(), k.detach(), list(grid_q), list(grid_k),
                                        _opt_float(sparsity), _opt_float(cdf_threshold), list(tile))
    out, lse = _bsa_op(q, k, v, indices, counts, list(grid_q), list(grid_k), list(tile), float(scale))
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_selection:
        result += ((indices, counts),)
    return result[0] if len(result) == 1 else result
