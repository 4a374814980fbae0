"""Quantization configs (in the spirit of torchao's ``quantize_(model, config)``).

A config says how the selected ``nn.Linear`` layers are stored and computed:

========================  ===============  ==============================================
config                    weight           activations
========================  ===============  ==============================================
``Int8WeightOnlyConfig``  int8 [out, in]   unchanged (fp16/bf16/fp32), W8A16 GEMM
``Fp8WeightOnlyConfig``   e4m3 [out, in]   unchanged, W8A16 GEMM
``Int8DynamicConfig``     int8             int8, one scale per token computed at run time
``Fp8DynamicConfig``      e4m3             e4m3, one scale per token computed at run time
========================  ===============  ==============================================

Weights are symmetric per output channel: ``scale = amax(|w_row|) / 127`` (int8) or ``/ 448``
(e4m3), float32. The strings ``"int8"``, ``"fp8"``, ``"int8-dynamic"``, ``"fp8-dynamic"`` name the
default instance of each config.

``skip``: module-name glob patterns kept in high precision whatever include/exclude say
(default: the embedders and the final layer, the layers most sensitive to precision).
``adaln``: what to do with ``*adaLN_modulation*`` Linears: ``"weight_only"`` (default; their M is
the number of latent frames, tiny, so dynamic activation quantization buys nothing), ``"same"``
(use this config's mode) or ``"skip"`` (keep high precision).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

__all__ = [
    "QuantConfig",
    "Int8WeightOnlyConfig",
    "Fp8WeightOnlyConfig",
    "Int8DynamicConfig",
    "Fp8DynamicConfig",
    "DEFAULT_SKIP",
    "ADALN_PATTERN",
    "resolve_config",
    "LayerSpec",
]

DEFAULT_SKIP: tuple[str, ...] = ("final_layer.*", "x_embedder.*", "t_embedder.*", "y_embedder.*")
ADALN_PATTERN = "*adaLN_modulation*"
ADALN_MODES = ("weight_only", "same", "skip")

WEIGHT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized: its weight format and whether activations are quantized."""

    weight: str  # "int8" or "fp8"
    dynamic: bool  # True: W8A8 with per-token activation scales; False: weight-only

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.weight]

    @property
    def name(self) -> str:
        return self.weight + ("-dynamic" if self.dynamic else "")

    def to_dict(self) -> dict:
        return {"weight": self.weight, "activation": "per_token_dynamic" if self.dynamic else None}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        if not isinstance(d, dict) or d.get("weight") not in WEIGHT_DTYPES or d.get("activation") not in (None, "per_token_dynamic"):
            raise ValueError(f"invalid per-layer quantization entry {d!r}: expected weight in "
                             f"{sorted(WEIGHT_DTYPES)} and activation None or 'per_token_dynamic'")
        return cls(d["weight"], d["activation"] is not None)


@dataclass(frozen=True)
class QuantConfig:
    """Base of the four configs; use one of the subclasses."""

    skip: tuple[str, ...] = DEFAULT_SKIP
    adaln: str = "weight_only"

    weight: str = dataclasses.field(default="int8", init=False)
    dynamic: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        if self.adaln not in ADALN_MODES:
            raise ValueError(f"adaln must be one of {ADALN_MODES}, got {self.adaln!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise TypeError(f"skip must be a sequence of module-name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def name(self) -> str:
        return self.weight + ("-dynamic" if self.dynamic else "")

    def layer_spec(self, is_adaln: bool) -> Optional[LayerSpec]:
        """The spec for a selected layer (None: keep it high precision)."""
        if is_adaln:
            if self.adaln == "skip":
                return None
            if self.adaln == "weight_only":
                return LayerSpec(self.weight, False)
        return LayerSpec(self.weight, self.dynamic)

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight, "dynamic": self.dynamic,
                "skip": list(self.skip), "adaln": self.adaln}


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    weight: str = dataclasses.field(default="int8", init=False)
    dynamic: bool = dataclasses.field(default=False, init=False)


@dataclass(frozen=True)
class Fp8WeightOnlyConfig(QuantConfig):
    weight: str = dataclasses.field(default="fp8", init=False)
    dynamic: bool = dataclasses.field(default=False, init=False)


@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    weight: str = dataclasses.field(default="int8", init=False)
    dynamic: bool = dataclasses.field(default=True, init=False)


@dataclass(frozen=True)
class Fp8DynamicConfig(QuantConfig):
    weight: str = dataclasses.field(default="fp8", init=False)
    dynamic: bool = dataclasses.field(default=True, init=False)


_BY_NAME = {
    "int8": Int8WeightOnlyConfig,
    "fp8": Fp8WeightOnlyConfig,
    "int8-dynamic": Int8DynamicConfig,
    "fp8-dynamic": Fp8DynamicConfig,
}


def resolve_config(config: Union[str, QuantConfig]) -> QuantConfig:
    """A config instance from a config or one of the names "int8", "fp8", "int8-dynamic", "fp8-dynamic"."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, type) and issubclass(config, QuantConfig) and config is not QuantConfig:
        return config()
    if isinstance(config, str):
        key = config.strip().lower().replace("_", "-")
        if key in _BY_NAME:
            return _BY_NAME[key]()
        raise ValueError(f"unknown quantization config {config!r}; expected one of {sorted(_BY_NAME)} "
                         "or a config instance (Int8WeightOnlyConfig(), ...)")
    raise TypeError(f"config must be a QuantConfig or a name in {sorted(_BY_NAME)}, got {type(config).__name__}")


def config_from_dict(d: dict) -> QuantConfig:
    cls = _BY_NAME.get(d.get("name"))
    if cls is None:
        raise ValueError(f"unknown quantization config name {d.get('name')!r} in checkpoint")
    return cls(skip=tuple(d.get("skip", DEFAULT_SKIP)), adaln=d.get("adaln", "weight_only"))
