"""Helpers that keep the rest of a LongCat-Video pipeline off the GPU while the DiT runs.

The UMT5-XXL text encoder (11.4 GB in bf16) is only needed once per prompt: encode, then move
it to the CPU. The Wan VAE decodes the whole video at once unless told otherwise: decode it in
overlapping spatial tiles (and encodes a video the same way, the video staying on the CPU). Which
tactics fit a memory budget: ``longcat.pipeline_plan.fit_pipeline``. Example, with an upstream
pipeline ``pipe``::

    embeds, mask = encode_prompts_then_offload(pipe.text_encoder, pipe.tokenizer, ["a cat"], "cuda")
    ...denoise with the (accelerated) DiT...
    video = decode_latents_tiled(pipe.vae.decode, latents, tile=32, overlap=8)
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["offload_to_cpu", "encode_prompts_then_offload", "decode_latents_tiled", "encode_video_tiled"]


def offload_to_cpu(module: nn.Module) -> nn.Module:
    """Move ``module`` to the CPU and return its GPU memory to the allocator's free pool."""
    module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return module


@torch.no_grad()
def encode_prompts_then_offload(
    text_encoder: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    device="cuda",
    max_length: int = 512,
    offload: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode ``prompts`` with a Hugging Face encoder and tokenizer, then move the encoder off the
    GPU. Returns (embeddings [B, 1, L, C], attention mask [B, 1, 1, L]) in the DiT's layout."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    text_encoder.to(device)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if offload:
        offload_to_cpu(text_encoder)
    return hidden.unsqueeze(1), mask[:, None, None, :]


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """Blend weights along one axis of a tile: linear ramps over the overlaps shared with
    neighbours, 1 elsewhere (no ramp at the video's own borders)."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 1) / (overlap + 1)
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[-overlap:] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> List[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _blend_tiles(fn, x: torch.Tensor, tile: int, overlap: int, scale: float, device, out_dtype) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of x [B, C, T, H, W] (tile and overlap in x's
    pixels), each tile moved to ``device``; its output has ``scale`` times x's height and width.
    Tiles are blended linearly across the overlaps in an fp32 accumulator on ``device``."""
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    _, _, _, H, W = x.shape
    stride = tile - overlap
    out = weight = None
    hs, ws = _starts(H, tile, stride), _starts(W, tile, stride)
    for h0 in hs:
        for w0 in ws:
            th, tw = min(tile, H - h0), min(tile, W - w0)
            part = fn(x[..., h0:h0 + th, w0:w0 + tw].to(device))
            part = part.sample if hasattr(part, "sample") else part
            oh, ow = round(H * scale), round(W * scale)
            if out is None:
                out = torch.zeros(*part.shape[:3], oh, ow, dtype=torch.float32, device=part.device)
                weight = torch.zeros(oh, ow, dtype=torch.float32, device=part.device)
            y0, x0, ph, pw = round(h0 * scale), round(w0 * scale), part.shape[-2], part.shape[-1]
            wy = _ramp(ph, round(overlap * scale) if len(hs) > 1 else 0, h0 == 0, h0 + th == H, part.device)
            wx = _ramp(pw, round(overlap * scale) if len(ws) > 1 else 0, w0 == 0, w0 + tw == W, part.device)
            w2 = wy[:, None] * wx[None, :]
            out[..., y0:y0 + ph, x0:x0 + pw] += part.float() * w2
            weight[y0:y0 + ph, x0:x0 + pw] += w2
            del part
    return out.div_(weight).to(out_dtype)  # in place: the fp32 accumulator and the cast output only


@torch.no_grad()
def decode_latents_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int = 32,
    overlap: int = 8,
    scale: int = 8,
) -> torch.Tensor:
    """Decode latents [B, C, T, H, W] in overlapping spatial tiles of ``tile`` latent pixels and
    blend the decoded tiles linearly across the overlaps; ``decode`` maps latents to pixels
    [B, 3, T', H*scale, W*scale] (e.g. ``vae.decode`` returning a tensor). Peak memory is one
    tile's decode plus the fp32 accumulator of the output instead of the whole video's decode."""
    dtype = latents.dtype if latents.is_floating_point() else torch.float32
    return _blend_tiles(decode, latents, tile, overlap, scale, latents.device, dtype)


@torch.no_grad()
def encode_video_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    video: torch.Tensor,
    tile: int = 32,
    overlap: int = 8,
    scale: int = 8,
    device=None,
) -> torch.Tensor:
    """Encode a video [B, 3, F, H, W] in overlapping spatial tiles of ``tile`` latent pixels
    (``tile * scale`` video pixels), blending the latent tiles across the overlaps; ``encode``
    maps a video tile to latents (e.g. ``lambda v: vae.encode(v).latent_dist.mode()``). Each tile
    is moved to ``device`` (default: the video's), so the video itself can stay on the CPU.
    Returns float32 latents on ``device``."""
    if video.shape[-2] % scale or video.shape[-1] % scale:
        raise ValueError(f"video height and width must be multiples of scale={scale}, got {tuple(video.shape[-2:])}")
    device = video.device if device is None else torch.device(device)
    return _blend_tiles(encode, video, tile * scale, overlap * scale, 1 / scale, device, torch.float32)
