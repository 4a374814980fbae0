"""Peak GPU memory of the whole LongCat-Video pipeline, phase by phase, and a budget fitter.

A user's peak is not one DiT step: it is the largest of the pipeline's phases, each holding the
weights resident at that moment plus that phase's activations:

- text encoding: the UMT5-XXL encoder (5.7B parameters) on the prompts;
- VAE encode (refinement stage only): the Wan 2.1 VAE encoding the upsampled stage-1 video;
- each denoising step: one DiT forward pass (``longcat.memory_plan.plan_memory``);
- VAE decode: the Wan VAE decoding the final latents to frames.

Weights are counted on the meta device: the DiT by ``plan_memory``; the UMT5 encoder built by
``transformers`` and the Wan VAE built by ``diffusers`` when they are installed (the ``pipeline``
extra), otherwise from the closed-form count below (UMT5) or the count recorded for the Wan 2.1
configuration (VAE), which the tests check against the meta-device count. Activation peaks are
formulas (estimates; ``longcat-bench pipeline`` measures them on a GPU):

- UMT5 encoder, B prompts of L tokens, hidden d, FFN F, heads H, a bytes per element: the hidden
  state, its fp32 norm temporaries and the attention output (6 B L d a), plus the larger of the
  gated FFN (w0 and w1 outputs, their product: 3 B L F a) and attention (scores, position bias,
  probabilities, mask: 4 B H L L a).
- Wan VAE (causal 3D convolutions over 4-frame chunks with a 2-frame cache per convolution): the
  working set is proportional to one output-resolution frame of ``base_dim`` channels,
  u = base_dim * 8h * 8w * a for a latent tile of h x w. Tracing diffusers' ``AutoencoderKLWan``
  (Wan 2.1 architecture) on the meta device with a live-tensor counter gives, in steady state,
  52.5 u for decoding (feature caches of all 33 convolutions + the largest resblock's
  temporaries at full resolution, 4 frames) and 38.8 u for encoding. Decoding also holds the
  output decoded so far, and ends with 2x the output (the last concatenation, then the clamped
  copy): peak max(52.5 u + out, 2 out). Encoding makes one copy of its input video.
- Tiled VAE (``longcat.pipeline_memory.WanVAETiler``, equal to the whole-frame VAE): the
  middle block's features of every frame at latent resolution (4 base_dim channels), the output
  (written tile by tile, no blend buffers) and one tile's working set, the tile including its
  halo of context (13 latent pixels for decoding, 9 for encoding). Traced on the meta device the
  same way: 52.3 u of the tile beside the output and the features when decoding, 38.6 u beside
  the video tile and the features when encoding. Tiled encoding keeps the video on the CPU and
  moves one tile at a time.

``fit_pipeline(budget)`` and ``fit_dit(budget, model)`` search the tactics, rank them by the
documented cost of each (``TACTIC_COST``, an estimate of the time each adds) and return the
cheapest whose planned peak fits, or raise ``MemoryBudgetError`` naming the smallest budget that
would fit.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .memory_plan import plan_memory
from .pipeline_memory import tile_spans

__all__ = [
    "UMT5_XXL_CONFIG", "WAN21_VAE_CONFIG", "STAGES", "PipelineTactics", "PhasePlan", "PipelinePlan",
    "MemoryBudgetError", "parse_memory_size", "UMT5_INT8_EXCLUDE", "plan_pipeline", "fit_pipeline", "fit_dit", "TACTIC_COST",
    "text_encoder_bytes", "vae_bytes", "vae_decode_bytes", "vae_encode_bytes", "text_encoder_activation_bytes",
    "vae_tile_shape", "vae_tile_overhead",
]

GB = 1e9

# The LongCat-Video text encoder: the encoder of UMT5-XXL (transformers' UMT5Config keys).
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# Wan 2.1 VAE (diffusers' AutoencoderKLWan defaults): 16 latent channels, 8x spatial, 4x temporal.
WAN21_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                        temperal_downsample=[False, True, True])
# transformers' UMT5 feed-forward reads wo.weight's dtype: 8-bit formats quantize the other Linears.
UMT5_INT8_EXCLUDE = ["*.wo", "shared"]
WAN21_VAE_PARAMETERS = 126_892_531  # AutoencoderKLWan(**WAN21_VAE_CONFIG) counted on the meta device

VAE_DECODE_UNITS = 52.5  # steady-state decode working set in u (see the module docstring)
VAE_ENCODE_UNITS = 38.8  # steady-state encode working set in u (beside its copy of the video)
# Receptive margins, in latent pixels, of the parts WanVAETiler tiles (the decoder after its
# middle block, the encoder before it) for the Wan 2.1 architecture: its tiles' context.
WAN21_DECODE_HALO = 13
WAN21_ENCODE_HALO = 9
# Share of the refinement's time spent in the VAE, for the cost of tiling it (a model, to be
# measured by longcat-bench pipeline): the 720p decode is ~10 MFLOP per output pixel, ~1.7 PFLOP
# for 189 frames, against ~4.6 PFLOP per DiT step.
VAE_TIME_SHARE_PCT = 5.0

# Stages of the coarse-to-fine pipeline: latent grid (T, H, W) before patching and the DiT batch.
STAGES = {
    "base": dict(resolution="480p", latent=(24, 60, 104), batch=2),  # CFG: conditional + unconditional
    "refine": dict(resolution="720p", latent=(48, 88, 160), batch=1),  # with temporal doubling
}

TEXT_ENCODER_TACTICS = ("gpu", "gpu-int8", "offload", "offload-int8", "offload-blocks", "cpu")

# Estimated time each tactic adds, in percent of the all-resident pipeline (a model, not a
# measurement): the fitter picks the fitting plan with the smallest sum. Order of preference:
# nothing > moving the text encoder off after encoding (one 11 GB copy per video) > chunking >
# VAE tiling > 8-bit weights (output changes) > block offload (hidden behind compute at 720p,
# more exposed with less prefetch) > running the text encoder on the CPU. VAE tiles (at most
# that many latent pixels a side, halo included) cost the extra area decoded at 720p.
TACTIC_COST = {
    # offload-blocks: 11.4 GB over PCIe per encode (~0.5 s at 25 GB/s), not hidden behind 512 tokens
    "text_encoder": {"gpu": 0.0, "offload": 0.5, "offload-blocks": 1.0, "gpu-int8": 3.0, "offload-int8": 3.5, "cpu": 40.0},
    "dit_weights": {"bf16": 0.0, "fp8": 4.0, "int8": 5.0},
    "attention_chunk_frames": {None: 0.0, 16: 1.0, 8: 2.0, 4: 3.0},
    "ffn_chunk_frames": {None: 0.0, 8: 0.5, 4: 0.5, 1: 1.5},
    "offload_prefetch": {None: 0.0, 2: 6.0, 1: 8.0},
    "vae_tile": {None: 0.0},  # filled in below, from the tiles' geometry
}


class MemoryBudgetError(ValueError):
    """No combination of tactics fits the memory budget; the message names the smallest that does."""


def parse_memory_size(size: Union[int, float, str], name: str = "memory_budget") -> int:
    """Bytes from a positive number or a string such as '8GB' (10^9), '8GiB' (2^30), '512MB'."""
    from longcat.quant.checkpoint import parse_size

    return parse_size(size, name)


# ----------------------------------------------------------------------------- weights


def _umt5_parameters(cfg: dict) -> int:
    """Closed-form parameter count of transformers' UMT5EncoderModel (each layer has its own
    relative-position bias; gated FFN: wi_0, wi_1, wo; RMS norms without bias)."""
    return cfg["vocab_size"] * cfg["d_model"] + cfg["num_layers"] * _umt5_layer_parameters(cfg) + cfg["d_model"]


def _umt5_layer_parameters(cfg: dict) -> int:
    d, inner, F = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    gated = str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    return 4 * d * inner + cfg.get("relative_attention_num_buckets", 32) * cfg["num_heads"] + 2 * d + (3 if gated else 2) * d * F


def _umt5_linear_parameters(cfg: dict) -> Tuple[int, int]:
    """(weight elements, output features) of the Linears 8-bit formats quantize: q, k, v, o and
    wi (not wo, see UMT5_INT8_EXCLUDE)."""
    d, inner, F = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    gated = str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    ffn_w = (2 if gated else 1) * d * F
    ffn_out = (2 if gated else 1) * F
    return cfg["num_layers"] * (4 * d * inner + ffn_w), cfg["num_layers"] * (3 * inner + d + ffn_out)


def _meta_umt5(cfg: dict):
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(UMT5Config(**cfg))


def _meta_wan_vae(cfg: dict):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**cfg)


def _have(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


@functools.lru_cache(maxsize=16)
def _text_encoder_parameters(cfg_items: tuple) -> int:
    cfg = dict(cfg_items)
    if _have("transformers"):
        return sum(p.numel() for p in _meta_umt5(cfg).parameters())
    return _umt5_parameters(cfg)


def text_encoder_bytes(cfg: Optional[dict] = None, fmt: str = "bf16") -> int:
    """Weight bytes of the UMT5 encoder in "bf16" or "int8" (Linear weights int8 with an fp32
    scale per output channel; embeddings and norms stay bf16)."""
    cfg = dict(UMT5_XXL_CONFIG if cfg is None else cfg)
    n = _text_encoder_parameters(tuple(sorted((k, str(v) if isinstance(v, list) else v) for k, v in cfg.items())))
    if fmt == "bf16":
        return 2 * n
    if fmt == "int8":
        linear, outs = _umt5_linear_parameters(cfg)
        return 2 * (n - linear) + linear + 4 * outs
    raise ValueError(f"text encoder format must be 'bf16' or 'int8', got {fmt!r}")


@functools.lru_cache(maxsize=16)
def _vae_parameters(cfg_items: tuple) -> int:
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg_items}
    if _have("diffusers"):
        return sum(p.numel() for p in _meta_wan_vae(cfg).parameters())
    if cfg == {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in WAN21_VAE_CONFIG.items()}:
        return WAN21_VAE_PARAMETERS
    raise RuntimeError("counting the weights of a VAE other than Wan 2.1's needs diffusers: pip install 'longcat-accel[pipeline]'")


def vae_bytes(cfg: Optional[dict] = None, bytes_per_element: int = 2) -> int:
    cfg = dict(WAN21_VAE_CONFIG if cfg is None else cfg)
    return bytes_per_element * _vae_parameters(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items())))


# ----------------------------------------------------------------------------- activations


def text_encoder_activation_bytes(cfg: Optional[dict] = None, prompts: int = 1, text_len: int = 512, a: int = 2) -> int:
    cfg = dict(UMT5_XXL_CONFIG if cfg is None else cfg)
    B, L, d, F, H = prompts, text_len, cfg["d_model"], cfg["d_ff"], cfg["num_heads"]
    return 6 * B * L * d * a + max(3 * B * L * F * a, 4 * B * H * L * L * a)


def _pixel_frames(latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1  # the first frame is kept, then 4 frames per latent frame


def _vae_unit(cfg: dict, h: int, w: int, a: int) -> int:
    """u of the module docstring; the traced constants hold for the Wan 2.1 architecture (any
    base_dim and z_dim)."""
    for key in ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample"):
        if list(_as_list(cfg.get(key, WAN21_VAE_CONFIG[key]))) != list(_as_list(WAN21_VAE_CONFIG[key])):
            raise ValueError(f"the VAE activation formulas hold for the Wan 2.1 architecture: {key} must be "
                             f"{WAN21_VAE_CONFIG[key]}, got {cfg.get(key)!r}")
    return cfg.get("base_dim", 96) * (8 * h) * (8 * w) * a


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def vae_tile_shape(latent_hw: Sequence[int], tile: int, halo: int) -> Tuple[int, int]:
    """The largest tile (height, width in latent pixels, context included) WanVAETiler decodes."""
    return tuple(max(d1 - d0 for d0, d1, _, _ in tile_spans(size, tile, 0, halo)) for size in latent_hw)


def vae_tile_overhead(latent_hw: Sequence[int], tile: int, halo: int = WAN21_DECODE_HALO) -> float:
    """Area decoded with tiles of ``tile`` latent pixels over the frame's area (the halos are
    decoded twice): the relative time of a tiled decode."""
    H, W = latent_hw
    rows, cols = tile_spans(H, tile, 0, halo), tile_spans(W, tile, 0, halo)
    return sum(d1 - d0 for d0, d1, _, _ in rows) * sum(d1 - d0 for d0, d1, _, _ in cols) / (H * W)


for _tile in (96, 64, 48):
    TACTIC_COST["vae_tile"][_tile] = round(VAE_TIME_SHARE_PCT * (vae_tile_overhead(STAGES["refine"]["latent"][1:], _tile) - 1), 2)


def _decode_peak(cfg: dict, h: int, w: int, frames: int, a: int, batch: int) -> int:
    """Decoding latents of h x w whole (diffusers' decode): working set beside the frames decoded
    so far, or the final concatenation and clamp (2x the output), whichever is larger."""
    out = batch * 3 * frames * (8 * h) * (8 * w) * a
    return max(int(VAE_DECODE_UNITS * batch * _vae_unit(cfg, h, w, a)) + out, 2 * out)


def _features_bytes(cfg: dict, T: int, H: int, W: int, a: int, batch: int) -> int:
    """The middle block's features of every frame, which WanVAETiler keeps at latent resolution."""
    return batch * cfg.get("base_dim", 96) * _as_list(cfg.get("dim_mult", WAN21_VAE_CONFIG["dim_mult"]))[-1] * T * H * W * a


def vae_decode_bytes(latent: Sequence[int], cfg: Optional[dict] = None, tile: Optional[int] = None,
                     a: int = 2, batch: int = 1) -> Dict[str, int]:
    """Activation peak of decoding latents (T, H, W): {"decode", "output", "peak"} ("decode": the
    decoder's working set, of the whole frame or of one tile with its halo; "output": with tiles,
    the output video and the middle block's features beside it)."""
    cfg = dict(WAN21_VAE_CONFIG if cfg is None else cfg)
    T, H, W = latent
    frames = _pixel_frames(T)
    if tile is None or (tile >= H and tile >= W):
        work = _decode_peak(cfg, H, W, frames, a, batch)
        return {"decode": work, "output": 0, "peak": work}
    th, tw = vae_tile_shape((H, W), tile, WAN21_DECODE_HALO)
    work = int(VAE_DECODE_UNITS * batch * _vae_unit(cfg, th, tw, a))
    held = batch * 3 * frames * (8 * H) * (8 * W) * a + _features_bytes(cfg, T, H, W, a, batch)
    return {"decode": work, "output": held, "peak": held + work}


def vae_encode_bytes(latent: Sequence[int], cfg: Optional[dict] = None, tile: Optional[int] = None,
                     a: int = 2, batch: int = 1) -> Dict[str, int]:
    """Activation peak of encoding the video of latent grid (T, H, W): {"input", "working set", "peak"}.
    Untiled, the video is on the GPU; tiled, it stays on the CPU and one tile (with its halo)
    at a time moves. "working set" is everything beyond the input: untiled, the encoder's copy of
    the video, its temporaries and the latents (mean and log-variance in fp32); tiled, the tile's
    temporaries, the middle block's features of every frame, the mean and log-variance, and the
    mean's fp32 copy."""
    cfg = dict(WAN21_VAE_CONFIG if cfg is None else cfg)
    T, H, W = latent
    frames = _pixel_frames(T)
    z = cfg.get("z_dim", 16)
    if tile is None or (tile >= H and tile >= W):
        video = batch * 3 * frames * (8 * H) * (8 * W) * a
        work = video + int(VAE_ENCODE_UNITS * batch * _vae_unit(cfg, H, W, a)) + batch * 2 * z * T * H * W * 4
        return {"input": video, "working set": work, "peak": video + work}
    th, tw = vae_tile_shape((H, W), tile, WAN21_ENCODE_HALO)
    video = batch * 3 * frames * (8 * th) * (8 * tw) * a
    # The chunk of frames being convolved, joined to its 2 cached frames and padded (2 x 6 frames),
    # and the 2 frames cached for the next chunk: 14 frames of the tile (1% of u at base_dim 96).
    chunk = batch * 14 * 3 * (8 * th) * (8 * tw) * a
    work = (int(VAE_ENCODE_UNITS * batch * _vae_unit(cfg, th, tw, a)) + chunk + _features_bytes(cfg, T, H, W, a, batch)
            + batch * z * T * H * W * (2 * a + 4))
    return {"input": video, "working set": work, "peak": video + work}


# ----------------------------------------------------------------------------- tactics and plans


@dataclass(frozen=True)
class PipelineTactics:
    """How the pipeline saves memory.

    text_encoder: "gpu" (bf16, resident throughout), "gpu-int8", "offload" (bf16 on the GPU to
        encode, then moved to the CPU), "offload-int8", "offload-blocks" (bf16 layers in pinned CPU
        memory, each copied to the GPU as it runs with the next one prefetched; the embedding
        table looks up on the CPU), "cpu" (encoded on the CPU).
    dit_weights: "bf16", "fp8" or "int8" (weight-only 8-bit).
    offload_prefetch: None (DiT blocks resident) or the block-offload prefetch depth.
    attention_chunk_frames / ffn_chunk_frames: frame chunking of the DiT blocks (``accelerate``).
    vae_tile: tiled VAE encode and decode (``WanVAETiler``, same result as whole frames): the
        largest tile side in latent pixels, context included (None: whole frames).
    """

    text_encoder: str = "gpu"
    dit_weights: str = "bf16"
    offload_prefetch: Optional[int] = None
    attention_chunk_frames: Optional[int] = None
    ffn_chunk_frames: Optional[int] = None
    vae_tile: Optional[int] = None

    def __post_init__(self):
        if self.text_encoder not in TEXT_ENCODER_TACTICS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODER_TACTICS}, got {self.text_encoder!r}")
        if self.dit_weights not in ("bf16", "fp8", "int8"):
            raise ValueError(f"dit_weights must be 'bf16', 'fp8' or 'int8', got {self.dit_weights!r}")
        for name in ("offload_prefetch", "attention_chunk_frames", "ffn_chunk_frames", "vae_tile"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be None or a positive int, got {v!r}")
        if self.vae_tile is not None and self.vae_tile <= 2 * WAN21_DECODE_HALO:
            raise ValueError(f"vae_tile must exceed twice the VAE tiles' halo ({2 * WAN21_DECODE_HALO} latent pixels), "
                             f"got {self.vae_tile}")

    def cost(self) -> float:
        """Estimated added time in percent (``TACTIC_COST``)."""
        c = TACTIC_COST
        return (c["text_encoder"][self.text_encoder] + c["dit_weights"][self.dit_weights]
                + c["attention_chunk_frames"].get(self.attention_chunk_frames, 3.0)
                + c["ffn_chunk_frames"].get(self.ffn_chunk_frames, 1.5)
                + c["offload_prefetch"].get(self.offload_prefetch, 6.0)
                + c["vae_tile"].get(self.vae_tile, 12.0))

    def accelerate_kwargs(self) -> dict:
        """The ``longcat.accelerate`` keyword arguments for the DiT part of these tactics."""
        return dict(quantize=None if self.dit_weights == "bf16" else self.dit_weights,
                    offload="blocks" if self.offload_prefetch else None, offload_prefetch=self.offload_prefetch or 1,
                    attention_chunk_frames=self.attention_chunk_frames, ffn_chunk_frames=self.ffn_chunk_frames)

    def __str__(self) -> str:
        parts = [f"text encoder {self.text_encoder}", f"DiT {self.dit_weights}"]
        parts.append(f"block offload (prefetch {self.offload_prefetch})" if self.offload_prefetch else "DiT resident")
        if self.attention_chunk_frames or self.ffn_chunk_frames:
            parts.append(f"chunks: blocks {self.attention_chunk_frames or 'whole'}, FFN {self.ffn_chunk_frames or self.attention_chunk_frames or 'whole'} frames")
        parts.append(f"VAE tiles of {self.vae_tile} latent pixels" if self.vae_tile else "VAE untiled")
        return ", ".join(parts)


@dataclass
class PhasePlan:
    name: str
    weights: Dict[str, int]  # component -> bytes resident on the GPU during this phase
    activations: Dict[str, int]  # what is alive beyond the weights at the phase's worst point
    peak_bytes: int

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())


@dataclass
class PipelinePlan:
    stage: str
    latent: Tuple[int, int, int]
    batch: int
    tactics: PipelineTactics
    phases: List[PhasePlan]
    settings: Dict[str, object] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    def as_dict(self) -> dict:
        return dict(stage=self.stage, latent=list(self.latent), batch=self.batch, tactics=asdict(self.tactics),
                    peak_bytes=self.peak_bytes, settings=self.settings,
                    phases=[dict(name=p.name, weights=p.weights, activations=p.activations, peak_bytes=p.peak_bytes) for p in self.phases])

    def __str__(self) -> str:
        lines = [f"pipeline memory plan (planned, not measured): {self.stage} stage, latent {self.latent} x batch {self.batch}",
                 f"  tactics: {self.tactics}"]
        for p in self.phases:
            lines.append(f"  {p.name:<16} weights {p.weights_bytes / GB:6.2f} GB + activations {p.activation_bytes / GB:6.2f} GB"
                         f" = {p.peak_bytes / GB:6.2f} GB")
        lines.append(f"  planned peak     {self.peak_bytes / GB:6.2f} GB")
        return "\n".join(lines)


def _dit_plan(dit, latent, batch, tactics: PipelineTactics, attention: str, text_len: int):
    return plan_memory(dit, latent=latent, batch=batch, weights=tactics.dit_weights, fused=True, attention=attention,
                       ffn_chunk_frames=tactics.ffn_chunk_frames, attention_chunk_frames=tactics.attention_chunk_frames,
                       offload="blocks" if tactics.offload_prefetch else None, prefetch_blocks=tactics.offload_prefetch or 1,
                       text_len=text_len)


def _hashable(dit):
    if isinstance(dit, str):
        return dit
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(dit).items()))


@functools.lru_cache(maxsize=4096)
def _dit_plan_cached(dit, latent, batch, weights, offload_prefetch, attention_chunk_frames, ffn_chunk_frames, attention, text_len):
    t = PipelineTactics(dit_weights=weights, offload_prefetch=offload_prefetch, attention_chunk_frames=attention_chunk_frames,
                        ffn_chunk_frames=ffn_chunk_frames)
    return _dit_plan(dit if isinstance(dit, str) else dict(dit), latent, batch, t, attention, text_len)


def plan_pipeline(
    stage: str = "refine",
    tactics: PipelineTactics = PipelineTactics(),
    *,
    temporal_doubling: bool = True,
    latent: Optional[Sequence[int]] = None,
    batch: Optional[int] = None,
    dit: str = "longcat-video",
    text_encoder: Optional[dict] = None,
    vae: Optional[dict] = None,
    text_len: int = 512,
    attention: Optional[str] = None,
) -> PipelinePlan:
    """Planned peak GPU memory of each phase of ``stage`` ("base": 480p text-to-video; "refine":
    720p refinement of the stage-1 video) under ``tactics``.

    temporal_doubling: the refinement doubles the frame rate (48 latent frames; False: 24).
    latent / batch: override the stage's latent grid (T, H, W) and DiT batch (CFG doubles it).
    dit: a preset name or config dict; text_encoder / vae: configs (default UMT5-XXL, Wan 2.1).
    attention: the DiT's attention ("bsa" for the refinement, "dense" for the base stage by default).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    if not isinstance(tactics, PipelineTactics):
        raise TypeError(f"tactics must be a PipelineTactics, got {type(tactics).__name__}")
    spec = STAGES[stage]
    if latent is None:
        latent = spec["latent"]
        if stage == "refine" and not temporal_doubling:
            latent = (latent[0] // 2, *latent[1:])
    latent = tuple(int(v) for v in latent)
    if len(latent) != 3 or min(latent) < 1:
        raise ValueError(f"latent must be three positive ints (T, H, W), got {latent!r}")
    batch = spec["batch"] if batch is None else int(batch)
    attention = attention or ("bsa" if stage == "refine" else "dense")
    te_cfg = dict(UMT5_XXL_CONFIG if text_encoder is None else text_encoder)
    vae_cfg = dict(WAN21_VAE_CONFIG if vae is None else vae)
    a = 2  # bf16 activations

    step = _dit_plan_cached(_hashable(dit), latent, batch, tactics.dit_weights, tactics.offload_prefetch,
                            tactics.attention_chunk_frames, tactics.ffn_chunk_frames, attention, text_len)
    # With block offload the blocks live on the CPU outside the denoising loop too.
    dit_at_rest = step.weights_outside_blocks_bytes if tactics.offload_prefetch else step.weights_total_bytes
    te_fmt = "int8" if tactics.text_encoder.endswith("int8") else "bf16"
    te_weights = text_encoder_bytes(te_cfg, te_fmt)
    te_resident_after = te_weights if tactics.text_encoder in ("gpu", "gpu-int8") else 0
    if tactics.text_encoder == "offload-blocks":  # two layers (one running, one prefetched) and the final norm
        te_encoding = 2 * (2 * _umt5_layer_parameters(te_cfg) + te_cfg["d_model"])
    else:
        te_encoding = te_weights if tactics.text_encoder != "cpu" else 0
    vae_w = vae_bytes(vae_cfg)
    prompts = batch  # one prompt (and its negative under CFG) per DiT batch row
    embeds = prompts * text_len * te_cfg["d_model"] * a
    T, H, W = latent
    latents = batch * vae_cfg.get("z_dim", 16) * T * H * W * 4  # fp32 latents of the denoising loop
    tile = tactics.vae_tile

    phases = []
    te_on_gpu = tactics.text_encoder != "cpu"
    phases.append(PhasePlan(
        "text encoding",
        {"text encoder": te_encoding, "dit": dit_at_rest, "vae": vae_w},
        {"text encoder": text_encoder_activation_bytes(te_cfg, prompts, text_len, a) if te_on_gpu else 0, "embeddings": embeds},
        0))
    if stage == "refine":
        enc = vae_encode_bytes(latent, vae_cfg, tile, a, batch=1)
        phases.append(PhasePlan(
            "vae encode", {"text encoder": te_resident_after, "dit": dit_at_rest, "vae": vae_w},
            {"video": enc["input"], "vae encoder": enc["working set"], "embeddings": embeds}, 0))
    phases.append(PhasePlan(
        "denoising step", {"text encoder": te_resident_after, "dit": step.weights_resident_bytes, "vae": vae_w},
        {"dit": step.activation_peak_bytes, "latents": 3 * latents, "embeddings": embeds}, 0))  # latents, prediction, update
    dec = vae_decode_bytes(latent, vae_cfg, tile, a, batch=1)
    phases.append(PhasePlan(
        "vae decode", {"text encoder": te_resident_after, "dit": dit_at_rest, "vae": vae_w},
        {"latents": latents, "vae decoder": dec["peak"]}, 0))
    for p in phases:
        p.peak_bytes = p.weights_bytes + p.activation_bytes
    return PipelinePlan(stage=stage, latent=latent, batch=batch, tactics=tactics, phases=phases,
                        settings=dict(attention=attention, text_len=text_len, dit=dit if isinstance(dit, str) else "config",
                                      temporal_doubling=temporal_doubling))


# ----------------------------------------------------------------------------- fitting


def _fmt_gb(n: int) -> str:
    return f"{math.ceil(n / 1e8) / 10:.1f} GB"


def _choose(candidates: Iterable[Tuple[PipelineTactics, int]], budget: int, what: str):
    best, smallest = None, None
    for tactics, peak in candidates:
        if smallest is None or peak < smallest[1]:
            smallest = (tactics, peak)
        if peak <= budget:
            key = (tactics.cost(), peak)
            if best is None or key < best[0]:
                best = (key, tactics, peak)
    if best is None:
        raise MemoryBudgetError(
            f"no tactics fit {what} in {_fmt_gb(budget)}: the smallest planned peak is {_fmt_gb(smallest[1])} "
            f"({smallest[0]}); give memory_budget of at least {_fmt_gb(smallest[1])}")
    return best[1], best[2]


def _space(fixed: dict) -> Iterable[PipelineTactics]:
    axes = dict(
        text_encoder=list(TACTIC_COST["text_encoder"]),
        dit_weights=list(TACTIC_COST["dit_weights"]),
        offload_prefetch=list(TACTIC_COST["offload_prefetch"]),
        attention_chunk_frames=list(TACTIC_COST["attention_chunk_frames"]),
        ffn_chunk_frames=list(TACTIC_COST["ffn_chunk_frames"]),
        vae_tile=list(TACTIC_COST["vae_tile"]),
    )
    for k, v in fixed.items():
        if k not in axes:
            raise ValueError(f"unknown tactic {k!r}; tactics: {sorted(axes)}")
        axes[k] = [v]
    names = list(axes)
    for values in itertools.product(*axes.values()):
        kw = dict(zip(names, values))
        if kw["ffn_chunk_frames"] and kw["attention_chunk_frames"] and kw["ffn_chunk_frames"] > kw["attention_chunk_frames"]:
            continue  # an FFN chunk larger than the block chunk is the block chunk
        yield PipelineTactics(**kw)


def fit_pipeline(memory_budget: Union[int, float, str], stage: str = "refine", *, fixed: Optional[dict] = None,
                 verbose: bool = False, **plan_kwargs) -> PipelinePlan:
    """The plan of the cheapest tactics (``TACTIC_COST``) whose planned peak fits ``memory_budget``.

    fixed: tactics the user has decided (e.g. ``{"dit_weights": "fp8"}``); the rest are searched.
    plan_kwargs: as ``plan_pipeline`` (temporal_doubling, latent, batch, dit, text_encoder, vae, ...).
    Raises MemoryBudgetError naming the smallest budget that fits when nothing does."""
    budget = parse_memory_size(memory_budget)
    candidates = ((t, plan_pipeline(stage, t, **plan_kwargs).peak_bytes) for t in _space(fixed or {}))
    tactics, _ = _choose(candidates, budget, f"the {stage} pipeline")
    plan = plan_pipeline(stage, tactics, **plan_kwargs)
    if verbose:
        print(f"memory budget {_fmt_gb(budget)}: chosen {tactics}; planned peak {_fmt_gb(plan.peak_bytes)}")
    return plan


def fit_dit(memory_budget: Union[int, float, str], model_or_config="longcat-video", *, latent: Sequence[int] = (48, 88, 160),
            batch: int = 1, attention: str = "bsa", fixed: Optional[dict] = None, text_len: int = 512) -> Tuple[PipelineTactics, object]:
    """The cheapest DiT tactics (weights format, block offload, frame chunking) whose planned
    denoising-step peak fits ``memory_budget``: returns (tactics, ``MemoryPlan``)."""
    budget = parse_memory_size(memory_budget)
    fixed = dict(fixed or {})
    fixed.update(text_encoder="gpu", vae_tile=None)  # not part of the DiT
    latent = tuple(int(v) for v in latent)

    def plan(t):
        return _dit_plan(model_or_config, latent, batch, t, attention, text_len)

    plans = {}
    def candidates():
        for t in _space(fixed):
            plans[t] = plan(t)
            yield t, plans[t].peak_bytes

    tactics, _ = _choose(candidates(), budget, f"a denoising step at latent {latent} x batch {batch}")
    return tactics, plans[tactics]
