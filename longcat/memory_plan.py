"""Expected peak GPU memory of one DiT forward pass, computed on the meta device.

The weights are counted exactly (the model is built on the meta device and, for 8-bit formats,
quantized there). Activations are an estimate from the shapes the forward pass allocates: the
largest set of tensors alive at once inside a block, for the reference (eager, float32
temporaries) and for the fused kernels. Measure on the GPU to confirm (``longcat-bench memory``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch

from .model import LongCatVideoTransformer3DModel, ffn_hidden_size
from .presets import get_preset

__all__ = ["MemoryPlan", "plan_memory", "latent_grid_for_video"]

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

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        s = self.settings
        lines = [
            f"memory plan: {s.get('preset')} at latent {s.get('latent')} ({self.tokens:,} tokens x batch {self.batch}), "
            f"weights {s.get('weights')}, attention {s.get('attention')}, fused={s.get('fused')}, "
            f"ffn_chunk_frames={s.get('ffn_chunk_frames')}, offload={s.get('offload')}",
            f"  weights on the GPU       {self.weights_resident_bytes / GB:8.2f} GB (of {self.weights_total_bytes / GB:.2f} GB)",
            f"  activation peak          {self.activation_peak_bytes / GB:8.2f} GB",
        ]
        lines += [f"    {k:<22} {v / GB:8.2f} GB" for k, v in sorted(self.phase_bytes.items(), key=lambda kv: -kv[1])]
        lines.append(f"  expected peak            {self.peak_bytes / GB:8.2f} GB")
        return "\n".join(lines)


def _meta_model(config: dict, weights: str, dtype: torch.dtype):
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**config).to(dtype)
    if weights in ("int8", "fp8", "int8-dynamic", "fp8-dynamic"):
        from longcat.quant import quantize

        quantize(model, weights)
    return model


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


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
    offload: Optional[str] = None,
    text_len: int = 512,
    num_cond_latents: int = 0,
) -> MemoryPlan:
    """Peak memory of one forward pass of the DiT.

    latent: the latent grid (T, H, W) before patching, or give frames/height/width of the video.
    weights: "bf16" (also "fp16", "fp32") or an 8-bit format ("int8", "fp8", "int8-dynamic", "fp8-dynamic").
    fused: the fused Triton element-wise ops (False: the reference's eager float32 temporaries).
    attention: "bsa" / "dense" / "sdpa" need no [N, N] matrix; "reference" materialises it.
    ffn_chunk_frames: FFN run this many latent frames at a time.
    offload: "blocks" keeps two blocks' weights on the GPU (current and prefetched).
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
    if latent is None:
        if None in (frames, height, width):
            raise ValueError("give latent=(T, H, W) or frames, height and width")
        latent = latent_grid_for_video(frames, height, width)
    T, H, W = (int(v) for v in latent)
    act_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(weights, torch.bfloat16)
    model = _meta_model(config, weights, act_dtype)

    total = _module_bytes(model)
    if offload == "blocks":
        block_bytes = max(_module_bytes(b) for b in model.blocks)
        resident = total - sum(_module_bytes(b) for b in model.blocks) + 2 * block_bytes
    else:
        resident = total

    _, ph, pw = config.get("patch_size", (1, 2, 2))
    n = T * math.ceil(H / ph) * math.ceil(W / pw)
    C = config["hidden_size"]
    F = ffn_hidden_size(C, config.get("mlp_ratio", 4))
    heads = config["num_heads"]
    a = torch.finfo(act_dtype).bits // 8  # activation bytes per element
    BN = batch * n
    x = BN * C * a  # one residual-stream tensor
    f32 = BN * C * 4

    # Tensors alive at the worst point of each phase of a block (beyond the residual stream x).
    phases: Dict[str, int] = {}
    if fused:
        phases["self-attention"] = x + 2 * (3 * x) + x  # modulated x, qkv + (q, k, v), attention output
        phases["residual + norms"] = 3 * x
        chunk = T if not ffn_chunk_frames else min(T, ffn_chunk_frames)
        phases["ffn"] = x + (3 * BN * F * a) * chunk // T  # x_m, w1 and w3 outputs and the SwiGLU product
    else:
        # Eager reference: float32 copies in LayerNorm-modulate (input, normalised, modulated) and in
        # RMSNorm / RoPE on q and k (upcast, rotate_half, products).
        phases["modulate"] = 3 * f32 + x
        phases["self-attention"] = x + 3 * x + 2 * x + 4 * (f32 // 2) * 2
        phases["residual + norms"] = 2 * f32 + x
        chunk = T if not ffn_chunk_frames else min(T, ffn_chunk_frames)
        phases["ffn"] = x + (4 * BN * F * a) * chunk // T
    if attention == "reference":
        phases["self-attention"] += 2 * batch * heads * n * n * 4  # scores and probabilities in fp32
    if attention in ("bsa", "auto"):
        tiles = math.ceil(T / 4) * math.ceil(math.ceil(H / ph) / 4) * math.ceil(math.ceil(W / pw) / 8)
        phases["self-attention"] += batch * heads * tiles * tiles * (4 + 4)  # gating scores + sorted indices
    text = batch * text_len * C * a * 4  # projected text, k, v
    kv_cache = 0
    if num_cond_latents:
        kv_cache = len(model.blocks) * 2 * batch * num_cond_latents * (n // T) * C * a
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
                    ffn_chunk_frames=ffn_chunk_frames, offload=offload, text_len=text_len)
    return MemoryPlan(tokens=n, batch=batch, weights_resident_bytes=int(resident), weights_total_bytes=int(total),
                      activation_peak_bytes=int(activation_peak), peak_bytes=int(peak), phase_bytes=phases, settings=settings)
