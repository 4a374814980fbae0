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

import triton
import triton.language as tl

from ._launch import cdiv, row_tile
from ._runtime import check_latent_shape, check_same_device, check_tensor, fallback_warning, triton_runs_on

__all__ = [
    "rms_norm",
    "rope_3d",
    "rms_norm_reference",
    "rope_3d_split",
    "rope_3d_frequencies",
    "rope_3d_reference",
]

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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


# ----------------------------------------------------------------------------------------------
# Rotation tables for the kernels.
#
# The kernels rotate channel pairs (2i, 2i+1); both channels of a pair share one angle, and an
# angle depends on one axis position only. So instead of the [T*H*W, D] table the kernels read a
# [T + H + W, D/2] table: row t (temporal pairs), row T + h (height pairs), row T + H + w (width
# pairs). Its angles are the reference's float32 angles bit for bit (same expression), and cos/sin
# are taken on the target device as the reference does, so the kernels' cos/sin equal the
# reference table's exactly; it is a few KB and stays in cache. (Computing cos/sin in-kernel
# would save nothing measurable: the table is <1% of the traffic of q and k.)
# ----------------------------------------------------------------------------------------------

_PAIR_TABLES: dict = {}


def rope_pair_tables(head_dim: int, grid, frame_offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape [T + H + W, head_dim // 2] float32 on ``device`` (cached)."""
    T, H, W = grid
    key = (int(head_dim), (T, H, W), int(frame_offset), str(torch.device(device)))
    hit = _PAIR_TABLES.get(key)
    if hit is not None:
        return hit
    d_t, d_h, d_w = rope_3d_split(head_dim)
    half = head_dim // 2
    ang = torch.zeros(T + H + W, half, dtype=torch.float32)
    col = 0
    row = 0
    for n, d, start in ((T, d_t, frame_offset), (H, d_h, 0), (W, d_w, 0)):
        pos = torch.arange(start, start + n, dtype=torch.float32)
        ang[row : row + n, col : col + d // 2] = torch.einsum("n,f->nf", pos, _axis_inv_freq(d, ROPE_BASE))
        row += n
        col += d // 2
    ang = ang.to(device)
    tables = (ang.cos().contiguous(), ang.sin().contiguous())
    if len(_PAIR_TABLES) > 256:
        _PAIR_TABLES.clear()
    _PAIR_TABLES[key] = tables
    return tables


@triton.jit
def _rope_pair_cos_sin(COS, SIN, n, H, W, T, HALF_T, HALF_TH, HALF, pcols, mask):
    """cos/sin [ROWS, BLOCK_HALF] for tokens n (int64 [ROWS]) and pair columns pcols."""
    t = n // (H * W)
    hh = (n // W) % H
    ww = n % W
    tab_row = tl.where(
        pcols[None, :] < HALF_T,
        t[:, None],
        tl.where(pcols[None, :] < HALF_TH, T + hh[:, None], T + H + ww[:, None]),
    )
    offs = tab_row * HALF + pcols[None, :]
    c = tl.load(COS + offs, mask=mask, other=0.0)
    s = tl.load(SIN + offs, mask=mask, other=0.0)
    return c, s


@triton.jit
def _rope_3d_kernel(
    X, OUT, COS, SIN, n_rows, S, T, H, W, HALF_T, HALF_TH, HALF,
    INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pcols = tl.arange(0, BLOCK_HALF)
    mask = (rows < n_rows)[:, None] & (pcols < HALF)[None, :]
    c, s = _rope_pair_cos_sin(COS, SIN, rows % S, H, W, T, HALF_T, HALF_TH, HALF, pcols, mask)
    if INVERSE:  # the transpose of the rotation: the backward of RoPE
        s = -s
    offs = rows[:, None] * (2 * HALF) + 2 * pcols[None, :]
    x0 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + offs + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x0 * c - x1 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + offs + 1, (x1 * c + x0 * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    X, W, OUT, n_rows, D, eps,
    X_DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # cast back to x's dtype, then times the weight in the promoted dtype (stored as OUT's dtype)
    y = (x * r[:, None]).to(X_DTYPE).to(tl.float32) * w[None, :]
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _launch_rope_3d(x, grid, frame_offset, inverse):
    x = x.contiguous()
    B, heads, S, D = x.shape
    T, H, W = grid
    d_t, d_h, _ = rope_3d_split(D)
    cos, sin = rope_pair_tables(D, grid, frame_offset, x.device)
    out = torch.empty_like(x)
    n_rows = B * heads * S
    BLOCK_HALF, ROWS, warps = row_tile(D // 2)
    if n_rows:
        _rope_3d_kernel[(cdiv(n_rows, ROWS),)](
            x, out, cos, sin, n_rows, S, T, H, W, d_t // 2, (d_t + d_h) // 2, D // 2,
            INVERSE=inverse, ROWS=ROWS, BLOCK_HALF=BLOCK_HALF, num_warps=warps,
        )
    return out


def _launch_rms_norm(x, weight, eps):
    x = x.contiguous()
    D = x.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    n_rows = x.numel() // D if D else 0
    BLOCK_D, ROWS, warps = row_tile(D)
    if n_rows:
        _rms_norm_kernel[(cdiv(n_rows, ROWS),)](
            x, weight, out, n_rows, D, eps,
            X_DTYPE=_TL_DTYPES[x.dtype], ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=warps,
        )
    return out


def rms_norm_backward_math(x, weight, grad, eps):
    """Gradients (dx in x.dtype, dweight in weight.dtype) of rms_norm_reference, in float32 torch
    ops (the casts are straight-through). Traceable, so usable inside compiled backward graphs."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = (xf * r).to(x.dtype).float()
    g = grad.float()
    dweight = (g * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    dn = g * weight.float()
    dx = r * dn - xf * r.pow(3) * (dn * xf).mean(-1, keepdim=True)
    return dx.to(x.dtype), dweight


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "longcat::rope_3d",
    mutates_args=(),
    schema="(Tensor x, int T, int H, int W, int frame_offset, bool inverse) -> Tensor",
)
def _rope_3d_op(x, T, H, W, frame_offset, inverse):
    return _launch_rope_3d(x, (T, H, W), frame_offset, inverse)


@_rope_3d_op.register_fake
def _(x, T, H, W, frame_offset, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _rope_backward(ctx, grad):
    T, H, W, frame_offset, inverse = ctx.args
    return _rope_3d_op(grad, T, H, W, frame_offset, not inverse), None, None, None, None, None


_rope_3d_op.register_autograd(_rope_backward, setup_context=_rope_setup)


@torch.library.custom_op("longcat::rms_norm", mutates_args=(), schema="(Tensor x, Tensor weight, float eps) -> Tensor")
def _rms_norm_op(x, weight, eps):
    return _launch_rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_backward_math(x, weight, grad, ctx.eps)
    return dx, dweight, None


_rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def rope_3d(x: torch.Tensor, grid, frame_offset: int = 0) -> torch.Tensor:
    """3D RoPE of x [B, heads, S, D] over the token grid (T, H, W), S = T*H*W, temporal positions
    starting at ``frame_offset``; float32 math, result in x.dtype (a new contiguous tensor).
    Matches :func:`rope_3d_reference`. Differentiable w.r.t. x."""
    check_tensor("x", x, ndim=4, dtypes=ACT_DTYPES)
    grid = check_latent_shape("grid", grid, num_tokens=x.shape[2])
    rope_3d_split(x.shape[-1])
    if int(frame_offset) != frame_offset or frame_offset < 0:
        raise ValueError(f"frame_offset must be an int >= 0, got {frame_offset!r}")
    if triton_runs_on(x):
        return _rope_3d_op(x, *grid, int(frame_offset), False)
    fallback_warning("rope_3d")
    return rope_3d_reference(x, grid, frame_offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape, e.g. [B, N, heads, D]): float32
    statistics, cast back to x.dtype, then times ``weight`` [D]; the result has the promoted
    dtype of x and weight, as :func:`rms_norm_reference`. Differentiable w.r.t. x and weight."""
    check_tensor("x", x, dtypes=ACT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_tensor("weight", weight, ndim=1, dtypes=ACT_DTYPES, last_dim=x.shape[-1])
    if x.shape[-1] > 65536:
        raise ValueError(f"x has rows of {x.shape[-1]} elements; at most 65536 are supported")
    check_same_device(x=x, weight=weight)
    if triton_runs_on(x, weight):
        return _rms_norm_op(x, weight, float(eps))
    fallback_warning("rms_norm")
    return rms_norm_reference(x, weight, eps)
