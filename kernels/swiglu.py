"""SwiGLU gate ``silu(a) * b`` of the DiT feed-forward network (``w2(silu(w1 x) * w3 x)``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._runtime import check_same_device, check_tensor

__all__ = ["swiglu_reference"]


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch oracle, in the inputs' dtype as upstream computes it: ``silu(a) * b``."""
    check_tensor("a", a)
    check_tensor("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device(a=a, b=b)
    return F.silu(a) * b
