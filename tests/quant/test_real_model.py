"""The quantizer on the real ``longcat.LongCatVideoTransformer3DModel`` (tiny preset, golden weights):
output against the float model, checkpoint round trip through a meta-device factory."""
import os

import pytest
import torch
from safetensors.torch import load_file

import longcat.quant as lq
from longcat.quant.accuracy import cosine_similarity, sqnr_db

# Quantizes and runs the golden tiny model once per format: among the slowest tests of the suite.
pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(real_model, golden_dir):
    cls, get_preset = real_model
    torch.manual_seed(0)
    model = cls(**get_preset("tiny")).eval()
    model.load_state_dict(load_file(os.path.join(golden_dir, "tiny_weights.safetensors")))
    io = load_file(os.path.join(golden_dir, "tiny_io.safetensors"))
    # A crop of the golden inputs keeps the interpreter's grids small: 2 frames of 8x8 latents.
    inputs = (io["x"][:, :, :2, :8, :8].contiguous(), io["t"], io["y"], io["mask"])
    return cls, get_preset, model, inputs


# Measured on the golden tiny model (fp32 activations): int8 50.6 dB, fp8 38.3 dB, int8-dynamic 46.8 dB,
# fp8-dynamic 35.8 dB; floors keep a margin of ~6-8 dB.
@pytest.mark.parametrize("fmt,floor_db", [("int8", 43.0), ("fp8", 31.0), ("int8-dynamic", 39.0), ("fp8-dynamic", 29.0)])
def test_tiny_model_output_close_to_float(tiny, fmt, floor_db):
    _, _, model, (x, t, y, mask) = tiny
    with torch.no_grad():
        ref = model(x, t, y, mask)
        lq.quantize(model, fmt)
        out = model(x, t, y, mask)
    assert len(lq.quantized_layers(model)) == 2 * 9
    s = sqnr_db(ref, out)
    print(f"{fmt}: end-to-end SQNR {s:.2f} dB, cosine {cosine_similarity(ref, out):.6f}")
    assert s > floor_db
    assert cosine_similarity(ref, out) > 0.999


def test_tiny_model_round_trip_via_factory(tiny, tmp_path):
    cls, get_preset, model, (x, t, y, mask) = tiny
    lq.quantize(model, "fp8-dynamic")
    lq.save_quantized(model, str(tmp_path / "q"), max_shard_size="1MB")
    loaded = lq.load_quantized(str(tmp_path / "q"), lambda: cls(**get_preset("tiny")))
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), loaded(x, t, y, mask))
