"""Tiled VAE decode and encode-then-offload helpers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat.pipeline_memory import decode_latents_tiled, encode_prompts_then_offload


def _pointwise_decoder(gen):
    w = torch.randn(3, 16, generator=gen)

    def decode(z):  # [B, 16, T, h, w] -> [B, 3, T, 8h, 8w]; each pixel depends on one latent
        y = torch.einsum("oc,bcthw->bothw", w, z)
        return y.repeat_interleave(8, -2).repeat_interleave(8, -1)

    return decode


@pytest.mark.parametrize("hw", [(20, 36), (32, 32), (9, 50)])
def test_tiled_decode_equals_full_decode_for_local_decoders(gen, hw):
    decode = _pointwise_decoder(gen)
    z = torch.randn(1, 16, 2, *hw, generator=gen)
    full = decode(z)
    tiled = decode_latents_tiled(decode, z, tile=16, overlap=4)
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)


def test_tiled_decode_blends_seams(gen):
    """A decoder with a receptive field: tiles disagree near their borders, blending keeps the
    result close to the full decode (and far closer than hard seams would)."""
    conv = nn.Conv3d(16, 3, (1, 3, 3), padding=(0, 1, 1))

    def decode(z):
        return F.interpolate(conv(z), scale_factor=(1, 8, 8), mode="nearest")

    z = torch.randn(1, 16, 1, 24, 40, generator=gen)
    with torch.no_grad():
        full = decode(z)
        tiled = decode_latents_tiled(decode, z, tile=16, overlap=6)
        hard = decode_latents_tiled(decode, z, tile=16, overlap=0)
    err, hard_err = (tiled - full).abs().mean(), (hard - full).abs().mean()
    assert err < hard_err
    assert err < 0.05 * full.abs().mean()


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        decode_latents_tiled(lambda z: z, torch.zeros(1, 16, 1, 8, 8), tile=8, overlap=8)


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
