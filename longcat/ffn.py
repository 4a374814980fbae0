"""The FFN's ``w1``/``w3`` pair as one GEMM: ``silu(x W1^T) * (x W3^T)`` from one packed [2H, K]
weight (W1 rows over W3 rows).

``pack_ffn`` (called by ``longcat.accelerate``) copies the two weights into one packed tensor and
makes ``w1``/``w3`` hold views of its halves: the modules, their names (``ffn.w1.weight``,
``ffn.w3.weight`` or the quantized buffers), their classes and the state dict stay upstream's, and
the packing costs no memory. ``ffn_gate`` then runs

- float weights (``nn.Linear``): one GEMM into [M, 2H] (cuBLAS on a GPU) and ``ops.swiglu_packed``;
- 8-bit weights (``QuantizedLinear``): one 8-bit GEMM with the SwiGLU epilogue, so the [M, 2H]
  intermediate never reaches memory and a dynamic layer quantizes its input once, not twice.

It falls back to the two separate layers (``ops.swiglu(w1(x), w3(x))``, the same math) whenever the
packed weight would not be what the layers compute, or would lose their gradients: a LoRA (or
any) wrapper on ``w1``/``w3``'s ``forward``, autograd on with ``w1``/``w3`` parameters that require
gradients (training), or weights that no longer alias the packed tensor (the model was moved or cast with
``.to`` after ``accelerate``, or its tensors were replaced; checked in eager mode, and the stale
packed tensor is then dropped: call ``accelerate`` after moving the model). ``unpack_ffn`` (``longcat.restore``) gives
``w1``/``w3`` storage of their own again.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["pack_ffn", "unpack_ffn", "is_packed", "ffn_gate"]

# The packed tensors live on the FFN module under this attribute (not registered: the state dict
# keeps upstream's w1/w3 names, and ``.to`` moves only the registered views, which ``ffn_gate``
# detects).
_PACKED_ATTR = "_longcat_packed_w13"
# Tensors packed per layer kind: (slot kind, name) in the module.
_FLOAT_SLOTS = (("_parameters", "weight"), ("_parameters", "bias"))
_QUANT_SLOTS = (("_buffers", "weight_q"), ("_buffers", "weight_scale"), ("_buffers", "bias"))


def _kind(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Linear:
        return "float"
    if type(module).__name__ == "QuantizedLinear":
        return "quantized"
    return None


def _slots(kind: str):
    return _FLOAT_SLOTS if kind == "float" else _QUANT_SLOTS


def _pair_is_packable(w1: nn.Module, w3: nn.Module) -> Optional[str]:
    kind = _kind(w1)
    if kind is None or _kind(w3) != kind:
        return None
    if (w1.in_features, w1.out_features) != (w3.in_features, w3.out_features):
        return None
    if kind == "quantized" and (w1.weight_dtype, w1.dynamic) != (w3.weight_dtype, w3.dynamic):
        return None
    for slot_kind, name in _slots(kind):
        a, b = getattr(w1, slot_kind).get(name), getattr(w3, slot_kind).get(name)
        if (a is None) != (b is None):
            return None
        if a is not None and (a.dtype != b.dtype or a.device != b.device or a.device.type == "meta"):
            return None
    return kind


def _set(module: nn.Module, slot_kind: str, name: str, tensor: torch.Tensor) -> None:
    if slot_kind == "_parameters":
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor


def pack_ffn(ffn: nn.Module) -> bool:
    """Pack ``ffn.w1`` and ``ffn.w3`` (both ``nn.Linear`` or both ``QuantizedLinear`` of one format
    and shape, on one device) into one [2H, K] tensor per weight tensor, the layers keeping views of
    its halves. Returns whether the pair was packed (False: left unchanged, e.g. a wrapped LoRA
    target or a meta model). Idempotent."""
    w1, w3 = getattr(ffn, "w1", None), getattr(ffn, "w3", None)
    if w1 is None or w3 is None or is_packed(ffn):
        return is_packed(ffn)
    kind = _pair_is_packable(w1, w3)
    if kind is None or "forward" in vars(w1) or "forward" in vars(w3):
        return False
    H = w1.out_features
    packed = []
    with torch.no_grad():
        for slot_kind, name in _slots(kind):
            a = getattr(w1, slot_kind)[name]
            if a is None:
                packed.append(None)
                continue
            both = torch.cat([a.detach(), getattr(w3, slot_kind)[name].detach()], 0)
            _set(w1, slot_kind, name, both[:H])
            _set(w3, slot_kind, name, both[H:])
            packed.append(both)
    setattr(ffn, _PACKED_ATTR, (kind, tuple(packed)))
    return True


def is_packed(ffn: nn.Module) -> bool:
    return getattr(ffn, _PACKED_ATTR, None) is not None


def unpack_ffn(ffn: nn.Module) -> None:
    """Undo ``pack_ffn``: ``w1``/``w3`` get their own copies of their halves."""
    state = getattr(ffn, _PACKED_ATTR, None)
    if state is None:
        return
    kind, _ = state
    with torch.no_grad():
        for layer in (ffn.w1, ffn.w3):
            if _kind(layer) != kind:
                continue
            for slot_kind, name in _slots(kind):
                t = getattr(layer, slot_kind).get(name)
                if t is not None:
                    _set(layer, slot_kind, name, t.detach().clone())
    delattr(ffn, _PACKED_ATTR)


def _aliases(view: torch.Tensor, packed: torch.Tensor) -> bool:
    return view.device == packed.device and view.data_ptr() == packed.data_ptr()


def _usable_packed(ffn: nn.Module) -> Optional[Tuple[str, tuple]]:
    state = getattr(ffn, _PACKED_ATTR, None)
    if state is None:
        return None
    w1, w3 = ffn.w1, ffn.w3
    # A wrapper on either forward (upstream's LoRA) must run: use the two layers.
    if "forward" in vars(w1) or "forward" in vars(w3):
        return None
    kind, packed = state
    if _kind(w1) != kind or _kind(w3) != kind:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in (*w1.parameters(), *w3.parameters())):
        # The packed tensor is not a parameter: training w1/w3 runs the layers so they get gradients.
        return None
    if not torch.compiler.is_compiling():
        # The halves must still be views of the packed tensors (``.to`` or a replaced weight breaks
        # that; the layers then hold the truth, and the stale packed copy is dropped so its memory
        # is freed). Compiled graphs skip the pointer check.
        for (slot_kind, name), p in zip(_slots(kind), packed):
            if p is None:
                continue
            h = p.shape[0] // 2
            a, b = getattr(w1, slot_kind)[name], getattr(w3, slot_kind)[name]
            if not (_aliases(a, p) and _aliases(b, p[h:])):
                delattr(ffn, _PACKED_ATTR)
                return None
    return state


def ffn_gate(ffn: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
    """``silu(w1 x) * w3 x`` of ``ffn`` on x [..., K]: one packed GEMM when ``ffn`` is packed and its
    layers are unwrapped, else the two layers and ``ops.swiglu``."""
    state = _usable_packed(ffn)
    if state is None:
        return ops.swiglu(ffn.w1(x), ffn.w3(x))
    kind, packed = state
    if kind == "float":
        weight, bias = packed
        return ops.swiglu_packed(F.linear(x, weight, bias))
    weight_q, weight_scale, bias = packed
    return ffn.w1.matmul(x, weight_q, weight_scale, bias, swiglu=True)
