"""Named model configurations: the released 13.6B model and small ones for tests and demos."""
from __future__ import annotations

import copy

__all__ = ["PRESETS", "get_preset"]

PRESETS = {
    # The released LongCat-Video DiT: 13,581,071,424 parameters, 27.2 GB in bf16. Its published
    # dit/config.json also sets the BSA parameters (BSA is switched on for the 720p refinement only)
    # and zero-padded text (every sample attends to all text positions).
    "longcat-video": dict(
        in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32,
        caption_channels=4096, mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256,
        patch_size=(1, 2, 2),
        bsa_params=dict(sparsity=0.9375, chunk_3d_shape_q=[4, 4, 4], chunk_3d_shape_k=[4, 4, 4]),
        text_tokens_zero_pad=True,
    ),
    # The 2-block model of the golden files (hidden 256, 2 heads of 128).
    "tiny": dict(
        in_channels=16, out_channels=16, hidden_size=256, depth=2, num_heads=2,
        caption_channels=64, mlp_ratio=4, adaln_tembed_dim=64, frequency_embedding_size=256,
        patch_size=(1, 2, 2),
    ),
    # A demo model that runs a forward pass on a laptop CPU in seconds (head_dim 128 as the real one).
    "small": dict(
        in_channels=16, out_channels=16, hidden_size=512, depth=4, num_heads=4,
        caption_channels=256, mlp_ratio=4, adaln_tembed_dim=128, frequency_embedding_size=256,
        patch_size=(1, 2, 2),
    ),
}


def get_preset(name: str) -> dict:
    """A copy of the config of preset ``name`` (keys of ``LongCatVideoTransformer3DModel``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
