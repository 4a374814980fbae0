"""Peer quantizers behind ``longcat.quant.quantize(..., backend=...)``, for side-by-side comparison.

- ``backend="bitsandbytes"``: ``"int8"`` is LLM.int8 (``bnb.nn.Linear8bitLt``, outlier threshold 6.0,
  mixed int8/fp16 decomposition); ``"nf4"`` is 4-bit NormalFloat (``bnb.nn.Linear4bit``, compute in
  the layer's dtype).
- ``backend="quanto"``: ``"int8"`` (qint8) and ``"fp8"`` (qfloat8, e4m3) weights via
  ``optimum.quanto.quantize`` + ``freeze``; weight-only (quanto's activation quantization needs
  calibration, there is no dynamic per-token mode to compare with ``*-dynamic``).

Layer selection (include/exclude, the default skip list) is the same as for the longcat backend.
Both libraries are optional (extra ``peers``): they are imported only when used.
"""
from __future__ import annotations

import glob
from typing import Union

import torch
import torch.nn as nn

from .config import DEFAULT_SKIP, Int8WeightOnlyConfig, QuantConfig, resolve_config

__all__ = ["quantize_peer", "PEER_BACKENDS", "require_peer"]

PEER_BACKENDS = {
    "bitsandbytes": ("int8", "nf4"),
    "quanto": ("int8", "fp8"),
}
_ALIASES = {"bnb": "bitsandbytes", "optimum-quanto": "quanto", "optimum.quanto": "quanto"}
_PACKAGES = {"bitsandbytes": ("bitsandbytes", "bitsandbytes"), "quanto": ("optimum.quanto", "optimum-quanto")}


def require_peer(backend: str):
    """Import and return the peer's module, or raise an ImportError naming the extra to install."""
    backend = _ALIASES.get(backend, backend)
    module, dist = _PACKAGES[backend]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"backend={backend!r} needs the optional dependency {dist!r}: "
                          f"pip install 'longcat-accel[peers]' (or pip install {dist})") from e


def _format_name(config) -> str:
    if isinstance(config, QuantConfig) or isinstance(config, type):
        cfg = resolve_config(config)
        return cfg.name
    if isinstance(config, str):
        return config.strip().lower().replace("_", "-")
    raise TypeError(f"config must be a format name or a QuantConfig, got {type(config).__name__}")


def quantize_peer(model: nn.Module, config: Union[str, QuantConfig], *, include=None, exclude=None,
                  backend: str = "bitsandbytes") -> nn.Module:
    """Quantize ``model`` in place with a peer library; returns it."""
    from .quantize import select_linears

    backend = _ALIASES.get(backend, backend)
    if backend not in PEER_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'longcat' or one of {sorted(PEER_BACKENDS)}")
    fmt = _format_name(config)
    if fmt not in PEER_BACKENDS[backend]:
        raise ValueError(f"backend {backend!r} supports formats {PEER_BACKENDS[backend]}, not {fmt!r}")
    skip = config.skip if isinstance(config, QuantConfig) else DEFAULT_SKIP
    plan = select_linears(model, Int8WeightOnlyConfig(skip=skip, adaln="weight_only"), include=include, exclude=exclude)
    names = [n for n, spec in plan.items() if spec is not None]
    for n in names:
        if any(t.device.type == "meta" for t in model.get_submodule(n).parameters()):
            raise ValueError(f"backend {backend!r} cannot quantize meta tensors ({n}); use backend='longcat' for meta models")
    if backend == "bitsandbytes":
        bnb = require_peer(backend)
        for n in names:
            _replace(model, n, _bnb_linear(bnb, model.get_submodule(n), fmt))
    else:
        quanto = require_peer(backend)
        if names:
            qtype = quanto.qint8 if fmt == "int8" else quanto.qfloat8
            quanto.quantize(model, weights=qtype, include=[glob.escape(n) for n in names])
            quanto.freeze(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _bnb_linear(bnb, lin: nn.Linear, fmt: str) -> nn.Module:
    device = lin.weight.device
    has_bias = lin.bias is not None
    w = lin.weight.detach()
    if fmt == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        compute = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, quant_type="nf4")
    if has_bias:
        new.bias = nn.Parameter(lin.bias.detach().to("cpu"), requires_grad=False)
    # bitsandbytes quantizes the weight when the module is moved to its device.
    return new.to(device)
