"""Expected peak GPU memory of one DiT forward pass, computed on the meta device.

The weights are counted exactly (the model is built on the meta device and, for 8-bit formats,
quantized there). Activations are an estimate from the shapes the forward pass allocates: the
largest set of tensors alive at once inside a block, for the reference (eager, float32
temporaries) and for the fused kernels. Measure on the GPU to confirm (``longcat-bench memory``).
"""
from __future__ import annotations

import functools
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch

from .model import LongCatVideoTransformer3DModel, _bsa_kwargs, ffn_hidden_size
from .ops import ATTENTION_BACKENDS
from .presets import get_preset

__all__ = ["MemoryPlan", "plan_memory", "latent_grid_for_video", "BlockTraffic", "block_traffic"]

GB = 1e9
WEIGHT_FORMATS = ("bf16", "fp16", "fp32", "int8", "fp8", "int8-dynamic", "fp8-dynamic")


def latent_grid_for_video(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (T, H, W) of a video for the Wan 2.1 VAE: 4x temporal (first frame kept), 8x spatial."""
    return ((frames - 1) // 4 + 1, math.ceil(height / 8), math.ceil(width / 8))


@dataclass
class MemoryPlan:
    tokens: int
    batch: int
    weights_resident_bytes: int
    weights_total_bytes: int
    activation_peak_bytes: int
    peak_bytes: int
    phase_bytes: Dict[str, int] = field(default_factory=dict)
    settings: Dict[str, object] = field(default_factory=dict)
    weights_outside_blocks_bytes: int = 0  # embedders and final layer: resident even with block offload

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        s = self.settings
        lines = [
            f"memory plan: {s.get('preset')} at latent {s.get('latent')} ({self.tokens:,} tokens x batch {self.batch}), "
            f"weights {s.get('weights')}, attention {s.get('attention')}, fused={s.get('fused')}, "
            f"ffn_chunk_frames={s.get('ffn_chunk_frames')}, attention_chunk_frames={s.get('attention_chunk_frames')}, "
            f"offload={s.get('offload')}, context_parallel={s.get('context_parallel')}",
            f"  weights on the GPU       {self.weights_resident_bytes / GB:8.2f} GB (of {self.weights_total_bytes / GB:.2f} GB)",
            f"  activation peak          {self.activation_peak_bytes / GB:8.2f} GB",
        ]
        lines += [f"    {k:<22} {v / GB:8.2f} GB" for k, v in sorted(self.phase_bytes.items(), key=lambda kv: -kv[1])]
        lines.append(f"  expected peak            {self.peak_bytes / GB:8.2f} GB")
        return "\n".join(lines)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _meta_model(config: dict, weights: str, dtype: torch.dtype):
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**config).to(dtype)
    if weights in ("int8", "fp8", "int8-dynamic", "fp8-dynamic"):
        from longcat.quant import quantize

        quantize(model, weights)
    return model


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@functools.lru_cache(maxsize=64)
def _weight_bytes(config_json: str, weights: str, dtype: torch.dtype) -> tuple:
    """(total, all blocks, largest block) bytes and the block count of the model built on the meta device; cached
    because quantizing the 13.6B model on the meta device takes seconds and fitters plan often."""
    model = _meta_model(json.loads(config_json), weights, dtype)
    blocks = [_module_bytes(b) for b in model.blocks]
    return _module_bytes(model), sum(blocks), max(blocks), len(blocks)


def plan_memory(
    model_or_config: Union[str, dict, LongCatVideoTransformer3DModel] = "longcat-video",
    *,
    latent: Optional[Sequence[int]] = None,
    frames: Optional[int] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch: int = 1,
    weights: str = "bf16",
    fused: bool = True,
    attention: str = "bsa",
    ffn_chunk_frames: Optional[int] = None,
    attention_chunk_frames: Optional[int] = None,
    offload: Optional[str] = None,
    prefetch_blocks: int = 1,
    text_len: int = 512,
    num_cond_latents: int = 0,
    context_parallel: int = 1,
) -> MemoryPlan:
    """Peak memory of one forward pass of the DiT.

    latent: the latent grid (T, H, W) before patching, or give frames/height/width of the video.
    weights: "bf16" (also "fp16", "fp32") or an 8-bit format ("int8", "fp8", "int8-dynamic", "fp8-dynamic").
    fused: the fused Triton element-wise ops (False: the reference's eager float32 temporaries).
    attention: "bsa" / "dense" / "sdpa" need no [N, N] matrix; "reference" materialises it.
    ffn_chunk_frames: FFN run this many latent frames at a time.
    attention_chunk_frames: whole blocks run this many latent frames of queries at a time
        (``chunked_block_forward``): only x, K and V span the sequence.
    offload: "blocks" keeps 1 + prefetch_blocks blocks' weights on the GPU (the current one and
        those being prefetched).
    context_parallel: number of ranks of Ulysses context parallelism; the plan is per GPU (weights
        replicated, tokens split, plus the all-to-all buffers).
    """
    if isinstance(model_or_config, LongCatVideoTransformer3DModel):
        config, preset = dict(model_or_config.config), "model"
    elif isinstance(model_or_config, str):
        config, preset = get_preset(model_or_config), model_or_config
    else:
        config, preset = dict(model_or_config), "config"
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if offload not in (None, "blocks"):
        raise ValueError(f"offload must be None or 'blocks', got {offload!r}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    _check_count("batch", batch, 1)
    _check_count("text_len", text_len, 0)
    _check_count("num_cond_latents", num_cond_latents, 0)
    if latent is None:
        if None in (frames, height, width):
            raise ValueError("give latent=(T, H, W) or frames, height and width")
        for name, value in (("frames", frames), ("height", height), ("width", width)):
            _check_count(name, value, 1)
        latent = latent_grid_for_video(frames, height, width)
    if isinstance(latent, (str, bytes)) or not hasattr(latent, "__len__") or len(latent) != 3:
        raise ValueError(f"latent must be (T, H, W), three ints >= 1, got {latent!r}")
    for name, value in zip("THW", latent):
        _check_count(f"latent {name}", value, 1)
    if num_cond_latents > latent[0]:
        raise ValueError(f"num_cond_latents ({num_cond_latents}) exceeds the latent frames T={latent[0]}")
    for name, value in (("ffn_chunk_frames", ffn_chunk_frames), ("attention_chunk_frames", attention_chunk_frames)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if not isinstance(prefetch_blocks, int) or prefetch_blocks < 1:
        raise ValueError(f"prefetch_blocks must be a positive int, got {prefetch_blocks!r}")
    if not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel must be a positive int (ranks), got {context_parallel!r}")
    if attention_chunk_frames and context_parallel > 1:
        raise ValueError("attention_chunk_frames is not combined with context parallelism")
    T, H, W = (int(v) for v in latent)
    bsa = _bsa_kwargs(config.get("bsa_params"))  # the model's BSA settings (upstream's defaults without)
    act_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(weights, torch.bfloat16)
    total, blocks_bytes, block_bytes, depth = _weight_bytes(json.dumps(config, sort_keys=True, default=str), weights, act_dtype)
    if offload == "blocks":
        resident = total - blocks_bytes + min(depth, 1 + prefetch_blocks) * block_bytes
    else:
        resident = total

    _, ph, pw = config.get("patch_size", (1, 2, 2))
    n = T * math.ceil(H / ph) * math.ceil(W / pw)
    C = config["hidden_size"]
    F = ffn_hidden_size(C, config.get("mlp_ratio", 4))
    heads = config["num_heads"]
    a = torch.finfo(act_dtype).bits // 8  # activation bytes per element
    BN = batch * n // context_parallel  # tokens on one GPU
    x = BN * C * a  # one residual-stream tensor
    f32 = BN * C * 4

    # Tensors alive at the worst point of each phase of a block (beyond the residual stream x).
    phases: Dict[str, int] = {}
    chunk = T if not ffn_chunk_frames else min(T, ffn_chunk_frames)
    if attention_chunk_frames:
        # K and V of every token stay alive through the block; per chunk: modulated x, q / k / v
        # and their normed and rotated copies, attention and text-attention outputs, FFN.
        achunk = attention_chunk_frames
        if attention in ("bsa", "auto"):
            achunk = -(-achunk // bsa["tile"][0]) * bsa["tile"][0]  # chunks are whole block-sparse query tiles
        achunk = min(T, achunk)
        chunk = achunk
        phases["self-attention (chunked)"] = 2 * x + 6 * x * achunk // T
        fchunk = min(achunk, ffn_chunk_frames or achunk)
        phases["ffn (chunked)"] = 2 * x + x * achunk // T + 3 * BN * F * a * fchunk // T
    elif fused:
        phases["self-attention"] = x + 2 * (3 * x) + x  # modulated x, qkv + (q, k, v), attention output
        phases["residual + norms"] = 3 * x
        phases["ffn"] = x + (3 * BN * F * a) * chunk // T  # x_m, w1 and w3 outputs and the SwiGLU product
    else:
        # Eager reference: float32 copies in LayerNorm-modulate (input, normalised, modulated) and in
        # RMSNorm / RoPE on q and k (upcast, rotate_half, products).
        phases["modulate"] = 3 * f32 + x
        phases["self-attention"] = x + 3 * x + 2 * x + 4 * (f32 // 2) * 2
        phases["residual + norms"] = 2 * f32 + x
        phases["ffn"] = x + (4 * BN * F * a) * chunk // T
    attn_phase = "self-attention (chunked)" if attention_chunk_frames else "self-attention"
    q_frac = (chunk / T) if attention_chunk_frames else 1.0  # queries at once
    local_heads = heads // context_parallel if heads % context_parallel == 0 else heads
    if context_parallel > 1:
        phases[attn_phase] += 3 * x + 2 * x  # qkv all-to-all send/receive, then the output's
    if attention == "reference":
        phases[attn_phase] += int(2 * batch * local_heads * n * n * q_frac) * 4  # scores and probabilities in fp32
    if attention in ("bsa", "auto"):
        tt, th, tw = bsa["tile"]
        tiles = math.ceil(T / tt) * math.ceil(math.ceil(H / ph) / th) * math.ceil(math.ceil(W / pw) / tw)
        kept = tiles if bsa["cdf_threshold"] is not None else max(1, int((1 - bsa["sparsity"]) * tiles))
        # gating scores (fp32) and the kept key-tile indices (int32) of every query tile
        phases[attn_phase] += int(batch * local_heads * tiles * q_frac) * (tiles + kept) * 4
    text = batch * text_len * C * a * 4  # projected text, k, v
    kv_cache = 0
    if num_cond_latents:
        kv_cache = depth * 2 * batch * num_cond_latents * (n // T) * C * a // context_parallel
    # The final layer runs in float32: upcast copy, normalised/modulated copy (and one more
    # temporary in the eager reference); frame-chunked together with the FFN.
    final = (2 if fused else 3) * f32 * chunk // T
    block_peak = max(phases.values())
    activation_peak = x + text + kv_cache + max(block_peak, final)
    phases["final layer (fp32)"] = final
    if kv_cache:
        phases["kv cache"] = kv_cache
    peak = resident + activation_peak
    settings = dict(preset=preset, latent=(T, H, W), weights=weights, fused=fused, attention=attention,
                    ffn_chunk_frames=ffn_chunk_frames, attention_chunk_frames=attention_chunk_frames, offload=offload,
                    prefetch_blocks=prefetch_blocks if offload else None, text_len=text_len, context_parallel=context_parallel)
    return MemoryPlan(tokens=n, batch=batch, weights_resident_bytes=int(resident), weights_total_bytes=int(total),
                      activation_peak_bytes=int(activation_peak), peak_bytes=int(peak), phase_bytes=phases, settings=settings,
                      weights_outside_blocks_bytes=int(total - blocks_bytes))


# ----------------------------------------------------------------------------------------------
# HBM traffic of one DiT block (a model: bytes each pass must read and write at least once)
# ----------------------------------------------------------------------------------------------


@dataclass
class BlockTraffic:
    """HBM bytes one block reads and writes, per pass, in the order the forward runs them.
    ``passes`` maps a pass to its bytes; the GEMMs count their weight once and their activations
    once (tile re-reads served by L2 are not counted); text keys/values are left out (512 tokens)."""

    weights: str
    tokens: int
    quantize_once: bool
    weight_bytes: int
    activation_bytes: int
    passes: Dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return dict(self.__dict__, total_bytes=self.total_bytes)


def block_traffic(
    model_or_config: Union[str, dict] = "longcat-video",
    *,
    latent: Sequence[int] = (48, 88, 160),
    batch: int = 1,
    weights: str = "bf16",
    quantize_once: bool = True,
) -> BlockTraffic:
    """HBM traffic of one block of the fused path (``kernel_ops(fused=True)``) at ``latent``
    (before patching), per pass. weights: "bf16" or an 8-bit format of ``plan_memory``; with the
    W8A8 formats ("int8-dynamic", "fp8-dynamic") ``quantize_once`` says whether the modulated
    inputs of qkv and of w1/w3 come out of the norm kernels already 8-bit (one quantization per
    input) or every Linear quantizes its own input (a read of the float input and a write of the
    codes per Linear). The FFN gate is the packed w1|w3 GEMM of ``longcat.ffn`` (one read of its
    input): float weights write [n, 2F] for a separate ``swiglu_packed`` pass, 8-bit weights compute
    the SwiGLU in the GEMM's epilogue."""
    config = get_preset(model_or_config) if isinstance(model_or_config, str) else dict(model_or_config)
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    act_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(weights, torch.bfloat16)
    block = _meta_model({**config, "depth": 1}, weights, act_dtype).blocks[0]
    T, H, W = (int(v) for v in latent)
    _, ph, pw = config.get("patch_size", (1, 2, 2))
    n = batch * T * math.ceil(H / ph) * math.ceil(W / pw)
    C = config["hidden_size"]
    F = ffn_hidden_size(C, config.get("mlp_ratio", 4))
    a = torch.finfo(act_dtype).bits // 8
    w8a8 = weights.endswith("-dynamic")
    act = n * C * a  # one [n, C] activation

    def gemm_input(width: int, pre_quantized: bool) -> int:
        """Bytes a Linear reads for its [n, width] input (plus its own quantization pass)."""
        if not w8a8:
            return n * width * a
        codes = n * width + n * 4
        return codes if pre_quantized else n * width * a + 2 * codes

    def normed_out(width: int, to_8bit: bool) -> int:
        return n * width + n * 4 if to_8bit else n * width * a

    once = w8a8 and quantize_once
    p: Dict[str, int] = {}
    p["LayerNorm-modulate"] = act + normed_out(C, once)
    p["qkv GEMM (activations)"] = gemm_input(C, once) + 3 * act
    p["QKV-prep (q, k norm + RoPE; v a view)"] = 2 * act + 2 * act
    p["self-attention (q, k, v, out once)"] = 4 * act
    p["proj GEMM (activations)"] = gemm_input(C, False) + act
    p["residual + affine norm"] = 2 * act + 2 * act
    p["cross-attention (q_linear, q norm, attention, proj)"] = (gemm_input(C, False) + act) + 2 * act + 2 * act + (gemm_input(C, False) + act)
    p["residual + modulate (FFN input)"] = 2 * act + act + normed_out(C, once)
    if weights in ("bf16", "fp16", "fp32"):
        # one packed w1|w3 GEMM (cuBLAS) writes [n, 2F]; swiglu_packed reads it and writes [n, F]
        p["w1|w3 GEMM (activations)"] = gemm_input(C, once) + 2 * n * F * a
        p["SwiGLU (packed)"] = 3 * n * F * a
    else:
        # 8-bit: the packed GEMM computes the SwiGLU in its epilogue; only [n, F] reaches memory
        p["w1|w3 GEMM + SwiGLU epilogue (activations)"] = gemm_input(C, once) + n * F * a
    p["w2 GEMM (activations)"] = gemm_input(F, False) + act
    p["gated residual"] = 3 * act
    weight_bytes = _module_bytes(block)
    return BlockTraffic(weights=weights, tokens=n, quantize_once=once, weight_bytes=int(weight_bytes),
                        activation_bytes=int(sum(p.values())), passes=p)
