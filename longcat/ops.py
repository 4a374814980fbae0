"""The op table the DiT calls through, so kernels slot in without touching the model code.

Every block reads its ops from one ``DiTOps`` value. ``REFERENCE_OPS`` is the exact math of the
upstream model in plain PyTorch (the oracle); other tables swap in Triton kernels or PyTorch's
SDPA. Each entry has the signature of the reference op it replaces.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from longcat.kernels.attention.block_sparse import block_sparse_attention_reference
from longcat.kernels.attention.dense import dense_attention_reference
from longcat.kernels.attention.varlen import varlen_attention_reference
from longcat.kernels.modulate import layer_norm_modulate_reference
from longcat.kernels.residual import gated_residual_reference
from longcat.kernels.rope import rms_norm_reference, rope_3d_reference
from longcat.kernels.swiglu import swiglu_packed_reference, swiglu_reference

__all__ = ["DiTOps", "REFERENCE_OPS", "SDPA_OPS", "ATTENTION_BACKENDS", "kernel_ops", "sdpa_attention", "sdpa_varlen_attention"]


@dataclass(frozen=True)
class DiTOps:
    """Implementations of the DiT's hot ops. Signatures follow the ``*_reference`` ops:

    layer_norm_modulate(x, shift, scale, weight, bias, eps) -> [B, N, C]
    gated_residual(x, y, gate) -> x + gate[frame] * y (a new tensor)
    rms_norm(x, weight, eps); rope_3d(x, grid, frame_offset); swiglu(a, b);
    swiglu_packed(ab) on the packed w1|w3 GEMM output [..., 2H] (``longcat.ffn``)
    dense_attention(q, k, v) and block_sparse_attention(q, k, v, latent_shape_q, latent_shape_k,
    sparsity=, cdf_threshold=, tile=) on [B, heads, S, D];
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) on packed
    [total, heads, D] (the max lengths are upper bounds known without reading the offsets).
    Optional fused paths (None: the model composes the single ops above):
    qkv_norm_rope(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre_rope, parts="qkv")
    -> (q, k, v[, k_pre_rope]) each [B, heads, N, D] (v may be a view of qkv); parts "q" ([B, N, C]
    input) -> (q,), parts "kv" ([B, N, 2C] input) -> (k, v[, k_pre_rope]);
    gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, eps) -> (x + gate * y,
    LayerNorm(-modulate) of it) in one pass (gate None: a plain add).
    Optional 8-bit outputs for W8A8 layers (None: those layers quantize their float input):
    layer_norm_modulate_quant(x, shift, scale, weight, bias, eps, qdtype) -> (q, per-token scale);
    gated_residual_layer_norm_quant(x, y, gate, shift, scale, weight, bias, eps, qdtype) ->
    (x + gate * y, q, per-token scale).
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
    swiglu_packed: Callable = swiglu_packed_reference
    qkv_norm_rope: Optional[Callable] = None
    gated_residual_layer_norm: Optional[Callable] = None
    layer_norm_modulate_quant: Optional[Callable] = None
    gated_residual_layer_norm_quant: Optional[Callable] = None
    # Run the FFN (modulate, w1/w3, SwiGLU, w2, residual) this many latent frames at a time, so
    # the [N, ffn_hidden] intermediates never exist for the whole sequence (inference only).
    ffn_chunk_frames: Optional[int] = None
    # Run whole blocks this many latent frames of queries at a time (``chunked_block_forward``):
    # only the residual stream x and the self-attention K and V span the sequence (inference only).
    attention_chunk_frames: Optional[int] = None
    # A ``longcat.context_parallel.ContextParallel``: blocks see their rank's spatial window of the
    # tokens and run self-attention on head shards (Ulysses all-to-all). None: one device.
    context_parallel: Optional[Any] = None
    # block_sparse_keys(k, v, latent_shape_k, tile) -> keys packed once for several
    # block_sparse_attention(..., keys=) calls (the frame-chunked path); None: no reuse.
    block_sparse_keys: Optional[Callable] = None

    def replace(self, **changes) -> "DiTOps":
        return dataclasses.replace(self, **changes)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention through PyTorch SDPA (its flash / cuDNN / efficient backends on a GPU)."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None) -> torch.Tensor:
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


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None):
    return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k)


REFERENCE_OPS = DiTOps(
    name="reference",
    layer_norm_modulate=layer_norm_modulate_reference,
    gated_residual=gated_residual_reference,
    rms_norm=rms_norm_reference,
    rope_3d=rope_3d_reference,
    swiglu=swiglu_reference,
    dense_attention=dense_attention_reference,
    block_sparse_attention=block_sparse_attention_reference,
    varlen_attention=reference_varlen_attention,
)

# Reference element-wise math with PyTorch's fused attention: the fair "unaccelerated" baseline
# at real sizes, where the explicit-softmax reference attention does not fit in memory.
SDPA_OPS = REFERENCE_OPS.replace(name="sdpa", dense_attention=sdpa_attention, varlen_attention=sdpa_varlen_attention)


ATTENTION_BACKENDS = ("auto", "bsa", "dense", "sdpa", "reference")


def kernel_ops(
    attention: str = "auto", fused: bool = True, ffn_chunk_frames: Optional[int] = None, attention_chunk_frames: Optional[int] = None,
) -> DiTOps:
    """The op table for an attention backend and fused/unfused element-wise ops.

    attention:
      "bsa"       Triton block-sparse attention where a block enables BSA, Triton dense elsewhere;
      "dense"     Triton dense attention everywhere (BSA flags ignored);
      "sdpa"      PyTorch SDPA for dense attention, the reference op for BSA;
      "reference" the plain-PyTorch reference ops (exact math; small sizes only);
      "auto"      "bsa".
    Text cross-attention uses the Triton varlen kernel with "bsa"/"dense", SDPA per sample with
    "sdpa". fused: Triton kernels for LayerNorm-modulate, gated residual (+ the following norm),
    RMSNorm + RoPE and SwiGLU, and the norms' 8-bit outputs for W8A8 layers; otherwise the
    reference element-wise ops.
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    for name, value in (("ffn_chunk_frames", ffn_chunk_frames), ("attention_chunk_frames", attention_chunk_frames)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be None or a positive int (latent frames), got {value!r}")
    if attention == "auto":
        attention = "bsa"
    base = {"sdpa": SDPA_OPS}.get(attention, REFERENCE_OPS)
    changes = {}
    if attention in ("bsa", "dense"):
        from longcat.kernels import attention as attn_kernels

        def dense(q, k, v):
            return attn_kernels.dense_attention(q, k, v)

        def varlen(q, k, v, cu_q, cu_k, max_q=None, max_k=None):
            return attn_kernels.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)

        if attention == "bsa":
            def block_sparse(q, k, v, shape_q, shape_k, sparsity=0.875, cdf_threshold=None, tile=(4, 4, 8), keys=None):
                return attn_kernels.block_sparse_attention(
                    q, k, v, shape_q, shape_k, sparsity=sparsity, cdf_threshold=cdf_threshold, tile=tile, keys=keys
                )

            changes.update(block_sparse_keys=attn_kernels.block_sparse_keys)
        else:
            def block_sparse(q, k, v, shape_q, shape_k, **_bsa):
                return attn_kernels.dense_attention(q, k, v)

        changes.update(dense_attention=dense, varlen_attention=varlen, block_sparse_attention=block_sparse)
    if fused:
        from longcat.kernels.modulate import layer_norm_modulate, layer_norm_modulate_quant
        from longcat.kernels.qkv_prep import qkv_norm_rope
        from longcat.kernels.residual import gated_residual, gated_residual_layer_norm, gated_residual_layer_norm_quant
        from longcat.kernels.rope import rms_norm, rope_3d
        from longcat.kernels.swiglu import swiglu, swiglu_packed

        def fused_qkv(qkv, q_weight, k_weight, num_heads, grid, frame_offset, eps, return_k_pre_rope, parts="qkv"):
            return qkv_norm_rope(
                qkv, q_weight, k_weight, num_heads, grid, frame_offset=frame_offset, eps=eps,
                return_k_pre_rope=return_k_pre_rope, parts=parts,
            )

        def fused_residual_norm(x, y, gate, shift, scale, weight, bias, eps):
            return gated_residual_layer_norm(x, y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias, eps=eps)

        changes.update(
            layer_norm_modulate=lambda x, shift, scale, weight, bias, eps: layer_norm_modulate(
                x, shift, scale, weight=weight, bias=bias, eps=eps
            ),
            gated_residual=gated_residual,
            rms_norm=rms_norm,
            rope_3d=rope_3d,
            swiglu=swiglu,
            swiglu_packed=swiglu_packed,
            qkv_norm_rope=fused_qkv,
            gated_residual_layer_norm=fused_residual_norm,
            layer_norm_modulate_quant=lambda x, shift, scale, weight, bias, eps, qdtype: layer_norm_modulate_quant(
                x, shift, scale, weight=weight, bias=bias, eps=eps, qdtype=qdtype
            ),
            gated_residual_layer_norm_quant=lambda x, y, gate, shift, scale, weight, bias, eps, qdtype: gated_residual_layer_norm_quant(
                x, y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias, eps=eps, qdtype=qdtype
            ),
        )
    name = f"{attention}+{'fused' if fused else 'unfused'}"
    return base.replace(name=name, ffn_chunk_frames=ffn_chunk_frames, attention_chunk_frames=attention_chunk_frames, **changes)
