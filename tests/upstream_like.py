"""A stand-in with the upstream DiT's module tree and calling conventions, for testing
``longcat.accelerate`` on a model that is not ours. It is built from the facts of DESIGN.md
section 3 (names, signatures, text packing); its blocks raise like upstream does when neither
flash-attn nor xformers is installed. With ``cp_split_hw`` it splits the tokens into spatial
windows over the default process group after the patch embedding and gathers them before
unpatchifying, as upstream's context-parallel forward does."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat import REFERENCE_OPS
from longcat.model import (
    CaptionEmbedder, CrossAttention, FeedForwardSwiGLU, FinalLayer, LayerNormFP32, PatchEmbed3D,
    SelfAttention, TimestepEmbedder, ffn_hidden_size,
)


class UpstreamLikeBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, adaln_tembed_dim):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size))
        self.pre_crs_attn_norm = LayerNormFP32(hidden_size, elementwise_affine=True)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, ffn_hidden_size(hidden_size, mlp_ratio))

    def forward(self, x, y, t, y_seqlen, latent_shape, num_cond_latents=None, return_kv=False, kv_cache=None, skip_crs_attn=False):
        raise RuntimeError("Unsupported attention operations.")


class UpstreamLikeDiT(nn.Module):
    def __init__(self, in_channels=16, out_channels=16, hidden_size=256, depth=2, num_heads=2, caption_channels=64,
                 mlp_ratio=4, adaln_tembed_dim=64, frequency_embedding_size=256, patch_size=(1, 2, 2), cp_split_hw=None):
        super().__init__()
        self.patch_size, self.out_channels = tuple(patch_size), out_channels
        self.cp_split_hw = list(cp_split_hw or [1, 1])
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(UpstreamLikeBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), out_channels, adaln_tembed_dim)

    def enable_bsa(self):
        for b in self.blocks:
            b.attn.enable_bsa = True

    def disable_bsa(self):
        for b in self.blocks:
            b.attn.enable_bsa = False

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, num_cond_latents=0,
                return_kv=False, kv_cache_dict={}, skip_crs_attn=False, offload_kv_cache=False):
        B, _, T, H, W = hidden_states.shape
        grid = (T, H // 2, W // 2)
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(-1, T)
        x = self.x_embedder(hidden_states)
        sh, sw = self.cp_split_hw
        if sh * sw > 1:  # this rank's spatial window, windows numbered row-major
            i, j = divmod(torch.distributed.get_rank(), sw)
            h, w = grid[1] // sh, grid[2] // sw
            x = x.view(B, T, grid[1], grid[2], -1)[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(B, T * h * w, -1)
        t = self.t_embedder(timestep.float().flatten()).reshape(B, T, -1)
        y = self.y_embedder(encoder_hidden_states)  # [B, 1, L, C]
        mask = encoder_attention_mask.squeeze(1).squeeze(1)
        y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, x.shape[-1])
        y_seqlens = mask.sum(dim=1).tolist()
        kv_out = {}
        for i, block in enumerate(self.blocks):
            out = block(x, y, t, y_seqlens, grid, num_cond_latents, return_kv, kv_cache_dict.get(i, None), skip_crs_attn)
            if return_kv:
                x, kv = out
                kv_out[i] = (kv[0].cpu(), kv[1].cpu()) if offload_kv_cache else kv
            else:
                x = out
        x = self.final_layer(x, t, REFERENCE_OPS)
        if sh * sw > 1:
            parts = [torch.empty_like(x) for _ in range(sh * sw)]
            torch.distributed.all_gather(parts, x.contiguous())
            x = torch.stack(parts).view(sh, sw, B, T, h, w, -1).permute(2, 3, 0, 4, 1, 5, 6).reshape(B, T * H // 2 * W // 2, -1)
        x = x.view(B, *grid, 1, 2, 2, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T, H, W)
        return (x.float(), kv_out) if return_kv else x.float()
