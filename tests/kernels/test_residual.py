"""Gated residual (out of place and in place) and the residual fused with the next LayerNorm."""
import pytest
import torch

from longcat.kernels.modulate import layer_norm_modulate_reference
from longcat.kernels.residual import (
    gated_residual,
    gated_residual_layer_norm,
    gated_residual_layer_norm_reference,
    gated_residual_reference,
)
from oracle import assert_by_rule

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(gen, B=2, T=3, L=7, C=200, dtype=torch.float32, device="cpu"):
    x = torch.randn(B, T * L, C, generator=gen).to(dtype)
    y = torch.randn(B, T * L, C, generator=gen).to(dtype)
    # distinct per frame: a wrong frame broadcast fails the comparison
    gate = torch.randn(B, T, C, generator=gen) + torch.arange(T).view(1, T, 1)
    return x.to(device), y.to(device), gate.to(device)


def _mods(gen, B=2, T=3, C=200, device="cpu", dtype=torch.float32):
    shift = torch.randn(B, T, C, generator=gen) - torch.arange(T).view(1, T, 1)
    scale = 0.5 * torch.randn(B, T, C, generator=gen) + 0.2 * torch.arange(T).view(1, T, 1)
    weight = 1 + 0.5 * torch.randn(C, generator=gen)
    bias = 0.5 * torch.randn(C, generator=gen)
    return shift.to(device), scale.to(device), weight.to(device, dtype), bias.to(device, dtype)


def _f64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,L", [(3, 7), (1, 9)])
def test_gated_residual_matches_oracle(gen, dtype, T, L):
    x, y, gate = _inputs(gen, T=T, L=L, dtype=dtype)
    x0, y0, g0 = x.clone(), y.clone(), gate.clone()
    out = gated_residual(x, y, gate)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    assert_by_rule(out, gated_residual_reference(x, y, gate), gated_residual_reference(*_f64([x, y, gate])), atol=ATOL[dtype])
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(gate, g0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_residual_inplace_writes_into_x(gen, dtype):
    x, y, gate = _inputs(gen, dtype=dtype)
    expected = gated_residual(x, y, gate)
    x_in = x.clone()
    ptr = x_in.data_ptr()
    ret = gated_residual(x_in, y, gate, inplace=True)
    assert ret is x_in and x_in.data_ptr() == ptr
    assert torch.equal(x_in, expected)


def test_gated_residual_inplace_refuses_autograd(gen):
    x, y, gate = _inputs(gen)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gated_residual(x, y.requires_grad_(), gate, inplace=True)
    with pytest.raises(ValueError, match="contiguous"):
        gated_residual(x.transpose(1, 2).contiguous().transpose(1, 2), y.detach(), gate, inplace=True)


def test_gated_residual_grads(gen):
    x, y, gate = _inputs(gen, T=2, L=5, C=96)
    grad = torch.randn(x.shape, generator=gen)

    def grads(fn, ts):
        leaves = [t.clone().requires_grad_() for t in ts]
        return torch.autograd.grad(fn(*leaves), leaves, grad.to(ts[0].dtype))

    got = grads(gated_residual, [x, y, gate])
    lowp = grads(gated_residual_reference, [x, y, gate])
    oracle = grads(gated_residual_reference, _f64([x, y, gate]))
    for g, lg, og in zip(got, lowp, oracle):
        assert_by_rule(g, lg, og, atol=1e-5)


CASES = {
    "ffn": dict(gate=True, mod=True, affine=False),  # x + gate * attn_out, then modulate for the FFN
    "cross": dict(gate=False, mod=False, affine=True),  # x + cross_out, no gate, then affine LN
    "gate_affine": dict(gate=True, mod=False, affine=True),
    "plain_mod": dict(gate=False, mod=True, affine=False),
}


def _case_args(gen, case, T=3, L=7, C=200, dtype=torch.float32, device="cpu"):
    x, y, gate = _inputs(gen, T=T, L=L, C=C, dtype=dtype, device=device)
    shift, scale, weight, bias = _mods(gen, T=T, C=C, device=device, dtype=dtype)
    c = CASES[case]
    return [x, y, gate if c["gate"] else None, shift if c["mod"] else None, scale if c["mod"] else None,
            weight if c["affine"] else None, bias if c["affine"] else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_gated_residual_layer_norm_matches_oracle(gen, dtype, case):
    args = _case_args(gen, case, dtype=dtype)
    before = [a.clone() if a is not None else None for a in args]
    new_x, normed = gated_residual_layer_norm(*args)
    ref_x, ref_n = gated_residual_layer_norm_reference(*args)
    o_x, o_n = gated_residual_layer_norm_reference(*_f64(args))
    assert new_x.dtype == normed.dtype == dtype
    assert_by_rule(new_x, ref_x, o_x, atol=ATOL[dtype])
    assert_by_rule(normed, ref_n, o_n, atol=ATOL[dtype])
    # the norm reads the rounded residual stream, as the unfused model: compare to that too
    unfused = layer_norm_modulate_reference(new_x, *args[3:])
    assert (normed.double() - unfused.double()).abs().max().item() <= 2 * ATOL[dtype]
    for a, b in zip(args, before):
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_gated_residual_layer_norm_grads(gen, case):
    args = _case_args(gen, case, T=2, L=5, C=96)
    present = [i for i, a in enumerate(args) if a is not None]
    g_new = torch.randn(args[0].shape, generator=gen)
    g_norm = torch.randn(args[0].shape, generator=gen)

    def grads(fn, ts):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in ts]
        outs = fn(*leaves)
        return torch.autograd.grad(outs, [leaves[i] for i in present], [g_new.to(ts[0].dtype), g_norm.to(ts[0].dtype)])

    got = grads(gated_residual_layer_norm, args)
    lowp = grads(gated_residual_layer_norm_reference, args)
    oracle = grads(gated_residual_layer_norm_reference, _f64(args))
    for g, lg, og in zip(got, lowp, oracle):
        assert g.shape == og.shape
        assert_by_rule(g, lg, og, atol=1e-5)


def test_bad_inputs(gen):
    x, y, gate = _inputs(gen)
    shift, scale, weight, bias = _mods(gen)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        gated_residual(x, y[:, :-1], gate)
    with pytest.raises(ValueError, match="does not divide"):
        gated_residual(x[:, :20], y[:, :20], gate)
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual(x, y, gate[..., :-1])
    with pytest.raises(TypeError, match="gate has dtype float16"):
        gated_residual(x, y, gate.half())
    with pytest.raises(TypeError, match="y has dtype float64"):
        gated_residual(x, y.double(), gate)
    with pytest.raises(ValueError, match="same device"):
        gated_residual(x, y, gate.to("meta"))
    with pytest.raises(ValueError, match="frames"):
        gated_residual_layer_norm(x, y, gate, shift[:, :1], scale[:, :1])
    with pytest.raises(ValueError, match="weight must have last dimension"):
        gated_residual_layer_norm(x, y, weight=weight[:5])


def test_torch_compile_fullgraph(gen):
    x, y, gate = _inputs(gen, T=2, L=4, C=40)
    shift, scale, _, _ = _mods(gen, T=2, C=40)

    def block_tail(x, y, gate, shift, scale):
        new_x, normed = gated_residual_layer_norm(x, y, gate, shift, scale)
        return gated_residual(new_x, normed, gate)

    compiled = torch.compile(block_tail, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    out = compiled(*leaves)
    out.sum().backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    eager = block_tail(*eager_leaves)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_real_width(gen, case):
    args = _case_args(gen, case, T=3, L=331, C=4096, dtype=torch.bfloat16, device="cuda")
    new_x, normed = gated_residual_layer_norm(*args)
    ref_x, ref_n = gated_residual_layer_norm_reference(*args)
    o_x, o_n = gated_residual_layer_norm_reference(*_f64(args))
    assert_by_rule(new_x, ref_x, o_x, atol=1e-2)
    assert_by_rule(normed, ref_n, o_n, atol=1e-2)
    x, y, gate = args[0], args[1], _inputs(gen, T=3, L=331, C=4096, device="cuda")[2]
    expected = gated_residual_reference(x, y, gate)
    x_in = x.clone()
    gated_residual(x_in, y, gate, inplace=True)
    assert_by_rule(x_in, expected, gated_residual_reference(*_f64([x, y, gate])), atol=1e-2)
