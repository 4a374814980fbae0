"""adaLN LayerNorm-modulate: ``LayerNorm(x) * (1 + scale[frame]) + shift[frame]``.

DiT blocks normalise the activations without affine parameters (eps 1e-6) in float32 and then
modulate them per latent frame: ``shift``/``scale`` have one row per frame and are broadcast
over that frame's H*W tokens. The same op without modulation but with an affine LayerNorm is the
pre-cross-attention norm. The result is cast back to the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ._launch import check_grid_axis1, frame_chunks, row_tile
from ._runtime import FP8_NEEDS_SM89, check_same_device, check_tensor, fallback_warning, fp8_supported, triton_runs_on
from .quantize_activations import AMAX_EPS, QMAX as QUANT_DTYPES, quantize_per_token_reference, quantize_tile

__all__ = [
    "layer_norm_modulate",
    "layer_norm_modulate_quant",
    "layer_norm_modulate_reference",
    "layer_norm_modulate_quant_reference",
    "check_frame_modulation",
]

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_frame_modulation(name: str, mod: torch.Tensor, x: torch.Tensor) -> int:
    """Check a per-frame modulation tensor [B, T, C] against activations x [B, N, C]; returns T."""
    check_tensor(name, mod, ndim=3)
    B, N, C = x.shape
    if mod.shape[0] != B or mod.shape[2] != C:
        raise ValueError(f"{name} must have shape [B={B}, T, C={C}], got {tuple(mod.shape)}")
    T = mod.shape[1]
    if T == 0 or N % T != 0:
        raise ValueError(f"{name} has {T} frames, which does not divide the {N} tokens of x")
    return T


def layer_norm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch oracle.

    x: [B, N, C] activations, N = T * L tokens in frame-major order.
    shift, scale: [B, T, C] per-frame modulation (both or neither), applied in float32.
    weight, bias: optional LayerNorm affine [C].
    Returns [B, N, C] in ``out_dtype`` (default x.dtype). Float64 inputs are computed in float64
    (an oracle for tests).
    """
    return _layer_norm_modulate_math(x, shift, scale, weight, bias, eps).to(out_dtype or x.dtype)


def _layer_norm_modulate_math(x, shift, scale, weight, bias, eps):
    """The reference computation, left in its compute dtype (float32, float64 for float64 x)."""
    check_tensor("x", x, ndim=3)
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    check_same_device(x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, N, C = x.shape
    y = F.layer_norm(
        x.to(compute),
        (C,),
        None if weight is None else weight.to(compute),
        None if bias is None else bias.to(compute),
        eps,
    )
    if shift is not None:
        T = check_frame_modulation("shift", shift, x)
        if scale.shape != shift.shape:
            raise ValueError(f"scale must have the shape of shift {tuple(shift.shape)}, got {tuple(scale.shape)}")
        y = y.view(B, T, N // T, C) * (scale.to(compute) + 1).unsqueeze(2) + shift.to(compute).unsqueeze(2)
        y = y.view(B, N, C)
    return y


def layer_norm_modulate_quant_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    qdtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle of LayerNorm-modulate followed by symmetric per-token quantization.

    The normalised values are quantized as computed (float32, no rounding to x.dtype first), by
    the rounding rule of ``longcat.kernels.quantize_activations`` (:func:`quantize_per_token_reference`).
    Returns (q [B, N, C] in qdtype, s [B, N] float32); ``q * s`` approximates y.
    """
    _qmax(qdtype)
    y = _layer_norm_modulate_math(x, shift, scale, weight, bias, eps)
    return quantize_per_token_reference(y.to(torch.float32), qdtype)


def _qmax(qdtype) -> float:
    if qdtype not in QUANT_DTYPES:
        raise TypeError(f"qdtype must be torch.int8 or torch.float8_e4m3fn, got {qdtype}")
    return QUANT_DTYPES[qdtype]


# ----------------------------------------------------------------------------------------------
# Triton kernels. One forward and one backward kernel serve LayerNorm(-modulate), its quantizing
# variant, the gated residual, and the gated residual fused with the following norm
# (residual.py); constexpr flags switch the parts on. All [B, N, C] tensors are contiguous; the
# per-frame [B, T, C] tensors may be strided views (chunks of the adaLN output).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_row_tile(X, RES, b, N, C, rows, end, cols, cmask, HAS_RES: tl.constexpr):
    """Rows ``rows`` (< end) of X and, with HAS_RES, of RES, in their storage dtypes."""
    mask = (rows < end)[:, None] & cmask[None, :]
    offs = (b * N + rows.to(tl.int64))[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(RES + offs, mask=mask, other=0.0)
    else:
        r = x
    return x, r


@triton.jit
def _fused_norm_fwd_kernel(
    X, RES, GATE, H_OUT, SHIFT, SCALE, W, BIAS, Y, QS,
    N, L, C, T, CHUNK, eps,
    sg_b, sg_t, ssh_b, ssh_t, ssc_b, ssc_t,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_MOD: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
    AMAX_EPS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    b = (pid_f // T).to(tl.int64)
    f = pid_f % T
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_GATE:
        g = tl.load(GATE + b * sg_b + f * sg_t + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_MOD:
        sh = tl.load(SHIFT + b * ssh_b + f * ssh_t + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * ssc_b + f * ssc_t + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    first = f * L + pid_c * CHUNK  # token index inside batch b
    end = tl.minimum(f * L + L, first + CHUNK)
    # Software pipeline: the next rows' loads are issued before this rows' reductions, so every
    # program keeps two row tiles in flight (a row-per-iteration loop with no prefetch leaves HBM
    # idle while it reduces).
    x_next, r_next = _load_row_tile(X, RES, b, N, C, first + tl.arange(0, ROWS), end, cols, cmask, HAS_RES)
    for r0 in range(0, CHUNK, ROWS):
        rows = first + r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        offs = (b * N + rows.to(tl.int64))[:, None] * C + cols[None, :]
        x = x_next.to(tl.float32)
        r = r_next.to(tl.float32)
        x_next, r_next = _load_row_tile(X, RES, b, N, C, rows + ROWS, end, cols, cmask, HAS_RES)
        if HAS_RES:
            if HAS_GATE:
                x = x + g[None, :] * r
            else:
                x = x + r
            h = x.to(H_OUT.dtype.element_ty)
            tl.store(H_OUT + offs, h, mask=mask)
            x = h.to(tl.float32)  # the norm sees the stored (rounded) residual stream
        if HAS_NORM:
            mean = tl.sum(x, axis=1) / C
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / C + eps)
            y = xc * rstd[:, None]
            if HAS_W:
                y = y * w[None, :]
            if HAS_B:
                y = y + bb[None, :]
            if HAS_MOD:
                y = y * sc[None, :] + sh[None, :]
            if QUANT == 0:
                tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
            else:
                q, s = quantize_tile(y, mask, QMAX, AMAX_EPS, QUANT == 1)
                tl.store(Y + offs, q.to(Y.dtype.element_ty), mask=mask)
                tl.store(QS + b * N + rows, s, mask=rmask)


@triton.jit
def _fused_norm_bwd_kernel(
    DY, DH, X, RES, GATE, SCALE, W, BIAS, DX, DRES,
    P_DSHIFT, P_DSCALE, P_DGATE, P_DW, P_DB,
    N, L, C, T, CHUNK, eps,
    sg_b, sg_t, ssc_b, ssc_t,
    HAS_DH: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_MOD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    b = (pid_f // T).to(tl.int64)
    f = pid_f % T
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_GATE:
        g = tl.load(GATE + b * sg_b + f * sg_t + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_MOD:
        sc = tl.load(SCALE + b * ssc_b + f * ssc_t + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = f * L + pid_c * CHUNK
    end = tl.minimum(f * L + L, first + CHUNK)
    for r0 in range(0, CHUNK, ROWS):
        rows = first + r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        offs = (b * N + rows.to(tl.int64))[:, None] * C + cols[None, :]
        if HAS_NORM:
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=1) / C
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / C + eps)
            xhat = xc * rstd[:, None]
            if HAS_MOD:
                z = xhat
                if HAS_W:
                    z = z * w[None, :]
                if HAS_B:
                    z = z + bb[None, :]
                acc_dshift += tl.sum(dy, axis=0)
                acc_dscale += tl.sum(dy * z, axis=0)
                dz = dy * sc[None, :]
            else:
                dz = dy
            if HAS_W:
                acc_dw += tl.sum(dz * xhat, axis=0)
                dxh = dz * w[None, :]
            else:
                dxh = dz
            if HAS_B:
                acc_db += tl.sum(dz, axis=0)
            c1 = tl.sum(dxh * xhat, axis=1) / C
            c2 = tl.sum(dxh, axis=1) / C
            dx = tl.where(mask, (dxh - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
            if HAS_DH:
                dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            dx = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            if HAS_GATE:
                r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
                acc_dgate += tl.sum(dx * r, axis=0)
                tl.store(DRES + offs, (dx * g[None, :]).to(DRES.dtype.element_ty), mask=mask)
            else:
                tl.store(DRES + offs, dx.to(DRES.dtype.element_ty), mask=mask)
    part = (pid_f * tl.num_programs(0) + pid_c).to(tl.int64) * C + cols
    if HAS_MOD:
        tl.store(P_DSHIFT + part, acc_dshift, mask=cmask)
        tl.store(P_DSCALE + part, acc_dscale, mask=cmask)
    if HAS_GATE:
        tl.store(P_DGATE + part, acc_dgate, mask=cmask)
    if HAS_W:
        tl.store(P_DW + part, acc_dw, mask=cmask)
    if HAS_B:
        tl.store(P_DB + part, acc_db, mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launchers (no validation beyond shapes already checked by the public functions).
# ----------------------------------------------------------------------------------------------

_FWD_TARGET_PROGRAMS = 16384
_BWD_TARGET_PROGRAMS = 1024


def _strides_bt(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _frames_of(B, N, *mods):
    for m in mods:
        if m is not None:
            return m.shape[1]
    return 1


def _launch_norm_fwd(x, res=None, gate=None, shift=None, scale=None, weight=None, bias=None,
                     eps=1e-6, has_norm=True, out_dtype=None, qdtype=None):
    """Returns (h or None, y or q or None, qscale or None)."""
    x = x.contiguous()
    res = res.contiguous() if res is not None else None
    B, N, C = x.shape
    T = _frames_of(B, N, gate, shift)
    L = N // T
    BLOCK_C, ROWS, warps = row_tile(C)
    chunk, nchunks = frame_chunks(B * T, L, ROWS, _FWD_TARGET_PROGRAMS)
    check_grid_axis1(B * T, "batch * frames")
    h = torch.empty_like(x) if res is not None else None
    quant = 0
    qs = None
    y = None
    qmax = 1.0
    if has_norm:
        if qdtype is not None:
            qmax = _qmax(qdtype)
            quant = 1 if qdtype == torch.int8 else 2
            y = torch.empty((B, N, C), device=x.device, dtype=qdtype)
            qs = torch.empty((B, N), device=x.device, dtype=torch.float32)
        else:
            y = torch.empty((B, N, C), device=x.device, dtype=out_dtype or x.dtype)
    if B * N == 0:
        return h, y, qs
    dummy = x
    _fused_norm_fwd_kernel[(nchunks, B * T)](
        x, res if res is not None else dummy, gate if gate is not None else dummy,
        h if h is not None else dummy, shift if shift is not None else dummy,
        scale if scale is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, y if y is not None else dummy, qs if qs is not None else dummy,
        N, L, C, T, chunk, eps,
        *_strides_bt(gate), *_strides_bt(shift), *_strides_bt(scale),
        HAS_RES=res is not None, HAS_GATE=gate is not None, HAS_NORM=has_norm,
        HAS_MOD=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        QUANT=quant, QMAX=qmax, AMAX_EPS=AMAX_EPS, ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=warps,
    )
    return h, y, qs


def _launch_norm_bwd(dy, dh, x, res=None, gate=None, shift=None, scale=None, weight=None, bias=None,
                     eps=1e-6, has_norm=True):
    """Gradients of the fused op. x is the norm's input (the residual output h when fused).
    Returns (dx, dres, dgate, dshift, dscale, dweight, dbias); None for absent inputs."""
    ref = x if x is not None else dh
    B, N, C = ref.shape
    dy = dy.contiguous() if dy is not None else None
    dh = dh.contiguous() if dh is not None else None
    x = x.contiguous() if x is not None else None
    res = res.contiguous() if res is not None else None
    T = _frames_of(B, N, gate, shift)
    L = N // T
    BLOCK_C, ROWS, warps = row_tile(C)
    chunk, nchunks = frame_chunks(B * T, L, ROWS, _BWD_TARGET_PROGRAMS)
    check_grid_axis1(B * T, "batch * frames")
    dx = torch.empty((B, N, C), device=ref.device, dtype=ref.dtype)
    dres = torch.empty_like(res) if res is not None else None

    def partial(flag):
        return torch.empty((B * T, nchunks, C), device=ref.device, dtype=torch.float32) if flag else None

    p_dshift, p_dscale = partial(shift is not None), partial(shift is not None)
    p_dgate, p_dw, p_db = partial(gate is not None), partial(weight is not None), partial(bias is not None)
    if B * N > 0:
        dummy = ref
        a = lambda t: t if t is not None else dummy  # noqa: E731
        _fused_norm_bwd_kernel[(nchunks, B * T)](
            a(dy), a(dh), a(x), a(res), a(gate), a(scale), a(weight), a(bias), dx, a(dres),
            a(p_dshift), a(p_dscale), a(p_dgate), a(p_dw), a(p_db),
            N, L, C, T, chunk, eps,
            *_strides_bt(gate), *_strides_bt(scale),
            HAS_DH=dh is not None and has_norm, HAS_RES=res is not None, HAS_GATE=gate is not None,
            HAS_NORM=has_norm, HAS_MOD=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            ROWS=ROWS, BLOCK_C=BLOCK_C, num_warps=warps,
        )

    def per_frame(p, like):
        if p is None:
            return None
        return p.sum(1).view(B, T, C).to(like.dtype) if B * N > 0 else torch.zeros_like(like)

    def per_channel(p, like):
        if p is None:
            return None
        return p.sum((0, 1)).to(like.dtype) if B * N > 0 else torch.zeros_like(like)

    return (dx, dres, per_frame(p_dgate, gate), per_frame(p_dshift, shift), per_frame(p_dscale, scale),
            per_channel(p_dw, weight), per_channel(p_db, bias))


# ----------------------------------------------------------------------------------------------
# Input checks shared with residual.py
# ----------------------------------------------------------------------------------------------


def check_norm_inputs(x, shift=None, scale=None, weight=None, bias=None, x_name="x") -> None:
    check_tensor(x_name, x, ndim=3, dtypes=ACT_DTYPES)
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    C = x.shape[2]
    if C > 65536:
        raise ValueError(f"{x_name} has {C} channels; the row kernels hold a row in one block (at most 65536)")
    if shift is not None:
        check_tensor("shift", shift, ndim=3, dtypes=(torch.float32,))
        check_tensor("scale", scale, ndim=3, dtypes=(torch.float32,))
        check_frame_modulation("shift", shift, x)
        if scale.shape != shift.shape:
            raise ValueError(f"scale must have the shape of shift {tuple(shift.shape)}, got {tuple(scale.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=ACT_DTYPES, last_dim=C)
    check_same_device(**{x_name: x}, shift=shift, scale=scale, weight=weight, bias=bias)


def unit_stride(t):
    """Per-frame tensors may be strided views; kernels only need a unit channel stride."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "longcat::layer_norm_modulate",
    mutates_args=(),
    schema="(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, float eps, "
    "ScalarType? out_dtype) -> Tensor",
)
def _layer_norm_modulate_op(x, shift, scale, weight, bias, eps, out_dtype):
    return _launch_norm_fwd(x, None, None, shift, scale, weight, bias, eps, True, out_dtype)[1]


@_layer_norm_modulate_op.register_fake
def _(x, shift, scale, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op(
    "longcat::fused_norm_backward",
    mutates_args=(),
    schema="(Tensor? dy, Tensor? dh, Tensor? x, Tensor? res, Tensor? gate, Tensor? shift, Tensor? scale, "
    "Tensor? weight, Tensor? bias, float eps, bool has_norm) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_norm_backward_op(dy, dh, x, res, gate, shift, scale, weight, bias, eps, has_norm):
    outs = _launch_norm_bwd(dy, dh, x, res, gate, shift, scale, weight, bias, eps, has_norm)
    ref = x if x is not None else dh
    return tuple(o if o is not None else ref.new_empty(0) for o in outs)


@_fused_norm_backward_op.register_fake
def _(dy, dh, x, res, gate, shift, scale, weight, bias, eps, has_norm):
    ref = x if x is not None else dh

    def like(t, dtype=None):
        return ref.new_empty(0) if t is None else t.new_empty(t.shape, dtype=dtype or t.dtype)

    return (ref.new_empty(ref.shape), like(res), like(gate), like(shift), like(scale), like(weight), like(bias))


def _none_if_empty(t, wanted):
    return t if wanted else None


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, _ = inputs
    ctx.save_for_backward(x, shift, scale, weight, bias)
    ctx.eps = eps


def _lnm_backward(ctx, grad):
    x, shift, scale, weight, bias = ctx.saved_tensors
    dx, _, _, dshift, dscale, dw, db = torch.ops.longcat.fused_norm_backward(
        grad, None, x, None, None, shift, scale, weight, bias, ctx.eps, True
    )
    return (dx, _none_if_empty(dshift, shift is not None), _none_if_empty(dscale, scale is not None),
            _none_if_empty(dw, weight is not None), _none_if_empty(db, bias is not None), None, None)


_layer_norm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


@torch.library.custom_op(
    "longcat::layer_norm_modulate_quant",
    mutates_args=(),
    schema="(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, float eps, "
    "ScalarType qdtype) -> (Tensor, Tensor)",
)
def _layer_norm_modulate_quant_op(x, shift, scale, weight, bias, eps, qdtype):
    _, q, s = _launch_norm_fwd(x, None, None, shift, scale, weight, bias, eps, True, None, qdtype)
    return q, s


@_layer_norm_modulate_quant_op.register_fake
def _(x, shift, scale, weight, bias, eps, qdtype):
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty(x.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[frame]) + shift[frame]`` in one pass, float32 statistics.

    x: [B, N, C] float16/bfloat16/float32, N = T * L tokens frame-major; shift, scale: [B, T, C]
    float32 (both or neither; strided views such as chunks of the adaLN output are fine);
    weight, bias: optional LayerNorm affine [C]. Returns [B, N, C] in ``out_dtype`` (default
    x.dtype). Differentiable w.r.t. x, shift, scale, weight and bias.
    """
    check_norm_inputs(x, shift, scale, weight, bias)
    if out_dtype is not None and out_dtype not in ACT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if triton_runs_on(x, shift, scale, weight, bias):
        return _layer_norm_modulate_op(x, unit_stride(shift), unit_stride(scale), weight, bias, float(eps), out_dtype)
    fallback_warning("layer_norm_modulate")
    return layer_norm_modulate_reference(x, shift, scale, weight, bias, eps, out_dtype=out_dtype)


def layer_norm_modulate_quant(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    qdtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm-modulate fused with symmetric per-token quantization (the A side of W8A8 GEMMs).

    Same inputs as :func:`layer_norm_modulate`. Returns (q [B, N, C] in ``qdtype`` (torch.int8 or
    torch.float8_e4m3fn), s [B, N] float32) with ``q * s[..., None]`` approximating the float32
    normalised values; see :func:`layer_norm_modulate_quant_reference`. Not differentiable.
    """
    check_norm_inputs(x, shift, scale, weight, bias)
    _qmax(qdtype)
    if not triton_runs_on(x, shift, scale, weight, bias):
        fallback_warning("layer_norm_modulate_quant")
    elif qdtype == torch.float8_e4m3fn and not fp8_supported(x):
        fallback_warning("layer_norm_modulate_quant", FP8_NEEDS_SM89)
    else:
        return _layer_norm_modulate_quant_op(x, unit_stride(shift), unit_stride(scale), weight, bias, float(eps), qdtype)
    return layer_norm_modulate_quant_reference(x, shift, scale, weight, bias, eps, qdtype)
