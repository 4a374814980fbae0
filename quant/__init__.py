"""8-bit (int8 / fp8) quantization of LongCat-Video's Linear layers.

    import longcat.quant as lq
    lq.quantize(model, "int8")                     # or lq.Int8DynamicConfig(), "fp8", "fp8-dynamic"
    lq.quantize(model, "int8", exclude=["blocks.0.*"])
    lq.save_quantized(model, "ckpt-int8")
    model = lq.load_quantized("ckpt-int8", lambda: LongCatVideoTransformer3DModel(**config), device="cuda")
    lq.memory_report(model)                        # bytes per dtype (works on the meta device)
    lq.quantize(model, "nf4", backend="bitsandbytes")  # peers, pip install 'longcat-accel[peers]'

``python -m longcat.quant accuracy`` prints SQNR / cosine per layer shape and format.
"""
from .checkpoint import CheckpointError, FORMAT_NAME, FORMAT_VERSION, load_quantized, read_quantization_config, save_quantized
from .config import (
    ADALN_PATTERN,
    DEFAULT_SKIP,
    Fp8DynamicConfig,
    Fp8WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    LayerSpec,
    QuantConfig,
    resolve_config,
)
from .linear import QuantizedLinear, dequantize_weight, quantize_weight
from .quantize import format_memory_report, memory_report, quantize, quantized_layers, select_linears, weight_bytes

__all__ = [
    "quantize",
    "select_linears",
    "quantized_layers",
    "QuantConfig",
    "Int8WeightOnlyConfig",
    "Fp8WeightOnlyConfig",
    "Int8DynamicConfig",
    "Fp8DynamicConfig",
    "LayerSpec",
    "resolve_config",
    "DEFAULT_SKIP",
    "ADALN_PATTERN",
    "QuantizedLinear",
    "quantize_weight",
    "dequantize_weight",
    "save_quantized",
    "load_quantized",
    "read_quantization_config",
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "weight_bytes",
    "memory_report",
    "format_memory_report",
]
