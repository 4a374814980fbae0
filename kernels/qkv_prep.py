"""QKV post-processing of the DiT self-attention in one pass over the fused qkv GEMM output.

From qkv [B, N, 3C] (viewed as [B, N, 3, heads, D], C = heads * D) produce q and k with per-head
RMSNorm (``rms_norm_reference`` semantics: float32 statistics, cast to the activation dtype, times
the weight) followed by 3D RoPE (``rope_3d_reference``), and v, each as a contiguous
[B, heads, N, D] tensor in the activation dtype; optionally also k after the norm and before RoPE
(what the KV cache stores). One read of qkv, one write of each output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv
from ._runtime import check_latent_shape, check_same_device, check_tensor, fallback_warning, triton_runs_on, interpreter_enabled
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

__all__ = ["qkv_norm_rope", "qkv_norm_rope_reference"]


def qkv_norm_rope_reference(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_heads: int,
    grid,
    frame_offset: int = 0,
    eps: float = 1e-6,
    return_k_pre_rope: bool = False,
):
    """Plain-PyTorch oracle: the unfused upstream sequence, results cast to qkv.dtype.
    Returns (q, k, v) or (q, k, v, k_pre_rope), each [B, heads, N, D]."""
    check_tensor("qkv", qkv, ndim=3)
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    x = qkv.view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, D]
    q = rms_norm_reference(x[0], q_weight, eps)
    k_pre = rms_norm_reference(x[1], k_weight, eps)
    q = rope_3d_reference(q, grid, frame_offset).to(qkv.dtype)
    k = rope_3d_reference(k_pre, grid, frame_offset).to(qkv.dtype)
    out = (q, k, x[2].contiguous())
    return out + (k_pre.to(qkv.dtype),) if return_k_pre_rope else out


@triton.jit
def _norm_rope_head(
    SRC, offs_in, w0, w1, c, s, mask, D, eps,
    ACT: tl.constexpr, ROUND_PROD: tl.constexpr,
):
    """Load one head's channel pairs, RMSNorm them and rotate: returns (pre-RoPE pairs, rotated)."""
    x0 = tl.load(SRC + offs_in, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(SRC + offs_in + 1, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / D + eps)
    p0 = (x0 * r[:, None]).to(ACT).to(tl.float32) * w0[None, :]
    p1 = (x1 * r[:, None]).to(ACT).to(tl.float32) * w1[None, :]
    if ROUND_PROD:  # the weight has the activation dtype: the product is rounded to it
        p0 = p0.to(ACT).to(tl.float32)
        p1 = p1.to(ACT).to(tl.float32)
    return p0, p1, p0 * c - p1 * s, p1 * c + p0 * s


@triton.jit
def _qkv_norm_rope_kernel(
    QKV, WQ, WK, Q, K, V, KPRE, COS, SIN,
    n_rows, N, HEADS, T, H, W, HALF_T, HALF_TH, HALF, eps,
    ACT: tl.constexpr, ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr, STORE_KPRE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat token index b * N + n
    pcols = tl.arange(0, BLOCK_HALF)
    pmask = pcols < HALF
    mask = (rows < n_rows)[:, None] & pmask[None, :]
    b = rows // N
    n = rows % N
    D = 2 * HALF
    C = HEADS * D
    # per-token rotation and norm weights: loaded once, reused by every head
    c, s = _rope_pair_cos_sin(COS, SIN, n, H, W, T, HALF_T, HALF_TH, HALF, pcols, mask)
    wq0 = tl.load(WQ + 2 * pcols, mask=pmask, other=0.0).to(tl.float32)
    wq1 = tl.load(WQ + 2 * pcols + 1, mask=pmask, other=0.0).to(tl.float32)
    wk0 = tl.load(WK + 2 * pcols, mask=pmask, other=0.0).to(tl.float32)
    wk1 = tl.load(WK + 2 * pcols + 1, mask=pmask, other=0.0).to(tl.float32)
    in_row = rows[:, None] * (3 * C) + 2 * pcols[None, :]
    for hd in range(0, HEADS):
        offs_in = in_row + hd * D
        offs_out = ((b * HEADS + hd) * N + n)[:, None] * D + 2 * pcols[None, :]
        _, _, q0, q1 = _norm_rope_head(QKV, offs_in, wq0, wq1, c, s, mask, D, eps, ACT, ROUND_Q)
        tl.store(Q + offs_out, q0.to(ACT), mask=mask)
        tl.store(Q + offs_out + 1, q1.to(ACT), mask=mask)
        p0, p1, k0, k1 = _norm_rope_head(QKV, offs_in + C, wk0, wk1, c, s, mask, D, eps, ACT, ROUND_K)
        tl.store(K + offs_out, k0.to(ACT), mask=mask)
        tl.store(K + offs_out + 1, k1.to(ACT), mask=mask)
        if STORE_KPRE:
            tl.store(KPRE + offs_out, p0.to(ACT), mask=mask)
            tl.store(KPRE + offs_out + 1, p1.to(ACT), mask=mask)
        v0 = tl.load(QKV + offs_in + 2 * C, mask=mask, other=0.0)
        v1 = tl.load(QKV + offs_in + 2 * C + 1, mask=mask, other=0.0)
        tl.store(V + offs_out, v0, mask=mask)
        tl.store(V + offs_out + 1, v1, mask=mask)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _launch_qkv_norm_rope(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre):
    qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    d_t, d_h, _ = rope_3d_split(D)
    cos, sin = rope_pair_tables(D, grid, frame_offset, qkv.device)
    shape = (B, num_heads, N, D)
    q = qkv.new_empty(shape)
    k = qkv.new_empty(shape)
    v = qkv.new_empty(shape)
    k_pre = qkv.new_empty(shape) if return_k_pre else qkv.new_empty(0)
    n_rows = B * N
    half = D // 2
    block_half = triton.next_power_of_2(half)
    rows = max(1, min(64, (8192 if interpreter_enabled() else 2048) // block_half))
    warps = max(1, min(8, rows * block_half // 256))
    if n_rows:
        act = qkv.dtype
        _qkv_norm_rope_kernel[(cdiv(n_rows, rows),)](
            qkv, q_weight, k_weight, q, k, v, k_pre if return_k_pre else q, cos, sin,
            n_rows, N, num_heads, grid[0], grid[1], grid[2], d_t // 2, (d_t + d_h) // 2, half, eps,
            ACT=_TL_DTYPES[act],
            ROUND_Q=torch.promote_types(act, q_weight.dtype) == act,
            ROUND_K=torch.promote_types(act, k_weight.dtype) == act,
            STORE_KPRE=return_k_pre, ROWS=rows, BLOCK_HALF=block_half, num_warps=warps,
        )
    return q, k, v, k_pre


@torch.library.custom_op(
    "longcat::qkv_norm_rope",
    mutates_args=(),
    schema="(Tensor qkv, Tensor q_weight, Tensor k_weight, int num_heads, int T, int H, int W, "
    "int frame_offset, float eps, bool return_k_pre) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _qkv_norm_rope_op(qkv, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, return_k_pre):
    return _launch_qkv_norm_rope(qkv, q_weight, k_weight, num_heads, (T, H, W), frame_offset, eps, return_k_pre)


@_qkv_norm_rope_op.register_fake
def _(qkv, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, return_k_pre):
    B, N, C3 = qkv.shape
    shape = (B, num_heads, N, C3 // (3 * num_heads))
    return (qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape),
            qkv.new_empty(shape) if return_k_pre else qkv.new_empty(0))


def _qkv_setup(ctx, inputs, output):
    qkv, q_weight, k_weight, num_heads, T, H, W, frame_offset, eps, return_k_pre = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight)
    ctx.args = (num_heads, T, H, W, frame_offset, eps, return_k_pre)


def _qkv_backward(ctx, dq, dk, dv, dk_pre):
    # PyTorch backward (float32 math) around the Triton inverse RoPE; the norm weights' grads
    # are straight-through the casts to the activation dtype.
    qkv, q_weight, k_weight = ctx.saved_tensors
    num_heads, T, H, W, frame_offset, eps, return_k_pre = ctx.args
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    x = qkv.view(B, N, 3, num_heads, D)
    zeros = None

    def grad_or_zero(g):
        nonlocal zeros
        if g is not None:
            return g
        if zeros is None:
            zeros = qkv.new_zeros((B, num_heads, N, D))
        return zeros

    dq_pre = _rope_3d_op(grad_or_zero(dq).to(torch.float32), T, H, W, frame_offset, True)
    dk_pre_total = _rope_3d_op(grad_or_zero(dk).to(torch.float32), T, H, W, frame_offset, True)
    if return_k_pre and dk_pre is not None and dk_pre.numel():
        dk_pre_total = dk_pre_total + dk_pre.float()
    dqx, dwq = rms_norm_backward_math(x[:, :, 0], q_weight, dq_pre.transpose(1, 2), eps)
    dkx, dwk = rms_norm_backward_math(x[:, :, 1], k_weight, dk_pre_total.transpose(1, 2), eps)
    dvx = grad_or_zero(dv).transpose(1, 2).to(qkv.dtype)
    dqkv = torch.stack((dqx, dkx, dvx), dim=2).reshape(B, N, C3)
    return dqkv, dwq, dwk, None, None, None, None, None, None, None


_qkv_norm_rope_op.register_autograd(_qkv_backward, setup_context=_qkv_setup)


def qkv_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_heads: int,
    grid,
    frame_offset: int = 0,
    eps: float = 1e-6,
    return_k_pre_rope: bool = False,
):
    """Split the fused qkv GEMM output and apply q/k RMSNorm and 3D RoPE in one pass.

    qkv: [B, N, 3C] float16/bfloat16/float32 (viewed as [B, N, 3, heads, D], D a multiple of 8);
    q_weight, k_weight: [D]; grid: (T, H, W) with T*H*W = N; frame_offset shifts the temporal
    positions. Returns (q, k, v), or (q, k, v, k_pre_rope) when asked, each a contiguous
    [B, heads, N, D] tensor in qkv.dtype. Differentiable w.r.t. qkv, q_weight and k_weight.
    """
    check_tensor("qkv", qkv, ndim=3, dtypes=ACT_DTYPES)
    check_tensor("q_weight", q_weight, ndim=1, dtypes=ACT_DTYPES)
    check_tensor("k_weight", k_weight, ndim=1, dtypes=ACT_DTYPES)
    if int(num_heads) != num_heads or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv last dimension {C3} is not 3 * num_heads({num_heads}) * head_dim")
    D = C3 // (3 * num_heads)
    rope_3d_split(D)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape[0] != D:
            raise ValueError(f"{name} must have shape [head_dim={D}], got {tuple(w.shape)}")
    grid = check_latent_shape("grid", grid, num_tokens=N)
    if int(frame_offset) != frame_offset or frame_offset < 0:
        raise ValueError(f"frame_offset must be an int >= 0, got {frame_offset!r}")
    check_same_device(qkv=qkv, q_weight=q_weight, k_weight=k_weight)
    if triton_runs_on(qkv, q_weight, k_weight):
        q, k, v, k_pre = _qkv_norm_rope_op(
            qkv, q_weight, k_weight, num_heads, *grid, int(frame_offset), float(eps), bool(return_k_pre_rope)
        )
        return (q, k, v, k_pre) if return_k_pre_rope else (q, k, v)
    fallback_warning("qkv_norm_rope")
    return qkv_norm_rope_reference(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre_rope)
