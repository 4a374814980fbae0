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
