"""Ulysses context parallelism: two CPU processes (gloo) against one device, and the errors."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longcat
from longcat import LongCatVideoTransformer3DModel
from longcat.context_parallel import ContextParallel, balanced_split, context_parallel

import cp_worker

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


@needs_gloo
# Two ranks each running every Triton kernel in the interpreter: by far the longest test.
@pytest.mark.parametrize("scenario", [pytest.param(s, marks=pytest.mark.slow) if s == "kernels" else s
                                      for s in sorted(cp_worker.SCENARIOS)])
def test_two_ranks_match_one_device(tmp_path, scenario):
    # Each rank asserts its own results; a failure on either rank raises here with its traceback.
    mp.spawn(cp_worker.run, args=(str(tmp_path / "rendezvous"), scenario), nprocs=cp_worker.WORLD, join=True)


@pytest.mark.parametrize("size, split", [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (6, (2, 3)), (8, (2, 4)), (7, (1, 7))])
def test_balanced_split(size, split):
    assert balanced_split(size) == split


def test_balanced_split_rejects_bad_size():
    with pytest.raises(ValueError, match="positive int"):
        balanced_split(0)


def test_needs_an_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel()


def test_split_checks_without_communication():
    cp = ContextParallel(group=None, size=4, rank=3, split_hw=(2, 2))
    with pytest.raises(ValueError, match="W = 5 is not a multiple of 2"):
        cp.check((4, 6, 5))
    with pytest.raises(ValueError, match="num_heads \\(6\\) divisible by 4"):
        cp.check((4, 6, 6), num_heads=6)
    # Rank 3 holds the bottom-right window, in (t, h, w) order.
    grid = (2, 4, 6)
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, -1, 1)
    window = cp.shard_tokens(x, grid).view(2, 2, 3)
    expected = torch.arange(48, dtype=torch.float32).view(2, 4, 6)[:, 2:, 3:]
    torch.testing.assert_close(window, expected, rtol=0, atol=0)


def test_config_split_without_group_raises(gen):
    m = LongCatVideoTransformer3DModel.from_preset("tiny", cp_split_hw=[2, 1]).set_ops(longcat.REFERENCE_OPS)
    x = torch.randn(1, 16, 2, 4, 4, generator=gen)
    with pytest.raises(RuntimeError, match="context_parallel=group"):
        m(x, torch.rand(1, generator=gen), torch.randn(1, 1, 3, 64, generator=gen))
    with pytest.raises(ValueError, match="two positive ints"):
        LongCatVideoTransformer3DModel.from_preset("tiny", cp_split_hw=[0, 2])
