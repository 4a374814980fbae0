"""The op table the DiT calls through, so kernels slot in without touching the model code.

Every block reads its ops from one ``DiTOps`` value. ``REFERENCE_OPS`` is the exact math of the
upstream model in plain PyTorch (the oracle); other tables swap in Triton kernels or PyTorch's
SDPA. Each entry has the signature of the reference op it replaces.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from longcat.kernels.attention.block_sparse import block_sparse_attention_reference
from longcat.kernels.attention.dense import dense_attention_reference
from longcat.kernels.attention.varlen import varlen_attention_reference
from longcat.kernels.modulate import layer_norm_modulate_reference
from longcat.kernels.residual import gated_residual_reference
from longcat.kernels.rope import rms_norm_reference, rope_3d_reference
from longcat.kernels.swiglu import swiglu_reference

__all__ = ["DiTOps", "REFERENCE_OPS", "SDPA_OPS", "sdpa_attention", "sdpa_varlen_attention"]


@dataclass(frozen=True)
class DiTOps:
    """Implementations of the DiT's hot ops. Signatures follow the ``*_reference`` ops:

    layer_norm_modulate(x, shift, scale, weight, bias, eps) -> [B, N, C]
    gated_residual(x, y, gate) -> x + gate[frame] * y (a new tensor)
    rms_norm(x, weight, eps); rope_3d(x, grid, frame_offset); swiglu(a, b)
    dense_attention(q, k, v) and block_sparse_attention(q, k, v, latent_shape_q, latent_shape_k,
    sparsity=, cdf_threshold=, tile=) on [B, heads, S, D];
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k) on packed [total, heads, D].
    Optional fused paths (None: the model composes the single ops above):
    qkv_norm_rope(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre_rope)
    -> (q, k, v[, k_pre_rope]) each [B, heads, N, D];
    gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, eps) -> (x + gate * y,
    LayerNorm(-modulate) of it) in one pass (gate None: a plain add).
    """

    name: str
    layer_norm_modulate: Callable
    gated_residual: Callable
    rms_norm: Callable
    rope_3d: Callable
    swiglu: Callable
    dense_attention: Callable
    block_sparse_attention: Callable
    varlen_attention: Callable
    qkv_norm_rope: Optional[Callable] = None
    gated_residual_layer_norm: Optional[Callable] = None

    def replace(self, **changes) -> "DiTOps":
        return dataclasses.replace(self, **changes)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention through PyTorch SDPA (its flash / cuDNN / efficient backends on a GPU)."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k) -> torch.Tensor:
    """Packed cross-attention with one SDPA call per sample (what a model without flash-attn's
    varlen kernel does). Samples with no keys give 0."""
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        if ck[i + 1] == ck[i] or cq[i + 1] == cq[i]:
            continue
        qi = q[cq[i]: cq[i + 1]].transpose(0, 1).unsqueeze(0)
        ki = k[ck[i]: ck[i + 1]].transpose(0, 1).unsqueeze(0)
        vi = v[ck[i]: ck[i + 1]].transpose(0, 1).unsqueeze(0)
        out[cq[i]: cq[i + 1]] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
    return out


REFERENCE_OPS = DiTOps(
    name="reference",
    layer_norm_modulate=layer_norm_modulate_reference,
    gated_residual=gated_residual_reference,
    rms_norm=rms_norm_reference,
    rope_3d=rope_3d_reference,
    swiglu=swiglu_reference,
    dense_attention=dense_attention_reference,
    block_sparse_attention=block_sparse_attention_reference,
    varlen_attention=varlen_attention_reference,
)

# Reference element-wise math with PyTorch's fused attention: the fair "unaccelerated" baseline
# at real sizes, where the explicit-softmax reference attention does not fit in memory.
SDPA_OPS = REFERENCE_OPS.replace(name="sdpa", dense_attention=sdpa_attention, varlen_attention=sdpa_varlen_attention)
