"""``longcat-bench pipeline`` end to end on toy widths (needs transformers and diffusers: the pipeline extra)."""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("transformers", "diffusers")),
                       reason="needs transformers and diffusers (pip install 'longcat-accel[pipeline]')"),
    pytest.mark.slow,
]


def test_tiny_refine_pipeline_with_every_tactic_runs_end_to_end():
    from longcat.bench.pipeline_bench import run_pipeline
    from longcat.pipeline_plan import PipelineTactics

    tactics = PipelineTactics(text_encoder="offload-int8", dit_weights="int8", offload_prefetch=1, attention_chunk_frames=4,
                              ffn_chunk_frames=1, vae_tile=27)
    res = run_pipeline("refine", device="cpu", latent=(2, 4, 8), steps=1, tactics=tactics)
    assert [r["phase"] for r in res["records"]] == ["text encoding", "vae encode", "denoising step", "vae decode"]
    assert all(r["status"] == "ok" and r["time_s"] > 0 and r["planned_peak_bytes"] > 0 for r in res["records"])
    assert res["output_finite"] and res["small"]
    plan = res["plan"]
    assert plan["tactics"]["vae_tile"] == 27 and plan["peak_bytes"] == max(p["peak_bytes"] for p in plan["phases"])


def test_tiny_refine_pipeline_gives_the_same_video_with_vae_tiles():
    """On the Wan 2.1 VAE architecture at a toy width, tiles of at most 27 latent pixels (2 x 2
    tiles of this 28 x 30 grid, each with its 13-pixel halo) give the same video, end to end from
    the same seed (VAE encode, the denoising step, VAE decode), as the whole-frame VAE."""
    import dataclasses

    from longcat.bench.pipeline_bench import run_pipeline
    from longcat.pipeline_plan import PipelineTactics

    tactics = PipelineTactics(text_encoder="offload-blocks", offload_prefetch=1, attention_chunk_frames=4, vae_tile=27)
    tiled = run_pipeline("refine", device="cpu", latent=(1, 28, 30), steps=1, tactics=tactics, keep_output=True)
    whole = run_pipeline("refine", device="cpu", latent=(1, 28, 30), steps=1, tactics=dataclasses.replace(tactics, vae_tile=None),
                         keep_output=True)
    assert all(r["status"] == "ok" for r in tiled["records"] + whole["records"])
    assert tiled["output"].shape == whole["output"].shape == (1, 3, 1, 224, 240)
    assert whole["output"].std() > 0.05  # a picture, not a constant
    torch.testing.assert_close(tiled["output"], whole["output"], rtol=1e-4, atol=1e-4)


def test_cli_needs_matching_stage_and_resolution(capsys):
    from longcat.bench.cli import main

    assert main(["pipeline", "--stage", "refine", "--resolution", "480p"]) == 2
    assert "720p" in capsys.readouterr().err


@pytest.mark.gpu
def test_720p_refine_fits_8gb_on_the_gpu():
    """Real-size components with the 8 GB recipe of the whole 720p refinement, run on 8 latent
    frames: under an 8 GB memory fraction every phase runs, each within 10% of its planned peak."""
    from longcat.bench.pipeline_bench import run_pipeline

    res = run_pipeline("refine", budget="8GB", device="cuda", latent=(8, 88, 160), fit_latent=(48, 88, 160), steps=1)
    assert all(r["status"] == "ok" for r in res["records"]), res["records"]
    assert res["output_finite"]
    for r in res["records"]:
        assert r["measured_peak_bytes"] <= 8e9
        assert abs(r["measured_peak_bytes"] / r["planned_peak_bytes"] - 1) <= 0.10, r
    assert torch.isfinite(torch.tensor([r["time_s"] for r in res["records"]])).all()
