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
