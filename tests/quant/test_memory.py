"""Byte accounting on the meta device: the full-size 13.6B model before and after 8-bit quantization."""
import pytest
import torch
import torch.nn as nn

import longcat.quant as lq
from longcat.quant.standin import module_from_shapes

FULL_PARAMS = 13_581_071_424


def expected_int8_bytes(model_float: nn.Module) -> int:
    """Independent count: 1 byte per quantized weight + fp32 scale, everything else bf16."""
    skip = ("final_layer.", "x_embedder.", "t_embedder.", "y_embedder.")
    total = 0
    quantized_owners = set()
    for name, m in model_float.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith(skip):
            quantized_owners.add(name)
            total += m.out_features * m.in_features + 4 * m.out_features
    for name, p in model_float.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized_owners and leaf == "weight":
            continue
        total += 2 * p.numel()
    return total


def check_full_size(model):
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS
    assert lq.weight_bytes(model) == 2 * FULL_PARAMS  # 27.16 GB in bf16
    expected = expected_int8_bytes(model)
    lq.quantize(model, "int8")
    report = lq.memory_report(model)
    assert report["total_bytes"] == lq.weight_bytes(model) == expected
    assert 13.5e9 < report["total_bytes"] < 13.7e9, report["total_bytes"]
    assert report["by_dtype"]["int8"]["bytes"] == report["quantized_weight_bytes"]
    assert 13.4e9 < report["quantized_weight_bytes"] < 13.6e9
    assert report["scale_bytes"] == report["by_dtype"]["float32"]["bytes"] < 20e6
    assert report["quantized_layers"] == 48 * 9
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert "int8" in lq.format_memory_report(report)
    return report


def test_full_size_golden_shapes_on_meta(golden_full_shapes):
    model = module_from_shapes(golden_full_shapes, device="meta", dtype=torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == golden_full_shapes
    report = check_full_size(model)
    # fp8 stores the same number of bytes
    model8 = lq.quantize(module_from_shapes(golden_full_shapes, device="meta", dtype=torch.bfloat16), "fp8-dynamic")
    assert lq.weight_bytes(model8) == report["total_bytes"]


def test_full_size_real_model_on_meta(real_model, golden_full_shapes):
    cls, get_preset = real_model
    with torch.device("meta"):
        model = cls(**get_preset("longcat-video")).to(torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == golden_full_shapes
    check_full_size(model)


def test_report_counts_shared_tensors_once():
    lin = nn.Linear(8, 4)
    model = nn.ModuleDict({"a": lin, "b": lin})
    assert lq.weight_bytes(model) == (8 * 4 + 4) * 4
