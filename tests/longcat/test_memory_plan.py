"""Memory planner figures for the full-size model at 720p (computed on the meta device)."""
import pytest

from longcat.memory_plan import latent_grid_for_video, plan_memory

LATENT_720P = (48, 88, 160)  # -> token grid (48, 44, 80), 168,960 tokens
N_720P = 168_960
C, F = 4096, 11008


def test_full_model_720p_bf16_figures():
    plan = plan_memory("longcat-video", latent=LATENT_720P, weights="bf16", fused=True, attention="bsa")
    assert plan.tokens == N_720P
    assert plan.weights_total_bytes == 13_581_071_424 * 2
    assert plan.weights_resident_bytes == plan.weights_total_bytes
    x = N_720P * C * 2
    assert plan.phase_bytes["ffn"] == x + 3 * N_720P * F * 2
    assert plan.peak_bytes == plan.weights_resident_bytes + plan.activation_peak_bytes
    assert 10e9 < plan.activation_peak_bytes < 20e9


def test_settings_move_the_peak_the_right_way():
    ref = plan_memory("longcat-video", latent=LATENT_720P, fused=False, attention="sdpa")
    fused = plan_memory("longcat-video", latent=LATENT_720P, fused=True, attention="sdpa")
    chunked = plan_memory("longcat-video", latent=LATENT_720P, fused=True, attention="sdpa", ffn_chunk_frames=4)
    offload = plan_memory("longcat-video", latent=LATENT_720P, fused=True, attention="sdpa", ffn_chunk_frames=4, offload="blocks")
    assert ref.activation_peak_bytes > fused.activation_peak_bytes >= chunked.activation_peak_bytes
    x = N_720P * C * 2
    assert chunked.phase_bytes["ffn"] - x == (fused.phase_bytes["ffn"] - x) * 4 // 48  # 4 of 48 frames at a time
    assert offload.weights_resident_bytes < 3e9 < chunked.weights_resident_bytes
    assert offload.activation_peak_bytes == chunked.activation_peak_bytes
    dense_matrix = plan_memory("longcat-video", latent=(8, 16, 16), attention="reference")
    assert dense_matrix.phase_bytes["self-attention"] > plan_memory("longcat-video", latent=(8, 16, 16), attention="sdpa").phase_bytes["self-attention"]


def test_video_to_latent_grid():
    assert latent_grid_for_video(93, 480, 832) == (24, 60, 104)
    plan = plan_memory("longcat-video", frames=93, height=480, width=832, batch=2)
    assert plan.tokens == 37_440 and plan.batch == 2


def test_report_text_and_errors():
    text = str(plan_memory("small", latent=(4, 16, 16)))
    assert "expected peak" in text and "weights on the GPU" in text
    with pytest.raises(ValueError, match="weights must be one of"):
        plan_memory("small", latent=(4, 16, 16), weights="int4")
    with pytest.raises(ValueError, match="give latent"):
        plan_memory("small")
    with pytest.raises(ValueError, match="offload must be"):
        plan_memory("small", latent=(4, 16, 16), offload="disk")


@pytest.mark.slow
def test_chunked_blocks_720p_8bit_figures():
    """Frame-chunked blocks keep x, K and V (3 residual-sized tensors) plus one chunk's temporaries:
    with 8-bit weights the 720p step is planned near the 18 GB target."""
    x = N_720P * C * 2
    plan = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention="dense", attention_chunk_frames=1)
    whole = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention="dense", ffn_chunk_frames=1)
    assert plan.phase_bytes["ffn (chunked)"] == 2 * x + x // 48 + 3 * N_720P * F * 2 // 48
    assert plan.phase_bytes["self-attention (chunked)"] >= 2 * x
    assert 3 * x < plan.activation_peak_bytes < 3.5 * x
    assert whole.activation_peak_bytes > plan.activation_peak_bytes + 5e9
    assert 13.6e9 < plan.weights_resident_bytes < 13.7e9
    assert plan.peak_bytes < 18.5e9
    # Block-sparse chunks are whole query tiles: 1 frame is planned as 4.
    bsa1 = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention="bsa", attention_chunk_frames=1)
    bsa4 = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention="bsa", attention_chunk_frames=4)
    assert bsa1.phase_bytes == bsa4.phase_bytes
    # A smaller FFN chunk inside bigger attention chunks lowers the FFN phase only.
    a4 = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention_chunk_frames=4)
    a4f1 = plan_memory("longcat-video", latent=LATENT_720P, weights="int8", attention_chunk_frames=4, ffn_chunk_frames=1)
    assert a4f1.phase_bytes["ffn (chunked)"] < a4.phase_bytes["ffn (chunked)"]
    assert a4f1.phase_bytes["self-attention (chunked)"] == a4.phase_bytes["self-attention (chunked)"]


def test_context_parallel_is_per_gpu():
    one = plan_memory("longcat-video", latent=LATENT_720P, weights="bf16", attention="bsa")
    four = plan_memory("longcat-video", latent=LATENT_720P, weights="bf16", attention="bsa", context_parallel=4)
    assert four.weights_resident_bytes == one.weights_resident_bytes  # weights are replicated
    assert four.phase_bytes["ffn"] == one.phase_bytes["ffn"] // 4
    assert one.activation_peak_bytes / 4 < four.activation_peak_bytes < one.activation_peak_bytes / 2
    with pytest.raises(ValueError, match="context_parallel must be a positive int"):
        plan_memory("small", latent=(4, 16, 16), context_parallel=0)
    with pytest.raises(ValueError, match="not combined with context parallelism"):
        plan_memory("small", latent=(4, 16, 16), context_parallel=2, attention_chunk_frames=2)
    with pytest.raises(ValueError, match="attention_chunk_frames must be None or a positive int"):
        plan_memory("small", latent=(4, 16, 16), attention_chunk_frames=0)
