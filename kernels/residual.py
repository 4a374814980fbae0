"""Gated residual ``x + gate[frame] * y``, computed in float32 and cast back to x.dtype.

After attention and after the FFN every DiT block adds the branch output scaled by a per-frame
gate (one row per latent frame, broadcast over the frame's H*W tokens).
"""
from __future__ import annotations

import torch

from ._runtime import check_same_device, check_tensor, fallback_warning, triton_runs_on
from ._launch import check_grid_axis1, frame_chunks, row_tile
from .quantize_activations import quantize_per_token_reference
from .modulate import (
    _FWD_TARGET_PROGRAMS,
    ACT_DTYPES,
    _fused_norm_fwd_kernel,
    _launch_norm_fwd,
    _layer_norm_modulate_math,
    _qmax,
    check_frame_modulation,
    check_norm_inputs,
    unit_stride,
)

__all__ = [
    "gated_residual",
    "gated_residual_layer_norm",
    "gated_residual_layer_norm_quant",
    "gated_residual_layer_norm_quant_reference",
    "gated_residual_reference",
    "gated_residual_layer_norm_reference",
]


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle. x, y: [B, N, C]; gate: [B, T, C] with N = T * L. Returns a new tensor."""
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    check_same_device(x=x, y=y, gate=gate)
    T = check_frame_modulation("gate", gate, x)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, N, C = x.shape
    out = x.to(compute).view(B, T, N // T, C) + gate.to(compute).unsqueeze(2) * y.to(compute).view(B, T, N // T, C)
    return out.view(B, N, C).to(x.dtype)


def gated_residual_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle of the residual fused with the next norm.

    new_x = x + gate[frame] * y (gate None: x + y), in float32 and cast to x.dtype; normed =
    LayerNorm(new_x) (affine with weight/bias, and/or modulated with shift/scale) computed from the
    cast new_x, as the unfused model computes it. Returns (new_x, normed), both in x.dtype.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate is None:
        check_same_device(x=x, y=y)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        new_x = (x.to(compute) + y.to(compute)).to(x.dtype)
    else:
        new_x = gated_residual_reference(x, y, gate)
    normed = _layer_norm_modulate_math(new_x, shift, scale, weight, bias, eps).to(x.dtype)
    return new_x, normed


def gated_residual_layer_norm_quant_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    qdtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle of the residual fused with the next norm and per-token quantization of
    the normed values (float32, not rounded to x.dtype first; the rule of
    ``longcat.kernels.quantize_activations``). Returns (new_x, q, s)."""
    _qmax(qdtype)
    new_x, _ = gated_residual_layer_norm_reference(x, y, gate, None, None, None, None, eps)
    y_norm = _layer_norm_modulate_math(new_x, shift, scale, weight, bias, eps)
    q, s = quantize_per_token_reference(y_norm.to(torch.float32), qdtype)
    return new_x, q, s


# ----------------------------------------------------------------------------------------------
# Custom ops (the kernels live in modulate.py: one fused row kernel serves both files)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "longcat::gated_residual", mutates_args=(), schema="(Tensor x, Tensor y, Tensor gate) -> Tensor"
)
def _gated_residual_op(x, y, gate):
    return _launch_norm_fwd(x, y, gate, has_norm=False)[0]


@_gated_residual_op.register_fake
def _(x, y, gate):
    return torch.empty_like(x)


def _gr_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gr_backward(ctx, grad):
    y, gate = ctx.saved_tensors
    dx, dy, dgate, *_ = torch.ops.longcat.fused_norm_backward(
        None, grad.to(ctx.x_dtype), None, y, gate, None, None, None, None, 0.0, False
    )
    return dx, dy, dgate


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)


@torch.library.custom_op(
    "longcat::gated_residual_", mutates_args=("x",), schema="(Tensor(a!) x, Tensor y, Tensor gate) -> ()"
)
def _gated_residual_inplace_op(x, y, gate):
    _launch_inplace(x, y, gate)


@_gated_residual_inplace_op.register_fake
def _(x, y, gate):
    return None


def _launch_inplace(x, y, gate):
    # The fused row kernel with its residual output pointed at x: every element of x is read
    # before the same element is written, by the same program, so writing in place is safe.
    B, N, C = x.shape
    T = gate.shape[1]
    L = N // T
    BLOCK_C, ROWS, warps = row_tile(C)
    chunk, nchunks = frame_chunks(B * T, L, ROWS, _FWD_TARGET_PROGRAMS)
    check_grid_axis1(B * T, "batch * frames")
    if B * N == 0:
        return
    y = y.contiguous()
    _fused_norm_fwd_kernel[(nchunks, B * T)](
        x, y, gate, x, x, x, x, x, x, x,
        N, L, C, T, chunk, 0.0,
        gate.stride(0), gate.stride(1), 0, 0, 0, 0,
        HAS_RES=True, HAS_GATE=True, HAS_NORM=False, HAS_MOD=False, HAS_W=False, HAS_B=False,
        QUANT=0, QMAX=1.0, AMAX_EPS=0.0, ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=warps,
    )


@torch.library.custom_op(
    "longcat::gated_residual_layer_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor y, Tensor? gate, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, "
    "float eps) -> (Tensor, Tensor)",
)
def _gated_residual_layer_norm_op(x, y, gate, shift, scale, weight, bias, eps):
    h, normed, _ = _launch_norm_fwd(x, y, gate, shift, scale, weight, bias, eps, True)
    return h, normed


@_gated_residual_layer_norm_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _grln_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale, weight, bias)
    ctx.eps = eps


def _grln_backward(ctx, grad_h, grad_normed):
    h, y, gate, shift, scale, weight, bias = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    if grad_normed is None:
        grad_normed = torch.zeros_like(h)
    dx, dy, dgate, dshift, dscale, dw, db = torch.ops.longcat.fused_norm_backward(
        grad_normed, grad_h, h, y, gate, shift, scale, weight, bias, ctx.eps, True
    )

    def keep(t, src):
        return t if src is not None else None

    return dx, dy, keep(dgate, gate), keep(dshift, shift), keep(dscale, scale), keep(dw, weight), keep(db, bias), None


_gated_residual_layer_norm_op.register_autograd(_grln_backward, setup_context=_grln_setup)


@torch.library.custom_op(
    "longcat::gated_residual_layer_norm_quant",
    mutates_args=(),
    schema="(Tensor x, Tensor y, Tensor? gate, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, "
    "float eps, ScalarType qdtype) -> (Tensor, Tensor, Tensor)",
)
def _gated_residual_layer_norm_quant_op(x, y, gate, shift, scale, weight, bias, eps, qdtype):
    return _launch_norm_fwd(x, y, gate, shift, scale, weight, bias, eps, True, None, qdtype)


@_gated_residual_layer_norm_quant_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, qdtype):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=qdtype), x.new_empty(x.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_residual_inputs(x, y, gate):
    check_tensor("x", x, ndim=3, dtypes=ACT_DTYPES)
    check_tensor("y", y, ndim=3, dtypes=ACT_DTYPES)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate is not None:
        check_tensor("gate", gate, ndim=3, dtypes=(torch.float32,))
        check_frame_modulation("gate", gate, x)
    check_same_device(x=x, y=y, gate=gate)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + gate[frame] * y`` computed in float32, result in x.dtype.

    x, y: [B, N, C] float16/bfloat16/float32 (y may differ in dtype from x); gate: [B, T, C]
    float32 with N = T * L (strided views fine). ``inplace=True`` writes the result into x (x must
    be contiguous) and returns x; it is for inference and refuses tensors that require grad.
    The out-of-place form is differentiable w.r.t. x, y and gate.
    """
    _check_residual_inputs(x, y, gate)
    if inplace:
        if not x.is_contiguous():
            raise ValueError("x must be contiguous for inplace=True")
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad):
            raise RuntimeError("gated_residual(inplace=True) is not differentiable; use inplace=False for training")
    if triton_runs_on(x, y, gate):
        if inplace:
            _gated_residual_inplace_op(x, y, unit_stride(gate))
            return x
        return _gated_residual_op(x, y, unit_stride(gate))
    fallback_warning("gated_residual")
    out = gated_residual_reference(x, y, gate)
    if inplace:
        x.copy_(out)
        return x
    return out


def gated_residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``new_x = x + gate[frame] * y`` (gate None: ``x + y``) fused with the next norm.

    Returns (new_x, normed), both [B, N, C] in x.dtype: new_x is rounded to x.dtype before the
    norm reads it (as the unfused model does). The norm is LayerNorm with float32 statistics,
    affine when weight/bias are given (pre-cross-attention norm), modulated when shift/scale
    [B, T, C] float32 are given (FFN input); gate and shift must then have the same T.
    Differentiable w.r.t. every tensor input.
    """
    _check_residual_inputs(x, y, gate)
    check_norm_inputs(x, shift, scale, weight, bias)
    if gate is not None and shift is not None and gate.shape[1] != shift.shape[1]:
        raise ValueError(f"gate has {gate.shape[1]} frames but shift has {shift.shape[1]}; they must agree")
    if triton_runs_on(x, y, gate, shift, scale, weight, bias):
        return _gated_residual_layer_norm_op(
            x, y, unit_stride(gate), unit_stride(shift), unit_stride(scale), weight, bias, float(eps)
        )
    fallback_warning("gated_residual_layer_norm")
    return gated_residual_layer_norm_reference(x, y, gate, shift, scale, weight, bias, eps)


def gated_residual_layer_norm_quant(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    qdtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gated_residual_layer_norm` whose normed output is quantized per token for the W8A8
    GEMMs that read it (the FFN input): returns (new_x [B, N, C] in x.dtype, q [B, N, C] in
    ``qdtype`` (torch.int8 or torch.float8_e4m3fn), s [B, N] float32), see
    :func:`gated_residual_layer_norm_quant_reference`. Not differentiable."""
    _check_residual_inputs(x, y, gate)
    check_norm_inputs(x, shift, scale, weight, bias)
    _qmax(qdtype)
    if gate is not None and shift is not None and gate.shape[1] != shift.shape[1]:
        raise ValueError(f"gate has {gate.shape[1]} frames but shift has {shift.shape[1]}; they must agree")
    if triton_runs_on(x, y, gate, shift, scale, weight, bias):
        return _gated_residual_layer_norm_quant_op(
            x, y, unit_stride(gate), unit_stride(shift), unit_stride(scale), weight, bias, float(eps), qdtype
        )
    fallback_warning("gated_residual_layer_norm_quant")
    return gated_residual_layer_norm_quant_reference(x, y, gate, shift, scale, weight, bias, eps, qdtype)
