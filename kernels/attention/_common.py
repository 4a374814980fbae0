"""Shared pieces of the attention kernels: input checks, block-size choices, and the
flash-attention forward/backward kernels used by both dense and variable-length attention.

Layout convention of the flash kernels: every tensor is addressed as ``[batch, head, row, D]``
through explicit strides (the last dimension must be contiguous). Variable-length attention
passes a batch stride of 0 and reads each sample's first row from ``cu_seqlens``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def check_kernel_inputs(head_dim: int, **tensors: torch.Tensor) -> None:
    """Checks of the Triton path only (the references accept any head_dim and float64)."""
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the Triton kernel supports "
                "float16, bfloat16, float32"
            )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Triton kernel; expected one of {SUPPORTED_HEAD_DIMS}"
        )


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take arbitrary strides except along the last dimension, which must be 1
    (vectorised loads); anything else (e.g. an expanded gradient) is copied once."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def dot_precision(dtype: torch.dtype):
    """fp32 inputs must not silently drop to tf32 on the GPU; 16-bit inputs use the default."""
    return "ieee" if dtype == torch.float32 else None


def flash_fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Static block choice (no autotune: one config also keeps the CPU interpreter happy)."""
    if dtype == torch.float32:
        if head_dim >= 256:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim >= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if head_dim >= 128 else 4, num_stages=2)


def flash_bwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32 or head_dim >= 256:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8 if head_dim >= 128 else 4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if head_dim >= 128 else 4, num_stages=2)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ---------------------------------------------------------------------------------------------
# Flash-attention kernels (dense and varlen)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_span(Cu, b, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sample ``b``: from cu_seqlens when VARLEN, else (0, seqlen)."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        length = tl.load(Cu + b + 1).to(tl.int64) - start
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = tl.zeros([], dtype=tl.int64) + seqlen
    return start, length


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK,
    qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    num_heads, seqlen_q, seqlen_k,
    VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, q_len = _sample_span(CuQ, b, seqlen_q, VARLEN)
    k_start, k_len = _sample_span(CuK, b, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    rows_m = (q_start + offs_m).to(tl.int64)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qs + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + h * stride_vh + k_start * stride_vs

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < k_len
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=mask_n[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        # the first key of every block is valid, so m_new is finite and alpha never NaN
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # a sample without keys: output 0, lse -inf (never 0/0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Out + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + b * stride_lb + h * stride_lh + rows_m * stride_ls, lse, mask=mask_m)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLse, Delta,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh, stride_ls,
    num_heads, seqlen,
    HAS_DLSE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(o * do) - dlse. Subtracting the lse gradient folds d(lse)/d(s) = p into
    the usual ds = p * (dp - delta)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = rows < seqlen
    rows = rows.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=mask[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b * stride_lb + h * stride_lh + rows * stride_ls
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + l_off, delta, mask=mask)


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, CuQ, CuK,
    sm_scale, qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    num_heads, seqlen_q, seqlen_k,
    VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, q_len = _sample_span(CuQ, b, seqlen_q, VARLEN)
    k_start, k_len = _sample_span(CuK, b, seqlen_k, VARLEN)
    if pid_n * BLOCK_N >= k_len:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < k_len
    rows_n = (k_start + offs_n).to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows_n[:, None] * stride_ks + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_n[:, None] * stride_vs + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qs
    do_base = DO + b * stride_dob + h * stride_doh + q_start * stride_dos
    l_base = b * stride_lb + h * stride_lh + q_start * stride_ls

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, q_len, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < q_len
        rows = rows.to(tl.int64)
        qt = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=mask_m[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        lse = tl.load(Lse + l_base + rows * stride_ls, mask=mask_m, other=0.0)
        delta = tl.load(Delta + l_base + rows * stride_ls, mask=mask_m, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2
        pt = tl.exp2(qkt - lse[None, :] * 1.4426950408889634)
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, CuQ, CuK,
    sm_scale, qk_scale_log2,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqh, stride_dqs,
    num_heads, seqlen_q, seqlen_k,
    VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, q_len = _sample_span(CuQ, b, seqlen_q, VARLEN)
    k_start, k_len = _sample_span(CuK, b, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    rows_m = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qs + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m[:, None] * stride_dos + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    l_off = b * stride_lb + h * stride_lh + rows_m * stride_ls
    lse = tl.load(Lse + l_off, mask=mask_m, other=0.0)
    delta = tl.load(Delta + l_off, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + h * stride_vh + k_start * stride_vs

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < k_len
        cols = cols.to(tl.int64)
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=mask_n[None, :], other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=mask_n[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.exp2(qk - lse[:, None] * 1.4426950408889634)
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


def strides3(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, H, S, D] ('bhsd') or packed [S, H, D] ('shd') tensor."""
    if layout == "bhsd":
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(1), t.stride(0)


def lse_strides(lse: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """lse is [B, H, S] for 'bhsd' and [S, H] for 'shd'."""
    if layout == "bhsd":
        return lse.stride(0), lse.stride(1), lse.stride(2)
    return 0, lse.stride(1), lse.stride(0)


def bwd_delta(out, grad_out, grad_lse, lse, layout: str, batch: int, num_heads: int, seqlen: int, head_dim: int):
    """Launch the preprocess kernel: delta (fp32, lse's shape) = rowsum(out * grad_out) - grad_lse."""
    delta = torch.empty_like(lse)
    block_m = 64
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse
    if has_dlse and dlse.stride() != lse.stride():
        dlse = dlse.contiguous()
    grid = (cdiv(seqlen, block_m), batch * num_heads)
    _bwd_preprocess_kernel[grid](
        out, grad_out, dlse, delta,
        *strides3(out, layout), *strides3(grad_out, layout), *lse_strides(lse, layout),
        num_heads, seqlen,
        HAS_DLSE=has_dlse, HEAD_DIM=head_dim, BLOCK_M=block_m,
    )
    return delta


def flash_forward(q, k, v, out, lse, cu_q, cu_k, scale, layout, batch, num_heads, max_q, max_k, varlen):
    head_dim = q.shape[-1]
    cfg = flash_fwd_config(head_dim, q.dtype)
    grid = (cdiv(max(max_q, 1), cfg["BLOCK_M"]), batch * num_heads)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        scale * LOG2E,
        *strides3(q, layout), *strides3(k, layout), *strides3(v, layout), *strides3(out, layout),
        *lse_strides(lse, layout),
        num_heads, max_q, max_k,
        VARLEN=varlen, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )


def flash_backward(do, q, k, v, lse, delta, dq, dk, dv, cu_q, cu_k, scale, layout, batch, num_heads,
                   max_q, max_k, varlen):
    head_dim = q.shape[-1]
    cfg = flash_bwd_config(head_dim, q.dtype)
    common = dict(VARLEN=varlen, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(q.dtype), **cfg)
    strides = (*strides3(q, layout), *strides3(k, layout), *strides3(v, layout), *strides3(do, layout),
               *lse_strides(lse, layout))
    grid_kv = (cdiv(max(max_k, 1), cfg["BLOCK_N"]), batch * num_heads)
    _flash_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, scale, scale * LOG2E,
        *strides, *strides3(dk, layout), *strides3(dv, layout),
        num_heads, max_q, max_k, **common,
    )
    grid_q = (cdiv(max(max_q, 1), cfg["BLOCK_M"]), batch * num_heads)
    _flash_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, scale, scale * LOG2E,
        *strides, *strides3(dq, layout),
        num_heads, max_q, max_k, **common,
    )
