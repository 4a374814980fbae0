"""longcat.CUDAGraphStep: eager fallback and argument checks on the CPU; capture and replay
against the eager forward on a GPU (plain, condition-latent and KV-cache paths, new inputs,
new text, new weights)."""
import warnings

import pytest
import torch
import torch.nn as nn

import longcat
from longcat import CUDAGraphStep, LongCatVideoTransformer3DModel
from longcat.kernels import _runtime
from upstream_like import UpstreamLikeDiT

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2]}


def _inputs(gen, B=2, T=2, H=4, W=4, L=6, caption=64, device="cpu", dtype=torch.float32):
    """Latents, timestep, text embeddings and a mask that drops the first sample's last 2 tokens."""
    x = torch.randn(B, 16, T, H, W, generator=gen).to(device)
    t = (torch.rand(B, generator=gen) * 1000).to(device)
    y = torch.randn(B, 1, L, caption, generator=gen).to(device, dtype)
    mask = torch.ones(B, 1, 1, L, dtype=torch.int64)
    mask[0, ..., L - 2:] = 0
    return x, t, y, mask.to(device)


def _eager(model, x, t, text, **kwargs):
    with torch.no_grad():
        return model(x, t, None, prepared_text=text, **kwargs)


def _kv_cache(model, x, text):
    """The KV cache of x's first latent frame, built eagerly as a pipeline does."""
    zeros = torch.zeros(x.shape[0], 1, device=x.device)
    with torch.no_grad():
        return model(x[:, :, :1], zeros, None, prepared_text=text, return_kv=True, skip_crs_attn=True)[1]


# ------------------------------------------------------------------------------------------ CPU


def _cpu_model():
    torch.manual_seed(0)
    return LongCatVideoTransformer3DModel.from_preset("tiny").eval().set_ops(longcat.REFERENCE_OPS)


def test_cpu_calls_the_model_eagerly_and_warns_once(gen, monkeypatch):
    monkeypatch.setattr(_runtime, "_WARNED", set())
    model = _cpu_model()
    x, t, y, mask = _inputs(gen)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model)
    with pytest.warns(RuntimeWarning, match="not a CUDA device"):
        out = step(x, t, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = step(x, t, text)
    assert not [w for w in caught if "CUDAGraphStep" in str(w.message)]
    with torch.no_grad():
        inline = model(x, t, y, mask)
    assert torch.equal(out, _eager(model, x, t, text))
    assert torch.equal(out, inline)
    assert torch.equal(again, out)
    assert not out.requires_grad  # ran under no_grad although the parameters require grad
    assert step.num_graphs == 0


def test_cpu_condition_and_kv_cache_paths_pass_their_arguments(gen, monkeypatch):
    monkeypatch.setattr(_runtime, "_WARNED", {"cuda_graphs:eager"})
    model = _cpu_model()
    x, t, y, mask = _inputs(gen, T=3)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model)
    t_frames = torch.stack([torch.zeros_like(t), t, t], dim=1)
    cond = step(x, t_frames, text, num_cond_latents=1)
    assert torch.equal(cond, _eager(model, x, t_frames, text, num_cond_latents=1))
    assert not torch.allclose(cond, _eager(model, x, t_frames, text), atol=1e-3)  # the condition mattered
    cache = _kv_cache(model, x, text)
    kv = step(x[:, :, 1:], t, text, num_cond_latents=1, kv_cache_dict=cache)
    assert torch.equal(kv, _eager(model, x[:, :, 1:], t, text, num_cond_latents=1, kv_cache_dict=cache))


def test_argument_errors(gen):
    with pytest.raises(TypeError, match="LongCatVideoTransformer3DModel.*host"):
        CUDAGraphStep(UpstreamLikeDiT())
    with pytest.raises(TypeError, match="got Linear"):
        CUDAGraphStep(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphStep(_cpu_model(), warmup=0)
    offloaded = longcat.accelerate(_cpu_model(), attention="reference", fused=False, offload="blocks")
    with pytest.raises(ValueError, match="offload='blocks'"):
        CUDAGraphStep(offloaded)

    model = _cpu_model()
    x, t, y, mask = _inputs(gen, T=3)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model)
    with pytest.raises(TypeError, match=r"prepared_text.*model\.prepare_text.*got tuple"):
        step(x, t, tuple(text))
    with pytest.raises(TypeError, match=r"prepared_text\.text must be a torch\.Tensor"):
        step(x, t, longcat.model.PreparedText(None, text.cu_seqlens))
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        step(x.numpy(), t, text)
    with pytest.raises(ValueError, match="return_kv"):
        step(x, t, text, return_kv=True)
    cache = _kv_cache(model, x, text)
    broken = {**cache, 1: cache[1][0]}
    with pytest.raises(TypeError, match=r"kv_cache_dict\[1\] must be a \(k, v\) pair"):
        step(x[:, :, 1:], t, text, num_cond_latents=1, kv_cache_dict=broken)
    # (A cache or input on another device than the model is checked on the GPU.)


# ------------------------------------------------------------------------------------------ GPU

CASES = [
    pytest.param("tiny", torch.float32, {}, id="tiny-fp32"),
    pytest.param("tiny", torch.float32, {"bsa": BSA}, id="tiny-fp32-bsa"),
    pytest.param("small", torch.bfloat16, {}, id="small-bf16"),
    pytest.param("small", torch.bfloat16, {"quantize": "fp8-dynamic"}, id="small-bf16-fp8"),
]


def _gpu_model(preset, dtype, seed=0, **accelerate_kwargs):
    torch.manual_seed(seed)
    model = LongCatVideoTransformer3DModel.from_preset(preset).eval().to("cuda", dtype)
    return longcat.accelerate(model, attention="bsa", fused=True, **accelerate_kwargs)


def _gpu_inputs(gen, model, T=4, L=6):
    return _inputs(gen, T=T, H=8, W=8, L=L, caption=model.config["caption_channels"], device="cuda", dtype=model.dtype)


def _fresh(gen, x, t):
    """New random latents and timestep of the same shapes."""
    return torch.randn(x.shape, generator=gen).to(x.device), (torch.rand(t.shape, generator=gen) * 1000).to(t.device)


def _assert_matches(got, want, dtype):
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= 2e-2, f"relative error {rel:.3g} against the eager forward"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("preset,dtype,accelerate_kwargs", CASES)
def test_graph_matches_eager_on_new_inputs_and_texts(gen, preset, dtype, accelerate_kwargs):
    model = _gpu_model(preset, dtype, **accelerate_kwargs)
    x, t, y, mask = _gpu_inputs(gen, model)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model)
    first = step(x, t, text)
    _assert_matches(first, _eager(model, x, t, text), dtype)
    assert step.num_graphs == 1

    # New latents and timestep replay the same graph (stale input buffers would show here).
    x2, t2 = _fresh(gen, x, t)
    second = step(x2, t2, text)
    _assert_matches(second, _eager(model, x2, t2, text), dtype)
    assert not torch.allclose(second, first, rtol=1e-2, atol=1e-2)
    _assert_matches(first, _eager(model, x, t, text), dtype)  # a copy: the replay left it alone

    # Another prompt with the same packed length (5 + 5 tokens instead of 4 + 6): same graph,
    # its text and offsets are copied in.
    y3 = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    mask3 = torch.ones_like(mask)
    mask3[..., 5:] = 0
    text3 = model.prepare_text(y3, mask3)
    assert text3.text.shape == text.text.shape and not torch.equal(text3.cu_seqlens, text.cu_seqlens)
    _assert_matches(step(x2, t2, text3), _eager(model, x2, t2, text3), dtype)
    assert step.num_graphs == 1

    # A longer text is another signature: a second graph; the first still replays.
    _, _, y4, mask4 = _gpu_inputs(gen, model, L=9)
    text4 = model.prepare_text(y4, mask4)
    _assert_matches(step(x, t, text4), _eager(model, x, t, text4), dtype)
    assert step.num_graphs == 2
    _assert_matches(step(x2, t2, text), _eager(model, x2, t2, text), dtype)
    assert step.num_graphs == 2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("preset,dtype", [("tiny", torch.float32), ("small", torch.bfloat16)])
def test_graph_condition_latents_and_kv_cache(gen, preset, dtype):
    model = _gpu_model(preset, dtype)
    x, t, y, mask = _gpu_inputs(gen, model)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model)
    for _ in range(2):  # capture, then replay on new inputs
        x, t = _fresh(gen, x, t)
        t_frames = torch.stack([torch.zeros_like(t), t, t, t], dim=1)
        _assert_matches(step(x, t_frames, text, num_cond_latents=1), _eager(model, x, t_frames, text, num_cond_latents=1), dtype)
    assert step.num_graphs == 1

    cache = _kv_cache(model, x, text)
    for _ in range(2):
        new, t = _fresh(gen, x[:, :, 1:], t)
        got = step(new, t, text, num_cond_latents=1, kv_cache_dict=cache)
        _assert_matches(got, _eager(model, new, t, text, num_cond_latents=1, kv_cache_dict=cache), dtype)
    assert step.num_graphs == 2

    # Another cache of the same shapes: captured again on it (the graph reads the cache in place).
    other, _ = _fresh(gen, x, t)
    cache2 = _kv_cache(model, other, text)
    got = step(new, t, text, num_cond_latents=1, kv_cache_dict=cache2)
    _assert_matches(got, _eager(model, new, t, text, num_cond_latents=1, kv_cache_dict=cache2), dtype)
    assert step.num_graphs == 2
    cache2[0][1].mul_(0.5)  # an in-place change of the cache is read by the next replay
    got = step(new, t, text, num_cond_latents=1, kv_cache_dict=cache2)
    _assert_matches(got, _eager(model, new, t, text, num_cond_latents=1, kv_cache_dict=cache2), dtype)


@pytest.mark.gpu
@gpu
def test_graph_recaptures_when_weights_are_replaced(gen):
    model = _gpu_model("tiny", torch.float32)
    x, t, y, mask = _gpu_inputs(gen, model)
    step = CUDAGraphStep(model)
    before = step(x, t, model.prepare_text(y, mask))

    torch.manual_seed(1)
    replacement = LongCatVideoTransformer3DModel.from_preset("tiny").state_dict()
    model.load_state_dict({k: v.to("cuda") for k, v in replacement.items()}, assign=True)  # new tensors
    text = model.prepare_text(y, mask)  # the text projection changed with the weights
    after = step(x, t, text)
    _assert_matches(after, _eager(model, x, t, text), torch.float32)
    assert not torch.allclose(after, before, rtol=1e-2, atol=1e-2)
    assert step.num_graphs == 1

    # Weights copied into the same tensors: the graph reads them as they are now.
    torch.manual_seed(2)
    model.load_state_dict(LongCatVideoTransformer3DModel.from_preset("tiny").state_dict())
    text = model.prepare_text(y, mask)
    _assert_matches(step(x, t, text), _eager(model, x, t, text), torch.float32)


@pytest.mark.gpu
@gpu
def test_graph_output_reuse_reset_and_errors(gen):
    model = _gpu_model("tiny", torch.float32)
    x, t, y, mask = _gpu_inputs(gen, model)
    text = model.prepare_text(y, mask)
    step = CUDAGraphStep(model, clone_output=False)
    a = step(x, t, text)
    x2, t2 = _fresh(gen, x, t)
    b = step(x2, t2, text)
    assert b.data_ptr() == a.data_ptr()  # the graph's own output, overwritten by the replay
    _assert_matches(b, _eager(model, x2, t2, text), torch.float32)
    step.reset()
    assert step.num_graphs == 0
    _assert_matches(step(x, t, text), _eager(model, x, t, text), torch.float32)
    assert step.num_graphs == 1

    with pytest.raises(ValueError, match="hidden_states is on cpu"):
        step(x.cpu(), t, text)
    cache = _kv_cache(model, x, text)
    host_cache = {i: (k.cpu(), v.cpu()) for i, (k, v) in cache.items()}
    with pytest.raises(ValueError, match=r"kv_cache_dict\[0\]\[0\] is on cpu"):
        step(x[:, :, 1:], t, text, num_cond_latents=1, kv_cache_dict=host_cache)

    # SDPA's varlen attention reads the text offsets on the host: refused before any capture.
    longcat.accelerate(model, attention="sdpa", fused=True)
    with pytest.raises(ValueError, match="varlen_attention"):
        step(x, t, text)
    assert step.num_graphs == 0
    longcat.accelerate(model, attention="bsa", fused=True, offload="blocks")
    with pytest.raises(ValueError, match="offload='blocks'"):
        step(x, t, text)


@pytest.mark.gpu
@gpu
def test_compile_reduce_overhead_matches_eager(gen):
    model = _gpu_model("tiny", torch.float32)
    x, t, y, mask = _gpu_inputs(gen, model)
    text = model.prepare_text(y, mask)
    inputs = [_fresh(gen, x, t) for _ in range(4)]
    want = [_eager(model, xi, ti, text) for xi, ti in inputs]
    torch._dynamo.reset()
    longcat.accelerate(model, attention="bsa", fused=True, compile={"mode": "reduce-overhead"})
    try:
        for (xi, ti), expected in zip(inputs, want):  # warm-up, recording, then replays
            torch.compiler.cudagraph_mark_step_begin()
            got = _eager(model, xi, ti, text).clone()
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    finally:
        longcat.restore(model)
        torch._dynamo.reset()
