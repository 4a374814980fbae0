"""Dynamic per-token activation quantization for the W8A8 GEMMs of ``longcat.kernels.quant_gemm``.

The rounding rule, the one every producer of 8-bit activations follows (``quantize_per_token``
here and the fused LayerNorm-modulate kernels of ``modulate.py``/``residual.py``, which share
the ``quantize_tile`` helper below), bit for bit on a GPU, in the interpreter and in the
references: for each token (row) of float32 values v,
``scale = max(amax(|v|), AMAX_EPS) / QMAX`` (IEEE division, round to nearest even), with QMAX =
127 for int8 and 448 for float8_e4m3fn; then ``v / scale`` (IEEE division), clamped to
[-QMAX, QMAX] and rounded to the nearest int8 value, or float8_e4m3fn value, ties to even. The
dequantised value is ``q * scale``. A row of zeros gets ``scale = AMAX_EPS / QMAX`` and ``q = 0``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

import triton
import triton.language as tl

from ._runtime import check_tensor, fallback_warning, fp8_supported, interpreter_enabled, triton_runs_on

__all__ = [
    "QMAX",
    "QuantizedActivations",
    "AMAX_EPS",
    "quantize_per_token",
    "quantize_per_token_reference",
    "dequantize_per_token",
]

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Floor on a token's amax so an all-zero token divides by a positive scale, never by 0.
AMAX_EPS = 1e-12
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantizedActivations(NamedTuple):
    """8-bit activations with their per-token scales, as a producer (e.g. the fused
    LayerNorm-modulate) hands them to W8A8 Linear layers, so they are quantized once for every
    consumer. q: [..., K] int8/float8_e4m3fn; scale: q.shape[:-1] float32; dtype: the activation
    dtype the consumers return."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def rows(self, start: int, stop: int) -> "QuantizedActivations":
        """Tokens [start, stop) of dimension 1 (a frame chunk of [B, N, K] activations)."""
        return QuantizedActivations(self.q[:, start:stop], self.scale[:, start:stop], self.dtype)


def _check_qdtype(qdtype) -> torch.dtype:
    if isinstance(qdtype, str):
        qdtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}.get(qdtype, qdtype)
    if qdtype not in QMAX:
        raise TypeError(f"qdtype must be torch.int8 or torch.float8_e4m3fn (or 'int8'/'fp8'), got {qdtype!r}")
    return qdtype


def quantize_per_token_reference(x: torch.Tensor, qdtype=torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle: returns (x_q of x's shape in ``qdtype``, scale float32 of shape x.shape[:-1])."""
    qdtype = _check_qdtype(qdtype)
    check_tensor("x", x, dtypes=ACT_DTYPES + (torch.float64,))
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the channel dimension last)")
    qmax = QMAX[qdtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if x.shape[-1] > 0 else xf.new_zeros(x.shape[:-1])
    scale = amax.clamp_min(AMAX_EPS) / qmax
    v = xf / scale.unsqueeze(-1)
    if qdtype == torch.int8:
        q = torch.round(v).clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = v.clamp_(-qmax, qmax).to(qdtype)
    return q, scale


def dequantize_per_token(x_q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``x_q * scale`` per token, in ``dtype``."""
    return (x_q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


@triton.jit
def _round_half_even(v):
    # Portable rint (libdevice is not available everywhere, e.g. the interpreter): exact for |v| < 2**22.
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3(v):
    # Round fp32 (|v| <= 448) to the nearest float8_e4m3fn value, ties to even, so that the final
    # cast is exact: the same bits on every GPU and in the interpreter (whose own down-cast rounds
    # some values wrongly). e4m3 has 3 mantissa bits; subnormals share the ulp 2**-9 of 2**-6.
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
    ulp = ((exponent - 3) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(v / ulp) * ulp
    return tl.where(r == 0.0, v * 0.0, r)  # keep the sign of zero, as torch's cast does


@triton.jit
def quantize_tile(v, mask, QMAX_C: tl.constexpr, EPS: tl.constexpr, IS_INT8: tl.constexpr):
    """The rounding rule of the module docstring on a [ROWS, BLOCK] float32 tile holding whole
    rows (``mask`` marks the real elements). Returns (codes as exactly representable float32
    values: cast them to the 8-bit dtype, scale [ROWS] float32)."""
    amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=1)
    scale = tl.div_rn(tl.maximum(amax, EPS), QMAX_C)
    v = tl.div_rn(v, scale[:, None])
    v = tl.minimum(tl.maximum(v, -QMAX_C), QMAX_C)
    if IS_INT8:
        q = _round_half_even(v)
    else:
        q = _round_to_e4m3(v)
    return q, scale


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm,
    QMAX_C: tl.constexpr, EPS: tl.constexpr, IS_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One pass: each program holds BLOCK_M whole rows in registers (one read, one write).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_tile(v, mask, QMAX_C, EPS, IS_INT8)
    tl.store(s_ptr + rows, scale, mask=rows < M)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


# Rows longer than this do not fit in one program's registers.
MAX_ROW = 65536


def _launch_quantize_per_token(x2: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x2.shape
    q = torch.empty((M, K), dtype=qdtype, device=x2.device)
    s = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return q, s
    block_k = triton.next_power_of_2(max(K, 16))
    if interpreter_enabled():  # the config choice depends on where kernels run, as in every launcher
        block_m, warps = max(1, min(64, 16384 // block_k)), 1
    else:
        # one row per program (4096: 8 warps, 16 elements per thread; 11008: 16 warps, 32)
        block_m, warps = 1, max(4, min(16, block_k // 512))
    grid = (triton.cdiv(M, block_m),)
    _quantize_per_token_kernel[grid](
        x2, q, s, M, K, x2.stride(0),
        QMAX_C=QMAX[qdtype], EPS=AMAX_EPS, IS_INT8=(qdtype == torch.int8),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
    return q, s


@torch.library.custom_op("longcat::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor, is_int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qdtype = torch.int8 if is_int8 else torch.float8_e4m3fn
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if triton_runs_on(x2) and (is_int8 or fp8_supported(x2)):
        q, s = _launch_quantize_per_token(x2, qdtype)
    else:
        fallback_warning("quantize_per_token")
        q, s = quantize_per_token_reference(x2, qdtype)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@_quantize_per_token_op.register_fake
def _(x, is_int8):
    qdtype = torch.int8 if is_int8 else torch.float8_e4m3fn
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def quantize_per_token(x: torch.Tensor, qdtype=torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x [..., K]`` per token (row) to int8 or float8_e4m3fn.

    Returns ``(x_q, scale)``: ``x_q`` has x's shape and dtype ``qdtype``; ``scale`` is float32 of
    shape ``x.shape[:-1]`` (``[M]`` for 2-D x). See the module docstring for the exact convention.
    x may be float16, bfloat16 or float32; it is not modified.
    """
    qdtype = _check_qdtype(qdtype)
    check_tensor("x", x, dtypes=ACT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (channel) dimension, got shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_ROW:
        raise ValueError(f"x has rows of {x.shape[-1]} elements; at most {MAX_ROW} are supported")
    return _quantize_per_token_op(x, qdtype == torch.int8)
