"""Ulysses context parallelism: the video tokens split over GPUs, self-attention on head shards.

Layout (upstream's, so an upstream model that splits its tokens itself runs our blocks unchanged):
the latent token grid (T, H, W) is cut into ``split_h x split_w`` spatial windows of
(T, H / split_h, W / split_w) tokens, and rank r of the group holds window
(r // split_w, r % split_w), its tokens in (t, h, w) order. Everything in a block except
self-attention works token by token, so it runs on the window alone (per-frame adaLN included:
every window holds every frame).

Self-attention needs every token: one all-to-all turns qkv [B, n, 3 * heads * D] of the window
into [B, N, 3 * heads/cp * D] (all N tokens, a 1/cp share of the heads), and places the tokens in
the grid's global (T, H, W) order. So RoPE positions, the condition-frame split, the KV cache and
block-sparse tiles are exactly those of a single GPU (upstream instead attends over the windows
stacked along T, which changes the block-sparse tiles unless every window is a whole number of
tiles). A second all-to-all brings the attention output back to the window, all heads.

Gradients: every step is differentiable. A rank's parameter gradients are its window's share;
the gradient of the loss is their sum over the group (``torch.distributed.all_reduce``).
The collectives are PyTorch's functional ones, so ``torch.compile`` traces them without a break.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["ContextParallel", "context_parallel", "balanced_split"]


def balanced_split(size: int) -> Tuple[int, int]:
    """The (split_h, split_w) factor pair of ``size`` closest to square, split_h <= split_w
    (upstream's default split)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"context-parallel size must be a positive int, got {size!r}")
    h = max(i for i in range(1, math.isqrt(size) + 1) if size % i == 0)
    return h, size // h


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i (differentiable)."""
    from torch.distributed import _functional_collectives as fc

    return fc.all_to_all_single_autograd(x.contiguous(), None, None, group)


class _GatherWindows(torch.autograd.Function):
    """All ranks' windows [B, T, h, w, C] -> the full grid [B, T, H, W, C]; backward keeps this
    rank's window of the gradient (every rank computes the same loss from the same full output)."""

    @staticmethod
    def forward(ctx, window: torch.Tensor, cp: "ContextParallel") -> torch.Tensor:
        ctx.cp = cp
        window = window.contiguous()
        parts = [torch.empty_like(window) for _ in range(cp.size)]
        dist.all_gather(parts, window, group=cp.group)
        sh, sw = cp.split_hw
        B, T, h, w, C = window.shape
        full = torch.stack(parts).view(sh, sw, B, T, h, w, C).permute(2, 3, 0, 4, 1, 5, 6)
        return full.reshape(B, T, sh * h, sw * w, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.cp.window(grad).contiguous(), None


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """A context-parallel group and its spatial split; build it with ``context_parallel()``."""

    group: Any
    size: int
    rank: int
    split_hw: Tuple[int, int]

    def __repr__(self) -> str:
        return f"ContextParallel(size={self.size}, rank={self.rank}, split_hw={self.split_hw})"

    # ------------------------------------------------------------------ checks
    def check(self, grid: Sequence[int], num_heads: Optional[int] = None) -> None:
        """Raise a clear error when the token grid or the head count cannot be split."""
        T, H, W = (int(g) for g in grid)
        sh, sw = self.split_hw
        bad = [f"{axis} = {n} is not a multiple of {k}" for axis, n, k in (("H", H, sh), ("W", W, sw)) if n % k]
        if bad:
            raise ValueError(
                f"context parallelism cuts the token grid (T, H, W) = {(T, H, W)} into {sh} x {sw} windows, "
                f"but {' and '.join(bad)} (token H and W are the latent's divided by the patch size)"
            )
        if num_heads is not None and num_heads % self.size:
            raise ValueError(f"context parallelism over {self.size} ranks needs num_heads ({num_heads}) divisible by {self.size}")

    # ------------------------------------------------------------------ token windows
    def window(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's window of a full grid [B, T, H, W, C] -> [B, T, h, w, C] (a view)."""
        sh, sw = self.split_hw
        B, T, H, W, C = x.shape
        i, j = divmod(self.rank, sw)
        h, w = H // sh, W // sw
        return x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w]

    def shard_tokens(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Tokens of the whole grid [B, T*H*W, C] -> this rank's window [B, T*h*w, C]."""
        T, H, W = grid
        self.check(grid)
        B, N, C = x.shape
        return self.window(x.view(B, T, H, W, C)).reshape(B, -1, C)

    def gather_tokens(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Every rank's window [B, T*h*w, C] -> the whole grid [B, T*H*W, C] on every rank."""
        T, H, W = grid
        sh, sw = self.split_hw
        B, n, C = x.shape
        full = _GatherWindows.apply(x.view(B, T, H // sh, W // sw, C), self)
        return full.reshape(B, T * H * W, C)

    # ------------------------------------------------------------------ Ulysses all-to-all
    def qkv_to_head_shards(self, qkv: torch.Tensor, grid: Sequence[int], num_heads: int) -> torch.Tensor:
        """qkv of this window [B, n, 3 * heads * D] -> every token, this rank's heads:
        [B, N, 3 * (heads / size) * D], tokens in global (T, H, W) order."""
        T, H, W = grid
        sh, sw = self.split_hw
        B, n, C3 = qkv.shape
        hc, D = num_heads // self.size, C3 // (3 * num_heads)
        send = qkv.view(B, n, 3, self.size, hc, D).permute(3, 0, 1, 2, 4, 5)  # [dst rank, B, n, 3, hc, D]
        got = _all_to_all(send, self.group)  # [src rank (window), B, n, 3, hc, D]
        got = got.view(sh, sw, B, T, H // sh, W // sw, 3 * hc * D).permute(2, 3, 0, 4, 1, 5, 6)
        return got.reshape(B, T * H * W, 3 * hc * D)

    def head_shards_to_tokens(self, out: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Attention output of this rank's heads [B, heads / size, N, D] (global token order) ->
        this window's tokens, all heads: [B, n, heads * D]."""
        T, H, W = grid
        sh, sw = self.split_hw
        B, hc, N, D = out.shape
        h, w = H // sh, W // sw
        send = out.reshape(B, hc, T, sh, h, sw, w, D).permute(3, 5, 0, 2, 4, 6, 1, 7)  # [sh, sw, B, T, h, w, hc, D]
        got = _all_to_all(send.reshape(self.size, B, T * h * w, hc, D), self.group)  # [src rank (heads), B, n, hc, D]
        return got.permute(1, 2, 0, 3, 4).reshape(B, T * h * w, self.size * hc * D)


def context_parallel(group=None, split_hw: Optional[Sequence[int]] = None) -> ContextParallel:
    """Describe context parallelism over ``group`` (default: the whole world) with the token grid
    cut into ``split_hw = (split_h, split_w)`` windows (default: ``balanced_split(group size)``).
    ``torch.distributed`` must be initialised, and every rank of the group makes the same call."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised (torch.distributed.init_process_group)")
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the context-parallel group")
    if split_hw is None:
        split_hw = balanced_split(size)
    split_hw = tuple(int(s) for s in split_hw)
    if len(split_hw) != 2 or min(split_hw) < 1 or split_hw[0] * split_hw[1] != size:
        raise ValueError(f"split_hw must be two positive ints whose product is the group size {size}, got {split_hw}")
    return ContextParallel(group=group, size=size, rank=rank, split_hw=split_hw)
