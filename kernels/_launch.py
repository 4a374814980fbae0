"""Launch-shape helpers shared by the row-wise kernels (norms, residuals, modulation, RoPE).

Row kernels hold a whole row (C channels, or one head's D) in one block. Kernels that see per-frame
modulation use a grid of (chunk of a frame's rows, batch * frame): every program reads its frame's
shift/scale/gate row once, and backward kernels reduce per-frame gradients deterministically into
one partial row per program (summed afterwards by PyTorch, no atomics).
"""
from __future__ import annotations

import triton

from ._runtime import interpreter_enabled

_GRID_AXIS1_MAX = 65535


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_tile(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of ``width`` elements held whole in registers."""
    block = triton.next_power_of_2(max(int(width), 1))
    # ~4K elements per tile on a GPU; bigger tiles under the interpreter, where every program
    # instance costs a fixed ~0.4 ms.
    budget = 16384 if interpreter_enabled() else 4096
    rows = max(1, min(64, budget // block))
    num_warps = max(1, min(16, rows * block // 512))
    return block, rows, num_warps


def frame_chunks(batch_frames: int, rows_per_frame: int, rows_tile: int, target_programs: int) -> tuple[int, int]:
    """Split every frame's rows into chunks: returns (chunk_rows, chunks_per_frame)."""
    if interpreter_enabled():
        target_programs = 1  # one program per frame: fewest program instances
    per_frame = max(1, min(cdiv(target_programs, batch_frames), cdiv(rows_per_frame, rows_tile)))
    chunk = cdiv(cdiv(rows_per_frame, per_frame), rows_tile) * rows_tile
    return chunk, cdiv(rows_per_frame, chunk)


def check_grid_axis1(n: int, what: str) -> None:
    if n > _GRID_AXIS1_MAX:
        raise ValueError(f"{what} = {n} exceeds the {_GRID_AXIS1_MAX} programs a grid axis allows")
