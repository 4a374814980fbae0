"""8-bit GEMMs for quantized Linear layers: ``y = x @ W^T * scale + bias`` with W stored as int8 or
float8_e4m3fn ``[N, K]`` and one float32 scale per output channel ``[N]`` (symmetric).

- W8A16 (weight-only): ``int8_weight_only_linear`` / ``fp8_weight_only_linear``. Activations stay
  float16/bfloat16/float32. The kernel computes y^T tiles: each weight tile is converted to the
  activation dtype in registers and is the tensor-core A operand (int8 and e4m3 values are exact in
  fp16/bf16), the activation tile streams through the pipelined shared-memory buffers as B, and
  the per-channel scale is applied once in the epilogue (the scale is constant along K). No
  full-size dequantised weight ever exists; at small M it reads half the bytes of a bf16 GEMM.
- W8A8 (dynamic): ``int8_dynamic_linear`` (int8 x int8 -> int32 accumulate) and
  ``fp8_dynamic_linear`` (e4m3 x e4m3 -> fp32 accumulate) take activations already quantized per
  token (``longcat.kernels.quantize_activations.quantize_per_token``); the epilogue multiplies by
  ``x_scale[m] * w_scale[n]`` and adds the bias. A plain fp8 GEMM on sm_90 goes to cuBLASLt
  (``torch._scaled_mm``, see ``_prefers_scaled_mm``); the fp8 accumulation rule is
  ``FP8_PROMOTE_ABOVE_K``.
- ``swiglu=True`` (any of the four): the weight packs W1 over W3 as ``[2H, K]`` (bias, if any,
  ``[2H]``) and the output is ``silu(x W1^T) * (x W3^T)`` of width H, computed in the epilogue
  (fp32) from two accumulators, so the FFN's [M, 2H] intermediate never reaches memory.

Both Triton kernels are persistent (one program per SM walking the output tiles in grouped,
L2-friendly order) and autotune over configs that pass the resource rule of ``kernels._configs`` (shared memory and
registers on sm_90; see ``_fits``), chosen by the range of M.

Each op has a pure-PyTorch ``*_reference`` (float32 math, float64 when given float64 inputs), a
validating launcher and a ``torch.library.custom_op`` with a fake implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ._configs import TileShape, fits
from ._runtime import check_same_device, check_tensor, fallback_warning, fp8_supported, interpreter_enabled, triton_runs_on

__all__ = [
    "int8_weight_only_linear",
    "fp8_weight_only_linear",
    "weight_only_linear",
    "int8_dynamic_linear",
    "fp8_dynamic_linear",
    "dynamic_linear",
    "weight_only_linear_reference",
    "dynamic_linear_reference",
    "int8_weight_only_linear_reference",
    "fp8_weight_only_linear_reference",
    "int8_dynamic_linear_reference",
    "fp8_dynamic_linear_reference",
    "scaled_mm_linear",
]

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def _epilogue_reference(acc, bias, swiglu):
    if bias is not None:
        acc = acc + bias.to(acc.dtype)
    if swiglu:
        a, b = acc.chunk(2, dim=-1)
        acc = F.silu(a) * b
    return acc


def weight_only_linear_reference(x, w_q, w_scale, bias=None, swiglu: bool = False):
    """Oracle of the W8A16 GEMMs: ``(x @ w_q^T) * w_scale + bias`` (then the SwiGLU gate), computed
    in float32 (float64 for float64 x) and returned in x.dtype. Materialises the weight in the
    compute dtype: a reference, not a fast path."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = torch.matmul(x.to(compute), w_q.to(compute).t()) * w_scale.to(compute)
    return _epilogue_reference(acc, bias, swiglu).to(x.dtype)


def dynamic_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, swiglu: bool = False):
    """Oracle of the W8A8 GEMMs. The integer (or e4m3) products are summed exactly in float64,
    then rounded to the kernel's accumulator (float32) unless ``out_dtype`` is float64, and scaled
    by ``x_scale[m] * w_scale[n]``."""
    acc = torch.matmul(x_q.to(torch.float64), w_q.to(torch.float64).t())
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = acc.to(compute) * x_scale.to(compute).unsqueeze(-1) * w_scale.to(compute)
    return _epilogue_reference(acc, bias, swiglu).to(out_dtype)


def int8_weight_only_linear_reference(x, w_q, w_scale, bias=None, swiglu=False):
    return weight_only_linear_reference(x, w_q, w_scale, bias, swiglu)


def fp8_weight_only_linear_reference(x, w_q, w_scale, bias=None, swiglu=False):
    return weight_only_linear_reference(x, w_q, w_scale, bias, swiglu)


def int8_dynamic_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, swiglu=False):
    return dynamic_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, swiglu)


def fp8_dynamic_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, swiglu=False):
    return dynamic_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, swiglu)


# ----------------------------------------------------------------------------------------------
# Triton kernels: W8A8 (8-bit x 8-bit) and W8A16 (8-bit weight, 16/32-bit activations)
# ----------------------------------------------------------------------------------------------

def _fits(cfg, x_bytes: int, swiglu: bool, promote_fp8: bool = False, weight_convert_bytes: int = 0) -> bool:
    """The resource rule (``kernels._configs``) every config a launcher may pick must pass on sm_90.
    Both halves of a SwiGLU GEMM stream a weight tile and keep an accumulator; a promoted fp8 dot
    keeps a second, fp32 accumulator. W8A16 holds the converted weight tile in registers as the wgmma
    A operand (``weight_convert_bytes`` per element: the activation size for int8, 4 for e4m3,
    which converts through wider intermediates; 0 for W8A8). On the sm_90 compiles of every config below (and of those they replaced;
    bench/results/static-changes-gemm.json) the rule accepts no config that spills or overflows
    shared memory; a 16x64x256 / 4-warp W8A16 config it would accept spills 192 bytes with SwiGLU,
    so it is not in the table."""
    kw = cfg.kwargs
    halves = 2 if swiglu else 1
    tile = TileShape(block_m=kw["BLOCK_M"], block_n=kw["BLOCK_N"], block_k=kw["BLOCK_K"], a_bytes=x_bytes, b_bytes=1,
                     b_operands=halves, accumulators=halves * (2 if promote_fp8 else 1),
                     b_convert_bytes=weight_convert_bytes)
    return fits(tile, cfg.num_warps, cfg.num_stages, arch=90)


# fp8 accumulation on sm_90: wgmma adds fp8 products into its fp32 accumulator keeping only ~14
# significant bits, and Triton's sm_90 default never promotes over K. Emulated on the CPU (per-token
# x per-channel fp8 operands, products added 32 at a time into a 13-bit-mantissa accumulator), that
# error sits 49.5 dB below the result at K = 4,096, 20 dB under the fp8 quantization noise (28.9 dB):
# ~1% of the error power, kept. At K = 11,008 (FFN w2) it is 41 dB, only 13 dB under the
# quantization noise (~5% of the error power, in every block): there the dot promotes to full fp32
# once per K step (max_num_imprecise_acc = BLOCK_K; 78 dB). The price, from the sm_90 compile: a
# warpgroup wait per K step (ptxas C7517) and ~2x the main-loop instructions, so it applies only
# above this K. (cuBLASLt, which takes plain fp8 GEMMs on sm_90, runs without fast accumulation:
# ``torch._scaled_mm(use_fast_accum=False)``, its default.)
FP8_PROMOTE_ABOVE_K = 4096


def _cfg(bm, bn, bk, group, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages)


# M ranges: "small" (<= 256 rows: adaLN, embedders; weight-bandwidth bound), "medium" (<= 1024)
# and "large" (DiT tokens). Each config is (M range, config); the rule above removes those that
# do not fit for the call's dtypes and epilogue.
_W8A8_CONFIGS = [
    ("large", _cfg(128, 256, 128, 8, 8, 3)),
    ("large", _cfg(128, 256, 64, 8, 8, 4)),
    ("large", _cfg(128, 128, 128, 8, 8, 4)),
    ("large", _cfg(128, 128, 64, 8, 4, 5)),
    ("medium", _cfg(64, 128, 128, 4, 4, 4)),
    ("medium", _cfg(128, 128, 128, 8, 8, 4)),
    ("small", _cfg(64, 64, 128, 1, 4, 5)),
    ("small", _cfg(64, 128, 128, 1, 4, 4)),
]
# W8A16 computes y^T tiles (see the kernel): BLOCK_N is the weight tile (wgmma's M side, 64 rows
# per warp group) and BLOCK_M the activation rows, which may be as small as 16.
_W8A16_CONFIGS = [
    ("large", _cfg(256, 128, 64, 8, 8, 3)),
    ("large", _cfg(128, 128, 64, 8, 8, 4)),
    ("large", _cfg(128, 128, 64, 8, 4, 4)),
    ("large", _cfg(128, 64, 64, 8, 4, 4)),
    ("medium", _cfg(64, 128, 128, 4, 8, 4)),
    ("medium", _cfg(64, 64, 128, 4, 4, 4)),
    ("small", _cfg(16, 128, 256, 1, 8, 4)),
    ("small", _cfg(32, 128, 128, 1, 8, 5)),
    ("small", _cfg(32, 64, 128, 1, 4, 5)),
]


def _m_range(m: int) -> str:
    return "small" if m <= 256 else "medium" if m <= 1024 else "large"


def _prune(table, x_bytes_of, weight_convert_bytes_of):
    def prune(configs, named_args, **kwargs):
        x_bytes = x_bytes_of(named_args)
        convert = weight_convert_bytes_of(named_args)
        swiglu = kwargs.get("SWIGLU", named_args.get("SWIGLU", False))
        promote = kwargs.get("PROMOTE_FP8", named_args.get("PROMOTE_FP8", False))
        fitting = [(rng, c) for rng, c in table if _fits(c, x_bytes, swiglu, promote, convert)]
        wanted = _m_range(named_args["M"])
        # No fitting config for this M range (a promoted fp8 SwiGLU GEMM at large M): the smallest tiles.
        return [c for rng, c in fitting if rng == wanted] or [c for rng, c in fitting if rng == "small"]
    return prune


def _w8a16_convert_bytes(named_args) -> int:
    return 4 if named_args["w_ptr"].dtype == torch.float8_e4m3fn else named_args["x_ptr"].element_size()


if interpreter_enabled():
    # The interpreter runs programs one after the other and cannot autotune over several configs.
    _W8A8_AUTOTUNE = dict(configs=[_cfg(32, 64, 64, 2, 4, 1)])
    _W8A16_AUTOTUNE = dict(configs=[_cfg(32, 64, 64, 2, 4, 1)])
else:
    _W8A8_AUTOTUNE = dict(configs=[c for _, c in _W8A8_CONFIGS], prune_configs_by={"early_config_prune": _prune(_W8A8_CONFIGS, lambda a: 1, lambda a: 0)})
    _W8A16_AUTOTUNE = dict(configs=[c for _, c in _W8A16_CONFIGS],
                           prune_configs_by={"early_config_prune": _prune(_W8A16_CONFIGS, lambda a: a["x_ptr"].element_size(), _w8a16_convert_bytes)})


def _num_sms(device) -> int:
    """Persistent grid: at most one program per SM, each striding over the tiles by this count."""
    if device.type != "cuda":
        return 3  # interpreter: a few programs, so that the tile loop runs several times
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles visit each weight column tile while it is in L2.
    num_in_group = GROUP_M * num_pid_n
    first_m = (tile_id // num_in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % num_in_group) % size_m
    pid_n = (tile_id % num_in_group) // size_m
    return pid_m, pid_n


@triton.autotune(key=["M_BUCKET", "N_OUT", "K", "SWIGLU", "HAS_BIAS", "INT_ACC", "PROMOTE_FP8"], **_W8A8_AUTOTUNE)
@triton.jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N_OUT, K, stride_xm, stride_ym, M_BUCKET, NUM_PROGRAMS,
    INT_ACC: tl.constexpr, PROMOTE_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Persistent: each program walks tiles pid, pid + NUM_PROGRAMS, ... in grouped order.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w3_off = N_OUT * K  # W3 rows follow the W1 rows in the packed SwiGLU weight
    for tile_id in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past the end read row M-1 / N-1 (clamped, never stored): the loads need no row mask.
        rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
        rows_n = tl.minimum(offs_n, N_OUT - 1).to(tl.int64)
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
        # The weight tile is read as [BLOCK_N, BLOCK_K] (K contiguous, as stored) and transposed in
        # the dot: the K-major operand layout 8-bit wgmma needs, and a plain pipelined copy.
        w_ptrs = w_ptr + rows_n[:, None] * K + offs_k[None, :]
        if INT_ACC:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if INT_ACC:
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            elif PROMOTE_FP8:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            if SWIGLU:
                b3 = tl.load(w_ptrs + w3_off, mask=k_ok[None, :], other=0.0)
                if INT_ACC:
                    acc3 = tl.dot(a, tl.trans(b3), acc3, out_dtype=tl.int32)
                elif PROMOTE_FP8:
                    acc3 = tl.dot(a, tl.trans(b3), acc3, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc3 = tl.dot(a, tl.trans(b3), acc3)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        mask_m = offs_m < M
        mask_n = offs_n < N_OUT
        x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        out = acc.to(tl.float32) * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :] * x_scale
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            gate = acc3.to(tl.float32) * tl.load(ws_ptr + N_OUT + offs_n, mask=mask_n, other=0.0)[None, :] * x_scale
            if HAS_BIAS:
                gate += tl.load(b_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            out = out * tl.sigmoid(out) * gate
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(key=["M_BUCKET", "N_OUT", "K", "SWIGLU", "HAS_BIAS"], **_W8A16_AUTOTUNE)
@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N_OUT, K, stride_xm, stride_ym, M_BUCKET, NUM_PROGRAMS,
    FP32_IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Each tile computes y^T = W x^T ([BLOCK_N, BLOCK_M]): the weight tile, converted from 8 bits
    # in registers, is wgmma's A operand (which may come from registers), and the activation tile
    # is the B operand streamed through the pipelined shared-memory buffers. Converting the B
    # operand instead would write it back to shared memory every K step and wait for every
    # wgmma in flight before doing so.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w3_off = N_OUT * K
    for tile_id in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
        rows_n = tl.minimum(offs_n, N_OUT - 1).to(tl.int64)
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + rows_n[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            w = w.to(a.dtype)  # int8 and e4m3 values are exact in fp16, bf16 and fp32
            if FP32_IEEE:
                acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(a), acc)
            if SWIGLU:
                w3 = tl.load(w_ptrs + w3_off, mask=k_ok[None, :], other=0.0)
                w3 = w3.to(a.dtype)
                if FP32_IEEE:
                    acc3 = tl.dot(w3, tl.trans(a), acc3, input_precision="ieee")
                else:
                    acc3 = tl.dot(w3, tl.trans(a), acc3)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        mask_m = offs_m < M
        mask_n = offs_n < N_OUT
        out = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if SWIGLU:
            gate = acc3 * tl.load(ws_ptr + N_OUT + offs_n, mask=mask_n, other=0.0)[:, None]
            if HAS_BIAS:
                gate += tl.load(b_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            out = out * tl.sigmoid(out) * gate
        y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def _m_bucket(m: int) -> int:
    # Autotune once per power-of-two range of M, not once per sequence length.
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _launch(x2, x_scale, w_q, w_scale, bias, out_dtype, a8, swiglu):
    M, K = x2.shape
    N = w_q.shape[0]
    n_out = N // 2 if swiglu else N
    y = torch.empty((M, n_out), dtype=out_dtype, device=x2.device)
    if M == 0 or n_out == 0:
        return y
    dummy = w_scale  # stands in for absent pointers (never read)

    num_sms = _num_sms(x2.device)

    def grid(meta):
        # Program p takes tiles p, p + num_sms, ...: with fewer tiles than SMs, one tile each.
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"])),)

    common = dict(HAS_BIAS=bias is not None, SWIGLU=swiglu)
    if a8:
        kernel, args = _w8a8_kernel, (x2, x_scale, w_q, w_scale, bias if bias is not None else dummy, y)
        common.update(INT_ACC=w_q.dtype == torch.int8, PROMOTE_FP8=K > FP8_PROMOTE_ABOVE_K)
    else:
        kernel, args = _w8a16_kernel, (x2, w_q, w_scale, bias if bias is not None else dummy, y)
        common.update(FP32_IEEE=x2.dtype == torch.float32)
    kernel[grid](*args, M, n_out, K, x2.stride(0), y.stride(0), _m_bucket(M), num_sms, **common)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def scaled_mm_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """A plain fp8 W8A8 GEMM through ``torch._scaled_mm`` (cuBLASLt on a GPU) with row-wise scales:
    x_q [M, K] and w_q [N, K] float8_e4m3fn, x_scale [M], w_scale [N] float32, bias [N] or None."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.reshape(-1, 1).contiguous(),
                            scale_b=w_scale.reshape(1, -1).contiguous(), bias=bias, out_dtype=out_dtype)


def _prefers_scaled_mm(x2, w_q, bias, out_dtype, swiglu) -> bool:
    """The dispatch rule: a plain fp8 W8A8 GEMM goes to cuBLASLt (``torch._scaled_mm`` with
    per-token x per-channel scales, which torch >= 2.5 supports on sm_90 for a bf16 output, with a
    bf16 bias) wherever it accepts the call; our Triton kernel takes what cuBLASLt cannot fuse (the
    SwiGLU epilogue), int8, other output dtypes and the CPU. ``longcat-bench kernels`` times both."""
    return (
        not swiglu
        and w_q.dtype == torch.float8_e4m3fn
        and x2.device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(x2.device) >= (9, 0)
        and out_dtype == torch.bfloat16
        and (bias is None or bias.dtype == torch.bfloat16)
        and x2.shape[1] % 16 == 0
        and w_q.shape[0] % 16 == 0
        and w_q.is_contiguous()
    )


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("longcat::weight_only_linear", mutates_args=())
def _weight_only_linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor], swiglu: bool) -> torch.Tensor:
    x2 = _rows(x)
    n_out = w_q.shape[0] // 2 if swiglu else w_q.shape[0]
    fp8 = w_q.dtype == torch.float8_e4m3fn
    if triton_runs_on(x2, w_q, w_scale, *( [bias] if bias is not None else [])) and (not fp8 or fp8_supported(x2)):
        y = _launch(x2, None, w_q.contiguous(), w_scale.contiguous(), bias, x.dtype, False, swiglu)
    else:
        fallback_warning("quant_gemm.weight_only_linear")
        y = weight_only_linear_reference(x2, w_q, w_scale, bias, swiglu)
    return y.reshape(*x.shape[:-1], n_out)


@_weight_only_linear_op.register_fake
def _(x, w_q, w_scale, bias, swiglu):
    n_out = w_q.shape[0] // 2 if swiglu else w_q.shape[0]
    return x.new_empty((*x.shape[:-1], n_out))


def _weight_only_setup_context(ctx, inputs, output):
    x, w_q, w_scale, bias, swiglu = inputs
    ctx.save_for_backward(w_q, w_scale)
    ctx.swiglu = swiglu
    ctx.x_dtype = x.dtype
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]


def _weight_only_backward(ctx, grad):
    # d/dx (x W^T s) = (grad * s) W: a LoRA trained on top of a W8A16 layer needs the input gradient.
    # The weight stays frozen (no gradient for w_q / w_scale).
    if ctx.swiglu:
        raise NotImplementedError("backward through the fused SwiGLU epilogue is not implemented; "
                                  "use separate w1/w3 layers for training")
    w_q, w_scale = ctx.saved_tensors
    compute = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
    g = grad.to(compute) * w_scale.to(compute)
    grad_x = torch.matmul(g, w_q.to(compute)).to(ctx.x_dtype)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, grad_b, None


_weight_only_linear_op.register_autograd(_weight_only_backward, setup_context=_weight_only_setup_context)


@torch.library.custom_op("longcat::dynamic_linear", mutates_args=())
def _dynamic_linear_op(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype, swiglu: bool) -> torch.Tensor:
    x2 = _rows(x_q)
    xs = x_scale.reshape(-1).contiguous()
    n_out = w_q.shape[0] // 2 if swiglu else w_q.shape[0]
    fp8 = w_q.dtype == torch.float8_e4m3fn
    if _prefers_scaled_mm(x2, w_q, bias, out_dtype, swiglu):
        y = scaled_mm_linear(x2, xs, w_q, w_scale, bias, out_dtype)
    elif triton_runs_on(x2, xs, w_q, w_scale, *([bias] if bias is not None else [])) and (not fp8 or fp8_supported(x2)):
        y = _launch(x2, xs, w_q.contiguous(), w_scale.contiguous(), bias, out_dtype, True, swiglu)
    else:
        fallback_warning("quant_gemm.dynamic_linear")
        y = dynamic_linear_reference(x2, xs, w_q, w_scale, bias, out_dtype, swiglu)
    return y.reshape(*x_q.shape[:-1], n_out)


@_dynamic_linear_op.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype, swiglu):
    n_out = w_q.shape[0] // 2 if swiglu else w_q.shape[0]
    return x_q.new_empty((*x_q.shape[:-1], n_out), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Public launchers (validate, then call the custom op)
# ----------------------------------------------------------------------------------------------

def _check_weight(w_q, w_scale, bias, swiglu, weight_dtype):
    check_tensor("w_q", w_q, ndim=2, dtypes=(weight_dtype,) if weight_dtype is not None else WEIGHT_DTYPES)
    N = w_q.shape[0]
    check_tensor("w_scale", w_scale, ndim=1, dtypes=(torch.float32,))
    if w_scale.shape[0] != N:
        raise ValueError(f"w_scale must have shape [N={N}] (one scale per output channel), got {tuple(w_scale.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=ACT_DTYPES)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape [N={N}], got {tuple(bias.shape)}")
    if swiglu and N % 2:
        raise ValueError(f"swiglu=True needs w_q packed as [2H, K] (W1 over W3), got an odd N={N}")


def weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, swiglu: bool = False,
                       _weight_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W8A16 linear: x [..., K] (fp16/bf16/fp32), w_q [N, K] int8 or float8_e4m3fn, w_scale [N] fp32,
    bias [N] or None. Returns [..., N] (or [..., N/2] with ``swiglu``) in x.dtype."""
    check_tensor("x", x, dtypes=ACT_DTYPES)
    _check_weight(w_q, w_scale, bias, swiglu, _weight_dtype)
    if x.dim() < 1 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"x must have last dimension K={w_q.shape[1]} (w_q is [N, K]), got shape {tuple(x.shape)}")
    check_same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    return _weight_only_linear_op(x, w_q, w_scale, bias, bool(swiglu))


def int8_weight_only_linear(x, w_q, w_scale, bias=None, *, swiglu: bool = False):
    """W8A16 with an int8 weight; see ``weight_only_linear``."""
    return weight_only_linear(x, w_q, w_scale, bias, swiglu=swiglu, _weight_dtype=torch.int8)


def fp8_weight_only_linear(x, w_q, w_scale, bias=None, *, swiglu: bool = False):
    """W8A16 with a float8_e4m3fn weight; see ``weight_only_linear``."""
    return weight_only_linear(x, w_q, w_scale, bias, swiglu=swiglu, _weight_dtype=torch.float8_e4m3fn)


def dynamic_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16, *,
                   swiglu: bool = False) -> torch.Tensor:
    """W8A8 linear: x_q [..., K] and w_q [N, K] both int8 or both float8_e4m3fn, x_scale fp32 of
    shape x_q.shape[:-1] (per token), w_scale [N] fp32, bias [N] or None. Returns [..., N] (or
    [..., N/2] with ``swiglu``) in ``out_dtype``."""
    check_tensor("x_q", x_q, dtypes=WEIGHT_DTYPES)
    _check_weight(w_q, w_scale, bias, swiglu, x_q.dtype)
    if x_q.dim() < 1 or x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(f"x_q must have last dimension K={w_q.shape[1]} (w_q is [N, K]), got shape {tuple(x_q.shape)}")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,))
    if tuple(x_scale.shape) != tuple(x_q.shape[:-1]):
        raise ValueError(f"x_scale must have shape {tuple(x_q.shape[:-1])} (one scale per token), got {tuple(x_scale.shape)}")
    if out_dtype not in ACT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    return _dynamic_linear_op(x_q, x_scale, w_q, w_scale, bias, out_dtype, bool(swiglu))


def int8_dynamic_linear(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, *, swiglu: bool = False):
    """W8A8 int8 x int8 -> int32; see ``dynamic_linear``."""
    if isinstance(x_q, torch.Tensor) and x_q.dtype != torch.int8:
        raise TypeError(f"x_q has dtype {x_q.dtype}; int8_dynamic_linear expects int8 (use fp8_dynamic_linear for fp8)")
    return dynamic_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype, swiglu=swiglu)


def fp8_dynamic_linear(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, *, swiglu: bool = False):
    """W8A8 float8_e4m3fn x float8_e4m3fn -> fp32; see ``dynamic_linear``."""
    if isinstance(x_q, torch.Tensor) and x_q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"x_q has dtype {x_q.dtype}; fp8_dynamic_linear expects float8_e4m3fn (use int8_dynamic_linear for int8)")
    return dynamic_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype, swiglu=swiglu)
