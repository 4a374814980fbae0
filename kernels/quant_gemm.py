"""8-bit GEMMs for quantized Linear layers: ``y = x @ W^T * scale + bias`` with W stored as int8 or
float8_e4m3fn ``[N, K]`` and one float32 scale per output channel ``[N]`` (symmetric).

- W8A16 (weight-only): ``int8_weight_only_linear`` / ``fp8_weight_only_linear``. Activations stay
  float16/bfloat16/float32; each K-tile of the weight is converted to the activation dtype inside
  the K-loop (int8 and e4m3 values are exact in fp16/bf16), multiplied with fp32 accumulation, and
  the per-channel scale is applied once in the epilogue (equal to scaling every tile, since the
  scale is constant along K). No full-size dequantised weight ever exists.
- W8A8 (dynamic): ``int8_dynamic_linear`` (int8 x int8 -> int32 accumulate) and
  ``fp8_dynamic_linear`` (e4m3 x e4m3 -> fp32 accumulate) take activations already quantized per
  token (``longcat.kernels.quantize_activations.quantize_per_token``); the epilogue multiplies by
  ``x_scale[m] * w_scale[n]`` and adds the bias.
- ``swiglu=True`` (any of the four): the weight packs W1 over W3 as ``[2H, K]`` (bias, if any,
  ``[2H]``) and the output is ``silu(x W1^T) * (x W3^T)`` of width H, computed in the epilogue
  (fp32) from two accumulators, so the FFN's [M, 2H] intermediate never reaches memory.

Each op has a pure-PyTorch ``*_reference`` (float32 math, float64 when given float64 inputs), a
validating launcher and a ``torch.library.custom_op`` with a fake implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ._configs import TileShape, prune_configs
from ._runtime import (check_same_device, check_tensor, device_capability, fallback_warning, fp8_supported,
                       interpreter_enabled, triton_runs_on)

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
# Triton kernel (one kernel, specialised by constexpr flags)
# ----------------------------------------------------------------------------------------------

def _gpu_configs():
    cfg = triton.Config
    return [
        # Large M (DiT tokens): wgmma-sized tiles for the H200.
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # 8 warps: two SwiGLU accumulators of 128x128 fit the registers (64 fp32 each per thread)
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Small M (adaLN, time/text embedders, decode-like calls): weight-bandwidth bound.
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4}, num_warps=4, num_stages=4),
    ]


def _gemm_tile(config, named_args, kwargs) -> TileShape:
    x, w = named_args["x_ptr"], named_args["w_ptr"]
    pair = 2 if kwargs["SWIGLU"] else 1
    convert = 0 if kwargs["A8"] else (4 if w.dtype == torch.float8_e4m3fn else x.element_size())
    return TileShape(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], x.element_size(),
                     w.element_size(), b_operands=pair, accumulators=pair, b_convert_bytes=convert)


def _prune_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    if m <= 32:
        by_m = [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    elif m <= 256:
        by_m = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    else:
        by_m = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    major, minor = device_capability(named_args["x_ptr"]) or (9, 0)
    return prune_configs(by_m, lambda c: _gemm_tile(c, named_args, kwargs), arch=10 * major + minor)


if interpreter_enabled():
    # The interpreter runs programs one after the other and cannot autotune over several configs.
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    _PRUNE = None
else:
    _CONFIGS = _gpu_configs()
    _PRUNE = {"early_config_prune": _prune_configs}


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N_OUT", "K", "A8", "SWIGLU", "HAS_BIAS"], prune_configs_by=_PRUNE)
@triton.jit
def _qgemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N_OUT, K, stride_xm, stride_ym, M_BUCKET,
    A8: tl.constexpr, INT_ACC: tl.constexpr, FP32_IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT

    # 64-bit row offsets: at 720p an activation has ~1.7e5 rows x 1.2e4 columns, close to 2**31.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
    w3_off = N_OUT * K  # W3 rows follow the W1 rows in the packed SwiGLU weight

    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
        if not A8:
            b = b.to(a.dtype)  # dequantise the tile: int8 / e4m3 are exact in fp16, bf16, fp32
        if INT_ACC:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if SWIGLU:
            b3 = tl.load(w_ptrs + w3_off, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
            if not A8:
                b3 = b3.to(a.dtype)
            if INT_ACC:
                acc3 = tl.dot(a, b3, acc3, out_dtype=tl.int32)
            elif FP32_IEEE:
                acc3 = tl.dot(a, b3, acc3, input_precision="ieee")
            else:
                acc3 = tl.dot(a, b3, acc3)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out = acc.to(tl.float32) * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if A8:
        x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        out = out * x_scale[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        gate = acc3.to(tl.float32) * tl.load(ws_ptr + N_OUT + offs_n, mask=mask_n, other=0.0)[None, :]
        if A8:
            gate = gate * x_scale[:, None]
        if HAS_BIAS:
            gate += tl.load(b_ptr + N_OUT + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out * tl.sigmoid(out) * gate

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
    int_acc = a8 and w_q.dtype == torch.int8
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    _qgemm_kernel[grid](
        x2, x_scale if x_scale is not None else w_scale, w_q, w_scale,
        bias if bias is not None else w_scale, y,
        M, n_out, K, x2.stride(0), y.stride(0), _m_bucket(M),
        A8=a8, INT_ACC=int_acc, FP32_IEEE=(not a8 and x2.dtype == torch.float32),
        HAS_BIAS=bias is not None, SWIGLU=swiglu,
    )
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


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
    if triton_runs_on(x2, xs, w_q, w_scale, *([bias] if bias is not None else [])) and (not fp8 or fp8_supported(x2)):
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
