"""Per-rank body of the context-parallelism tests (tests/longcat/test_context_parallel.py).

Every rank builds the same seeded model and inputs, computes the single-device result itself,
then the context-parallel one, and compares them; an assertion on any rank fails the test.
"""
import os

import torch
import torch.distributed as dist

import longcat
from longcat import LongCatVideoTransformer3DModel, accelerate
from longcat.context_parallel import context_parallel

from dit_cases import assert_paths_close, forward_paths, random_inputs

WORLD = 2


HEADS = 4  # two heads per rank, so the head order inside a shard is checked too


def _model(seed=7, **config):
    torch.manual_seed(seed)
    m = LongCatVideoTransformer3DModel.from_preset("tiny", num_heads=HEADS, **config).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.set_ops(longcat.REFERENCE_OPS)


def _inputs(H=8, seed=11):
    return random_inputs(torch.Generator().manual_seed(seed), B=2, T=4, H=H, W=8)


def _paths(model, *inputs):
    return forward_paths(model, *inputs)


def _close(got: dict, want: dict, what: str, rtol=1e-5, atol=1e-5):
    """Compare with the single-device paths; a rank's KV cache holds every token for its share
    of the heads."""
    hc = HEADS // WORLD
    heads = slice(dist.get_rank() * hc, (dist.get_rank() + 1) * hc)
    want = {k: v[:, heads] if k.startswith("cache") else v for k, v in want.items()}
    assert_paths_close(got, want, rtol=rtol, atol=atol, what=what)


def scenario_reference(rank):
    """Reference ops: both splits, every path, our model and the upstream-structured one,
    gradients, and the errors."""
    inputs = _inputs()
    want = _paths(_model(), *inputs)
    for split in ((2, 1), (1, 2)):
        m = accelerate(_model(), attention="reference", fused=False, context_parallel=context_parallel(None, split))
        report = longcat.acceleration_report(m)
        assert report.context_parallel == f"2 ranks, split_hw {split}", report.context_parallel
        _close(_paths(m, *inputs), want, f"ours, split {split}")

    # An upstream-structured model splits the tokens itself; accelerate picks the world group.
    from upstream_like import UpstreamLikeDiT

    up = UpstreamLikeDiT(num_heads=HEADS, cp_split_hw=[1, 2]).eval()
    up.load_state_dict(_model().state_dict())
    accelerate(up, attention="reference", fused=False)
    _close(_paths(up, *inputs), want, "upstream-structured, cp_split_hw [1, 2]")

    # Gradients: a rank's parameter and input gradients are its window's share; their sum over
    # the group is the single-device gradient.
    x, t, y, mask = inputs
    weight = torch.randn(2, 16, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for cp in (None, context_parallel(None, (2, 1))):
        m = _model()
        if cp is not None:
            accelerate(m, attention="reference", fused=False, context_parallel=cp)
        xg = x.clone().requires_grad_()
        (m(xg, t, y, mask) * weight).sum().backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        g["hidden_states"] = xg.grad.clone()
        if cp is not None:
            for v in g.values():
                dist.all_reduce(v)
        grads.append(g)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")

    # Errors, each before anything runs.
    m = _model()
    try:
        context_parallel(None, (2, 2))
        raise AssertionError("split (2, 2) over 2 ranks was accepted")
    except ValueError as e:
        assert "product is the group size 2" in str(e)
    accelerate(m, attention="reference", fused=False, context_parallel=context_parallel(None, (2, 1)))
    x_odd = _inputs(H=6)[0]  # token grid H = 3: not divisible by 2
    try:
        m(x_odd, t, y, mask)
        raise AssertionError("a token grid that does not split was accepted")
    except ValueError as e:
        assert "H = 3 is not a multiple of 2" in str(e), e
    up_plain = UpstreamLikeDiT(num_heads=HEADS).eval()
    try:
        accelerate(up_plain, context_parallel=dist.group.WORLD)
        raise AssertionError("an upstream model without cp_split_hw was accepted for context parallelism")
    except ValueError as e:
        assert "without cp_split_hw" in str(e)
    assert longcat.acceleration_report(up_plain) is None  # nothing was patched


def scenario_kernels(rank):
    """Triton kernels (interpreter on the CPU): block-sparse + fused ops on head shards, against
    the same kernels on one device; and the blocks compiled in one graph each."""
    bsa = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2]}
    inputs = _inputs()
    one = accelerate(_model(), attention="bsa", fused=True, bsa=bsa)
    want = _paths(one, *inputs)
    cp = context_parallel(None, (2, 1))
    m = accelerate(_model(), attention="bsa", fused=True, bsa=bsa, context_parallel=cp)
    _close(_paths(m, *inputs), want, "bsa + fused kernels")

    # The all-to-alls are traceable: every block is still one graph.
    m = accelerate(_model(), attention="bsa", fused=True, context_parallel=cp, compile={"backend": "aot_eager", "fullgraph": True})
    with torch.no_grad():
        got = m(*inputs)
    torch.testing.assert_close(got, _paths(_model(), *inputs)["plain"], rtol=1e-4, atol=2e-5)


SCENARIOS = {"reference": scenario_reference, "kernels": scenario_kernels}


def run(rank: int, init_file: str, scenario: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        SCENARIOS[scenario](rank)
    finally:
        dist.destroy_process_group()
