"""Model structure, full-size parameter count, behaviour beyond the golden cases, bad input."""
import json
import os

import pytest
import torch

import longcat
from longcat import LongCatVideoTransformer3DModel, get_preset
from longcat.model import ffn_hidden_size


def test_full_size_on_meta_matches_upstream_names_and_shapes(golden_dir):
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_preset("longcat-video")
    assert sum(p.numel() for p in model.parameters()) == 13_581_071_424
    with open(os.path.join(golden_dir, "full_state_dict.json")) as f:
        golden = json.load(f)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(golden)
    assert all(ours[k] == golden[k][0] for k in golden)
    assert ffn_hidden_size(4096, 4) == 11008


def _small_inputs(gen, B=2, T=3, H=6, W=10, L=5, cfg=None):
    cfg = cfg or get_preset("small")
    x = torch.randn(B, cfg["in_channels"], T, H, W, generator=gen)
    t = torch.rand(B, generator=gen) * 1000
    y = torch.randn(B, 1, L, cfg["caption_channels"], generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.int64)
    mask[0, ..., L - 2:] = 0
    return x, t, y, mask


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return LongCatVideoTransformer3DModel.from_preset("small").eval()


def test_reference_and_sdpa_ops_agree(small_model, gen):
    x, t, y, mask = _small_inputs(gen)
    with torch.no_grad():
        a = small_model.set_ops(longcat.REFERENCE_OPS)(x, t, y, mask)
        b = small_model.set_ops(longcat.SDPA_OPS)(x, t, y, mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert a.shape == x.shape and a.std() > 0


def test_padding_of_masked_text_is_ignored(small_model, gen):
    """Changing text tokens that the mask drops must not change the output."""
    x, t, y, mask = _small_inputs(gen)
    y2 = y.clone()
    y2[0, :, -2:] = torch.randn_like(y2[0, :, -2:]) * 10
    with torch.no_grad():
        a, b = small_model(x, t, y, mask), small_model(x, t, y2, mask)
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        c = small_model(x, t, y2, None)  # without the mask the padding is attended to
    assert (c[0] - a[0]).abs().max() > 1e-3


def test_published_config_is_the_longcat_video_preset():
    cfg = get_preset("longcat-video")
    assert cfg["bsa_params"] == {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    assert cfg["text_tokens_zero_pad"] is True


def test_text_tokens_zero_pad_zeroes_padding_and_attends_to_every_position(gen):
    """text_tokens_zero_pad (DESIGN.md section 3): the projected text is zeroed at padded positions
    and every query attends to all L positions (no varlen)."""
    torch.manual_seed(0)
    cfg = get_preset("small")
    zero_pad = LongCatVideoTransformer3DModel(**cfg, text_tokens_zero_pad=True).eval()
    plain = LongCatVideoTransformer3DModel(**cfg).eval()
    plain.load_state_dict(zero_pad.state_dict())
    x, t, y, mask = _small_inputs(gen)
    y2 = y.clone()
    y2[0, :, -2:] = torch.randn_like(y2[0, :, -2:]) * 10  # padded positions: their values do not matter
    hook = plain.y_embedder.register_forward_hook(lambda mod, inp, out: out * mask.reshape(mask.shape[0], -1, 1).to(out.dtype))
    with torch.no_grad():
        a, b = zero_pad(x, t, y, mask), zero_pad(x, t, y2, mask)
        expected = plain(x, t, y, None)  # the hook zeroes the padding; no mask: all positions attended
        hook.remove()
        varlen = plain(x, t, y, mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    assert (a[0] - varlen[0]).abs().max() > 1e-4  # zeroed positions still take softmax weight
    torch.testing.assert_close(a[1], varlen[1], rtol=1e-4, atol=1e-5)  # sample 1 has no padding


def test_empty_text_for_one_sample(small_model, gen):
    x, t, y, mask = _small_inputs(gen)
    mask[1] = 0
    with torch.no_grad():
        out = small_model(x, t, y, mask)
        alone = small_model(x[:1], t[:1], y[:1], mask[:1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-5)


def test_odd_latent_size_is_padded_and_cropped(small_model, gen):
    """An odd latent is zero-padded to the patch grid and the output cropped back: it must equal
    the crop of the output for the explicitly zero-padded latent."""
    x, t, y, mask = _small_inputs(gen, H=7, W=9)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    with torch.no_grad():
        out = small_model(x, t, y, mask)
        ref = small_model(padded, t, y, mask)[..., :7, :9]
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_per_frame_timestep_broadcast_equals_scalar(small_model, gen):
    x, t, y, mask = _small_inputs(gen)
    with torch.no_grad():
        a = small_model(x, t, y, mask)
        b = small_model(x, t[:, None].expand(-1, x.shape[2]).contiguous(), y, mask)
        c = small_model(x, torch.stack([t, t + 100, t], 1), y, mask)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4  # a frame's own timestep matters


def test_bsa_at_zero_sparsity_equals_dense(gen):
    torch.manual_seed(1)
    cfg = get_preset("small")
    model = LongCatVideoTransformer3DModel(**cfg, bsa_params={"sparsity": 0.0, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}).eval()
    model.set_ops(longcat.REFERENCE_OPS)
    x, t, y, mask = _small_inputs(gen, T=4, H=8, W=8)
    with torch.no_grad():
        dense = model(x, t, y, mask)
        model.enable_bsa()
        sparse0 = model(x, t, y, mask)
        model.blocks[0].attn.bsa_params = {"sparsity": 0.75, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
        sparse = model(x, t, y, mask)
        model.disable_bsa()
    torch.testing.assert_close(dense, sparse0, rtol=1e-4, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-5


def test_gradients_flow_with_checkpointing(gen):
    torch.manual_seed(2)
    model = LongCatVideoTransformer3DModel.from_preset("tiny")
    x, t, y, mask = _small_inputs(gen, B=1, T=2, H=4, W=4, cfg=get_preset("tiny"))
    out = model(x, t, y, mask)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y, mask).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0


class TestBadInput:
    @pytest.fixture
    def m(self):
        return LongCatVideoTransformer3DModel.from_preset("tiny")

    @pytest.fixture
    def inputs(self, gen):
        return _small_inputs(gen, B=2, T=3, H=4, W=4, L=5, cfg=get_preset("tiny"))

    def test_wrong_rank(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"rank 5"):
            m(x[:, :, 0], t, y, mask)

    def test_wrong_channels(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"in_channels=16"):
            m(x[:, :8], t, y, mask)

    def test_timestep_shape(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"timestep must have shape"):
            m(x, t[:1], y, mask)
        with pytest.raises(ValueError, match=r"timestep must have shape"):
            m(x, torch.zeros(2, 5), y, mask)

    def test_mask_text_length_mismatch(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"encoder_attention_mask"):
            m(x, t, y, mask[..., :3])

    def test_text_channels(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"caption_channels"):
            m(x, t, y[..., :10], mask)

    def test_num_cond_latents_too_large(self, m, inputs):
        x, t, y, mask = inputs
        with pytest.raises(ValueError, match=r"num_cond_latents=3 must be smaller"):
            m(x, t, y, mask, num_cond_latents=3)

    def test_kv_cache_wrong_length(self, m, inputs):
        x, t, y, mask = inputs
        with torch.no_grad():
            _, cache = m(x[:, :, :1], torch.zeros(2, 1), y, mask, return_kv=True, skip_crs_attn=True)
        with pytest.raises(ValueError, match=r"kv cache holds"):
            m(x, t, y, mask, num_cond_latents=2, kv_cache_dict=cache)
        with pytest.raises(ValueError, match=r"an entry for each"):
            m(x, t, y, mask, num_cond_latents=1, kv_cache_dict={0: cache[0]})

    def test_unknown_config_key(self):
        with pytest.raises(TypeError, match=r"unknown LongCat-Video config keys"):
            LongCatVideoTransformer3DModel(hidden_size=256, num_heads=2, bogus=1)

    def test_bad_bsa_params(self):
        with pytest.raises(ValueError, match=r"chunk_3d_shape"):
            LongCatVideoTransformer3DModel(**get_preset("tiny"), bsa_params={"chunk_3d_shape_q": [4, 4, 8], "chunk_3d_shape_k": [2, 2, 2]})
