"""Pipeline memory planner, budget fitter and block-offload schedule (no transformers/diffusers needed
except where marked)."""
import importlib.util

import pytest
import torch
import torch.nn as nn

from longcat.memory_plan import plan_memory
from longcat.offload import BlockOffloader
from longcat.pipeline_plan import (
    MemoryBudgetError, PipelineTactics, fit_dit, fit_pipeline, parse_memory_size, plan_pipeline, text_encoder_bytes, vae_bytes,
)

LATENT_720P = (48, 88, 160)
UMT5_XXL_PARAMS = 5_680_910_336  # transformers' UMT5EncoderModel with the UMT5-XXL config, counted on meta
WAN21_VAE_PARAMS = 126_892_531  # diffusers' AutoencoderKLWan() counted on meta
needs = {p: pytest.mark.skipif(importlib.util.find_spec(p) is None, reason=f"needs {p} (the pipeline extra)")
         for p in ("transformers", "diffusers")}


def test_720p_refine_phases_match_hand_computed_figures():
    plan = plan_pipeline("refine", PipelineTactics())
    assert plan.latent == LATENT_720P and plan.batch == 1
    te, vae = 2 * UMT5_XXL_PARAMS, 2 * WAN21_VAE_PARAMS
    dit = plan_memory("longcat-video", latent=LATENT_720P, weights="bf16", attention="bsa")
    assert dit.weights_total_bytes == 2 * 13_581_071_424
    weights = te + vae + dit.weights_total_bytes
    for p in plan.phases:
        assert p.weights_bytes == weights, p.name  # everything resident throughout
    embeds = 512 * 4096 * 2
    # UMT5: 6 B L d a + max(3 B L F a, 4 B H L L a) with B=1, L=512, d=4096, F=10240, H=64, bf16
    assert plan.phase("text encoding").activation_bytes == 6 * 512 * 4096 * 2 + 4 * 64 * 512 * 512 * 2 + embeds
    # Wan VAE: u = 96 channels x 704 x 1280 pixels x 2 bytes; 189 frames of 3 x 704 x 1280 out
    u = 96 * 704 * 1280 * 2
    video = 3 * 189 * 704 * 1280 * 2
    latents = 16 * 48 * 88 * 160 * 4
    assert plan.phase("vae decode").activation_bytes == int(52.5 * u) + video + latents
    assert plan.phase("vae encode").activation_bytes == 2 * video + int(38.8 * u) + 2 * latents + embeds
    assert plan.phase("denoising step").activation_bytes == dit.activation_peak_bytes + 3 * 16 * 48 * 88 * 160 * 4 + embeds
    assert plan.peak_bytes == plan.phase("denoising step").peak_bytes
    assert 52e9 < plan.peak_bytes < 54e9  # ~60 GB upstream: same weights, unfused activations


def test_720p_tiled_vae_figures_match_hand_computed_ones():
    """Tiles of at most 64 latent pixels with the halo of 13 (decode) or 9 (encode): the 88 rows
    split in two kept halves of 31 + 13 = 44 -> decoded 57 rows, the 160 columns in four kept
    parts of 34, 34, 33, 33 -> decoded at most 34 + 26 = 60 columns (encode, halo 9: 44 + 9 = 53 rows, at most 36 + 18 = 54 columns)."""
    from longcat.pipeline_plan import VAE_TIME_SHARE_PCT, TACTIC_COST, vae_decode_bytes, vae_encode_bytes, vae_tile_overhead

    out = 3 * 189 * 704 * 1280 * 2
    feats = 384 * 48 * 88 * 160 * 2  # the middle block's features, whole frames
    dec = vae_decode_bytes(LATENT_720P, tile=64)
    assert dec["decode"] == int(52.5 * 96 * (8 * 57) * (8 * 60) * 2)
    assert dec["peak"] == dec["decode"] + out + feats
    enc = vae_encode_bytes(LATENT_720P, tile=64)
    assert enc["input"] == 3 * 189 * (8 * 53) * (8 * 54) * 2
    chunk = 14 * 3 * (8 * 53) * (8 * 54) * 2  # 4 frames joined to 2 cached ones, padded, and 2 cached for the next
    assert enc["working set"] == int(38.8 * 96 * (8 * 53) * (8 * 54) * 2) + chunk + feats + 16 * 48 * 88 * 160 * (2 * 2 + 4)
    # What tiling costs: the area decoded twice (the halos), times the VAE's share of the time.
    assert vae_tile_overhead((88, 160), 64) == pytest.approx((57 + 57) * (60 + 60 + 59 + 59) / (88 * 160))
    assert TACTIC_COST["vae_tile"][64] == pytest.approx(VAE_TIME_SHARE_PCT * (vae_tile_overhead((88, 160), 64) - 1), abs=0.01)
    plan = plan_pipeline("refine", PipelineTactics(vae_tile=64))
    assert plan.phase("vae decode").activations["vae decoder"] == dec["peak"]
    assert "VAE tiles of 64 latent pixels" in str(plan.tactics)


def test_tactics_move_each_phase():
    base = plan_pipeline("refine", PipelineTactics())
    small = plan_pipeline("refine", PipelineTactics(text_encoder="offload", dit_weights="int8", offload_prefetch=1,
                                                    attention_chunk_frames=4, ffn_chunk_frames=1, vae_tile=64))
    # The text encoder leaves after encoding; the blocks live on the CPU outside the denoising loop.
    dit = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention="bsa", attention_chunk_frames=4,
                      ffn_chunk_frames=1, offload="blocks")
    assert small.phase("vae decode").weights == {"text encoder": 0, "dit": dit.weights_outside_blocks_bytes, "vae": 2 * WAN21_VAE_PARAMS}
    assert small.phase("denoising step").weights["dit"] == dit.weights_resident_bytes
    assert small.phase("text encoding").weights["text encoder"] == 2 * UMT5_XXL_PARAMS
    for name in ("vae encode", "denoising step", "vae decode"):
        assert small.phase(name).peak_bytes < base.phase(name).peak_bytes / 4, name
    deeper = plan_pipeline("refine", PipelineTactics(offload_prefetch=3))
    one = plan_pipeline("refine", PipelineTactics(offload_prefetch=1))
    block = (dit.weights_resident_bytes - dit.weights_outside_blocks_bytes) // 2 * 2  # two int8 blocks
    assert deeper.phase("denoising step").weights["dit"] - one.phase("denoising step").weights["dit"] > block  # 2 more bf16 blocks
    no_doubling = plan_pipeline("refine", PipelineTactics(), temporal_doubling=False)
    assert no_doubling.latent == (24, 88, 160)
    base_stage = plan_pipeline("base", PipelineTactics())
    assert base_stage.batch == 2 and [p.name for p in base_stage.phases] == ["text encoding", "denoising step", "vae decode"]


def test_text_encoder_streamed_layer_by_layer_holds_two_layers():
    # a UMT5-XXL layer: q, k, v, o (4096 x 4096), its relative-position bias (32 x 64), two norms,
    # wi_0, wi_1, wo (4096 x 10240)
    layer = 4 * 4096 * 4096 + 32 * 64 + 2 * 4096 + 3 * 4096 * 10240
    plan = plan_pipeline("refine", PipelineTactics(text_encoder="offload-blocks"))
    assert plan.phase("text encoding").weights["text encoder"] == 2 * (2 * layer + 4096)  # + the final norm, bf16
    assert plan.phase("vae decode").weights["text encoder"] == 0


def test_int8_text_encoder_bytes():
    d, inner, F, layers = 4096, 4096, 10240, 24
    quantized = layers * (4 * d * inner + 2 * d * F)  # q, k, v, o, wi_0, wi_1 (wo stays bf16)
    scales = layers * (4 * inner + 2 * F) * 4
    assert text_encoder_bytes(fmt="int8") == 2 * (UMT5_XXL_PARAMS - quantized) + quantized + scales
    with pytest.raises(ValueError, match="text encoder format"):
        text_encoder_bytes(fmt="int4")


@pytest.mark.parametrize("budget, expected", [
    # 8 GB: even the int8 encoder (7.7 GB: the 2.1 GB embedding table stays bf16) does not fit beside the rest
    ("8GB", PipelineTactics(text_encoder="offload-blocks", offload_prefetch=2, attention_chunk_frames=8, ffn_chunk_frames=4,
                            vae_tile=96)),
    ("16GB", PipelineTactics(text_encoder="offload", offload_prefetch=2, ffn_chunk_frames=8)),
    ("24GB", PipelineTactics(text_encoder="offload", offload_prefetch=2)),
    ("80GB", PipelineTactics()),
])
def test_fitter_choices(budget, expected):
    plan = fit_pipeline(budget)
    assert plan.tactics == expected
    assert plan.peak_bytes <= parse_memory_size(budget)


def test_fitter_prefers_cheaper_tactics_as_the_budget_grows():
    costs = [fit_pipeline(b).tactics.cost() for b in ("8GB", "16GB", "24GB", "80GB")]
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0
    fixed = fit_pipeline("16GB", fixed={"dit_weights": "fp8"})
    assert fixed.tactics.dit_weights == "fp8" and fixed.peak_bytes <= 16e9


def test_impossible_budget_names_the_smallest_that_fits():
    with pytest.raises(MemoryBudgetError, match=r"at least (\d+\.\d) GB") as err:
        fit_pipeline("3GB")
    smallest = err.value.args[0].rsplit("at least ", 1)[1].split()[0]
    assert fit_pipeline(f"{smallest}GB").peak_bytes <= float(smallest) * 1e9
    with pytest.raises(ValueError, match="memory_budget must be"):
        fit_pipeline("eight gigabytes")
    with pytest.raises(ValueError, match="stage must be one of"):
        plan_pipeline("upscale")
    with pytest.raises(ValueError, match="vae_tile must exceed twice the VAE tiles' halo"):
        PipelineTactics(vae_tile=26)


def test_fit_dit_and_accelerate_memory_budget():
    import longcat
    from longcat.accelerate import acceleration_report

    latent = (4, 16, 16)
    resident = plan_memory("small", latent=latent, attention="dense").peak_bytes
    tactics, plan = fit_dit(resident, "small", latent=latent, attention="dense")
    assert tactics == PipelineTactics() and plan.peak_bytes == resident
    tactics, plan = fit_dit(resident - 1, "small", latent=latent, attention="dense")
    assert tactics != PipelineTactics() and plan.peak_bytes <= resident - 1

    model = longcat.LongCatVideoTransformer3DModel.from_preset("small")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryBudgetError, match="at least"):
        longcat.accelerate(model, attention="dense", memory_budget=1000, budget_latent=latent)
    assert acceleration_report(model) is None  # refused before changing anything
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    longcat.accelerate(model, attention="dense", memory_budget=resident - 1, budget_latent=latent)
    report = acceleration_report(model)
    assert any("planned step peak" in n for n in report.notes)
    chosen = tactics.accelerate_kwargs()
    assert (report.quantization or None) == chosen["quantize"]
    assert (report.offload is not None) == (chosen["offload"] == "blocks")
    longcat.restore(model)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_offload_prefetch_schedule(prefetch):
    """Each block is loaded before it runs, the next `prefetch` blocks are loaded while it runs,
    and it is freed after: at most 1 + prefetch blocks off the CPU at any time."""
    blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
    home = [b.weight.clone() for b in blocks]
    off = BlockOffloader(blocks, prefetch=prefetch)
    resident = []
    for b in blocks:
        b.register_forward_pre_hook(lambda m, a: resident.append(len(off.resident_blocks())))  # after the offloader's
    x = torch.empty(3, 8, device="meta")
    for b in blocks:
        x = b(x)
    events = list(off.events)
    for i in range(5):
        run = events.index(("run", i))
        assert events.index(("load", i)) < run < events.index(("free", i))
        for j in range(i + 1, min(5, i + 1 + prefetch)):
            assert events.index(("load", j)) < events.index(("free", i))  # prefetched while i computes
        if i + 1 + prefetch < 5:
            assert events.index(("load", i + 1 + prefetch)) > run
    assert max(resident) == min(5, 1 + prefetch)
    assert off.resident_blocks() == []
    off.remove()
    assert all(torch.equal(b.weight, w) and b.weight.device.type == "cpu" for b, w in zip(blocks, home))
    with pytest.raises(ValueError, match="prefetch must be a positive int"):
        BlockOffloader(nn.ModuleList([nn.Linear(2, 2)]), prefetch=0)


@needs["transformers"]
def test_umt5_count_matches_transformers_on_meta():
    from longcat.pipeline_plan import UMT5_XXL_CONFIG, _meta_umt5, _umt5_parameters

    assert sum(p.numel() for p in _meta_umt5(UMT5_XXL_CONFIG).parameters()) == _umt5_parameters(UMT5_XXL_CONFIG) == UMT5_XXL_PARAMS


@needs["diffusers"]
def test_wan_vae_count_matches_diffusers_on_meta():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    assert sum(p.numel() for p in vae.parameters()) == WAN21_VAE_PARAMS
    assert vae_bytes() == 2 * WAN21_VAE_PARAMS


@needs["diffusers"]
@pytest.mark.parametrize("latent", [(5, 16, 24), (9, 12, 20)])
@pytest.mark.parametrize("base_dim", [96, 8])
def test_vae_formulas_match_diffusers_traced_on_meta(latent, base_dim):
    """The planned VAE activation peaks against the live tensors of diffusers' AutoencoderKLWan
    run on the meta device (real module, no memory): within 5%."""
    from diffusers import AutoencoderKLWan

    from longcat.bench.memory import LiveTensorBytes
    from longcat.pipeline_plan import WAN21_VAE_CONFIG, vae_decode_bytes, vae_encode_bytes

    cfg = dict(WAN21_VAE_CONFIG, base_dim=base_dim)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg).to(torch.bfloat16)
    z = torch.empty(1, 16, *latent, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), LiveTensorBytes() as live:
        vae.decode(z)
    assert live.peak == pytest.approx(vae_decode_bytes(latent, cfg)["peak"], rel=0.05)
    frames = 4 * (latent[0] - 1) + 1
    video = torch.empty(1, 3, frames, 8 * latent[1], 8 * latent[2], device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), LiveTensorBytes() as live:
        vae.encode(video).latent_dist.mode()
    planned = vae_encode_bytes(latent, cfg)
    assert live.peak == pytest.approx(planned["peak"] - planned["input"], rel=0.05)  # the video existed before
    with pytest.raises(ValueError, match="Wan 2.1 architecture"):
        vae_decode_bytes(latent, dict(cfg, num_res_blocks=1))


@needs["diffusers"]
@pytest.mark.parametrize("base_dim", [96, 8])
def test_tiled_vae_formulas_match_the_tiler_traced_on_meta(base_dim):
    """WanVAETiler's peaks (tiles of at most 30 latent pixels: 2 x 2 tiles of a 32 x 40 grid)
    against the planned ones, traced on the meta device: within 5%."""
    from diffusers import AutoencoderKLWan

    from longcat.bench.memory import LiveTensorBytes
    from longcat.pipeline_memory import WanVAETiler
    from longcat.pipeline_plan import WAN21_VAE_CONFIG, vae_decode_bytes, vae_encode_bytes

    cfg, latent, tile = dict(WAN21_VAE_CONFIG, base_dim=base_dim), (3, 32, 40), 30
    with torch.device("meta"):
        tiler = WanVAETiler(AutoencoderKLWan(**cfg).to(torch.bfloat16))
    z = torch.empty(1, 16, *latent, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), LiveTensorBytes() as live:
        tiler.decode(z, tile=tile)
    assert live.peak == pytest.approx(vae_decode_bytes(latent, cfg, tile)["peak"], rel=0.05)
    video = torch.empty(1, 3, 9, 8 * latent[1], 8 * latent[2], device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), LiveTensorBytes() as live:
        tiler.encode(video, tile=tile, device="meta")
    planned = vae_encode_bytes(latent, cfg, tile)
    # On meta a tile of the video is a view, not the planned copy; nor is the fp32 copy of the mean made.
    assert live.peak == pytest.approx(planned["working set"] - 16 * 3 * 32 * 40 * 4, rel=0.05)


def test_live_tensor_counter_counts_what_is_alive():
    from longcat.bench.memory import LiveTensorBytes

    x = torch.empty(1000, device="meta")
    with LiveTensorBytes() as live:
        a = x * 2  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        del a
        c = b + 1  # 8000 alive
        del b, c
        d = x.double()  # 8000 bytes, after a and c were freed
    assert live.peak == 8000 and live.live == 8000
    del d
