"""Tiled VAE decode and encode (exact with a halo of the receptive margin, the Wan VAE's
attention included) and the encode-then-offload helper."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat.pipeline_memory import (
    WanVAETiler, decode_latents_tiled, encode_prompts_then_offload, encode_video_tiled, receptive_margin, tile_spans,
)

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="needs diffusers (pip install 'longcat-accel[pipeline]')")


@pytest.mark.parametrize("size, tile, overlap, halo", [
    (90, 64, 0, 13), (160, 64, 0, 13), (160, 96, 0, 13), (24, 16, 4, 0), (50, 16, 4, 0), (100, 30, 3, 5),
    (17, 16, 0, 7), (33, 16, 0, 0), (27, 27, 0, 13), (5, 64, 0, 13), (1000, 28, 0, 13),
])
def test_tile_spans_cover_with_halo_and_overlap(size, tile, overlap, halo):
    spans = tile_spans(size, tile, overlap, halo)
    assert spans[0][2] == 0 and spans[-1][3] == size
    for a, b in zip(spans, spans[1:]):
        assert a[3] - b[2] == overlap  # neighbours' kept parts share exactly the overlap
    for d0, d1, k0, k1 in spans:
        assert d1 - d0 <= tile and d0 <= k0 < k1 <= d1
        assert k0 - d0 == (0 if k0 == 0 else halo) and d1 - k1 == (0 if k1 == size else halo)
    if len(spans) > 1:  # the fewest tiles: one fewer could not hold the axis
        n = len(spans) - 1
        assert n == 1 or n * (tile - 2 * halo) + 2 * halo - (n - 1) * overlap < size
        kept = [k1 - k0 - (halo if k0 == 0 or k1 == size else 0) for _, _, k0, k1 in spans]
        assert max(kept) - min(kept) <= 1  # balanced


def test_tile_spans_refuse_what_cannot_progress():
    with pytest.raises(ValueError, match="2 \\* halo \\+ overlap"):
        tile_spans(100, 26, 0, 13)
    with pytest.raises(ValueError, match="tile must be a positive int"):
        tile_spans(100, 0)
    with pytest.raises(ValueError, match="halo must be a non-negative int"):
        tile_spans(100, 32, 0, -1)


def _local_decoder(gen):
    """Convolutions and nearest upsampling only: 3x3 at 1x, 2x and 8x (a margin of
    1 + 2 / 2 + 1 / 8 = 2.125 latent pixels, with 1x1 layers and activations adding nothing)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = nn.Sequential(
        nn.Conv3d(16, 8, (1, 3, 3), padding=(0, 1, 1)), nn.SiLU(), nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"),
        nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)), nn.Conv3d(8, 8, 1), nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),
        nn.SiLU(), nn.Upsample(scale_factor=(1, 4, 4), mode="nearest"), nn.Conv3d(8, 3, (1, 3, 3), padding=(0, 1, 1)),
    )
    return net.eval()


def test_receptive_margin_of_convolutions_and_upsampling(gen):
    assert receptive_margin([_local_decoder(gen)]) == pytest.approx(1 + 2 / 2 + 1 / 8)
    down = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2))
    assert receptive_margin([down]) == 2  # 1 pixel, then ceil((1 + 2 - 1) / 2) = 1 output pixel = 2 input pixels
    with pytest.raises(ValueError, match="whole frame"):
        receptive_margin([nn.Sequential(nn.Conv2d(3, 3, 3), nn.MultiheadAttention(3, 1))])
    with pytest.raises(ValueError, match="nearest upsampling"):
        receptive_margin([nn.Upsample(scale_factor=2, mode="bilinear")])


@pytest.mark.parametrize("hw", [(20, 36), (32, 32), (9, 50)])
def test_tiled_decode_with_the_receptive_halo_equals_the_whole_decode(gen, hw):
    decode = _local_decoder(gen)
    z = torch.randn(1, 16, 2, *hw, generator=gen)
    with torch.no_grad():
        full = decode(z)
    halo = 3  # ceil(2.125)
    for overlap in (0, 2):
        tiled = decode_latents_tiled(decode, z, tile=12, overlap=overlap, halo=halo)
        torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)
    short = decode_latents_tiled(decode, z, tile=12, overlap=0, halo=halo - 1)
    assert (short - full).abs().max() > 1e-3  # a halo below the margin leaves seams


def test_blending_without_a_halo_only_hides_seams(gen):
    """Overlapping tiles without context disagree near their borders: blending brings the result
    closer to the whole decode than hard seams, and is not exact."""
    conv = nn.Conv3d(16, 3, (1, 3, 3), padding=(0, 1, 1))

    def decode(z):
        return F.interpolate(conv(z), scale_factor=(1, 8, 8), mode="nearest")

    z = torch.randn(1, 16, 1, 24, 40, generator=gen)
    with torch.no_grad():
        full = decode(z)
        blended = decode_latents_tiled(decode, z, tile=16, overlap=6)
        hard = decode_latents_tiled(decode, z, tile=16, overlap=0)
    err, hard_err = (blended - full).abs().mean(), (hard - full).abs().mean()
    assert 0 < err < hard_err
    assert err < 0.05 * full.abs().mean()


def test_tiled_encode_with_the_receptive_halo_equals_the_whole_encode(gen):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), nn.SiLU(),
                        nn.Conv3d(8, 8, (1, 4, 4), stride=(1, 4, 4)), nn.Conv3d(8, 4, (1, 3, 3), padding=(0, 1, 1))).eval()
    video = torch.randn(1, 3, 3, 96, 136, generator=gen)
    with torch.no_grad():
        full = net(video)
    halo = 2  # 1 / 4 + 3 / 4 + 1 latent pixels, rounded up
    tiled = encode_video_tiled(net, video, tile=10, overlap=0, scale=4, halo=halo)
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="2 \\* halo \\+ overlap"):
        decode_latents_tiled(lambda z: z, torch.zeros(1, 16, 1, 9, 9), tile=8, overlap=8)
    with pytest.raises(ValueError, match="expected 8 times its size"):
        decode_latents_tiled(lambda z: z, torch.zeros(1, 16, 1, 9, 9), tile=8, overlap=2)
    with pytest.raises(ValueError, match="multiples of scale=8"):
        encode_video_tiled(lambda v: v, torch.zeros(1, 3, 1, 12, 16), tile=8)


# ----------------------------------------------------------------------------- the Wan VAE (diffusers)

TOY_WAN = dict(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])
WAN21_SMALL = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def _wan(cfg):
    from diffusers import AutoencoderKLWan

    from longcat.bench.pipeline_bench import _randomize

    vae = AutoencoderKLWan(**cfg).eval()
    _randomize(vae, torch.Generator().manual_seed(1))  # norms 1 and biases 0 included: nothing is left at init
    return vae


@needs_diffusers
@pytest.mark.parametrize("cfg, latent", [(TOY_WAN, (3, 21, 29)), pytest.param(WAN21_SMALL, (1, 33, 36), marks=pytest.mark.slow)])
def test_wan_tiled_decode_and_encode_equal_the_whole_frame_vae(gen, cfg, latent):
    """Attention included: the middle blocks run on whole frames, the tiled parts with their
    receptive halo. One latent pixel less of halo and the tiles disagree."""
    vae = _wan(cfg)
    tiler = WanVAETiler(vae)
    z = torch.randn(1, 16, *latent, generator=gen)
    with torch.no_grad():
        full = vae.decode(z).sample
    tile = 2 * tiler.decode_halo + 4  # several tiles along both axes
    assert len(tile_spans(latent[1], tile, 0, tiler.decode_halo)) > 1 and len(tile_spans(latent[2], tile, 0, tiler.decode_halo)) > 1
    torch.testing.assert_close(tiler.decode(z, tile=tile), full, rtol=1e-5, atol=1e-5)
    tight = cfg is TOY_WAN  # (the margin is as tight at full depth; checked on the toy, where it is quick)
    if tight:
        assert (tiler.decode(z, tile=tile, halo=tiler.decode_halo - 1) - full).abs().max() > 1e-4

    video = torch.rand(1, 3, 1 + 4 * (latent[0] - 1), tiler.scale * latent[1], tiler.scale * latent[2], generator=gen) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(video).latent_dist.mode()
    tile = 2 * tiler.encode_halo + 4
    torch.testing.assert_close(tiler.encode(video, tile=tile), mean, rtol=1e-5, atol=1e-5)
    if tight:
        assert (tiler.encode(video, tile=tile, halo=tiler.encode_halo - 1) - mean).abs().max() > 1e-4


@needs_diffusers
def test_wan_tiler_halos_and_errors():
    from diffusers import AutoencoderKLWan

    from longcat.pipeline_plan import WAN21_DECODE_HALO, WAN21_ENCODE_HALO

    with torch.device("meta"):
        wan21 = WanVAETiler(AutoencoderKLWan())
    assert (wan21.decode_halo, wan21.encode_halo, wan21.scale) == (WAN21_DECODE_HALO, WAN21_ENCODE_HALO, 8)
    tiler = WanVAETiler(_wan(TOY_WAN))
    assert (tiler.decode_halo, tiler.encode_halo, tiler.scale) == (7, 4, 2)
    with pytest.raises(ValueError, match="tile must be an int above 2 \\* halo = 14"):
        tiler.decode(torch.zeros(1, 16, 1, 20, 20), tile=14)
    with pytest.raises(ValueError, match="latents must be"):
        tiler.decode(torch.zeros(16, 1, 20, 20), tile=32)
    with pytest.raises(ValueError, match="multiples of scale=2"):
        tiler.encode(torch.zeros(1, 3, 1, 21, 20), tile=32)
    with pytest.raises(TypeError, match="needs diffusers' AutoencoderKLWan"):
        WanVAETiler(nn.Linear(2, 2))


def test_encode_then_offload_moves_encoder_and_shapes_outputs():
    class Tok:
        def __call__(self, prompts, padding, max_length, truncation, add_special_tokens, return_attention_mask, return_tensors):
            ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
            mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
            for i, p in enumerate(prompts):
                n = min(max_length, len(p.split()))
                ids[i, :n] = torch.arange(1, n + 1)
                mask[i, :n] = 1
            return {"input_ids": ids, "attention_mask": mask}

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(32, 8)
            self.moves = []

        def to(self, *args, **kwargs):
            self.moves.append(str(args[0]) if args else str(kwargs))
            return super().to(*args, **kwargs)

        def forward(self, input_ids, attention_mask):
            return (self.emb(input_ids) * attention_mask[..., None],)

    enc = Enc()
    emb, mask = encode_prompts_then_offload(enc, Tok(), ["a cat", "a dog runs"], device="cpu", max_length=6)
    assert emb.shape == (2, 1, 6, 8) and mask.shape == (2, 1, 1, 6)
    assert mask.sum().item() == 5
    assert enc.moves[-1] == "cpu"


@needs_diffusers
@pytest.mark.gpu
def test_wan21_tiled_decode_in_bf16_is_as_accurate_as_the_whole_decode():
    """The real Wan 2.1 VAE (random weights) on a 720p grid of 2 latent frames, in bf16 on the GPU:
    against the float32 whole-frame decode, the tiled bf16 decode's error is at most twice the
    whole-frame bf16 decode's, plus a small atol (tiles only change the convolutions' algorithms)."""
    from longcat.bench.pipeline_bench import build_vae

    vae = build_vae({}, "cuda", torch.float32, seed=1)
    z = torch.randn(1, 16, 2, 88, 160, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        oracle = vae.decode(z).sample
        vae.to(torch.bfloat16)
        whole = vae.decode(z.bfloat16()).sample.float()
    tiled = WanVAETiler(vae).decode(z.bfloat16(), tile=64).float()
    assert (tiled - oracle).abs().max() <= 2 * (whole - oracle).abs().max() + 1e-2
