"""Seeded inputs and the forward paths of the DiT (plain, condition frames, KV cache), shared by
the model-level tests."""
import torch


def random_inputs(gen, B=2, T=4, H=4, W=6, L=6, caption_channels=64):
    """Latents [B, 16, T, H, W], timesteps [B], text [B, 1, L, C] and a mask in which the first
    sample's text is shorter than the others'."""
    x = torch.randn(B, 16, T, H, W, generator=gen)
    t = torch.rand(B, generator=gen) * 1000
    y = torch.randn(B, 1, L, caption_channels, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.int64)
    mask[0, ..., 2 * L // 3:] = 0
    return x, t, y, mask


def forward_paths(model, x, t, y, mask, num_cond=2):
    """Outputs of every path: plain; the first ``num_cond`` frames as condition frames (timestep
    0); the cache built from them (last block's k and v); the other frames against that cache."""
    B, T = x.shape[0], x.shape[2]
    with torch.no_grad():
        plain = model(x, t, y, mask)
        t_frames = torch.cat([torch.zeros(B, num_cond), t[:, None].expand(-1, T - num_cond)], 1)
        cond = model(x, t_frames, y, mask, num_cond_latents=num_cond)
        _, cache = model(x[:, :, :num_cond], torch.zeros(B, num_cond), y, mask, return_kv=True, skip_crs_attn=True)
        kv = model(x[:, :, num_cond:], t, y, mask, num_cond_latents=num_cond, kv_cache_dict=cache)
    last = cache[max(cache)]
    return {"plain": plain, "cond": cond, "cache k": last[0], "cache v": last[1], "kv-cache": kv}


def assert_paths_close(got: dict, want: dict, rtol=1e-5, atol=1e-5, what=""):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")
