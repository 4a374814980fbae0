"""plan_memory refuses sizes and settings it cannot plan for, naming the argument."""
import numpy as np
import pytest

from longcat.memory_plan import plan_memory


@pytest.mark.parametrize("kwargs,needle", [
    (dict(latent=(4, -16, 16)), "latent H"),
    (dict(latent=(0, 16, 16)), "latent T"),
    (dict(latent=(4, 16)), "latent must be"),
    (dict(latent="4x16x16"), "latent must be"),
    (dict(latent=(4, 16, 16.5)), "latent W"),
    (dict(frames=-3, height=128, width=128), "frames"),
    (dict(frames=5, height=0, width=128), "height"),
    (dict(latent=(4, 16, 16), batch=-1), "batch"),
    (dict(latent=(4, 16, 16), batch=0), "batch"),
    (dict(latent=(4, 16, 16), batch=True), "batch"),
    (dict(latent=(4, 16, 16), text_len=-5), "text_len"),
    (dict(latent=(4, 16, 16), num_cond_latents=-1), "num_cond_latents"),
    (dict(latent=(4, 16, 16), num_cond_latents=5), "num_cond_latents"),
    (dict(latent=(4, 16, 16), attention="flash"), "attention must be one of"),
    (dict(latent=(4, 16, 16), attention="BSA"), "attention must be one of"),
])
def test_bad_sizes_and_settings_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        plan_memory("tiny", **kwargs)


def test_valid_edge_values_still_plan():
    plan = plan_memory("tiny", latent=(1, 2, 2), text_len=0, attention="reference")
    assert plan.tokens == 1 and plan.peak_bytes > plan.weights_total_bytes > 0
    numpy_sizes = plan_memory("tiny", latent=tuple(np.array([4, 16, 16])), batch=np.int64(2))
    assert numpy_sizes.peak_bytes == plan_memory("tiny", latent=(4, 16, 16), batch=2).peak_bytes
