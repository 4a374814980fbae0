"""Variable-length attention over packed sequences (the DiT's text cross-attention).

Queries and keys of all samples are packed along dimension 0 (``[total, heads, D]``) and
``cu_seqlens_q``/``cu_seqlens_k`` ([batch + 1] cumulative offsets, starting at 0) say which rows
belong to which sample; each sample's queries attend only to that sample's keys. A sample with no
keys (empty text) gets output 0.
"""
from __future__ import annotations

import torch

from .._runtime import check_same_device, check_tensor
from .dense import masked_attention_math

__all__ = ["varlen_attention_reference", "check_cu_seqlens"]


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int | None = None,
                     max_name: str = "max_seqlen") -> None:
    """Validate offsets on the host (one device-to-host copy of batch + 1 integers): an int32/int64
    vector starting at 0, non-decreasing, ending at the packed length ``total``; and, when given,
    ``max_seqlen`` (named ``max_name`` in errors) at least the longest sample."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold batch + 1 >= 2 offsets, got {cu.numel()}")
    if cu.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: its offsets must be readable to split the packed samples")
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, got {values[0]}..{values[-1]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if max_seqlen is not None and max_seqlen < max(lengths):
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sample of {name} ({max(lengths)} rows)")


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Plain-PyTorch oracle. q: [total_q, heads, D]; k, v: [total_k, heads, D]. Returns out
    [total_q, heads, D] in q.dtype (and lse [total_q, heads])."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [total, heads, D]")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same batch size")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]: cq[i + 1]].transpose(0, 1)  # [heads, Sq_i, D]
        ki = k[ck[i]: ck[i + 1]].transpose(0, 1)
        vi = v[ck[i]: ck[i + 1]].transpose(0, 1)
        o, l = masked_attention_math(qi, ki, vi, scale)
        outs.append(o.transpose(0, 1))
        lses.append(l.transpose(0, 1))
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=0)) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Triton path: launcher, custom op (forward + backward), public function
# ---------------------------------------------------------------------------------------------

from .._runtime import fallback_warning, triton_runs_on  # noqa: E402
from ._common import (  # noqa: E402
    bwd_delta, check_kernel_inputs, check_scale, flash_backward, flash_forward, last_dim_contiguous,
)

__all__ += ["varlen_attention"]


def _varlen_forward_launch(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    total_q, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((total_q, H), dtype=torch.float32, device=q.device)
    batch = cu_q.numel() - 1
    if total_q == 0:
        return out, lse
    flash_forward(q, k, v, out, lse, cu_q, cu_k, scale, "shd", batch, H, total_q, k.shape[0], max_q=max_q)
    return out, lse


def _varlen_backward_launch(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    total_q, H, D = q.shape
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if total_q == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    batch = cu_q.numel() - 1
    delta = bwd_delta(out, grad_out, grad_lse, lse, "shd", 1, H, total_q, D)
    flash_backward(grad_out, q, k, v, lse, delta, dq, dk, dv, cu_q, cu_k, scale, "shd", batch, H,
                   total_q, k.shape[0], max_q=max_q, max_k=max_k)
    return dq, dk, dv


@torch.library.custom_op("longcat::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _varlen_forward_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("longcat::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_backward_launch(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, scale)


@_varlen_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _varlen_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


_varlen_attention_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Checks that need no host sync (the offsets' values are checked only when we read them)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu.numel() < 2:
            raise ValueError(f"{name} must hold batch + 1 >= 2 offsets, got {cu.numel()}")
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [total, heads, D]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same batch size")


def _check_max_seqlen(name: str, bound) -> int | None:
    if bound is None:
        return None
    if isinstance(bound, bool) or not hasattr(bound, "__index__") or int(bound) < 0:
        raise ValueError(f"{name} must be a non-negative int (an upper bound of the sample lengths), got {bound!r}")
    return int(bound)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Attention over packed variable-length samples (differentiable).

    q: [total_q, heads, D]; k, v: [total_k, heads, D] (any strides with a contiguous last
    dimension); cu_seqlens_q/k: int32 or int64 [B + 1] offsets. Sample i's queries
    ``q[cu_q[i]:cu_q[i+1]]`` attend to its keys ``k[cu_k[i]:cu_k[i+1]]`` only; a sample with no
    keys gets output 0 and lse -inf. scale (> 0) defaults to D^-0.5.

    Without ``max_seqlen_q``/``max_seqlen_k`` the offsets are read on the host (a device-to-host
    sync) and validated. Giving both (upper bounds of the per-sample lengths) avoids the sync:
    the offsets are then trusted, so validate them once where they are made (as
    ``longcat.model.PreparedText`` does). Even then the kernels never read or write outside
    q, k, v and the outputs (offsets are clamped to the tensors), but rows past a too-small
    bound are not computed. Returns out [total_q, heads, D] (contiguous) and, if
    ``return_lse``, lse [total_q, heads] float32.
    """
    _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(q.shape[-1] ** -0.5 if scale is None else scale)
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not triton_runs_on(q, k, v, cu_seqlens_q, cu_seqlens_k):
        fallback_warning("varlen_attention")
        return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, return_lse=return_lse)
    check_kernel_inputs(q.shape[-1], q=q, k=k, v=v)
    if max_seqlen_q is None or max_seqlen_k is None:
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item())
    out, lse = _varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return (out, lse) if return_lse else out
