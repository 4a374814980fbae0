"""Our DiT reproduces the upstream model's own outputs (golden files, float32, CPU)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import longcat
from longcat import LongCatVideoTransformer3DModel
from oracle import assert_rel_close

OPS = {"reference": longcat.REFERENCE_OPS, "sdpa": longcat.SDPA_OPS}


@pytest.fixture(scope="module")
def golden(golden_dir):
    with open(os.path.join(golden_dir, "tiny.json")) as f:
        meta = json.load(f)
    model = LongCatVideoTransformer3DModel(**meta["config"])
    model.load_state_dict(load_file(os.path.join(golden_dir, "tiny_weights.safetensors")))
    return model.eval(), load_file(os.path.join(golden_dir, "tiny_io.safetensors")), meta


@pytest.mark.parametrize("ops", sorted(OPS))
def test_text_to_video(golden, ops):
    model, io, _ = golden
    model.set_ops(OPS[ops])
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"], io["mask"])
    assert out.dtype == torch.float32
    assert_rel_close(out, io["out_t2v"], 1e-4)


@pytest.mark.parametrize("ops", sorted(OPS))
def test_condition_latents(golden, ops):
    model, io, meta = golden
    model.set_ops(OPS[ops])
    with torch.no_grad():
        out = model(io["x"], io["t_frames"], io["y"], io["mask"], num_cond_latents=meta["num_cond_latents"])
    assert_rel_close(out, io["out_cond"], 1e-4)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("ops", sorted(OPS))
def test_kv_cache(golden, ops, offload):
    model, io, meta = golden
    model.set_ops(OPS[ops])
    n_cond = meta["num_cond_latents"]
    x, B = io["x"], io["x"].shape[0]
    with torch.no_grad():
        _, cache = model(
            x[:, :, :n_cond], torch.zeros(B, n_cond), io["y"], io["mask"],
            return_kv=True, skip_crs_attn=True, offload_kv_cache=offload,
        )
        assert sorted(cache) == list(range(meta["config"]["depth"]))
        out = model(x[:, :, n_cond:], io["t"], io["y"], io["mask"], num_cond_latents=n_cond, kv_cache_dict=cache)
    assert_rel_close(out, io["out_kvcache"], 1e-4)


def test_kv_cache_batch_one_broadcasts(golden):
    """A cache built for one sample serves a batch (CFG), as upstream allows."""
    model, io, meta = golden
    model.set_ops(longcat.SDPA_OPS)
    n_cond, x = meta["num_cond_latents"], io["x"]
    with torch.no_grad():
        _, cache = model(x[:1, :, :n_cond], torch.zeros(1, n_cond), io["y"][:1], io["mask"][:1], return_kv=True, skip_crs_attn=True)
        both = x[:1, :, n_cond:].expand(2, -1, -1, -1, -1)
        out = model(both, io["t"][:1].expand(2), io["y"][:1].expand(2, -1, -1, -1), io["mask"][:1].expand(2, -1, -1, -1),
                    num_cond_latents=n_cond, kv_cache_dict=cache)
    torch.testing.assert_close(out[0], out[1])
    assert_rel_close(out[:1], io["out_kvcache"][:1], 1e-4)


@pytest.mark.slow
def test_golden_through_triton_kernels(golden):
    """The whole model on the Triton kernels (attention + fused ops) still reproduces upstream."""
    from longcat.ops import kernel_ops

    model, io, meta = golden
    model.set_ops(kernel_ops("bsa", fused=True))
    n_cond = meta["num_cond_latents"]
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"], io["mask"])
        _, cache = model(io["x"][:, :, :n_cond], torch.zeros(2, n_cond), io["y"], io["mask"], return_kv=True, skip_crs_attn=True)
        out_kv = model(io["x"][:, :, n_cond:], io["t"], io["y"], io["mask"], num_cond_latents=n_cond, kv_cache_dict=cache)
    model.set_ops(longcat.SDPA_OPS)
    assert_rel_close(out, io["out_t2v"], 1e-4)
    assert_rel_close(out_kv, io["out_kvcache"], 1e-4)
