"""LongCat-Video DiT: our own implementation, state-dict compatible with the upstream checkpoint.

The math follows the upstream model exactly (DESIGN.md section 3): per-frame adaLN computed in
float32, float32 LayerNorms and RMSNorms, 3D RoPE, variable-length cross-attention over each
sample's valid text tokens, SwiGLU FFN, condition latents and the KV cache. The hot ops are taken
from a swappable ``DiTOps`` table (``longcat.ops``), so Triton kernels replace them without
changing this file.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from longcat.kernels._runtime import check_tensor
from longcat.kernels.attention.varlen import check_cu_seqlens
from longcat.kernels.quantize_activations import QuantizedActivations

from .ffn import ffn_gate
from .ops import DiTOps, REFERENCE_OPS, SDPA_OPS

__all__ = [
    "LongCatVideoTransformer3DModel",
    "block_forward",
    "self_attention_forward",
    "self_attention_with_kv_cache",
    "cross_attention_forward",
    "chunked_block_forward",
    "LongCatBlock",
    "SelfAttention",
    "CrossAttention",
    "FeedForwardSwiGLU",
    "ffn_hidden_size",
    "CONFIG_DEFAULTS",
    "PreparedText",
]

# Constructor keys of the upstream model, with upstream's defaults (the released 13.6B model).
CONFIG_DEFAULTS: Dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    hidden_size=4096,
    depth=48,
    num_heads=32,
    caption_channels=4096,
    mlp_ratio=4,
    adaln_tembed_dim=512,
    frequency_embedding_size=256,
    patch_size=(1, 2, 2),
    enable_flashattn3=False,
    enable_flashattn2=False,
    enable_xformers=False,
    enable_bsa=False,
    bsa_params=None,
    cp_split_hw=None,
    text_tokens_zero_pad=False,
)

NORM_EPS = 1e-6


class _PreparedTextFields(NamedTuple):
    text: torch.Tensor
    cu_seqlens: torch.Tensor


class PreparedText(_PreparedTextFields):
    """Projected text, every sample's valid tokens packed: text [L_total, C] and the cumulative
    offsets cu_seqlens [B + 1] (int32 or int64). Made by ``LongCatVideoTransformer3DModel.prepare_text``.

    The attention kernels trust these offsets at every block (no host sync there), so a
    PreparedText built by hand is validated here, once (one host read of the B + 1 offsets):
    they must start at 0, never decrease and end at ``text.shape[0]``."""

    __slots__ = ()

    def __new__(cls, text: torch.Tensor, cu_seqlens: torch.Tensor):
        check_tensor("prepared_text.text", text, ndim=2)
        check_tensor("prepared_text.cu_seqlens", cu_seqlens)
        if cu_seqlens.device != text.device:
            raise ValueError(f"prepared_text.cu_seqlens is on {cu_seqlens.device}, prepared_text.text on {text.device}")
        check_cu_seqlens("prepared_text.cu_seqlens", cu_seqlens, text.shape[0])
        return super().__new__(cls, text, cu_seqlens)

    @classmethod
    def _trusted(cls, text: torch.Tensor, cu_seqlens: torch.Tensor) -> "PreparedText":
        """Without validation: for offsets valid by construction (``prepare_text``) or copies of a
        validated PreparedText (CUDA-graph buffers; a host read is impossible during capture)."""
        return tuple.__new__(cls, (text, cu_seqlens))


def ffn_hidden_size(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """SwiGLU width: 2/3 of hidden_size * mlp_ratio, rounded up to a multiple of 256."""
    hidden = int(2 * int(hidden_size * mlp_ratio) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def fp32_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear in float32 whatever its storage dtype (upstream runs the adaLN, timestep and
    final layers under float32 autocast). A Linear whose forward was replaced (LoRA, quantization)
    is called as a module so the replacement takes effect."""
    if type(module) is nn.Linear and "forward" not in vars(module):
        bias = None if module.bias is None else module.bias.float()
        return F.linear(x.float(), module.weight.float(), bias)
    dtype = getattr(module, "weight", x).dtype if isinstance(getattr(module, "weight", None), torch.Tensor) else x.dtype
    return module(x.to(dtype) if dtype.is_floating_point else x).float()


class RMSNorm(nn.Module):
    """Per-head RMSNorm over head_dim; the math lives in the op table (``ops.rms_norm``)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class LayerNormFP32(nn.Module):
    """LayerNorm computed in float32 (affine or not); cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS, elementwise_affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify of latents [B, C, T, H, W] -> tokens [B, T*H'*W', hidden] (H, W padded
    up to a multiple of the patch)."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        pad = (0, (-W) % pw, 0, (-H) % ph, 0, (-T) % pt)  # right/bottom, as upstream
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (cos half, then sin half) -> MLP, in float32."""

    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, t_embed_dim, bias=True),
            nn.SiLU(),
            nn.Linear(t_embed_dim, t_embed_dim, bias=True),
        )

    # Frequencies per (dim, period, device): computed on the CPU as upstream does, copied to the
    # device once, so a forward pass makes no host-to-device copy (CUDA-graph capture forbids one).
    _FREQS: Dict[tuple, torch.Tensor] = {}

    @classmethod
    def sinusoidal(cls, t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        key = (half, float(max_period), t.device)
        freqs = cls._FREQS.get(key)
        if freqs is None:
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
            if not t.is_meta:
                cls._FREQS[key] = freqs
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = fp32_linear(self.mlp[0], self.sinusoidal(t, self.frequency_embedding_size))
        return fp32_linear(self.mlp[2], F.silu(h))


class CaptionEmbedder(nn.Module):
    """Text-embedding projection: Linear, GELU(tanh), Linear (activation dtype)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class FeedForwardSwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _bsa_kwargs(bsa_params: Optional[dict]) -> dict:
    """Map upstream's ``bsa_params`` (sparsity, cdf_threshold, chunk_3d_shape_q/k) to ours."""
    params = dict(bsa_params or {})
    tile_q = tuple(params.pop("chunk_3d_shape_q", (4, 4, 8)))
    tile_k = tuple(params.pop("chunk_3d_shape_k", tile_q))
    if tile_q != tile_k:
        raise ValueError(f"bsa_params: chunk_3d_shape_q {tile_q} and chunk_3d_shape_k {tile_k} must be equal")
    out = {"sparsity": params.pop("sparsity", 0.875), "cdf_threshold": params.pop("cdf_threshold", None), "tile": tile_q}
    if params:
        raise ValueError(f"bsa_params: unknown keys {sorted(params)}")
    return out


def _uses_bsa(attn, latent_t: int) -> bool:
    """BSA where the module enables it, for video only (as upstream: T > 1)."""
    return getattr(attn, "enable_bsa", False) and latent_t > 1


def _attend(attn, ops: DiTOps, q, k, v, grid, latent_t: int, bsa_keys=None):
    """Dense attention, or BSA where the module enables it. ``bsa_keys``: k and v packed once by
    ``ops.block_sparse_keys`` for several query chunks."""
    if _uses_bsa(attn, latent_t):
        _, H, W = grid
        shape_q = (q.shape[2] // (H * W), H, W)
        shape_k = (k.shape[2] // (H * W), H, W)
        kwargs = _bsa_kwargs(attn.bsa_params)
        if bsa_keys is not None:
            kwargs["keys"] = bsa_keys
        return ops.block_sparse_attention(q, k, v, shape_q, shape_k, **kwargs)
    return ops.dense_attention(q, k, v)


def _project_qkv(attn, ops: DiTOps, x: torch.Tensor, grid, want_k_pre_rope: bool, rope: bool = True):
    """qkv Linear, per-head RMSNorm of q and k, then (optionally) 3D RoPE; [B, heads, N, D] each.
    Under context parallelism x is this rank's window and the results hold every token of the
    grid (global order) for this rank's share of the heads."""
    qkv = attn.qkv(x)
    heads = attn.num_heads
    cp = ops.context_parallel
    if cp is not None:
        qkv = cp.qkv_to_head_shards(qkv, grid, heads)
        heads //= cp.size
    B, N, _ = qkv.shape
    if rope and ops.qkv_norm_rope is not None:
        return ops.qkv_norm_rope(qkv, attn.q_norm.weight, attn.k_norm.weight, heads, grid, 0, attn.q_norm.eps, want_k_pre_rope)
    q, k, v = qkv.view(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = ops.rms_norm(q, attn.q_norm.weight, attn.q_norm.eps)
    k = ops.rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
    k_pre = k if want_k_pre_rope else None
    if rope:
        q = ops.rope_3d(q, grid, 0)
        k = ops.rope_3d(k, grid, 0)
    return (q, k, v, k_pre) if want_k_pre_rope else (q, k, v)


def _merge_heads(attn, ops: DiTOps, x: torch.Tensor, grid) -> torch.Tensor:
    """Attention output [B, heads, N, D] -> ``proj`` of [B, N, heads * D] (under context
    parallelism: this rank's heads of every token -> all heads of this rank's window)."""
    if ops.context_parallel is not None:
        return attn.proj(ops.context_parallel.head_shards_to_tokens(x, grid))
    B, heads, N, D = x.shape
    return attn.proj(x.transpose(1, 2).reshape(B, N, heads * D))


def self_attention_forward(attn, x, ops: DiTOps, grid, num_cond_latents: int = 0, return_kv: bool = False):
    """Self-attention of a block's ``attn`` module (ours or upstream's: the same submodule names).
    Condition tokens (the first ``num_cond_latents`` frames) attend to condition tokens only."""
    T, H, W = grid
    if return_kv:
        # Nothing below writes into k_pre or v, so the cache takes them as they are (upstream
        # clones both; the model makes v contiguous only where it is a view of qkv).
        q, k, v, k_pre = _project_qkv(attn, ops, x, grid, True)
        kv = (k_pre, v)
    else:
        q, k, v = _project_qkv(attn, ops, x, grid, False)
    if num_cond_latents:
        n_cond = num_cond_latents * H * W
        out_cond = _attend(attn, ops, q[:, :, :n_cond], k[:, :, :n_cond], v[:, :, :n_cond], grid, T)
        out_noise = _attend(attn, ops, q[:, :, n_cond:], k, v, grid, T)
        out = torch.cat([out_cond, out_noise], dim=2)
    else:
        out = _attend(attn, ops, q, k, v, grid, T)
    out = _merge_heads(attn, ops, out, grid)
    return (out, kv) if return_kv else out


def self_attention_with_kv_cache(attn, x, ops: DiTOps, grid, num_cond_latents: int, kv_cache):
    """New frames attend to the cached condition frames and to themselves. The cache holds k
    after the norm and before RoPE; RoPE runs on the grid (num_cond + T, H, W) and the queries
    take the positions of the last T frames."""
    T, H, W = grid
    B = x.shape[0]
    k_cache, v_cache = kv_cache
    q, k, v = _project_qkv(attn, ops, x, grid, False, rope=False)
    if k_cache.shape[0] == 1 and B > 1:
        k_cache, v_cache = k_cache.expand(B, -1, -1, -1), v_cache.expand(B, -1, -1, -1)
    k_full = ops.rope_3d(torch.cat([k_cache.to(k.dtype), k], dim=2), (num_cond_latents + T, H, W), 0)
    v_full = torch.cat([v_cache.to(v.dtype), v], dim=2)
    q = ops.rope_3d(q, grid, num_cond_latents)
    return _merge_heads(attn, ops, _attend(attn, ops, q, k_full, v_full, grid, T), grid)


def text_keys_values(cross, ops: DiTOps, text):
    """Keys (RMS-normed) and values of the packed text [L_total, C] for ``cross_attn``:
    each [L_total, heads, D]."""
    k, v = cross.kv_linear(text).view(-1, 2, cross.num_heads, cross.head_dim).unbind(1)
    return ops.rms_norm(k, cross.k_norm.weight, cross.k_norm.eps), v


def cross_attention_queries(cross, xq, ops: DiTOps, text_kv, cu_seqlens_k):
    """Cross-attention output [B, Nq, C] of the queries xq [B, Nq, C] over each sample's text."""
    B, Nq, C = xq.shape
    k, v = text_kv
    q = ops.rms_norm(cross.q_linear(xq).reshape(B * Nq, cross.num_heads, cross.head_dim), cross.q_norm.weight, cross.q_norm.eps)
    cu_q = torch.arange(B + 1, device=xq.device, dtype=torch.int32) * Nq
    # Static upper bounds for the sequence lengths: no host sync, no graph break under torch.compile.
    return cross.proj(ops.varlen_attention(q, k, v, cu_q, cu_seqlens_k, Nq, k.shape[0]).reshape(B, Nq, C))


def cross_attention_forward(cross, x, ops: DiTOps, text, cu_seqlens_k, num_skip_tokens: int = 0):
    """Text cross-attention of a block's ``cross_attn`` module: x [B, N, C]; text [L_total, C]
    packed with offsets ``cu_seqlens_k``; the first ``num_skip_tokens`` tokens of every sample
    (condition frames) get no cross-attention (output 0, as upstream)."""
    B, N, C = x.shape
    xq = x[:, num_skip_tokens:] if num_skip_tokens else x
    out = cross_attention_queries(cross, xq, ops, text_keys_values(cross, ops, text), cu_seqlens_k)
    if num_skip_tokens:
        out = torch.cat([out.new_zeros(B, num_skip_tokens, C), out], dim=1)
    return out


def _activation_qdtype(ops: DiTOps, consumers) -> Optional[torch.dtype]:
    """The 8-bit dtype in which every module of ``consumers`` (the Linear layers reading one
    modulated input) takes that input pre-quantized, or None. Only W8A8 layers of one format
    whose forward is not replaced qualify: a wrapped layer (upstream's LoRA replaces ``forward``)
    needs the float input, and then the whole group gets it."""
    if ops.layer_norm_modulate_quant is None or ops.gated_residual_layer_norm_quant is None:
        return None
    qdtypes = {None if "forward" in vars(m) else getattr(m, "activation_qdtype", None) for m in consumers}
    return qdtypes.pop() if len(qdtypes) == 1 else None


def _modulate(ops: DiTOps, x, shift, scale, consumers):
    """LayerNorm-modulate of x for ``consumers``: float, or 8-bit with per-token scales when they
    all take it (quantized once for the group, by the norm kernel)."""
    qdtype = _activation_qdtype(ops, consumers)
    if qdtype is None:
        return ops.layer_norm_modulate(x, shift, scale, None, None, NORM_EPS)
    q, s = ops.layer_norm_modulate_quant(x, shift, scale, None, None, NORM_EPS, qdtype)
    return QuantizedActivations(q, s, x.dtype)


def _residual_modulate(ops: DiTOps, x, y, gate, shift, scale, consumers):
    """(x + gate * y (gate None: x + y), its LayerNorm-modulate for ``consumers`` as in _modulate)."""
    fused = ops.gated_residual_layer_norm
    if fused is None:
        x = ops.gated_residual(x, y, gate) if gate is not None else x + y
        return x, _modulate(ops, x, shift, scale, consumers)
    qdtype = _activation_qdtype(ops, consumers)
    if qdtype is None:
        return fused(x, y, gate, shift, scale, None, None, NORM_EPS)
    x, q, s = ops.gated_residual_layer_norm_quant(x, y, gate, shift, scale, None, None, NORM_EPS, qdtype)
    return x, QuantizedActivations(q, s, x.dtype)


def _token_rows(x_m, start: int, stop: int):
    """Tokens [start, stop) of a modulated input (a tensor or QuantizedActivations)."""
    return x_m.rows(start, stop) if isinstance(x_m, QuantizedActivations) else x_m[:, start:stop]


def block_forward(
    block,
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    grid: Tuple[int, int, int],
    ops: DiTOps,
    num_cond_latents: int = 0,
    return_kv: bool = False,
    kv_cache=None,
    skip_crs_attn: bool = False,
):
    """One DiT block (ours or upstream's module tree): adaLN-modulated self-attention, text
    cross-attention, adaLN-modulated SwiGLU FFN, each with its residual.

    x [B, N, C]; t [B, T, C_t] float32 (one row per latent frame); text [L_total, C] packed.
    """
    T, H, W = grid
    if ops.attention_chunk_frames and ops.context_parallel is None and not torch.is_grad_enabled():
        return chunked_block_forward(block, x, t, text, cu_seqlens_k, grid, ops, num_cond_latents, return_kv, kv_cache, skip_crs_attn)
    # [B, T, 6C] in float32: one modulation row per latent frame.
    mod = fp32_linear(block.adaLN_modulation[1], F.silu(t.float()))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

    x_m = _modulate(ops, x, shift_msa, scale_msa, (block.attn.qkv,))
    kv = None
    if kv_cache is not None:
        attn_out = self_attention_with_kv_cache(block.attn, x_m, ops, grid, num_cond_latents, kv_cache)
    elif return_kv:
        attn_out, kv = self_attention_forward(block.attn, x_m, ops, grid, num_cond_latents, return_kv=True)
    else:
        attn_out = self_attention_forward(block.attn, x_m, ops, grid, num_cond_latents)

    norm = block.pre_crs_attn_norm
    fused = ops.gated_residual_layer_norm
    ffn = block.ffn
    ffn_in = (ffn.w1, ffn.w3)
    if skip_crs_attn:
        x, x_m = _residual_modulate(ops, x, attn_out, gate_msa, shift_mlp, scale_mlp, ffn_in)
    else:
        # With a KV cache every token of this call is a noise token and gets text attention.
        # x holds x.shape[1] // T tokens per frame (a spatial window under context parallelism).
        n_skip = 0 if kv_cache is not None else num_cond_latents * (x.shape[1] // T)
        if fused is not None:
            x, normed = fused(x, attn_out, gate_msa, None, None, norm.weight, norm.bias, norm.eps)
        else:
            x = ops.gated_residual(x, attn_out, gate_msa)
            normed = ops.layer_norm_modulate(x, None, None, norm.weight, norm.bias, norm.eps)
        cross_out = cross_attention_forward(block.cross_attn, normed, ops, text, cu_seqlens_k, n_skip)
        x, x_m = _residual_modulate(ops, x, cross_out, None, shift_mlp, scale_mlp, ffn_in)

    chunk = ops.ffn_chunk_frames
    if chunk and chunk < T and not torch.is_grad_enabled():
        # Frame chunks: each chunk reads and writes only its own tokens of x (a tensor this block
        # made), so the residual can be written in place.
        L = x.shape[1] // T
        for f0 in range(0, T, chunk):
            f1 = min(T, f0 + chunk)
            xs = x[:, f0 * L: f1 * L]
            ms = _token_rows(x_m, f0 * L, f1 * L)
            xs.copy_(ops.gated_residual(xs, ffn.w2(ffn_gate(ffn, ms, ops)), gate_mlp[:, f0:f1]))
    else:
        x = ops.gated_residual(x, ffn.w2(ffn_gate(ffn, x_m, ops)), gate_mlp)
    return (x, kv) if return_kv else x


def linear_rows(module: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output features [start, stop) of a Linear-like module, computing only those where the
    module allows it (nn.Linear, QuantizedLinear); any other module (a LoRA wrapper, a peer's
    quantized layer) runs whole and is sliced."""
    if "forward" not in vars(module):
        if type(module) is nn.Linear:
            bias = None if module.bias is None else module.bias[start:stop]
            return F.linear(x, module.weight[start:stop], bias)
        if hasattr(module, "forward_rows"):
            return module.forward_rows(x, start, stop)
    return module(x)[..., start:stop]


def _frame_chunks(start: int, stop: int, size: int):
    return [(f, min(stop, f + size)) for f in range(start, stop, size)]


def chunked_block_forward(
    block, x, t, text, cu_seqlens_k, grid, ops: DiTOps, num_cond_latents=0, return_kv=False, kv_cache=None, skip_crs_attn=False,
):
    """``block_forward`` for inference, ``ops.attention_chunk_frames`` latent frames at a time.

    Pass 1 builds K (normed, RoPE'd) and V of every token chunk by chunk; pass 2 takes each chunk
    of queries through self-attention, cross-attention and the FFN with their residuals, and
    writes the chunk's rows of ``x`` in place (every K and V is already built, so no later chunk
    reads them). So apart from x, K and V, no tensor spans the sequence: the modulated input,
    qkv, q, the attention output and the FFN intermediates exist for one chunk at a time. The
    math is ``block_forward``'s op for op. Block-sparse chunks are whole query tiles, starting
    where upstream's tiles start (frame 0, or the first noise frame on the condition path).
    ``x`` (a tensor the model made for this block) is overwritten with the output. A smaller
    ``ops.ffn_chunk_frames`` splits each chunk's FFN further."""
    T, H, W = grid
    B, N, C = x.shape
    L = N // T
    attn, cross, norm = block.attn, block.cross_attn, block.pre_crs_attn_norm
    heads, D = attn.num_heads, attn.head_dim
    mod = fp32_linear(block.adaLN_modulation[1], F.silu(t.float()))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    size = int(ops.attention_chunk_frames)
    if _uses_bsa(attn, T):
        tile_t = _bsa_kwargs(attn.bsa_params)["tile"][0]
        size = -(-size // tile_t) * tile_t

    # Frames of x sit after the cached frames on the RoPE grid.
    offset = num_cond_latents if kv_cache is not None else 0
    n_cache = 0 if kv_cache is None else kv_cache[0].shape[2]
    K = x.new_empty(B, heads, n_cache + N, D)
    V = x.new_empty(B, heads, n_cache + N, D)
    k_pre = x.new_empty(B, heads, N, D) if return_kv else None
    if kv_cache is not None:
        k_cache, v_cache = (c.expand(B, -1, -1, -1) if c.shape[0] == 1 else c for c in kv_cache)
        for f0, f1 in _frame_chunks(0, num_cond_latents, size):
            K[:, :, f0 * L:f1 * L] = ops.rope_3d(k_cache[:, :, f0 * L:f1 * L].to(x.dtype), (f1 - f0, H, W), f0)
        V[:, :, :n_cache] = v_cache
    for f0, f1 in _frame_chunks(0, T, size):
        rows = slice(f0 * L, f1 * L)
        x_m = _modulate(ops, x[:, rows], shift_msa[:, f0:f1], scale_msa[:, f0:f1], (attn.qkv,))
        kv = linear_rows(attn.qkv, x_m, C, 3 * C)  # [B, n, 2C]: k then v
        del x_m
        if ops.qkv_norm_rope is not None:
            # one pass: norm + RoPE of k (and the pre-RoPE k), v a view of kv
            k_v = ops.qkv_norm_rope(kv, None, attn.k_norm.weight, heads, (f1 - f0, H, W), offset + f0, attn.k_norm.eps,
                                    return_kv, parts="kv")
            k_rot, v = k_v[0], k_v[1]
            if return_kv:
                k_pre[:, :, rows] = k_v[2]
        else:
            k, v = kv.view(B, -1, 2, heads, D).permute(2, 0, 3, 1, 4)
            k = ops.rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
            if return_kv:
                k_pre[:, :, rows] = k
            k_rot = ops.rope_3d(k, (f1 - f0, H, W), offset + f0)
        K[:, :, n_cache + rows.start:n_cache + rows.stop] = k_rot
        V[:, :, n_cache + rows.start:n_cache + rows.stop] = v

    # Query segments with the keys they see: condition frames attend to condition keys only.
    if kv_cache is None and num_cond_latents:
        segments = [(0, num_cond_latents, num_cond_latents * L), (num_cond_latents, T, N)]
    else:
        segments = [(0, T, n_cache + N)]
    text_kv = None if skip_crs_attn else text_keys_values(cross, ops, text)
    fused = ops.gated_residual_layer_norm
    ffn = block.ffn
    ffn_in = (ffn.w1, ffn.w3)
    for seg_start, seg_stop, n_keys in segments:
        k_seg, v_seg = K[:, :, :n_keys], V[:, :, :n_keys]
        # BSA: K and V packed tile-major, and their tile means, once for all chunks of the segment
        bsa_keys = None
        if _uses_bsa(attn, T) and ops.block_sparse_keys is not None:
            bsa_keys = ops.block_sparse_keys(k_seg, v_seg, (n_keys // L, H, W), _bsa_kwargs(attn.bsa_params)["tile"])
        for f0, f1 in _frame_chunks(seg_start, seg_stop, size):
            rows = slice(f0 * L, f1 * L)
            xs = x[:, rows]
            x_m = _modulate(ops, xs, shift_msa[:, f0:f1], scale_msa[:, f0:f1], (attn.qkv,))
            q = linear_rows(attn.qkv, x_m, 0, C)
            del x_m  # chunk temporaries are released as soon as they are used: the peak is a few of them
            if ops.qkv_norm_rope is not None:
                (q,) = ops.qkv_norm_rope(q, attn.q_norm.weight, None, heads, (f1 - f0, H, W), offset + f0, attn.q_norm.eps,
                                         False, parts="q")
            else:
                q = q.view(B, -1, heads, D).transpose(1, 2)
                q = ops.rope_3d(ops.rms_norm(q, attn.q_norm.weight, attn.q_norm.eps), (f1 - f0, H, W), offset + f0)
            attn_out = _attend(attn, ops, q, k_seg, v_seg, grid, T, bsa_keys)
            del q
            attn_out = _merge_heads(attn, ops, attn_out, grid)
            gate, shift, scale = gate_msa[:, f0:f1], shift_mlp[:, f0:f1], scale_mlp[:, f0:f1]
            # Condition frames (without a cache) get no text attention, as in block_forward.
            with_text = not skip_crs_attn and (kv_cache is not None or f0 >= num_cond_latents)
            if with_text:
                if fused is not None:
                    xs, normed = fused(xs, attn_out, gate, None, None, norm.weight, norm.bias, norm.eps)
                else:
                    xs = ops.gated_residual(xs, attn_out, gate)
                    normed = ops.layer_norm_modulate(xs, None, None, norm.weight, norm.bias, norm.eps)
                del attn_out
                cross_out = cross_attention_queries(cross, normed, ops, text_kv, cu_seqlens_k)
                del normed
                xs, x_m = _residual_modulate(ops, xs, cross_out, None, shift, scale, ffn_in)
                del cross_out
            else:
                xs, x_m = _residual_modulate(ops, xs, attn_out, gate, shift, scale, ffn_in)
                del attn_out
            # The FFN intermediates are the widest tensors: ffn_chunk_frames can split a chunk further.
            sub = min(ops.ffn_chunk_frames or (f1 - f0), f1 - f0)
            for s0, s1 in _frame_chunks(f0, f1, sub):
                r = slice((s0 - f0) * L, (s1 - f0) * L)
                ms = _token_rows(x_m, r.start, r.stop)
                x[:, s0 * L:s1 * L] = ops.gated_residual(xs[:, r], ffn.w2(ffn_gate(ffn, ms, ops)), gate_mlp[:, s0:s1])
    if return_kv:
        return x, (k_pre, V)
    return x


class SelfAttention(nn.Module):
    """3D self-attention: fused qkv, per-head q/k RMSNorm, 3D RoPE, dense or block-sparse
    attention, output projection (math in ``self_attention_forward``)."""

    def __init__(self, dim: int, num_heads: int, enable_bsa: bool = False, bsa_params: Optional[dict] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.enable_bsa = enable_bsa
        self.bsa_params = bsa_params


class CrossAttention(nn.Module):
    """Text cross-attention over each sample's valid tokens (math in ``cross_attention_forward``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)


class LongCatBlock(nn.Module):
    """One single-stream DiT block (math in ``block_forward``)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, adaln_tembed_dim, enable_bsa=False, bsa_params=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size, bias=True))
        self.pre_crs_attn_norm = LayerNormFP32(hidden_size, elementwise_affine=True)
        self.attn = SelfAttention(hidden_size, num_heads, enable_bsa=enable_bsa, bsa_params=bsa_params)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, ffn_hidden_size(hidden_size, mlp_ratio))

    def forward(self, x, t, text, cu_seqlens_k, grid, ops: DiTOps, num_cond_latents=0, return_kv=False, kv_cache=None, skip_crs_attn=False):
        return block_forward(self, x, t, text, cu_seqlens_k, grid, ops, num_cond_latents, return_kv, kv_cache, skip_crs_attn)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm-modulate + Linear to patch pixels, all in float32."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, t: torch.Tensor, ops: DiTOps) -> torch.Tensor:
        shift, scale = fp32_linear(self.adaLN_modulation[1], F.silu(t.float())).chunk(2, dim=-1)
        T = t.shape[1]
        chunk = ops.ffn_chunk_frames or ops.attention_chunk_frames
        if not chunk or chunk >= T or torch.is_grad_enabled():
            return fp32_linear(self.linear, ops.layer_norm_modulate(x.float(), shift, scale, None, None, NORM_EPS))
        # Frame chunks: the float32 copies of the hidden states exist for a few frames at a time.
        L = x.shape[1] // T
        outs = []
        for f0 in range(0, T, chunk):
            f1 = min(T, f0 + chunk)
            xs = x[:, f0 * L: f1 * L].float()
            outs.append(fp32_linear(self.linear, ops.layer_norm_modulate(xs, shift[:, f0:f1], scale[:, f0:f1], None, None, NORM_EPS)))
        return torch.cat(outs, dim=1)


class LongCatVideoTransformer3DModel(nn.Module):
    """The LongCat-Video DiT. Constructor keys and forward arguments are upstream's; the state
    dict has upstream's names and shapes, so upstream checkpoints load as they are."""

    _supports_gradient_checkpointing = True

    def __init__(self, **config):
        super().__init__()
        unknown = set(config) - set(CONFIG_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown LongCat-Video config keys: {sorted(unknown)}")
        cfg = {**CONFIG_DEFAULTS, **config}
        cfg["patch_size"] = tuple(int(p) for p in cfg["patch_size"])
        cfg["cp_split_hw"] = [int(s) for s in (cfg["cp_split_hw"] or [1, 1])]
        if len(cfg["patch_size"]) != 3 or cfg["patch_size"][0] != 1:
            raise ValueError(f"patch_size must be (1, ph, pw): the temporal axis is not patched; got {cfg['patch_size']}")
        if len(cfg["cp_split_hw"]) != 2 or min(cfg["cp_split_hw"]) < 1:
            raise ValueError(f"cp_split_hw must be two positive ints (split_h, split_w), got {cfg['cp_split_hw']}")
        if cfg["hidden_size"] % cfg["num_heads"]:
            raise ValueError(f"hidden_size {cfg['hidden_size']} is not divisible by num_heads {cfg['num_heads']}")
        if cfg["bsa_params"] is not None:
            _bsa_kwargs(cfg["bsa_params"])  # validate early
        self.config = cfg
        self.patch_size = cfg["patch_size"]
        self.in_channels, self.out_channels = cfg["in_channels"], cfg["out_channels"]
        C = cfg["hidden_size"]

        self.x_embedder = PatchEmbed3D(self.patch_size, cfg["in_channels"], C)
        self.t_embedder = TimestepEmbedder(cfg["adaln_tembed_dim"], cfg["frequency_embedding_size"])
        self.y_embedder = CaptionEmbedder(cfg["caption_channels"], C)
        self.blocks = nn.ModuleList(
            LongCatBlock(C, cfg["num_heads"], cfg["mlp_ratio"], cfg["adaln_tembed_dim"], cfg["enable_bsa"], cfg["bsa_params"])
            for _ in range(cfg["depth"])
        )
        self.final_layer = FinalLayer(C, math.prod(self.patch_size), cfg["out_channels"], cfg["adaln_tembed_dim"])
        self.gradient_checkpointing = False
        self.ops: DiTOps = SDPA_OPS

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LongCatVideoTransformer3DModel":
        from .presets import get_preset

        return cls(**{**get_preset(name), **overrides})

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device="cpu", **kwargs):
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB") -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    # ----------------------------------------------------------------- switches
    def set_ops(self, ops: DiTOps) -> "LongCatVideoTransformer3DModel":
        """Choose the op implementations (``longcat.ops.REFERENCE_OPS``, ``SDPA_OPS``, ...)."""
        if not isinstance(ops, DiTOps):
            raise TypeError(f"ops must be a longcat.ops.DiTOps, got {type(ops).__name__}")
        self.ops = ops
        return self

    def enable_bsa(self) -> None:
        for block in self.blocks:
            block.attn.enable_bsa = True

    def disable_bsa(self) -> None:
        for block in self.blocks:
            block.attn.enable_bsa = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    # ----------------------------------------------------------------- forward
    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents, kv_cache_dict, return_kv, prepared_text=None):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be latents [B, C, T, H, W] (rank 5), got {shape}")
        B, C, T, H, W = hidden_states.shape
        if C != self.in_channels:
            raise ValueError(f"hidden_states has {C} channels; the model expects in_channels={self.in_channels}")
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be a tensor of shape [B] or [B, T], got {type(timestep).__name__}")
        if not (timestep.shape == (B,) or timestep.shape == (B, T)):
            raise ValueError(f"timestep must have shape [B]=[{B}] or [B, T]=[{B}, {T}], got {tuple(timestep.shape)}")
        if prepared_text is not None:
            if prepared_text.cu_seqlens.shape != (B + 1,):
                raise ValueError(f"prepared_text was made for batch {prepared_text.cu_seqlens.shape[0] - 1}, hidden_states has {B}")
        else:
            y = encoder_hidden_states
            if not isinstance(y, torch.Tensor) or y.dim() not in (3, 4) or (y.dim() == 4 and y.shape[1] != 1):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"encoder_hidden_states must be [B, 1, L, C_text] or [B, L, C_text], got {shape}")
            if y.shape[0] != B:
                raise ValueError(f"encoder_hidden_states has batch {y.shape[0]}, hidden_states has {B}")
        if not isinstance(num_cond_latents, int) or num_cond_latents < 0:
            raise ValueError(f"num_cond_latents must be a non-negative int, got {num_cond_latents!r}")
        if kv_cache_dict:
            if return_kv:
                raise ValueError("return_kv=True cannot be combined with a kv_cache_dict (the cache is built in a call of its own)")
            if set(kv_cache_dict) != set(range(len(self.blocks))):
                raise ValueError(f"kv_cache_dict must hold an entry for each of the {len(self.blocks)} blocks")
            if num_cond_latents < 1:
                raise ValueError("with a kv_cache_dict, num_cond_latents must give the number of cached latent frames (>= 1)")
            ph, pw = self.patch_size[1:]
            cached = num_cond_latents * math.ceil(H / ph) * math.ceil(W / pw)
            k0, v0 = kv_cache_dict[0]
            if k0.shape[2] != cached or v0.shape != k0.shape or k0.shape[0] not in (1, B):
                raise ValueError(
                    f"kv cache holds k {tuple(k0.shape)}, v {tuple(v0.shape)}; expected [1 or {B}, heads, {cached}, head_dim] "
                    f"for {num_cond_latents} cached frames"
                )
        elif num_cond_latents >= T:
            raise ValueError(f"num_cond_latents={num_cond_latents} must be smaller than the number of latent frames T={T}")

    def prepare_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: Optional[torch.Tensor] = None) -> PreparedText:
        """Project the text embeddings [B, 1, L, C_text] (or [B, L, C_text]) and pack every
        sample's valid tokens. The result does not depend on the latents or the timestep: compute
        it once per prompt and pass it as ``forward(..., prepared_text=)`` at every denoising step
        (this also keeps the data-dependent packing, a host sync, out of a captured CUDA graph)."""
        y = encoder_hidden_states
        if not isinstance(y, torch.Tensor) or y.dim() not in (3, 4) or (y.dim() == 4 and y.shape[1] != 1):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"encoder_hidden_states must be [B, 1, L, C_text] or [B, L, C_text], got {shape}")
        if y.shape[-1] != self.config["caption_channels"]:
            raise ValueError(f"encoder_hidden_states has {y.shape[-1]} channels; caption_channels={self.config['caption_channels']}")
        B, L = y.shape[0], y.shape[-2]
        m = encoder_attention_mask
        if m is not None and (not isinstance(m, torch.Tensor) or m.shape not in ((B, L), (B, 1, 1, L))):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"encoder_attention_mask must be [B, L] or [B, 1, 1, L] = [{B}, {L}] matching the text length, got {shape}")
        text, cu = self._pack_text(y.to(self.dtype), m)
        # offsets of non-negative lengths cumulated from 0 up to the packed rows: valid by construction
        return PreparedText._trusted(text, cu)

    def _pack_text(self, y: torch.Tensor, mask: Optional[torch.Tensor]):
        """Project the text and pack every sample's valid tokens into one [L_total, C] sequence;
        returns it with the cumulative key offsets [B + 1] (int32)."""
        B = y.shape[0]
        y = self.y_embedder(y.reshape(B, y.shape[-2], y.shape[-1]))  # [B, L, C]
        L = y.shape[1]
        if mask is not None:
            mask = mask.reshape(B, L)
            if self.config["text_tokens_zero_pad"]:
                y = y * mask[:, :, None].to(y.dtype)
                mask = None
        if mask is None:
            lengths = torch.full((B,), L, dtype=torch.int32, device=y.device)
            packed = y.reshape(B * L, -1)
        else:
            keep = mask != 0
            lengths = keep.sum(dim=1, dtype=torch.int32)
            packed = y[keep]
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return packed, cu

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        num_cond_latents: int = 0,
        return_kv: bool = False,
        kv_cache_dict: Optional[dict] = None,
        skip_crs_attn: bool = False,
        offload_kv_cache: bool = False,
        prepared_text: Optional[PreparedText] = None,
    ):
        """Predict the flow for latents [B, C_in, T, H, W] at ``timestep`` ([B], or [B, T] for
        one timestep per latent frame). Returns float32 [B, C_out, T, H, W], and with
        ``return_kv`` also ``{block index: (k, v)}`` (k after the norm, before RoPE), on the CPU
        when ``offload_kv_cache``. ``prepared_text`` (from ``prepare_text``) replaces
        ``encoder_hidden_states`` and ``encoder_attention_mask``.

        Under context parallelism (``ops.context_parallel``) every rank passes the same inputs
        and gets the whole output; a KV cache holds every token for that rank's heads."""
        num_cond_latents = int(num_cond_latents or 0)
        if prepared_text is not None:
            if not isinstance(prepared_text, PreparedText):
                raise TypeError(f"prepared_text must come from model.prepare_text(), got {type(prepared_text).__name__}")
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError("pass either prepared_text or encoder_hidden_states/encoder_attention_mask, not both")
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents, kv_cache_dict, return_kv, prepared_text)
        B, _, T, H, W = hidden_states.shape
        ph, pw = self.patch_size[1:]
        grid = (T, math.ceil(H / ph), math.ceil(W / pw))
        dtype = self.dtype
        ops = self.ops
        cp = self._context_parallel(grid)

        if timestep.dim() == 1:
            timestep = timestep.unsqueeze(1).expand(B, T)
        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]
        if cp is not None:
            x = cp.shard_tokens(x, grid)  # this rank's spatial window
        # Upstream casts the timestep to the model dtype before embedding it in float32.
        t = self.t_embedder(timestep.to(dtype).float().reshape(-1)).view(B, T, -1)
        if prepared_text is None:
            prepared_text = self.prepare_text(encoder_hidden_states, encoder_attention_mask)
        text, cu_seqlens_k = prepared_text

        kv_out = {}
        for i, block in enumerate(self.blocks):
            cache = None
            if kv_cache_dict:
                k_c, v_c = kv_cache_dict[i]
                cache = (k_c.to(x.device, non_blocking=True), v_c.to(x.device, non_blocking=True))
            args = (x, t, text, cu_seqlens_k, grid, ops, num_cond_latents, return_kv, cache, skip_crs_attn)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                result = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                result = block(*args)
            if return_kv:
                x, (k, v) = result
                kv_out[i] = (k.cpu(), v.cpu()) if offload_kv_cache else (k.contiguous(), v.contiguous())
            else:
                x = result

        x = self.final_layer(x, t, ops)  # [B, N, p_t*p_h*p_w*C_out], float32
        if cp is not None:
            x = cp.gather_tokens(x, grid)
        out = self.unpatchify(x, grid)[:, :, :, :H, :W].float()
        return (out, kv_out) if return_kv else out

    def _context_parallel(self, grid):
        """The op table's ContextParallel (checked against this model and grid), or None."""
        cp = self.ops.context_parallel
        split = tuple(self.config["cp_split_hw"])
        if cp is None:
            if split != (1, 1):
                raise RuntimeError(
                    f"config cp_split_hw={list(split)} asks for context parallelism: pass the process group with "
                    "longcat.accelerate(model, context_parallel=group)"
                )
            return None
        if split != (1, 1) and tuple(cp.split_hw) != split:
            raise ValueError(f"the context-parallel split {cp.split_hw} differs from the config's cp_split_hw {list(split)}")
        cp.check(grid, self.config["num_heads"])
        return cp

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, N, p_t*p_h*p_w*C_out] -> [B, C_out, T*p_t, H'*p_h, W'*p_w]."""
        B = x.shape[0]
        nt, nh, nw = grid
        pt, ph, pw = self.patch_size
        x = x.view(B, nt, nh, nw, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, self.out_channels, nt * pt, nh * ph, nw * pw)
