"""Resource rule for tiled Triton configs: will a config fit the GPU it is compiled for?

Autotuning must never discover that a config does not fit by catching ``OutOfResources`` (and a
config that spills registers is slower than a smaller one that does not). Kernels therefore prune
their configs with :func:`fits` before autotuning (``prune_configs_by={"early_config_prune": ...}``
or a static choice), using estimates of the two resources that reject configs on Hopper:

- shared memory per block: the software pipeline keeps ``num_stages`` copies of every operand tile
  it streams, as loaded (Triton allocates one buffer per stage), plus one more B tile when B is
  converted in registers (a dequantised 8-bit weight); the epilogue's layout conversion reuses the
  pipeline buffers, so it counts only when larger;
- registers per thread: fp32/int32 accumulators (``BLOCK_M * BLOCK_N`` per accumulator, spread over
  the block's threads), plus registers for operands converted in registers, plus addresses,
  masks and loop state. ptxas caps a thread at 255 registers and spills beyond it.

The estimates are calibrated against ptxas and Triton's allocator for sm_90 (``longcat-bench
compile`` reports the real numbers for every config a launcher can pick) and err on the safe side:
shared memory is exact or over-estimated for every quantized-GEMM config compiled; registers are an
estimate of what a config needs, while ptxas may choose to stay lower and spill (Triton 3.7.1 keeps
the W8A16-fp8 32x128x128 4-warp config at 128 registers with 8 spilled bytes), so the compile gate,
not this rule, is the final word.

API:
- ``ARCH_LIMITS[arch]``: per-architecture limits (shared memory per block/SM, registers, threads);
- ``TileShape``: what a config streams (tile sizes, element sizes, operand/accumulator counts);
- ``dot_shared_bytes(tile, num_stages)`` and ``dot_registers(tile, num_warps)``: the estimates;
- ``fits(tile, num_warps, num_stages, arch)``: both within the limits of ``sm_<arch>``;
- ``prune_configs(configs, tile_of, arch)``: the ``triton.Config`` list minus the configs that do
  not fit; ``tile_of(config)`` builds the ``TileShape`` of a config.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

__all__ = [
    "ARCH_LIMITS",
    "MAX_REGISTERS_PER_THREAD",
    "TileShape",
    "dot_shared_bytes",
    "dot_registers",
    "fits",
    "prune_configs",
]

# Per-architecture limits (CUDA occupancy tables): max shared memory one block may opt into, shared
# memory and registers per SM, max resident threads and blocks per SM.
ARCH_LIMITS: dict[int, dict[str, int]] = {
    80: {"smem_per_block": 166_912, "smem_per_sm": 167_936, "regs_per_sm": 65_536, "threads_per_sm": 2048, "blocks_per_sm": 32},
    89: {"smem_per_block": 101_376, "smem_per_sm": 102_400, "regs_per_sm": 65_536, "threads_per_sm": 1536, "blocks_per_sm": 24},
    90: {"smem_per_block": 232_448, "smem_per_sm": 233_472, "regs_per_sm": 65_536, "threads_per_sm": 2048, "blocks_per_sm": 32},
}

MAX_REGISTERS_PER_THREAD = 255
# Registers a tiled kernel needs besides accumulators and converted operands (addresses, masks,
# loop counters, epilogue temporaries) and per accumulator; calibrated on sm_90 compiles of the
# quantized GEMM with Triton 3.7.1 (it rejects every large-M config that spills there).
_BASE_REGISTERS = 56
_REGISTERS_PER_ACCUMULATOR_EPILOGUE = 4


@dataclasses.dataclass(frozen=True)
class TileShape:
    """The tiles one program of a matmul-like kernel streams through its K loop.

    ``a_bytes``/``b_bytes``: element sizes of the A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N]
    tiles as loaded; ``b_operands``: B tiles per K step (2 for a fused w1|w3 SwiGLU GEMM);
    ``accumulators``: [BLOCK_M, BLOCK_N] fp32/int32 accumulators; ``b_convert_bytes``: register
    bytes per B element converted in registers before the MMA (0 when B feeds the MMA as loaded;
    the target element size for int8 -> fp16/bf16; 4 for float8_e4m3fn, which converts through
    wider intermediates).
    """

    block_m: int
    block_n: int
    block_k: int
    a_bytes: int
    b_bytes: int
    b_operands: int = 1
    accumulators: int = 1
    b_convert_bytes: int = 0


def dot_shared_bytes(tile: TileShape, num_stages: int) -> int:
    """Estimated shared memory (bytes) of one block: the pipelined operand buffers (plus one more
    B tile as loaded when B is converted in registers), or the epilogue's layout conversion when
    that is larger."""
    stages = max(1, int(num_stages))
    a_tile = tile.block_m * tile.block_k * tile.a_bytes
    b_tile = tile.block_k * tile.block_n * tile.b_bytes
    pipeline = stages * (a_tile + b_tile * tile.b_operands) + (b_tile if tile.b_convert_bytes else 0)
    epilogue = tile.block_m * tile.block_n * 4
    return max(pipeline, epilogue)


def dot_registers(tile: TileShape, num_warps: int) -> int:
    """Estimated registers per thread: accumulators, one B tile converted in registers (the B
    operands of a step are converted one after the other), and a base."""
    threads = 32 * int(num_warps)
    acc = tile.accumulators * tile.block_m * tile.block_n // threads
    converted = tile.block_k * tile.block_n * tile.b_convert_bytes // (4 * threads)
    return acc + converted + _BASE_REGISTERS + _REGISTERS_PER_ACCUMULATOR_EPILOGUE * tile.accumulators


def fits(tile: TileShape, num_warps: int, num_stages: int, arch: int = 90) -> bool:
    """True when the config's estimated shared memory fits one block on ``sm_<arch>`` and its
    estimated registers stay within what a thread may use without spilling."""
    limits = ARCH_LIMITS.get(int(arch), ARCH_LIMITS[90])
    return (dot_shared_bytes(tile, num_stages) <= limits["smem_per_block"]
            and dot_registers(tile, num_warps) <= MAX_REGISTERS_PER_THREAD)


def prune_configs(configs: Sequence, tile_of: Callable[[object], TileShape], arch: int = 90) -> list:
    """The ``triton.Config`` objects of ``configs`` that fit ``sm_<arch>`` (order kept). Raises a
    ValueError naming the rejected configs when none fits: a launcher must offer one that does."""
    kept = [c for c in configs if fits(tile_of(c), c.num_warps, c.num_stages, arch)]
    if configs and not kept:
        raise ValueError(f"no config fits sm_{arch} (shared memory / registers): {[str(c) for c in configs]}")
    return kept
