"""QKV post-processing of the DiT self-attention in one pass over the fused qkv GEMM output.

From qkv [B, N, 3C] (viewed as [B, N, 3, heads, D], C = heads * D) produce q and k with per-head
RMSNorm (``rms_norm_reference`` semantics: float32 statistics, cast to the activation dtype, times
the weight) followed by 3D RoPE (``rope_3d_reference``), each a contiguous [B, heads, N, D] tensor
in the activation dtype; optionally also k after the norm and before RoPE (what the KV cache
stores). v is returned as a strided view of qkv (attention kernels take strides), so it is never
copied. One read of the q and k columns, one write of each output.

``parts`` serves the frame-chunked block, whose GEMMs produce q alone ([B, N, C], ``parts="q"``)
or k and v together ([B, N, 2C], ``parts="kv"``).

Kernel layout: a program takes ROWS tokens of HEADS_PER_PROGRAM heads (the heads spread over grid
axis 1). Every head's [ROWS, D] tile is loaded and stored contiguously (128-bit accesses: D = 128
bf16 is 256 bytes per token), and the rotation pairs (2i, 2i+1) are separated in registers with
reshape + split and put back with join, not with stride-2 loads. The rotation tables are loaded
once per program and reused by its heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv
from ._runtime import check_latent_shape, check_same_device, check_tensor, fallback_warning, interpreter_enabled, triton_runs_on
from .rope import (
    ACT_DTYPES,
    _rope_3d_op,
    _rope_pair_cos_sin,
    rms_norm_backward_math,
    rms_norm_reference,
    rope_3d_reference,
    rope_3d_split,
    rope_pair_tables,
)

__all__ = ["qkv_norm_rope", "qkv_norm_rope_reference", "QKV_PARTS"]

# parts -> (number of C-wide column groups in the input, column group of q, of k; None: absent)
QKV_PARTS = {"qkv": (3, 0, 1), "q": (1, 0, None), "kv": (2, None, 0)}


def _check_parts(parts: str):
    if parts not in QKV_PARTS:
        raise ValueError(f"parts must be one of {tuple(QKV_PARTS)}, got {parts!r}")
    return QKV_PARTS[parts]


def qkv_norm_rope_reference(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    num_heads: int,
    grid,
    frame_offset: int = 0,
    eps: float = 1e-6,
    return_k_pre_rope: bool = False,
    parts: str = "qkv",
):
    """Plain-PyTorch oracle: the unfused upstream sequence, results cast to qkv.dtype.
    parts "qkv": returns (q, k, v) or (q, k, v, k_pre_rope); "q": (q,); "kv": (k, v) or
    (k, v, k_pre_rope); each [B, heads, N, D] (v a view of qkv)."""
    check_tensor("qkv", qkv, ndim=3)
    groups, q_col, k_col = _check_parts(parts)
    B, N, width = qkv.shape
    D = width // (groups * num_heads)
    x = qkv.view(B, N, groups, num_heads, D).permute(2, 0, 3, 1, 4)  # [groups, B, heads, N, D]
    out = ()
    if q_col is not None:
        q = rms_norm_reference(x[q_col], q_weight, eps)
        out += (rope_3d_reference(q, grid, frame_offset).to(qkv.dtype),)
    if k_col is not None:
        k_pre = rms_norm_reference(x[k_col], k_weight, eps)
        out += (rope_3d_reference(k_pre, grid, frame_offset).to(qkv.dtype), x[k_col + 1])
        if return_k_pre_rope:
            out += (k_pre.to(qkv.dtype),)
    return out


@triton.jit
def _norm_rope_tile(
    SRC, src_offs, OUT, out_offs, KPRE, w, c, s, mask, eps,
    ACT: tl.constexpr, ROUND_PROD: tl.constexpr, STORE_PRE: tl.constexpr,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """RMSNorm one head's [ROWS, BLOCK_D] tile, rotate its channel pairs, store (and the pre-RoPE
    values when STORE_PRE)."""
    x = tl.load(SRC + src_offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    p = (x * r[:, None]).to(ACT).to(tl.float32) * w[None, :]
    if ROUND_PROD:  # the weight has the activation dtype: the product is rounded to it
        p = p.to(ACT).to(tl.float32)
    if STORE_PRE:
        tl.store(KPRE + out_offs, p.to(ACT), mask=mask)
    p0, p1 = tl.split(tl.reshape(p, [ROWS, BLOCK_D // 2, 2]))
    y = tl.reshape(tl.join(p0 * c - p1 * s, p1 * c + p0 * s), [ROWS, BLOCK_D])
    tl.store(OUT + out_offs, y.to(ACT), mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(
    SRC, WQ, WK, Q, K, KPRE, COS, SIN,
    n_rows, N, HEADS, T, H, W, HALF_T, HALF_TH, src_row, q_col, k_col, eps,
    ACT: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr, ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr,
    STORE_KPRE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
):
    pid_r = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS_PER_PROGRAM
    rows = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat token index b * N + n
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HEAD_DIM
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    pcols = tl.arange(0, BLOCK_D // 2)
    pmask = (rows < n_rows)[:, None] & (pcols < HEAD_DIM // 2)[None, :]
    b = rows // N
    n = rows % N
    # per-token rotation: loaded once, reused by every head of the program
    c, s = _rope_pair_cos_sin(COS, SIN, n, H, W, T, HALF_T, HALF_TH, HEAD_DIM // 2, pcols, pmask)
    src_base = rows[:, None] * src_row + cols[None, :]
    if HAS_Q:
        wq = tl.load(WQ + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_K:
        wk = tl.load(WK + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in tl.static_range(HEADS_PER_PROGRAM):
        hd = head0 + i
        out_offs = ((b * HEADS + hd) * N + n)[:, None] * HEAD_DIM + cols[None, :]
        if HAS_Q:
            _norm_rope_tile(SRC, src_base + q_col + hd * HEAD_DIM, Q, out_offs, KPRE, wq, c, s, mask, eps,
                            ACT, ROUND_Q, False, ROWS, HEAD_DIM, BLOCK_D)
        if HAS_K:
            _norm_rope_tile(SRC, src_base + k_col + hd * HEAD_DIM, K, out_offs, KPRE, wk, c, s, mask, eps,
                            ACT, ROUND_K, STORE_KPRE, ROWS, HEAD_DIM, BLOCK_D)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _tile_config(num_heads: int, block_d: int) -> tuple[int, int, int]:
    """(ROWS, HEADS_PER_PROGRAM, num_warps). On a GPU, for D = 128: 32 tokens x 2 heads per
    program of 8 warps, 16 contiguous bytes per thread and access, 80 registers (sm_90 static
    compile). Under the interpreter: the fewest program instances."""
    if interpreter_enabled():
        return max(1, min(64, 8192 // block_d)), num_heads, 1
    rows = max(1, min(32, 4096 // block_d))
    return rows, 2 if num_heads % 2 == 0 else 1, max(1, min(8, rows * block_d // 512))


def _launch_qkv_norm_rope(src, q_weight, k_weight, num_heads, grid, frame_offset, eps, parts, return_k_pre):
    groups, q_col, k_col = QKV_PARTS[parts]
    src = src.contiguous()
    B, N, width = src.shape
    C = width // groups
    D = C // num_heads
    d_t, d_h, _ = rope_3d_split(D)
    cos, sin = rope_pair_tables(D, grid, frame_offset, src.device)
    shape = (B, num_heads, N, D)
    q = src.new_empty(shape) if q_col is not None else src.new_empty(0)
    k = src.new_empty(shape) if k_col is not None else src.new_empty(0)
    k_pre = src.new_empty(shape) if return_k_pre and k_col is not None else src.new_empty(0)
    n_rows = B * N
    block_d = triton.next_power_of_2(D)
    rows, heads_per_program, warps = _tile_config(num_heads, block_d)
    if n_rows:
        act = src.dtype
        _qkv_norm_rope_kernel[(cdiv(n_rows, rows), num_heads // heads_per_program)](
            src, q_weight if q_col is not None else src, k_weight if k_col is not None else src,
            q if q_col is not None else src, k if k_col is not None else src, k_pre if k_pre.numel() else src,
            cos, sin, n_rows, N, num_heads, grid[0], grid[1], grid[2], d_t // 2, (d_t + d_h) // 2,
            width, (q_col or 0) * C, (k_col or 0) * C, eps,
            ACT=_TL_DTYPES[act], HAS_Q=q_col is not None, HAS_K=k_col is not None,
            ROUND_Q=q_col is not None and torch.promote_types(act, q_weight.dtype) == act,
            ROUND_K=k_col is not None and torch.promote_types(act, k_weight.dtype) == act,
            STORE_KPRE=bool(k_pre.numel()), HEAD_DIM=D, BLOCK_D=block_d,
            ROWS=rows, HEADS_PER_PROGRAM=heads_per_program, num_warps=warps,
        )
    return q, k, k_pre


@torch.library.custom_op(
    "longcat::qkv_norm_rope",
    mutates_args=(),
    schema="(Tensor src, Tensor? q_weight, Tensor? k_weight, int num_heads, int T, int H, int W, "
    "int frame_offset, float eps, str parts, bool return_k_pre) -> (Tensor, Tensor, Tensor)",
)
def _qkv_norm_rope_op(src, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, parts, return_k_pre):
    return _launch_qkv_norm_rope(src, q_weight, k_weight, num_heads, (T, H, W), frame_offset, eps, parts, return_k_pre)


@_qkv_norm_rope_op.register_fake
def _(src, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, parts, return_k_pre):
    groups, q_col, k_col = QKV_PARTS[parts]
    B, N, width = src.shape
    shape = (B, num_heads, N, width // (groups * num_heads))
    return (src.new_empty(shape if q_col is not None else 0), src.new_empty(shape if k_col is not None else 0),
            src.new_empty(shape if return_k_pre and k_col is not None else 0))


def _qkv_setup(ctx, inputs, output):
    src, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, parts, return_k_pre = inputs
    ctx.save_for_backward(src, q_weight, k_weight)
    ctx.args = (num_heads, T, H, W, frame_offset, eps, parts)


def _qkv_backward(ctx, dq, dk, dk_pre):
    # PyTorch backward (float32 math) around the Triton inverse RoPE; the norm weights' grads are
    # straight-through the casts to the activation dtype. v is a view of the input: its gradient
    # reaches the input through the view, so the v columns get 0 here.
    src, q_weight, k_weight = ctx.saved_tensors
    num_heads, T, H, W, frame_offset, eps, parts = ctx.args
    groups, q_col, k_col = QKV_PARTS[parts]
    B, N, width = src.shape
    D = width // (groups * num_heads)
    x = src.view(B, N, groups, num_heads, D)
    zero = src.new_zeros((B, N, num_heads, D))
    dsrc = [zero] * groups
    dwq = dwk = None

    def norm_rope_grad(g, g_pre, col, weight):
        g = g if g is not None and g.numel() else src.new_zeros((B, num_heads, N, D))
        d_pre = _rope_3d_op(g.to(torch.float32), T, H, W, frame_offset, True)
        if g_pre is not None and g_pre.numel():
            d_pre = d_pre + g_pre.float()
        return rms_norm_backward_math(x[:, :, col], weight, d_pre.transpose(1, 2), eps)

    if q_col is not None:
        dsrc[q_col], dwq = norm_rope_grad(dq, None, q_col, q_weight)
    if k_col is not None:
        dsrc[k_col], dwk = norm_rope_grad(dk, dk_pre, k_col, k_weight)
    return torch.stack(dsrc, dim=2).reshape(B, N, width), dwq, dwk, None, None, None, None, None, None, None, None


_qkv_norm_rope_op.register_autograd(_qkv_backward, setup_context=_qkv_setup)


def qkv_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    num_heads: int,
    grid,
    frame_offset: int = 0,
    eps: float = 1e-6,
    return_k_pre_rope: bool = False,
    parts: str = "qkv",
):
    """Split the fused qkv GEMM output and apply q/k RMSNorm and 3D RoPE in one pass.

    qkv: [B, N, 3C] float16/bfloat16/float32 (viewed as [B, N, 3, heads, D], D a multiple of 8);
    q_weight, k_weight: [D]; grid: (T, H, W) with T*H*W = N; frame_offset shifts the temporal
    positions. Returns (q, k, v), or (q, k, v, k_pre_rope) when asked: q, k and k_pre_rope are
    contiguous [B, heads, N, D] tensors in qkv.dtype, v is a [B, heads, N, D] view of qkv.
    ``parts="q"``: qkv is [B, N, C] holding q only, returns (q,) (k_weight unused, may be None);
    ``parts="kv"``: qkv is [B, N, 2C] holding k then v, returns (k, v) or (k, v, k_pre_rope)
    (q_weight unused, may be None). Differentiable w.r.t. qkv and the weights used.
    """
    groups, q_col, k_col = _check_parts(parts)
    check_tensor("qkv", qkv, ndim=3, dtypes=ACT_DTYPES)
    if int(num_heads) != num_heads or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    B, N, width = qkv.shape
    if width % (groups * num_heads) != 0:
        raise ValueError(f"qkv last dimension {width} is not {groups} * num_heads({num_heads}) * head_dim (parts={parts!r})")
    D = width // (groups * num_heads)
    rope_3d_split(D)
    weights = {}
    for name, w, used in (("q_weight", q_weight, q_col is not None), ("k_weight", k_weight, k_col is not None)):
        if not used:
            continue
        check_tensor(name, w, ndim=1, dtypes=ACT_DTYPES)
        if w.shape[0] != D:
            raise ValueError(f"{name} must have shape [head_dim={D}], got {tuple(w.shape)}")
        weights[name] = w
    q_weight, k_weight = weights.get("q_weight"), weights.get("k_weight")
    grid = check_latent_shape("grid", grid, num_tokens=N)
    if int(frame_offset) != frame_offset or frame_offset < 0:
        raise ValueError(f"frame_offset must be an int >= 0, got {frame_offset!r}")
    check_same_device(qkv=qkv, **weights)
    if not triton_runs_on(qkv, *weights.values()):
        fallback_warning("qkv_norm_rope")
        return qkv_norm_rope_reference(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre_rope, parts)
    q, k, k_pre = _qkv_norm_rope_op(
        qkv, q_weight, k_weight, num_heads, *grid, int(frame_offset), float(eps), parts, bool(return_k_pre_rope)
    )
    out = (q,) if q_col is not None else ()
    if k_col is not None:
        out += (k, qkv.unflatten(-1, (groups, num_heads, D))[:, :, k_col + 1].transpose(1, 2))
        if return_k_pre_rope:
            out += (k_pre,)
    return out
