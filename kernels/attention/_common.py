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

from .._configs import ARCH_LIMITS, MAX_REGISTERS_PER_THREAD, TileShape, dot_registers
from .._runtime import device_capability

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


def check_scale(scale) -> float:
    """The softmax scale as a float. The kernels take a row's maximum score before scaling it,
    which is right only for a positive scale."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take arbitrary strides except along the last dimension, which must be 1
    (vectorised loads); anything else (e.g. an expanded gradient) is copied once."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def dot_precision(dtype: torch.dtype):
    """fp32 inputs must not silently drop to tf32 on the GPU; 16-bit inputs use the default."""
    return "ieee" if dtype == torch.float32 else None


# Forward configs per head_dim for 16-bit inputs, best first: 128-key blocks where they compile
# without spills, at least two K/V tiles in flight (num_stages >= 3); the first config that fits
# the device's shared memory is used. Each was compiled for sm_90 (bf16): 0 spills, no
# serialized wgmma. Four warps at 128x128 spill, and 128x128 spills 8 B in the varlen
# kernel at D=128 (its offset clamps), which takes 64-key blocks there.
_FWD_CANDIDATES_16BIT = {
    16: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)],
    32: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)],
    64: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)],
    128: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),  # 229,376 B of shared memory
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)],  # 98,304 B (sm_86/sm_89)
    256: [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),  # 229,376 B
          dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
          dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)],
}
_FWD_VARLEN_CANDIDATES_16BIT = {
    **_FWD_CANDIDATES_16BIT,
    128: _FWD_CANDIDATES_16BIT[128][1:],
}
_FWD_CANDIDATES_FP32 = {
    **{d: [dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)] for d in (16, 32, 64, 128)},
    256: [dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)],
}
# Backward: dk/dv keeps a 128-key block resident and streams 64-query blocks; dq keeps 128
# queries and streams 64 keys. Eight warps: four spill and serialize wgmma (C7511-C7512).
_BWD_16BIT = dict(dkdv=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
                  dq=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
# for GPUs with less shared memory per block than Hopper (~99 KB at D=128)
_BWD_SMALL = dict(dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                  dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2))
_BWD_CANDIDATES_16BIT = {
    16: [_BWD_16BIT], 32: [_BWD_16BIT], 64: [_BWD_16BIT], 128: [_BWD_16BIT, _BWD_SMALL],
    256: [dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
               dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
          dict(dkdv=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
               dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1))],
}
# The varlen dk/dv kernel (D=128) spills at 64x128 (144 B) and, with Triton 3.6, at 32x128 (28 B):
# 32 queries x 64 keys per step, clean on 3.6 and 3.7 (5 tiles in flight; training only, so the
# extra Q/dO re-reads of the half-width key block cost no inference time).
_BWD_VARLEN_CANDIDATES_16BIT = {
    **_BWD_CANDIDATES_16BIT,
    128: [dict(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3), dq=_BWD_16BIT["dq"]), _BWD_SMALL],
}
_BWD_CANDIDATES_FP32 = {
    d: [dict(dkdv=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8 if d >= 128 else 4, num_stages=1),
             dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8 if d >= 128 else 4, num_stages=1))]
    for d in SUPPORTED_HEAD_DIMS
}


def fwd_shared_bytes(cfg: dict, head_dim: int, elem: int) -> int:
    """Shared memory of the forward kernel: the resident query block plus ``num_stages`` K and V
    blocks (the pipeline's buffers; equals Triton's allocation on sm_90). The shared rule's
    ``dot_shared_bytes`` would stage the query block too."""
    return elem * head_dim * (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"])


def bwd_shared_bytes(cfg: dict, head_dim: int, elem: int) -> int:
    """Shared memory of the larger backward kernel: its two resident blocks plus ``num_stages``
    copies of the two streamed blocks (and, for dk/dv, of the fp32 lse and delta rows); at or
    above Triton's allocation on sm_90."""
    dkdv, dq = cfg["dkdv"], cfg["dq"]
    return max(
        elem * head_dim * (2 * dkdv["BLOCK_N"] + 2 * dkdv["num_stages"] * dkdv["BLOCK_M"])
        + 8 * dkdv["num_stages"] * dkdv["BLOCK_M"],
        elem * head_dim * (2 * dq["BLOCK_M"] + 2 * dq["num_stages"] * dq["BLOCK_N"]),
    )


def _registers(rows: int, fp32_columns: int, head_dim: int, elem: int, num_warps: int) -> int:
    """The shared register rule (``kernels._configs.dot_registers``) for ``rows`` x
    ``fp32_columns`` of fp32 state per program (accumulators and the live score block)."""
    tile = TileShape(block_m=rows, block_n=fp32_columns, block_k=head_dim, a_bytes=elem, b_bytes=elem)
    return dot_registers(tile, num_warps)


def _fwd_fits(cfg: dict, head_dim: int, elem: int, shared: int) -> bool:
    # fp32 state: the output accumulator [BLOCK_M, D] and the scores [BLOCK_M, BLOCK_N]
    regs = _registers(cfg["BLOCK_M"], head_dim + cfg["BLOCK_N"], head_dim, elem, cfg["num_warps"])
    return fwd_shared_bytes(cfg, head_dim, elem) <= shared and regs <= MAX_REGISTERS_PER_THREAD


def _bwd_fits(cfg: dict, head_dim: int, elem: int, shared: int) -> bool:
    # dk/dv: dk and dv [BLOCK_N, D] and a transposed score block [BLOCK_N, BLOCK_M];
    # dq: dq [BLOCK_M, D] and a score block [BLOCK_M, BLOCK_N]
    dkdv, dq = cfg["dkdv"], cfg["dq"]
    regs = max(_registers(dkdv["BLOCK_N"], 2 * head_dim + dkdv["BLOCK_M"], head_dim, elem, dkdv["num_warps"]),
               _registers(dq["BLOCK_M"], head_dim + dq["BLOCK_N"], head_dim, elem, dq["num_warps"]))
    return bwd_shared_bytes(cfg, head_dim, elem) <= shared and regs <= MAX_REGISTERS_PER_THREAD


def shared_limit(t: torch.Tensor | None = None) -> int:
    """Shared memory one block may opt into where ``t`` runs: the CUDA device's own limit, the
    captured architecture's for meta tensors, sm_90's for the CPU interpreter."""
    if t is not None and t.device.type == "cuda":
        return int(torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin)
    capability = device_capability(t) if t is not None else None
    arch = 90 if capability is None else 10 * capability[0] + capability[1]
    return ARCH_LIMITS.get(arch, ARCH_LIMITS[90])["smem_per_block"]


def _first_fitting(candidates: list[dict], fits) -> dict:
    """The first candidate the resource rule accepts, else the last (smallest) one, which
    Triton then reports if even that cannot launch."""
    for cfg in candidates:
        if fits(cfg):
            return cfg
    return candidates[-1]


def flash_fwd_config(head_dim: int, dtype: torch.dtype, shared: int = ARCH_LIMITS[90]["smem_per_block"],
                     varlen: bool = False) -> dict:
    """Static block choice (no autotune: one config also keeps the CPU interpreter happy)."""
    elem = torch.finfo(dtype).bits // 8
    if dtype == torch.float32:
        table = _FWD_CANDIDATES_FP32
    else:
        table = _FWD_VARLEN_CANDIDATES_16BIT if varlen else _FWD_CANDIDATES_16BIT
    return dict(_first_fitting(table[head_dim], lambda c: _fwd_fits(c, head_dim, elem, shared)))


def flash_bwd_config(head_dim: int, dtype: torch.dtype, shared: int = ARCH_LIMITS[90]["smem_per_block"],
                     varlen: bool = False) -> dict:
    """``{"dkdv": cfg, "dq": cfg}`` for the two backward kernels."""
    elem = torch.finfo(dtype).bits // 8
    if dtype == torch.float32:
        table = _BWD_CANDIDATES_FP32
    else:
        table = _BWD_VARLEN_CANDIDATES_16BIT if varlen else _BWD_CANDIDATES_16BIT
    cfg = _first_fitting(table[head_dim], lambda c: _bwd_fits(c, head_dim, elem, shared))
    return {name: dict(c) for name, c in cfg.items()}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ---------------------------------------------------------------------------------------------
# Flash-attention kernels (dense and varlen)
#
# Every kernel clamps a sample's rows to its tensor's extent: offsets past the end or going
# backwards give a shorter or empty sample, never an access outside the tensor. Key (or query) loops run over full blocks without masks, then at most one masked tail block.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_span(Cu, b, seqlen, VARLEN: tl.constexpr):
    """(first row, length) of sample ``b``: from cu_seqlens when VARLEN (clamped to the tensor's
    ``seqlen`` rows), else (0, seqlen)."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        end = tl.load(Cu + b + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), seqlen)
        end = tl.minimum(tl.maximum(end, start), seqlen)
        length = end - start
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = tl.zeros([], dtype=tl.int64) + seqlen
    return start, length


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, cols, k_len, qk_scale_log2,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. Scores go to base 2 with one multiply by
    ``scale * log2(e)`` folded into the exponent (the row maximum is taken before scaling, which
    needs scale > 0). Only the tail block (MASKED) pays for masks; its first key is valid, so the
    running maximum stays finite and no NaN guard is needed."""
    if MASKED:
        mask_n = cols < k_len
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
    p = tl.exp2(qk * qk_scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


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
    """seqlen_q/seqlen_k: rows per sample (dense) or rows of the packed tensors (varlen)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, q_len = _sample_span(CuQ, b, seqlen_q, VARLEN)
    k_start, k_len = _sample_span(CuK, b, seqlen_k, VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    k_full = k_len - k_len % BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    rows_m = q_start + offs_m
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qs + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    # scalar 64-bit bases advanced per block plus 32-bit in-block offsets: fewer registers than
    # a 64-bit pointer per element (BLOCK_N rows times a row stride stays far below 2**31)
    k_base = K + b * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + h * stride_vh + k_start * stride_vs
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base + k_offs, v_base + v_offs, start_n + offs_n, k_len, qk_scale_log2,
                                   False, DOT_PRECISION)
        k_base += BLOCK_N * stride_ks
        v_base += BLOCK_N * stride_vs
    if k_full < k_len:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base + k_offs, v_base + v_offs, k_full + offs_n, k_len, qk_scale_log2,
                                   True, DOT_PRECISION)

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
def _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows, q_len, qk_scale_log2,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block's contribution to a key block's dk (unscaled) and dv, computed transposed
    (keys along rows) so neither accumulator needs a transpose. Query rows past the sample load
    as q = do = lse = delta = 0 and then contribute exactly 0: the tail needs masked loads only."""
    if MASKED:
        mask_m = rows < q_len
        q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=mask_m[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptrs, mask=mask_m, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    qkt = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    pt = tl.exp2(qkt * qk_scale_log2 - (lse * 1.4426950408889634)[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


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
    q_full = q_len - q_len % BLOCK_M

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < k_len
    rows_n = k_start + offs_n
    k = tl.load(K + b * stride_kb + h * stride_kh + rows_n[:, None] * stride_ks + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_n[:, None] * stride_vs + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qs
    do_base = DO + b * stride_dob + h * stride_doh + q_start * stride_dos
    l_base = b * stride_lb + h * stride_lh + q_start * stride_ls
    q_offs = offs_m[:, None] * stride_qs + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dos + offs_d[None, :]
    l_offs = offs_m * stride_ls

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, q_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base + q_offs, do_base + do_offs, Lse + l_base + l_offs,
                             Delta + l_base + l_offs, start_m + offs_m, q_len, qk_scale_log2, False, DOT_PRECISION)
        q_base += BLOCK_M * stride_qs
        do_base += BLOCK_M * stride_dos
        l_base += BLOCK_M * stride_ls
    if q_full < q_len:
        dk, dv = _dkdv_block(dk, dv, k, v, q_base + q_offs, do_base + do_offs, Lse + l_base + l_offs,
                             Delta + l_base + l_offs, q_full + offs_m, q_len, qk_scale_log2, True, DOT_PRECISION)
    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _dq_block(dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, cols, k_len, qk_scale_log2,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block's contribution to a query block's dq (unscaled). Keys past the sample load
    as k = v = 0 and score 0, so the tail masks p: exp(0 - lse) overflows when every real score
    is very negative, and inf * 0 would poison dq."""
    if MASKED:
        mask_n = cols < k_len
        k = tl.load(k_ptrs, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.exp2(qk * qk_scale_log2 - lse_log2[:, None])
    if MASKED:
        p = tl.where(mask_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


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
    k_full = k_len - k_len % BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < q_len
    rows_m = q_start + offs_m
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qs + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m[:, None] * stride_dos + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    l_off = b * stride_lb + h * stride_lh + rows_m * stride_ls
    lse_log2 = tl.load(Lse + l_off, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=mask_m, other=0.0)
    # scalar 64-bit bases advanced per block plus 32-bit in-block offsets: fewer registers than
    # a 64-bit pointer per element (BLOCK_N rows times a row stride stays far below 2**31)
    k_base = K + b * stride_kb + h * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + h * stride_vh + k_start * stride_vs
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, k_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse_log2, delta, k_base + k_offs, v_base + v_offs, start_n + offs_n, k_len, qk_scale_log2,
                       False, DOT_PRECISION)
        k_base += BLOCK_N * stride_ks
        v_base += BLOCK_N * stride_vs
    if k_full < k_len:
        dq = _dq_block(dq, q, do, lse_log2, delta, k_base + k_offs, v_base + v_offs, k_full + offs_n, k_len, qk_scale_log2,
                       True, DOT_PRECISION)
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


def _grid_rows(max_rows: int, rows: int) -> int:
    """Rows the grid covers per sample: the caller's bound, never more than the tensor holds."""
    return min(max(int(max_rows), 1), max(rows, 1))


def flash_forward(q, k, v, out, lse, cu_q, cu_k, scale, layout, batch, num_heads, rows_q, rows_k, max_q):
    """Launch the forward kernel. rows_q/rows_k: rows per sample (dense) or of the packed tensors
    (varlen, with offsets ``cu_q``/``cu_k``; dense passes None); max_q (the longest sample's
    query count) sizes the grid: query rows past it are not computed."""
    head_dim = q.shape[-1]
    varlen = cu_q is not None
    cfg = flash_fwd_config(head_dim, q.dtype, shared_limit(q), varlen)
    grid = (cdiv(_grid_rows(max_q, rows_q), cfg["BLOCK_M"]), batch * num_heads)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, cu_q if varlen else lse, cu_k if varlen else lse,
        scale * LOG2E,
        *strides3(q, layout), *strides3(k, layout), *strides3(v, layout), *strides3(out, layout),
        *lse_strides(lse, layout),
        num_heads, rows_q, rows_k,
        VARLEN=varlen, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )


def flash_backward(do, q, k, v, lse, delta, dq, dk, dv, cu_q, cu_k, scale, layout, batch, num_heads,
                   rows_q, rows_k, max_q, max_k):
    """Launch the dk/dv and dq kernels (arguments as in ``flash_forward``)."""
    head_dim = q.shape[-1]
    varlen = cu_q is not None
    cfg = flash_bwd_config(head_dim, q.dtype, shared_limit(q), varlen)
    cus = (cu_q, cu_k) if varlen else (lse, lse)
    common = dict(VARLEN=varlen, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(q.dtype))
    strides = (*strides3(q, layout), *strides3(k, layout), *strides3(v, layout), *strides3(do, layout),
               *lse_strides(lse, layout))
    grid_kv = (cdiv(_grid_rows(max_k, rows_k), cfg["dkdv"]["BLOCK_N"]), batch * num_heads)
    _flash_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *cus, scale, scale * LOG2E,
        *strides, *strides3(dk, layout), *strides3(dv, layout),
        num_heads, rows_q, rows_k, **common, **cfg["dkdv"],
    )
    grid_q = (cdiv(_grid_rows(max_q, rows_q), cfg["dq"]["BLOCK_M"]), batch * num_heads)
    _flash_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, *cus, scale, scale * LOG2E,
        *strides, *strides3(dq, layout),
        num_heads, rows_q, rows_k, **common, **cfg["dq"],
    )
