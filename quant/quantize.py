"""``quantize(model, config)``: replace the selected ``nn.Linear`` layers in place, and the byte
accounting of a model (works on the ``meta`` device, so a 13.6B model can be sized without memory).

Selection of a Linear named ``name`` (its ``named_modules`` name):
1. it is skipped if it matches one of ``config.skip`` (default: ``final_layer.*``, ``x_embedder.*``,
   ``t_embedder.*``, ``y_embedder.*``);
2. else it must match ``include`` (when given) and must not match ``exclude``;
3. ``*adaLN_modulation*`` layers then follow ``config.adaln``.
A pattern is a shell glob matched against the whole name (``"blocks.*.attn.qkv"``), a string
starting with ``"re:"`` (regular expression, ``re.fullmatch``), or a compiled ``re.Pattern``.
"""
from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .config import ADALN_PATTERN, LayerSpec, QuantConfig, resolve_config
from .linear import QuantizedLinear

__all__ = ["quantize", "select_linears", "weight_bytes", "memory_report", "quantized_layers", "Pattern"]

Pattern = Union[str, "re.Pattern[str]"]

# The attribute a quantized model carries: the config it was quantized with (for save_quantized).
CONFIG_ATTR = "_longcat_quant_config"


def _as_patterns(patterns, arg: str) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(p)
        elif isinstance(p, str):
            if p.startswith("re:"):
                try:
                    out.append(re.compile(p[3:]))
                except re.error as e:
                    raise ValueError(f"{arg}: invalid regular expression {p[3:]!r}: {e}") from None
            else:
                out.append(p)
        else:
            raise TypeError(f"{arg} must hold glob strings, 're:<regex>' strings or compiled regexes, got {p!r}")
    return out


def _matches(name: str, patterns: Sequence) -> bool:
    for p in patterns:
        if isinstance(p, re.Pattern):
            if p.fullmatch(name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def select_linears(model: nn.Module, config: Union[str, QuantConfig], *, include=None, exclude=None) -> "OrderedDict[str, Optional[LayerSpec]]":
    """Every ``nn.Linear`` of ``model`` mapped to the LayerSpec it would get (None: left as is)."""
    config = resolve_config(config)
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    skip = _as_patterns(config.skip, "config.skip")
    out: "OrderedDict[str, Optional[LayerSpec]]" = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = not _matches(name, skip) and (not inc or _matches(name, inc)) and not _matches(name, exc)
        out[name] = config.layer_spec(fnmatch.fnmatchcase(name, ADALN_PATTERN)) if chosen else None
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize(model: nn.Module, config: Union[str, QuantConfig] = "int8", *, include=None, exclude=None,
             backend: str = "longcat") -> nn.Module:
    """Quantize ``model`` in place and return it.

    config: a QuantConfig (``Int8WeightOnlyConfig()``, ``Fp8WeightOnlyConfig()``,
    ``Int8DynamicConfig()``, ``Fp8DynamicConfig()``) or a name ``"int8"``, ``"fp8"``,
    ``"int8-dynamic"``, ``"fp8-dynamic"``; with a peer backend, that backend's names (see
    ``longcat.quant.peers``). include/exclude: module-name patterns (see the module docstring).
    backend: ``"longcat"`` (this package's Triton GEMMs), ``"bitsandbytes"`` or ``"quanto"``
    (optional dependencies: ``pip install longcat-accel[peers]``).

    Works on a model on the ``meta`` device (quantized buffers are then meta tensors of the right
    dtypes and shapes). A Linear whose ``forward`` was patched (e.g. by upstream's LoRA loader) is
    refused: merge the LoRA first, or apply it after quantizing (QuantizedLinear is a valid target).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend != "longcat":
        from .peers import quantize_peer

        return quantize_peer(model, config, include=include, exclude=exclude, backend=backend)
    config = resolve_config(config)
    plan = select_linears(model, config, include=include, exclude=exclude)
    for name, spec in plan.items():
        if spec is None:
            continue
        linear = model.get_submodule(name)
        if "forward" in vars(linear):
            raise ValueError(f"{name}: its forward is patched (a LoRA or hook wrapper?); merge the LoRA "
                             "into the weight before quantizing, or apply the LoRA after quantizing")
        _set_submodule(model, name, QuantizedLinear.from_linear(linear, spec.weight_dtype, spec.dynamic))
    setattr(model, CONFIG_ATTR, config)
    return model


def quantized_layers(model: nn.Module) -> "OrderedDict[str, QuantizedLinear]":
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear))


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    seen = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        yield name, t


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (shared tensors counted once; meta tensors
    counted by shape and dtype, nothing is allocated)."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(model))


def memory_report(model: nn.Module) -> dict:
    """Bytes and element counts per dtype, the quantized share, and the total.

    Returns ``{"total_bytes", "by_dtype": {dtype: {"bytes", "numel", "tensors"}},
    "quantized_weight_bytes", "scale_bytes", "high_precision_bytes", "quantized_layers", "linear_layers"}``.
    """
    by_dtype: dict = {}
    qw = sc = 0
    qnames = {n for n, _ in quantized_layers(model).items()}
    for name, t in _tensors(model):
        key = str(t.dtype).replace("torch.", "")
        d = by_dtype.setdefault(key, {"bytes": 0, "numel": 0, "tensors": 0})
        nbytes = t.numel() * t.element_size()
        d["bytes"] += nbytes
        d["numel"] += t.numel()
        d["tensors"] += 1
        owner, _, leaf = name.rpartition(".")
        if owner in qnames and leaf == "weight_q":
            qw += nbytes
        elif owner in qnames and leaf == "weight_scale":
            sc += nbytes
    total = sum(d["bytes"] for d in by_dtype.values())
    n_linear = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    return {
        "total_bytes": total,
        "by_dtype": dict(sorted(by_dtype.items())),
        "quantized_weight_bytes": qw,
        "scale_bytes": sc,
        "high_precision_bytes": total - qw - sc,
        "quantized_layers": len(qnames),
        "linear_layers": n_linear,
    }


def format_memory_report(report: dict) -> str:
    lines = [f"{'dtype':<16}{'tensors':>9}{'elements':>16}{'GB':>10}"]
    for dt, d in report["by_dtype"].items():
        lines.append(f"{dt:<16}{d['tensors']:>9}{d['numel']:>16,}{d['bytes'] / 1e9:>10.3f}")
    lines.append(f"{'total':<16}{'':>9}{'':>16}{report['total_bytes'] / 1e9:>10.3f}")
    lines.append(f"quantized layers: {report['quantized_layers']} (high-precision Linear left: {report['linear_layers']}); "
                 f"8-bit weights {report['quantized_weight_bytes'] / 1e9:.3f} GB, scales {report['scale_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)
