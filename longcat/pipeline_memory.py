"""Helpers that keep the rest of a LongCat-Video pipeline off the GPU while the DiT runs.

The UMT5-XXL text encoder (11.4 GB in bf16) is only needed once per prompt: encode, then move
it to the CPU. The Wan VAE decodes the whole video at once unless told otherwise: decode it in
overlapping spatial tiles. Example, with an upstream pipeline ``pipe``::

    embeds, mask = encode_prompts_then_offload(pipe.text_encoder, pipe.tokenizer, ["a cat"], "cuda")
    ...denoise with the (accelerated) DiT...
    video = decode_latents_tiled(pipe.vae.decode, latents, tile=32, overlap=8)
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["offload_to_cpu", "encode_prompts_then_offload", "decode_latents_tiled"]


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
    tile's decode instead of the whole video's."""
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    _, _, _, H, W = latents.shape
    stride = tile - overlap
    out = weight = None
    hs, ws = _starts(H, tile, stride), _starts(W, tile, stride)
    for h0 in hs:
        for w0 in ws:
            th, tw = min(tile, H - h0), min(tile, W - w0)
            part = decode(latents[..., h0:h0 + th, w0:w0 + tw])
            part = part.sample if hasattr(part, "sample") else part
            if out is None:
                out = torch.zeros(*part.shape[:3], H * scale, W * scale, dtype=torch.float32, device=part.device)
                weight = torch.zeros(H * scale, W * scale, dtype=torch.float32, device=part.device)
            wy = _ramp(th * scale, overlap * scale if len(hs) > 1 else 0, h0 == 0, h0 + th == H, part.device)
            wx = _ramp(tw * scale, overlap * scale if len(ws) > 1 else 0, w0 == 0, w0 + tw == W, part.device)
            w2 = wy[:, None] * wx[None, :]
            ys, xs = slice(h0 * scale, (h0 + th) * scale), slice(w0 * scale, (w0 + tw) * scale)
            out[..., ys, xs] += part.float() * w2
            weight[ys, xs] += w2
    return (out / weight).to(latents.dtype if latents.is_floating_point() else torch.float32)
