"""Dense softmax attention ``softmax(q k^T * scale) v`` over [B, heads, S, D] tensors."""
from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor

__all__ = ["dense_attention_reference", "masked_attention_math"]


def masked_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention math shared by the reference ops: float32 (float64 for float64 inputs).

    mask (bool, broadcastable to [..., Sq, Skv]) keeps the True entries. A query row with no key
    gets output 0 and log-sum-exp -inf. Returns (out in q.dtype, lse in float32/float64).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(compute))
    return out.to(q.dtype), lse


def _check_qkv(q, k, v):
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q [B, heads, Sq, D] and k [B, heads, Skv, D] disagree: {tuple(q.shape)} vs {tuple(k.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Plain-PyTorch oracle. q: [B, heads, Sq, D]; k, v: [B, heads, Skv, D]; scale D^-0.5 by
    default. Returns out [B, heads, Sq, D] in q.dtype (and the natural-log lse [B, heads, Sq])."""
    _check_qkv(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = masked_attention_math(q, k, v, scale)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Triton path: launcher, custom op (forward + backward), public function
# ---------------------------------------------------------------------------------------------

from .._runtime import fallback_warning, triton_runs_on  # noqa: E402
from ._common import (  # noqa: E402
    bwd_delta, check_kernel_inputs, check_scale, flash_backward, flash_forward, last_dim_contiguous,
)

__all__ += ["dense_attention"]


def _bhsd_buffer_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A [B, H, S, D] tensor whose memory is [B, S, H, D]: the model's next step
    (``out.transpose(1, 2).reshape(B, S, H * D)``) then needs no copy."""
    B, H, S, D = x.shape
    return x.new_empty((B, S, H, D), dtype=dtype or x.dtype).transpose(1, 2)


def _dense_forward_launch(q, k, v, scale: float):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, Sq, D = q.shape
    out = _bhsd_buffer_like(q)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sq == 0:
        return out, lse
    flash_forward(q, k, v, out, lse, None, None, scale, "bhsd", B, H, Sq, k.shape[2], max_q=Sq)
    return out, lse


def _dense_backward_launch(grad_out, grad_lse, q, k, v, out, lse, scale: float):
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    dq, dk, dv = _bhsd_buffer_like(q), _bhsd_buffer_like(k), _bhsd_buffer_like(v)
    if Sq == 0 or Skv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = bwd_delta(out, grad_out, grad_lse, lse, "bhsd", B, H, Sq, D)
    flash_backward(grad_out, q, k, v, lse, delta, dq, dk, dv, None, None, scale, "bhsd", B, H, Sq, Skv,
                   max_q=Sq, max_k=Skv)
    return dq, dk, dv


@torch.library.custom_op("longcat::dense_attention", mutates_args=())
def _dense_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _dense_forward_launch(q, k, v, scale)


@_dense_attention_op.register_fake
def _(q, k, v, scale):
    B, H, Sq, D = q.shape
    return _bhsd_buffer_like(q), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("longcat::dense_attention_backward", mutates_args=())
def _dense_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dense_backward_launch(grad_out, grad_lse, q, k, v, out, lse, scale)


@_dense_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, scale):
    return _bhsd_buffer_like(q), _bhsd_buffer_like(k), _bhsd_buffer_like(v)


def _dense_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _dense_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _dense_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_dense_attention_op.register_autograd(_dense_backward, setup_context=_dense_setup_context)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Softmax attention ``softmax(q k^T * scale) v`` (flash-attention kernels, differentiable).

    q: [B, heads, Sq, D]; k, v: [B, heads, Skv, D]; any strides with a contiguous last dimension
    (e.g. views of a packed qkv tensor). scale (> 0) defaults to D^-0.5. Returns out [B, heads, Sq, D]
    in q.dtype (memory laid out as [B, Sq, heads, D]) and, if ``return_lse``, the natural-log
    log-sum-exp [B, heads, Sq] in float32 (differentiable too).
    """
    _check_qkv(q, k, v)
    scale = check_scale(q.shape[-1] ** -0.5 if scale is None else scale)
    if not triton_runs_on(q, k, v):
        fallback_warning("dense_attention")
        return dense_attention_reference(q, k, v, scale=scale, return_lse=return_lse)
    check_kernel_inputs(q.shape[-1], q=q, k=k, v=v)
    out, lse = _dense_attention_op(q, k, v, scale)
    return (out, lse) if return_lse else out
