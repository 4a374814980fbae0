"""adaLN LayerNorm-modulate: ``LayerNorm(x) * (1 + scale[frame]) + shift[frame]``.

DiT blocks normalise the activations without affine parameters (eps 1e-6) in float32 and then
modulate them per latent frame: ``shift``/``scale`` have one row per frame and are broadcast
over that frame's H*W tokens. The same op without modulation but with an affine LayerNorm is the
pre-cross-attention norm. The result is cast back to the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._runtime import check_same_device, check_tensor

__all__ = ["layer_norm_modulate_reference", "check_frame_modulation"]


def check_frame_modulation(name: str, mod: torch.Tensor, x: torch.Tensor) -> int:
    """Check a per-frame modulation tensor [B, T, C] against activations x [B, N, C]; returns T."""
    check_tensor(name, mod, ndim=3)
    B, N, C = x.shape
    if mod.shape[0] != B or mod.shape[2] != C:
        raise ValueError(f"{name} must have shape [B={B}, T, C={C}], got {tuple(mod.shape)}")
    T = mod.shape[1]
    if T == 0 or N % T != 0:
        raise ValueError(f"{name} has {T} frames, which does not divide the {N} tokens of x")
    return T


def layer_norm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain-PyTorch oracle.

    x: [B, N, C] activations, N = T * L tokens in frame-major order.
    shift, scale: [B, T, C] per-frame modulation (both or neither), applied in float32.
    weight, bias: optional LayerNorm affine [C].
    Returns [B, N, C] in x.dtype. Float64 inputs are computed in float64 (an oracle for tests).
    """
    check_tensor("x", x, ndim=3)
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    check_same_device(x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, N, C = x.shape
    y = F.layer_norm(
        x.to(compute),
        (C,),
        None if weight is None else weight.to(compute),
        None if bias is None else bias.to(compute),
        eps,
    )
    if shift is not None:
        T = check_frame_modulation("shift", shift, x)
        if scale.shape != shift.shape:
            raise ValueError(f"scale must have the shape of shift {tuple(shift.shape)}, got {tuple(scale.shape)}")
        y = y.view(B, T, N // T, C) * (scale.to(compute) + 1).unsqueeze(2) + shift.to(compute).unsqueeze(2)
        y = y.view(B, N, C)
    return y.to(x.dtype)
