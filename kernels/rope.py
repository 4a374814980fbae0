"""Per-head RMSNorm and 3D rotary position embedding (RoPE) of the DiT attention.

q and k are RMS-normalised over head_dim in float32 (eps 1e-6), cast back, then multiplied by
the norm weight. 3D RoPE splits head_dim D into a temporal part d_t = D - 4*(D//6) and height and
width parts d_h = d_w = 2*(D//6). Each axis uses the frequencies ``1 / base**(2i / d_axis)``,
each repeated twice so the rotation acts on adjacent channel pairs (2i, 2i+1):
``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``. Positions are 0..T-1, 0..H-1, 0..W-1 on the
latent token grid (tokens ordered T, H, W); ``frame_offset`` shifts the temporal positions, which
is how queries of new frames are placed after cached condition frames.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ._runtime import check_latent_shape, check_same_device, check_tensor

__all__ = ["rms_norm_reference", "rope_3d_split", "rope_3d_frequencies", "rope_3d_reference"]

ROPE_BASE = 10000.0


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch oracle of RMSNorm over the last dimension: float32 statistics, cast back to
    x.dtype, then times ``weight`` (upstream's order, so the result takes the promoted dtype)."""
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1, last_dim=x.shape[-1])
    check_same_device(x=x, weight=weight)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rope_3d_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of head_dim given to the (T, H, W) axes."""
    if head_dim <= 0 or head_dim % 8 != 0:
        raise ValueError(f"3D RoPE needs head_dim to be a positive multiple of 8, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis_inv_freq(dim: int, base: float) -> torch.Tensor:
    # Same expression as upstream so float32 tables agree bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


@lru_cache(maxsize=64)
def _rope_angles_cpu(head_dim: int, grid: tuple[int, int, int], frame_offset: int, base: float) -> torch.Tensor:
    T, H, W = grid
    d_t, d_h, d_w = rope_3d_split(head_dim)
    parts = []
    for n, d, axis in ((T, d_t, 0), (H, d_h, 1), (W, d_w, 2)):
        start = frame_offset if axis == 0 else 0
        pos = torch.arange(start, start + n, dtype=torch.float32)
        ang = torch.einsum("n,f->nf", pos, _axis_inv_freq(d, base)).repeat_interleave(2, dim=-1)  # [n, d]
        view = [1, 1, 1, d]
        view[axis] = n
        parts.append(ang.view(view).expand(T, H, W, d))
    return torch.cat(parts, dim=-1).reshape(T * H * W, head_dim)


def rope_3d_frequencies(
    head_dim: int,
    grid,
    frame_offset: int = 0,
    device: torch.device | str | None = None,
    base: float = ROPE_BASE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables of shape [T*H*W, head_dim] in float32 for the token grid ``grid``."""
    grid = check_latent_shape("grid", grid)
    if frame_offset < 0:
        raise ValueError(f"frame_offset must be >= 0, got {frame_offset}")
    ang = _rope_angles_cpu(int(head_dim), grid, int(frame_offset), float(base)).to(device)
    return ang.cos(), ang.sin()


def rope_3d_reference(x: torch.Tensor, grid, frame_offset: int = 0) -> torch.Tensor:
    """Plain-PyTorch oracle. x: [B, heads, S, D] with S = T*H*W of ``grid``; float32 math,
    result in x.dtype."""
    check_tensor("x", x, ndim=4)
    check_latent_shape("grid", grid, num_tokens=x.shape[2])
    cos, sin = rope_3d_frequencies(x.shape[-1], grid, frame_offset, device=x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return (xf * cos.to(compute) + rotated * sin.to(compute)).to(x.dtype)
