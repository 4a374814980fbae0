"""longcat.accelerate_pipeline: a budget's tactics applied in place to a pipeline object holding
dit, text_encoder and vae (as upstream's LongCatVideoPipeline does); needs the pipeline extra."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import longcat
from longcat.pipeline_plan import PipelineTactics

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("transformers", "diffusers")),
                                reason="needs transformers and diffusers (pip install 'longcat-accel[pipeline]')")


def _pipe():
    from longcat.bench.models import build_random_model
    from longcat.bench.pipeline_bench import SMALL_TEXT_ENCODER, SMALL_VAE, build_text_encoder, build_vae

    return SimpleNamespace(dit=build_random_model("tiny", dtype=torch.float32, device="cpu", seed=0),
                           text_encoder=build_text_encoder(SMALL_TEXT_ENCODER, "cpu", torch.float32, seed=1),
                           vae=build_vae(SMALL_VAE, "cpu", torch.float32, seed=2))


def test_tactics_are_applied_and_the_vae_gives_the_same_results(gen, capsys):
    pipe = _pipe()
    z = torch.randn(1, 16, 1, 28, 30, generator=gen)
    video = torch.rand(1, 3, 1, 224, 240, generator=gen) * 2 - 1
    ids = torch.randint(1, 512, (2, 16), generator=gen)
    with torch.no_grad():
        decoded = pipe.vae.decode(z).sample
        posterior = pipe.vae.encode(video).latent_dist
        embeds = pipe.text_encoder(ids, torch.ones_like(ids)).last_hidden_state

    tactics = PipelineTactics(text_encoder="cpu", offload_prefetch=1, attention_chunk_frames=4, vae_tile=27)
    plan = longcat.accelerate_pipeline(pipe, tactics=tactics, device="cpu", plan_kwargs=dict(latent=(1, 28, 30)))
    assert plan.tactics == tactics and "planned peak" in capsys.readouterr().out
    report = longcat.acceleration_report(pipe.dit)
    assert report.offload and "4" in report.chunking

    # The tiled VAE (2 x 2 tiles of at most 27 latent pixels) returns the same objects and values.
    torch.testing.assert_close(pipe.vae.decode(z).sample, decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe.vae.decode(z, return_dict=False)[0], decoded, rtol=1e-5, atol=1e-5)
    tiled = pipe.vae.encode(video).latent_dist
    torch.testing.assert_close(tiled.mode(), posterior.mode(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled.logvar, posterior.logvar, rtol=1e-5, atol=1e-5)
    draw = [d.sample(torch.Generator().manual_seed(5)) for d in (tiled, posterior)]
    torch.testing.assert_close(*draw, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the CPU text encoder hooks leave its results unchanged
        torch.testing.assert_close(pipe.text_encoder(ids, torch.ones_like(ids)).last_hidden_state, embeds)


class _RecordingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return super().to(*args, **kwargs)

    def forward(self, ids):
        self.moves.append("forward")
        return (self.emb(ids),)


def test_offloaded_text_encoder_comes_to_the_device_only_to_encode():
    pipe = _pipe()
    pipe.text_encoder = _RecordingEncoder()
    # "cpu:0" stands in for the GPU: a device that prints differently from the CPU the encoder parks on
    longcat.accelerate_pipeline(pipe, tactics=PipelineTactics(text_encoder="offload"), device="cpu:0", verbose=False)
    assert pipe.text_encoder.moves == ["cpu"]  # parked at once
    for _ in range(2):
        pipe.text_encoder(torch.zeros(1, 3, dtype=torch.long))
    assert pipe.text_encoder.moves == ["cpu"] + ["cpu:0", "forward", "cpu"] * 2


def test_budget_is_fitted_and_bad_calls_are_refused(capsys):
    pipe = _pipe()
    with pytest.raises(ValueError, match="either memory_budget or tactics"):
        longcat.accelerate_pipeline(pipe)
    with pytest.raises(ValueError, match="either memory_budget or tactics"):
        longcat.accelerate_pipeline(pipe, "8GB", tactics=PipelineTactics())
    with pytest.raises(TypeError, match=r"missing \['vae'\]"):
        longcat.accelerate_pipeline(SimpleNamespace(dit=pipe.dit, text_encoder=pipe.text_encoder), "8GB")
    with pytest.raises(ValueError, match=r"\['offload'\] are set by the pipeline's tactics"):
        longcat.accelerate_pipeline(pipe, "8GB", offload="blocks")
    with pytest.raises(TypeError, match="WanVAETiler needs diffusers' AutoencoderKLWan"):
        longcat.accelerate_pipeline(SimpleNamespace(dit=pipe.dit, text_encoder=pipe.text_encoder, vae=nn.Linear(2, 2)), "8GB")
    assert longcat.acceleration_report(pipe.dit) is None  # nothing was applied by the refused calls
    with pytest.raises(longcat.MemoryBudgetError, match="at least"):
        longcat.accelerate_pipeline(pipe, "3GB")
    plan = longcat.accelerate_pipeline(pipe, "8GB", device="cpu")
    assert plan.peak_bytes <= 8e9 and plan.tactics == longcat.fit_pipeline("8GB").tactics
    assert f"{plan.tactics}" in capsys.readouterr().out


def test_text_encoder_streamed_layer_by_layer(gen):
    """'offload-blocks': the UMT5 layers live on the CPU under a BlockOffloader (its copy schedule is
    tested in test_pipeline_plan on the meta device; UMT5 itself cannot run on meta), the embedding
    looks up on the CPU, the final norm lives on the device. On the CPU the output is unchanged."""
    from longcat.bench.pipeline_bench import SMALL_TEXT_ENCODER, build_text_encoder
    from longcat.pipeline import place_text_encoder

    ids = torch.randint(1, 512, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    plain = build_text_encoder(SMALL_TEXT_ENCODER, "cpu", torch.float32, seed=1)
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    streamed = place_text_encoder(build_text_encoder(SMALL_TEXT_ENCODER, "cpu", torch.float32, seed=1), "offload-blocks", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(streamed(input_ids=ids, attention_mask=mask).last_hidden_state, expected)

    offloader = streamed._longcat_block_offloader
    assert offloader.blocks == list(streamed.encoder.block) and offloader.prefetch == 1
    assert offloader.resident_blocks() == [] and streamed.encoder.embed_tokens.weight.device.type == "cpu"
    on_meta = place_text_encoder(build_text_encoder(SMALL_TEXT_ENCODER, "cpu", torch.float32, seed=1), "offload-blocks", "meta")
    assert on_meta.encoder.final_layer_norm.weight.device.type == "meta"  # the device's share
    assert on_meta._longcat_block_offloader.resident_blocks() == []
    with pytest.raises(TypeError, match="T5-style encoder"):
        place_text_encoder(nn.Linear(2, 2), "offload-blocks", "cpu")
    with pytest.raises(ValueError, match="text encoder tactic must be one of"):
        place_text_encoder(plain, "disk", "cpu")
