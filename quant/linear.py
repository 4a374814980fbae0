"""``QuantizedLinear``: the drop-in replacement of ``nn.Linear`` with an 8-bit weight.

Buffers: ``weight_q`` (int8 or float8_e4m3fn, [out, in]), ``weight_scale`` (float32, [out],
symmetric per output channel) and ``bias`` (activation dtype, [out]) or None. The module keeps
``in_features``/``out_features`` and its class name, so upstream's LoRA loader (which asserts the
target's class name is ``Linear`` or ``QuantizedLinear``) still accepts it. Its forward never
builds a full-precision weight on the Triton path: W8A16 converts weight tiles inside the GEMM,
W8A8 quantizes activations per token and multiplies 8-bit by 8-bit; a W8A8 layer also takes
``QuantizedActivations`` (8-bit codes and per-token scales that a fused norm already produced,
shared by every layer reading that input) and then quantizes nothing itself.

``model.to(dtype)`` / ``.half()`` move the quantized buffers between devices but never change
their dtypes (a float32 scale in bf16 would lose precision, an e4m3 weight would be widened).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from longcat.kernels.quant_gemm import dynamic_linear, weight_only_linear
from longcat.kernels.quantize_activations import QuantizedActivations, quantize_per_token

from .config import WEIGHT_DTYPES, LayerSpec

__all__ = ["QuantizedLinear", "quantize_weight", "dequantize_weight", "QMAX"]

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
# Floor on a row's amax: an all-zero output channel gets a tiny positive scale and zero codes.
WEIGHT_AMAX_EPS = 1e-12


def quantize_weight(weight: torch.Tensor, qdtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a [out, in] weight.

    Returns ``(w_q [out, in] qdtype, scale [out] float32)`` with ``w ~= w_q * scale[:, None]``.
    Works on any device, including ``meta`` (then both results are meta tensors)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if qdtype not in QMAX:
        raise TypeError(f"qdtype must be torch.int8 or torch.float8_e4m3fn, got {qdtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    qmax = QMAX[qdtype]
    w = weight.detach().float()
    lo, hi = w.aminmax(dim=1)  # no full-size |w| temporary
    scale = torch.maximum(hi, -lo).clamp_min(WEIGHT_AMAX_EPS) / qmax
    v = (w / scale.unsqueeze(1)).clamp_(-qmax, qmax)
    w_q = v.round_().to(torch.int8) if qdtype == torch.int8 else v.to(qdtype)
    return w_q, scale


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w_q * scale[:, None]`` in ``dtype`` (a full-size tensor: for checks and LoRA merging)."""
    return (w_q.float() * scale.float().unsqueeze(1)).to(dtype)


def _bias_for(bias, act_dtype):
    if bias is not None and bias.dtype != act_dtype and act_dtype in (torch.float16, torch.bfloat16, torch.float32):
        return bias.to(act_dtype)
    return bias


def _activations(x, weight_dtype):
    """(x_q, x_scale) for a W8A8 GEMM: quantized here from a float x, or as they came."""
    if isinstance(x, QuantizedActivations):
        if x.q.dtype != weight_dtype:
            raise TypeError(f"QuantizedActivations hold {x.q.dtype} codes; this layer multiplies {weight_dtype}")
        return x.q, x.scale
    return quantize_per_token(x, weight_dtype)


def _float_input(x, layer):
    if isinstance(x, QuantizedActivations):
        raise TypeError(f"{type(layer).__name__} is weight-only (W8A16): it takes float activations, not QuantizedActivations")


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W stored in 8 bits; see the module docstring.

    ``weight_dtype``: torch.int8 or torch.float8_e4m3fn. ``dynamic``: quantize activations per
    token at run time (W8A8); otherwise weight-only (W8A16). Buffers are created empty (zeros on
    a real device, nothing on ``meta``); fill them with ``from_linear`` or a checkpoint.
    """

    _quantized_buffers = ("weight_q", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_dtype: torch.dtype = torch.int8, dynamic: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if weight_dtype not in QMAX:
            raise TypeError(f"weight_dtype must be torch.int8 or torch.float8_e4m3fn, got {weight_dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight_dtype = weight_dtype
        self.dynamic = bool(dynamic)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_buffer("bias", None)

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec("int8" if self.weight_dtype == torch.int8 else "fp8", self.dynamic)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: torch.dtype = torch.int8, dynamic: bool = False) -> "QuantizedLinear":
        """Quantize an ``nn.Linear`` (on any device, ``meta`` included). The bias keeps its dtype."""
        w_q, scale = quantize_weight(linear.weight, weight_dtype)
        q = cls(linear.in_features, linear.out_features, bias=False, weight_dtype=weight_dtype,
                dynamic=dynamic, device="meta")
        q.weight_q = w_q
        q.weight_scale = scale
        if linear.bias is not None:
            q.bias = linear.bias.detach()
        return q

    @classmethod
    def from_spec(cls, linear_like: nn.Module, spec: LayerSpec, device="meta", bias_dtype=torch.bfloat16) -> "QuantizedLinear":
        """An empty module shaped like ``linear_like`` (for loading checkpoints)."""
        bias = getattr(linear_like, "bias", None)
        return cls(linear_like.in_features, linear_like.out_features, bias=bias is not None,
                   weight_dtype=spec.weight_dtype, dynamic=spec.dynamic, device=device,
                   bias_dtype=bias.dtype if bias is not None and bias.is_floating_point() else bias_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [out, in] weight in ``dtype`` (allocates it: for LoRA merging and checks)."""
        return dequantize_weight(self.weight_q, self.weight_scale, dtype)

    @property
    def activation_qdtype(self) -> Optional[torch.dtype]:
        """The 8-bit dtype in which this layer can take its input pre-quantized
        (``QuantizedActivations``), or None (weight-only: it needs the float input)."""
        return self.weight_dtype if self.dynamic else None

    def forward(self, x) -> torch.Tensor:
        return self.forward_rows(x, 0, self.out_features)

    def forward_rows(self, x, start: int, stop: int) -> torch.Tensor:
        """Output features [start, stop) only (per-channel scales: a row slice of the weight is a
        quantized Linear of its own). x: a float tensor, or ``QuantizedActivations``."""
        rows = slice(start, stop)
        bias = None if self.bias is None else self.bias[rows]
        return self.matmul(x, self.weight_q[rows], self.weight_scale[rows], bias)

    def matmul(self, x, weight_q: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor], swiglu: bool = False) -> torch.Tensor:
        """This layer's GEMM (its weight format and activation rule) on the given quantized tensors:
        a row slice of its own, or a packed [2H, K] w1|w3 weight with ``swiglu=True`` (one GEMM with
        the SwiGLU epilogue, the activations quantized once; see ``longcat.ffn``). x: a float
        tensor, or ``QuantizedActivations``."""
        bias = _bias_for(bias, x.dtype)
        if self.dynamic:
            x_q, x_scale = _activations(x, self.weight_dtype)
            return dynamic_linear(x_q, x_scale, weight_q, weight_scale, bias, x.dtype, swiglu=swiglu)
        _float_input(x, self)
        return weight_only_linear(x, weight_q, weight_scale, bias, swiglu=swiglu)

    def _apply(self, fn, recurse=True):
        # Let device moves through but keep the quantized buffers' dtypes (see module docstring).
        saved = {name: self._buffers[name] for name in self._quantized_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Accept upstream's int8 names (``weight_int8``) for the int8 weight.
        legacy = prefix + "weight_int8"
        if legacy in state_dict and prefix + "weight_q" not in state_dict:
            state_dict[prefix + "weight_q"] = state_dict.pop(legacy)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.spec.weight}, activations={'per-token dynamic' if self.dynamic else 'unquantized'}")
