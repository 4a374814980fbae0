"""Helpers that keep the rest of a LongCat-Video pipeline off the GPU while the DiT runs.

The UMT5-XXL text encoder (11.4 GB in bf16) is only needed once per prompt: encode, then move
it to the CPU. The Wan VAE decodes whole frames unless told otherwise; ``WanVAETiler`` decodes
(and encodes) it in spatial tiles with the same result as the whole-frame decode, and
``decode_latents_tiled`` / ``encode_video_tiled`` tile any decoder or encoder given as a function.
Which tactics fit a memory budget: ``longcat.pipeline_plan.fit_pipeline``. Example, with an
upstream pipeline ``pipe``::

    embeds, mask = encode_prompts_then_offload(pipe.text_encoder, pipe.tokenizer, ["a cat"], "cuda")
    ...denoise with the (accelerated) DiT...
    video = WanVAETiler(pipe.vae).decode(latents, tile=64)

Why tiles can be exact: a layer that reads a k x k neighbourhood makes the outermost k // 2
pixels of a tile wrong (they see the tile's zero padding instead of the neighbour's pixels), and
the errors move inwards one layer at a time. A tile decoded with ``halo`` pixels of context beyond
the part it keeps, ``halo`` at least the decoder's receptive margin (``receptive_margin``), gives
the kept part exactly. Blending overlapping tiles instead (``overlap``) only hides the seams.
Attention over a whole frame is not local at all: the Wan VAE has one such layer in the middle
block of its decoder and of its encoder, both at latent resolution, so ``WanVAETiler`` runs those
on whole frames and tiles only the convolutional part at higher resolution, which holds nearly
all of the VAE's memory.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["offload_to_cpu", "encode_prompts_then_offload", "tile_spans", "receptive_margin", "decode_latents_tiled",
           "encode_video_tiled", "WanVAETiler"]


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


# ----------------------------------------------------------------------------- tile geometry


def tile_spans(size: int, tile: int, overlap: int = 0, halo: int = 0) -> List[Tuple[int, int, int, int]]:
    """Split an axis of ``size`` pixels into tiles: (start, end) of each tile as decoded, then
    (start, end) of the part of it that is kept. The kept parts cover the axis, neighbours' kept
    parts share ``overlap`` pixels (to be blended), and a tile reaches ``halo`` pixels beyond its
    kept part on each side that has a neighbour (context, decoded and discarded). No tile is
    longer than ``tile``; the fewest tiles that allows are used, their kept parts as equal as
    integers allow."""
    for name, v in (("size", size), ("tile", tile), ("overlap", overlap), ("halo", halo)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name in ("size", "tile") else 0):
            raise ValueError(f"{name} must be a {'positive' if name in ('size', 'tile') else 'non-negative'} int, got {v!r}")
    if size <= tile:
        return [(0, size, 0, size)]
    inner = tile - 2 * halo  # the most an interior tile keeps
    if inner <= overlap:
        raise ValueError(f"tile must exceed 2 * halo + overlap to split an axis of {size} pixels: "
                         f"tile={tile}, halo={halo}, overlap={overlap}")
    # n tiles keep at most n * inner + 2 * halo pixels (the two end tiles have one neighbour), less
    # the n - 1 shared overlaps.
    n = max(2, math.ceil((size - 2 * halo - overlap) / (inner - overlap)))
    free = size - 2 * halo + (n - 1) * overlap  # what the n kept parts hold beyond the end tiles' halos
    lengths = [free // n + (1 if i < free % n else 0) for i in range(n)]
    spans, end = [], halo  # the first kept part is its length plus the halo it needs no context for
    for i, length in enumerate(lengths):
        start = 0 if i == 0 else end - overlap
        end = size if i == n - 1 else start + length + (halo if i == 0 else 0)
        spans.append((max(0, start - halo), min(size, end + halo), start, end))
    return spans


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """Blend weights along one axis of a kept part: linear ramps over the overlaps shared with
    neighbours, 1 elsewhere (the ramps of two neighbours sum to 1)."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 1) / (overlap + 1)
        if not at_start:
            w[:overlap] = torch.minimum(w[:overlap], ramp[:n])
        if not at_end:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0)[-n:])
    return w


def receptive_margin(modules: Iterable[nn.Module]) -> float:
    """How far, in input pixels, wrong values at a tile's border reach into the output of
    ``modules`` run in the given order (each module's convolutions and upsamplings in
    registration order, which is the order the Wan VAE runs them in). Convolutions add
    (k // 2) pixels at their own resolution (strided ones as the comment below says);
    nearest upsampling scales what is already wrong; 1x1 layers, norms over channels and
    activations add nothing. Attention is refused: it is not local, no margin makes it exact."""
    margin, scale = 0.0, 1.0  # scale: pixels of the current resolution per input pixel
    for top in modules:
        for m in top.modules():
            if "Attention" in type(m).__name__:
                raise ValueError(f"{type(m).__name__} attends over the whole frame: tiles through it cannot be exact")
            if isinstance(m, nn.Upsample):
                factor = m.scale_factor if isinstance(m.scale_factor, (tuple, list)) else (m.scale_factor,)
                if m.mode not in ("nearest", "nearest-exact") or any(float(f) != int(f) for f in factor):
                    raise ValueError(f"receptive_margin handles nearest upsampling by whole factors, got {m}")
                scale *= int(factor[-1])
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                k, stride, dilation = m.kernel_size[-1], m.stride[-1], m.dilation[-1]
                reach = dilation * (k - 1)
                if stride == 1:
                    margin += (reach // 2) / scale
                else:
                    # an output pixel is wrong if any of its reach + 1 inputs is (zero padding on
                    # the far side, as the Wan VAE pads): ceil((m + reach - 1) / stride) of them
                    wrong = math.ceil((margin * scale + reach - 1) / stride)
                    scale /= stride
                    margin = wrong / scale
    return margin


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, halo: int, in_scale: int, out_scale: int, device,
           out_dtype) -> torch.Tensor:
    """Apply ``fn`` to spatial tiles of x [B, C, T, H, W] (``tile``, ``overlap`` and ``halo`` in
    units of ``in_scale`` pixels of x, which become ``out_scale`` pixels of the output), each tile
    moved to ``device``; keep each tile's kept part and blend across overlaps in an fp32
    accumulator (without overlaps, kept parts are written straight into the output)."""
    H, W = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_spans(H, tile, overlap, halo), tile_spans(W, tile, overlap, halo)
    out = weight = None
    for d0, d1, k0, k1 in rows:
        for e0, e1, l0, l1 in cols:
            part = fn(x[..., d0 * in_scale:d1 * in_scale, e0 * in_scale:e1 * in_scale].to(device))
            part = part.sample if hasattr(part, "sample") else part
            if tuple(part.shape[-2:]) != ((d1 - d0) * out_scale, (e1 - e0) * out_scale):
                raise ValueError(f"a tile of {(d1 - d0) * in_scale} x {(e1 - e0) * in_scale} pixels came back as "
                                 f"{tuple(part.shape[-2:])}; expected {out_scale / in_scale:g} times its size")
            o = out_scale
            part = part[..., (k0 - d0) * o:(k1 - d0) * o, (l0 - e0) * o:(l1 - e0) * o]
            if out is None:
                shape = (*part.shape[:3], H * o, W * o)
                if overlap:
                    out = torch.zeros(shape, dtype=torch.float32, device=part.device)
                    weight = torch.zeros(H * o, W * o, dtype=torch.float32, device=part.device)
                else:
                    out = torch.empty(shape, dtype=out_dtype, device=part.device)
            if overlap:
                wy = _ramp((k1 - k0) * o, overlap * o, k0 == 0, k1 == H, part.device)
                wx = _ramp((l1 - l0) * o, overlap * o, l0 == 0, l1 == W, part.device)
                w2 = wy[:, None] * wx[None, :]
                out[..., k0 * o:k1 * o, l0 * o:l1 * o] += part.float() * w2
                weight[k0 * o:k1 * o, l0 * o:l1 * o] += w2
            else:
                out[..., k0 * o:k1 * o, l0 * o:l1 * o] = part
            del part
    return out.div_(weight).to(out_dtype) if overlap else out  # in place: the fp32 accumulator and the cast only


@torch.no_grad()
def decode_latents_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int = 32,
    overlap: int = 8,
    scale: int = 8,
    halo: int = 0,
) -> torch.Tensor:
    """Decode latents [B, C, T, H, W] in spatial tiles of at most ``tile`` latent pixels;
    ``decode`` maps latents to pixels [B, 3, T', H*scale, W*scale] (e.g. ``vae.decode``). Each
    tile is decoded with ``halo`` latent pixels of context that are then discarded, and
    neighbouring tiles are blended linearly over ``overlap`` latent pixels. With ``halo`` at least
    the decoder's receptive margin (``receptive_margin``) and a decoder made of local layers, the
    result equals the whole decode; ``WanVAETiler`` does this for the Wan VAE, whose attention is
    not local. Peak memory: one tile's decode plus the output (and, with an overlap, its fp32
    accumulator)."""
    dtype = latents.dtype if latents.is_floating_point() else torch.float32
    return _tiled(decode, latents, tile, overlap, halo, 1, scale, latents.device, dtype)


@torch.no_grad()
def encode_video_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    video: torch.Tensor,
    tile: int = 32,
    overlap: int = 8,
    scale: int = 8,
    device=None,
    halo: int = 0,
) -> torch.Tensor:
    """Encode a video [B, 3, F, H, W] in spatial tiles of at most ``tile`` latent pixels
    (``tile * scale`` video pixels), with ``halo`` and ``overlap`` as in ``decode_latents_tiled``;
    ``encode`` maps a video tile to latents (e.g. ``lambda v: vae.encode(v).latent_dist.mode()``).
    Each tile is moved to ``device`` (default: the video's), so the video itself can stay on the
    CPU. Returns float32 latents on ``device``."""
    _check_video(video, scale)
    device = video.device if device is None else torch.device(device)
    return _tiled(encode, video, tile, overlap, halo, scale, 1, device, torch.float32)


def _check_video(video: torch.Tensor, scale: int) -> None:
    if video.dim() != 5:
        raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
    if video.shape[-2] % scale or video.shape[-1] % scale:
        raise ValueError(f"video height and width must be multiples of scale={scale}, got {tuple(video.shape[-2:])}")


# ----------------------------------------------------------------------------- the Wan VAE, exactly


def _cached_causal_conv(conv: nn.Module, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """A causal 3D convolution of one chunk of frames: the previous chunk's last two input frames
    stand in for its temporal padding, and this chunk's are kept for the next."""
    i = idx[0]
    last = x[:, :, -2:].clone()
    if last.shape[2] < 2 and cache[i] is not None:
        last = torch.cat([cache[i][:, :, -1:].to(last.device), last], 2)
    y = conv(x, cache[i])
    cache[i] = last
    idx[0] += 1
    return y


class WanVAETiler:
    """Spatially tiled encode and decode of diffusers' ``AutoencoderKLWan`` (the Wan 2.1 VAE that
    LongCat-Video uses) that equal the whole-frame ones.

    The decoder is cut after its middle block: the input convolution and the middle block (whose
    attention spans the frame) run on whole frames at latent resolution, into features
    [B, 4 * base_dim, T, H, W] (0.52 GB at 720p in bf16); the upsampling blocks and the output
    convolution run per tile, each tile decoded with ``decode_halo`` latent pixels of context
    (their receptive margin, 13 for the Wan 2.1 architecture) and written straight into the
    output. The encoder is cut before its middle block the same way (``encode_halo``: 10).
    One latent frame is decoded (one chunk of frames encoded) at a time, as diffusers does.
    """

    def __init__(self, vae: nn.Module):
        decoder, encoder = getattr(vae, "decoder", None), getattr(vae, "encoder", None)
        parts = {"decoder": (decoder, ("conv_in", "mid_block", "up_blocks", "norm_out", "nonlinearity", "conv_out")),
                 "encoder": (encoder, ("conv_in", "down_blocks", "mid_block", "norm_out", "nonlinearity", "conv_out"))}
        for name, (module, attrs) in parts.items():
            missing = [a for a in attrs if not hasattr(module, a)]
            if module is None or missing:
                raise TypeError(f"WanVAETiler needs diffusers' AutoencoderKLWan; {type(vae).__name__}.{name} lacks "
                                f"{missing or [name]}")
        config = getattr(vae, "config", {})
        if config.get("patch_size") is not None or config.get("is_residual", False):
            raise ValueError("WanVAETiler handles the Wan 2.1 VAE; this one has patch_size / is_residual (Wan 2.2)")
        self.vae = vae
        # Pixels per latent pixel, from the upsamplings themselves (a toy config may have fewer
        # stages than its spatial_compression_ratio says).
        self.scale = math.prod(int(m.scale_factor[-1] if isinstance(m.scale_factor, (tuple, list)) else m.scale_factor)
                               for m in decoder.modules() if isinstance(m, nn.Upsample))
        self.decode_halo = math.ceil(receptive_margin([*decoder.up_blocks, decoder.norm_out, decoder.conv_out]))
        self.encode_halo = math.ceil(receptive_margin([encoder.conv_in, *encoder.down_blocks]) / self.scale)
        self._cache_slots = sum(isinstance(m, nn.Conv3d) for m in vae.modules())
        self._first_chunk = "first_chunk" in inspect.signature(decoder.up_blocks[0].forward).parameters

    def _check_tile(self, tile: int, halo: int) -> None:
        if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 2 * halo:
            raise ValueError(f"tile must be an int above 2 * halo = {2 * halo} latent pixels, got {tile!r}")

    # -- decode

    @torch.no_grad()
    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole frames through the input convolution and the middle block: [B, D, T, H, W]."""
        dec, cache, feats = self.vae.decoder, [None] * self._cache_slots, None
        x = self.vae.post_quant_conv(latents)
        for t in range(x.shape[2]):
            idx = [0]
            h = dec.mid_block(_cached_causal_conv(dec.conv_in, x[:, :, t:t + 1], cache, idx), feat_cache=cache, feat_idx=idx)
            if feats is None:
                feats = h.new_empty(*h.shape[:2], x.shape[2], *h.shape[3:])
            feats[:, :, t:t + 1] = h
        return feats

    def _decode_frames(self, feats: torch.Tensor):
        """The upsampling part, one latent frame at a time: yields pixel-frame chunks, clamped."""
        dec, cache = self.vae.decoder, [None] * self._cache_slots
        for t in range(feats.shape[2]):
            idx, kw = [0], ({"first_chunk": t == 0} if self._first_chunk else {})
            x = feats[:, :, t:t + 1]
            for block in dec.up_blocks:
                x = block(x, feat_cache=cache, feat_idx=idx, **kw)
            x = _cached_causal_conv(dec.conv_out, dec.nonlinearity(dec.norm_out(x)), cache, idx)
            yield x.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int = 64, halo: Optional[int] = None) -> torch.Tensor:
        """Pixels [B, 3, 1 + 4 (T - 1), 8 H, 8 W] of latents [B, 16, T, H, W], in the VAE's dtype,
        decoded in tiles of at most ``tile`` latent pixels a side (``halo``: context per tile,
        default ``decode_halo``, which makes the result equal ``vae.decode(latents).sample``)."""
        halo = self.decode_halo if halo is None else halo
        self._check_tile(tile, halo)
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, T, H, W], got shape {tuple(latents.shape)}")
        feats = self.decode_features(latents)
        s, (T, H, W) = self.scale, feats.shape[2:]
        out = None
        for d0, d1, k0, k1 in tile_spans(H, tile, 0, halo):
            for e0, e1, l0, l1 in tile_spans(W, tile, 0, halo):
                f = 0
                for chunk in self._decode_frames(feats[..., d0:d1, e0:e1]):
                    if out is None:  # frames: the first latent frame gives one, each later one the same count
                        frames = 1 + (T - 1) * self._frames_per_latent()
                        out = chunk.new_empty(*chunk.shape[:2], frames, H * s, W * s)
                    n = chunk.shape[2]
                    out[:, :, f:f + n, k0 * s:k1 * s, l0 * s:l1 * s] = \
                        chunk[..., (k0 - d0) * s:(k1 - d0) * s, (l0 - e0) * s:(l1 - e0) * s]
                    f += n
                if f != out.shape[2]:
                    raise RuntimeError(f"the decoder gave {f} frames, expected {out.shape[2]}")
        return out

    def _frames_per_latent(self) -> int:
        return 2 ** sum(getattr(m, "mode", None) == "upsample3d" for m in self.vae.decoder.modules())

    # -- encode

    def _encode_chunks(self, video: torch.Tensor):
        """The encoder up to its middle block, one chunk of frames (the first frame, then four at a
        time) at a time: yields latent-resolution features, one latent frame each."""
        enc, cache = self.vae.encoder, [None] * self._cache_slots
        frames = video.shape[2]
        for c0, c1 in [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((frames - 1) // 4)]:
            idx = [0]
            x = _cached_causal_conv(enc.conv_in, video[:, :, c0:c1], cache, idx)
            for layer in enc.down_blocks:
                x = layer(x, feat_cache=cache, feat_idx=idx)
            yield x

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile: int = 64, halo: Optional[int] = None, device=None) -> torch.Tensor:
        """The latent mean [B, 16, T, H / 8, W / 8] of a video [B, 3, 1 + 4 (T - 1), H, W] (what
        ``vae.encode(video).latent_dist.mode()`` gives), encoded in tiles of at most ``tile``
        latent pixels a side (``halo``: context per tile, default ``encode_halo``). Each tile is
        moved to ``device`` (default: the VAE's), so the video can stay on the CPU."""
        moments = self.encode_moments(video, tile, halo, device)
        return moments[:, : moments.shape[1] // 2]

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor, tile: int = 64, halo: Optional[int] = None, device=None) -> torch.Tensor:
        """As ``encode``, the mean and the log-variance [B, 32, T, H / 8, W / 8] (the parameters of
        ``vae.encode(video).latent_dist``)."""
        _check_video(video, self.scale)
        halo = self.encode_halo if halo is None else halo
        self._check_tile(tile, halo)
        device = torch.device(device) if device is not None else next(self.vae.parameters()).device
        dtype = next(self.vae.parameters()).dtype
        s, H, W = self.scale, video.shape[-2] // self.scale, video.shape[-1] // self.scale
        chunks = 1 + (video.shape[2] - 1) // 4  # frames beyond the last whole chunk of four are not encoded
        per_chunk = 4 // 2 ** sum(getattr(m, "mode", None) == "downsample3d" for m in self.vae.encoder.modules())
        T = 1 + (chunks - 1) * per_chunk
        feats = None
        for d0, d1, k0, k1 in tile_spans(H, tile, 0, halo):
            for e0, e1, l0, l1 in tile_spans(W, tile, 0, halo):
                piece, t = video[..., d0 * s:d1 * s, e0 * s:e1 * s].to(device, dtype), 0
                for h in self._encode_chunks(piece):
                    if feats is None:
                        feats = h.new_empty(*h.shape[:2], T, H, W)
                    feats[:, :, t:t + h.shape[2], k0:k1, l0:l1] = h[..., k0 - d0:k1 - d0, l0 - e0:l1 - e0]
                    t += h.shape[2]
                del piece
        enc, cache, z = self.vae.encoder, [None] * self._cache_slots, None
        for t0, t1 in [(0, 1)] + [(1 + per_chunk * i, 1 + per_chunk * (i + 1)) for i in range(chunks - 1)]:
            idx = [0]  # the middle block and the head on whole frames, chunk by chunk as before
            x = enc.mid_block(feats[:, :, t0:t1], feat_cache=cache, feat_idx=idx)
            x = _cached_causal_conv(enc.conv_out, enc.nonlinearity(enc.norm_out(x)), cache, idx)
            x = self.vae.quant_conv(x)
            if z is None:
                z = x.new_empty(*x.shape[:2], T, *x.shape[3:])
            z[:, :, t0:t1] = x
        return z
