"""Gated residual ``x + gate[frame] * y``, computed in float32 and cast back to x.dtype.

After attention and after the FFN every DiT block adds the branch output scaled by a per-frame
gate (one row per latent frame, broadcast over the frame's H*W tokens).
"""
from __future__ import annotations

import torch

from ._runtime import check_same_device, check_tensor
from .modulate import check_frame_modulation

__all__ = ["gated_residual_reference"]


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle. x, y: [B, N, C]; gate: [B, T, C] with N = T * L. Returns a new tensor."""
    check_tensor("x", x, ndim=3)
    check_tensor("y", y, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    check_same_device(x=x, y=y, gate=gate)
    T = check_frame_modulation("gate", gate, x)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, N, C = x.shape
    out = x.to(compute).view(B, T, N // T, C) + gate.to(compute).unsqueeze(2) * y.to(compute).view(B, T, N // T, C)
    return out.view(B, N, C).to(x.dtype)
