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


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> None:
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold batch + 1 >= 2 offsets, got {cu.numel()}")
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, got {values[0]}..{values[-1]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {values}")


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
