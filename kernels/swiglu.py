"""SwiGLU gate ``silu(a) * b`` of the DiT feed-forward network (``w2(silu(w1 x) * w3 x)``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ._launch import cdiv
from ._runtime import check_same_device, check_tensor, fallback_warning, interpreter_enabled, triton_runs_on

__all__ = ["swiglu", "swiglu_packed", "swiglu_reference", "swiglu_packed_reference"]

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle, in the inputs' dtype as upstream computes it: ``silu(a) * b``."""
    check_tensor("a", a)
    check_tensor("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device(a=a, b=b)
    return F.silu(a) * b


def swiglu_packed_reference(ab: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle on the fused w1|w3 output [..., 2H]: ``silu(ab[..., :H]) * ab[..., H:]``."""
    check_tensor("ab", ab)
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dimension (w1 | w3 halves), got shape {tuple(ab.shape)}")
    a, b = ab.chunk(2, dim=-1)
    return swiglu_reference(a, b)


# Elementwise kernels over [rows, H] views with a row stride: the same kernels serve separate a, b
# tensors and the packed [rows, 2H] layout (b starts H columns after a). float32 math, one rounding.


@triton.jit
def _swiglu_fwd_kernel(
    A, B, OUT, H, sa, sb, so,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(A + row * sa + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * sb + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(OUT + row * so + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, A, B, DA, DB, H, sd, sa, sb, sda, sdb,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g = tl.load(DOUT + row * sd + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * sa + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * sb + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    # d silu(a) / da = sig * (1 + a * (1 - sig))
    da = g * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + row * sda + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * sdb + cols, (g * silu).to(DB.dtype.element_ty), mask=mask)


_GRID_AXIS1_MAX = 65535


def _block(H):
    return min(triton.next_power_of_2(max(H, 1)), 8192 if interpreter_enabled() else 1024)


def _rows_view(t, H):
    """t as [rows, H] with unit column stride; the row stride is returned separately."""
    t2 = t.reshape(-1, H)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < H):
        t2 = t2.contiguous()
    return t2


def _launch_rows(kernel, H, rows, *args, BLOCK):
    # rows go on grid axis 1 (at most 65535 per launch): launch in slabs of rows
    step = _GRID_AXIS1_MAX
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        kernel[(cdiv(H, BLOCK), n)](*[(a[r0:r0 + n] if isinstance(a, torch.Tensor) else a) for a in args], BLOCK=BLOCK)


def _launch_swiglu(a2, b2, out2):
    H = a2.shape[1]
    if a2.shape[0] and H:
        _launch_rows(_swiglu_fwd_kernel, H, a2.shape[0], a2, b2, out2, H, a2.stride(0), b2.stride(0), out2.stride(0),
                     BLOCK=_block(H))


def _launch_swiglu_bwd(g2, a2, b2, da2, db2):
    H = a2.shape[1]
    if a2.shape[0] and H:
        _launch_rows(_swiglu_bwd_kernel, H, a2.shape[0], g2, a2, b2, da2, db2, H,
                     g2.stride(0), a2.stride(0), b2.stride(0), da2.stride(0), db2.stride(0), BLOCK=_block(H))


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("longcat::swiglu", mutates_args=(), schema="(Tensor a, Tensor b) -> Tensor")
def _swiglu_op(a, b):
    H = a.shape[-1]
    out = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    _launch_swiglu(_rows_view(a, H), _rows_view(b, H), out.view(-1, H))
    return out


@_swiglu_op.register_fake
def _(a, b):
    return torch.empty(a.shape, device=a.device, dtype=a.dtype)


@torch.library.custom_op(
    "longcat::swiglu_backward", mutates_args=(), schema="(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)"
)
def _swiglu_backward_op(grad, a, b):
    H = a.shape[-1]
    da = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    db = torch.empty(b.shape, device=b.device, dtype=b.dtype)
    _launch_swiglu_bwd(_rows_view(grad, H), _rows_view(a, H), _rows_view(b, H), da.view(-1, H), db.view(-1, H))
    return da, db


@_swiglu_backward_op.register_fake
def _(grad, a, b):
    return torch.empty(a.shape, device=a.device, dtype=a.dtype), torch.empty(b.shape, device=b.device, dtype=b.dtype)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad):
    a, b = ctx.saved_tensors
    return _swiglu_backward_op(grad, a, b)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("longcat::swiglu_packed", mutates_args=(), schema="(Tensor ab) -> Tensor")
def _swiglu_packed_op(ab):
    H = ab.shape[-1] // 2
    ab2 = _rows_view(ab, 2 * H)
    out = torch.empty((*ab.shape[:-1], H), device=ab.device, dtype=ab.dtype)
    _launch_swiglu(ab2[:, :H], ab2[:, H:], out.view(-1, H))
    return out


@_swiglu_packed_op.register_fake
def _(ab):
    return ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2))


@torch.library.custom_op(
    "longcat::swiglu_packed_backward", mutates_args=(), schema="(Tensor grad, Tensor ab) -> Tensor"
)
def _swiglu_packed_backward_op(grad, ab):
    H = ab.shape[-1] // 2
    ab2 = _rows_view(ab, 2 * H)
    dab = torch.empty(ab.shape, device=ab.device, dtype=ab.dtype)
    d2 = dab.view(-1, 2 * H)
    _launch_swiglu_bwd(_rows_view(grad, H), ab2[:, :H], ab2[:, H:], d2[:, :H], d2[:, H:])
    return dab


@_swiglu_packed_backward_op.register_fake
def _(grad, ab):
    return torch.empty_like(ab, memory_format=torch.contiguous_format)


def _swiglu_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_packed_backward(ctx, grad):
    (ab,) = ctx.saved_tensors
    return _swiglu_packed_backward_op(grad, ab)


_swiglu_packed_op.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_packed_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` in float32 with one rounding, result in a.dtype (a, b: one shape and dtype,
    float16/bfloat16/float32; any strides). Differentiable w.r.t. a and b."""
    check_tensor("a", a, dtypes=ACT_DTYPES)
    check_tensor("b", b, dtypes=ACT_DTYPES)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dim() == 0:
        raise ValueError("a must have at least one dimension")
    check_same_device(a=a, b=b)
    if triton_runs_on(a, b):
        return _swiglu_op(a, b)
    fallback_warning("swiglu")
    return swiglu_reference(a, b)


def swiglu_packed(ab: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the fused w1|w3 GEMM output ab [..., 2H] (first half a = w1 x, second half b = w3 x):
    returns ``silu(a) * b`` [..., H] in ab.dtype, reading ab once, without splitting copies.
    Differentiable w.r.t. ab (the gradient comes back packed the same way)."""
    check_tensor("ab", ab, dtypes=ACT_DTYPES)
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dimension (w1 | w3 halves), got shape {tuple(ab.shape)}")
    if triton_runs_on(ab):
        return _swiglu_packed_op(ab)
    fallback_warning("swiglu_packed")
    return swiglu_packed_reference(ab)
