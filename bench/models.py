"""Models with random weights for measurements: built on the meta device, materialised once on
the target device (a 13.6B model in bf16 takes seconds on a GPU), seeded."""
from __future__ import annotations

import math
from typing import Union

import torch

from longcat import LongCatVideoTransformer3DModel, get_preset

__all__ = ["build_random_model", "random_inputs"]


@torch.no_grad()
def build_random_model(
    preset: Union[str, dict] = "small",
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
) -> LongCatVideoTransformer3DModel:
    """A model of ``preset`` (a name or a config dict) with weights drawn so activations stay
    O(1): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.1^2)."""
    cfg = get_preset(preset) if isinstance(preset, str) else dict(preset)
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**cfg)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(0.0, 0.1 if name.endswith("weight") else 0.02, generator=gen)
            if name.endswith("weight"):
                p.add_(1.0)
        elif p.dim() == 1:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            fan_in = math.prod(p.shape[1:])
            p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model.to(dtype).eval()


def random_inputs(model, batch: int, latent: tuple, text_len: int, device, seed: int = 0, valid_text=None):
    """Latents [B, C, T, H, W], timesteps [B], text [B, 1, L, C_text] and a mask whose valid
    lengths vary per sample (the last sample keeps all tokens)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    T, H, W = latent
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], T, H, W, generator=gen, device=device)
    t = torch.rand(batch, generator=gen, device=device) * 1000
    y = torch.randn(batch, 1, text_len, cfg["caption_channels"], generator=gen, device=device)
    mask = torch.zeros(batch, 1, 1, text_len, dtype=torch.int64, device=device)
    for b in range(batch):
        n = valid_text[b] if valid_text else max(1, text_len - (batch - 1 - b) * max(1, text_len // 4))
        mask[b, ..., :n] = 1
    return x, t, y, mask
