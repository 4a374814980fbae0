"""SwiGLU gate silu(a) * b, separate and packed (fused w1|w3 GEMM output)."""
import pytest
import torch

from longcat.kernels import _runtime
from longcat.kernels import swiglu as swiglu_mod
from longcat.kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_reference, swiglu_reference
from oracle import assert_by_rule

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 200), (3, 1000), (7,)])
def test_swiglu_matches_oracle(gen, dtype, shape):
    a = (torch.randn(shape, generator=gen) * 3).to(dtype)
    b = torch.randn(shape, generator=gen).to(dtype)
    a0, b0 = a.clone(), b.clone()
    out = swiglu(a, b)
    assert out.dtype == dtype and out.shape == a.shape
    assert_by_rule(out, swiglu_reference(a, b), swiglu_reference(a.double(), b.double()), atol=ATOL[dtype])
    assert torch.equal(a, a0) and torch.equal(b, b0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_packed_matches_oracle(gen, dtype):
    ab = (torch.randn(2, 9, 2 * 100, generator=gen) * 3).to(dtype)
    out = swiglu_packed(ab)
    assert out.shape == (2, 9, 100) and out.dtype == dtype
    assert_by_rule(out, swiglu_packed_reference(ab), swiglu_packed_reference(ab.double()), atol=ATOL[dtype])


def test_swiglu_strided_inputs(gen):
    ab = torch.randn(6, 2 * 64, generator=gen)
    a, b = ab.chunk(2, dim=-1)  # non-contiguous halves
    torch.testing.assert_close(swiglu(a, b), swiglu_reference(a, b))
    t = torch.randn(50, 6, generator=gen).t()  # column-major [6, 50]
    torch.testing.assert_close(swiglu_packed(t), swiglu_packed_reference(t))


def test_swiglu_grads(gen):
    a = torch.randn(3, 130, generator=gen) * 3
    b = torch.randn(3, 130, generator=gen)
    grad = torch.randn(3, 130, generator=gen)

    def grads(fn, x, y):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        return torch.autograd.grad(fn(x, y), (x, y), grad.to(x.dtype))

    for g, lg, og in zip(grads(swiglu, a, b), grads(swiglu_reference, a, b), grads(swiglu_reference, a.double(), b.double())):
        assert_by_rule(g, lg, og, atol=1e-6)


def test_swiglu_packed_grads(gen):
    ab = torch.randn(4, 3, 2 * 70, generator=gen) * 3
    grad = torch.randn(4, 3, 70, generator=gen)

    def grad_of(fn, x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(fn(x), x, grad.to(x.dtype))[0]

    got = grad_of(swiglu_packed, ab)
    assert got.shape == ab.shape
    assert_by_rule(got, grad_of(swiglu_packed_reference, ab), grad_of(swiglu_packed_reference, ab.double()), atol=1e-6)


def test_torch_compile_fullgraph(gen):
    ab = torch.randn(3, 2 * 40, generator=gen)
    compiled = torch.compile(lambda t: swiglu_packed(t) * 2, fullgraph=True, backend="aot_eager")
    leaf = ab.clone().requires_grad_()
    out = compiled(leaf)
    out.sum().backward()
    ref = ab.clone().requires_grad_()
    (swiglu_packed(ref) * 2).sum().backward()
    torch.testing.assert_close(out, swiglu_packed_reference(ab) * 2)
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_bad_inputs(gen):
    a = torch.randn(3, 8, generator=gen)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(a, a[:, :4])
    with pytest.raises(TypeError, match="share a dtype"):
        swiglu(a, a.half())
    with pytest.raises(TypeError, match="a has dtype int64"):
        swiglu(a.long(), a)
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_packed(torch.randn(3, 7))
    with pytest.raises(ValueError, match="same device"):
        swiglu(a, a.to("meta"))


def test_fallback_without_triton(gen, monkeypatch):
    monkeypatch.setattr(swiglu_mod, "triton_runs_on", lambda *t: False)
    monkeypatch.setattr(_runtime, "_WARNED", set())
    ab = torch.randn(3, 16, generator=gen)
    with pytest.warns(RuntimeWarning, match="swiglu_packed"):
        out = swiglu_packed(ab)
    assert torch.equal(out, swiglu_packed_reference(ab))


@pytest.mark.gpu
def test_bf16_real_width(gen):
    ab = (torch.randn(2, 600, 2 * 11008, generator=gen) * 3).to("cuda", torch.bfloat16)
    assert_by_rule(swiglu_packed(ab), swiglu_packed_reference(ab), swiglu_packed_reference(ab.double()), atol=1e-2)
    a, b = ab.chunk(2, dim=-1)
    assert_by_rule(swiglu(a, b), swiglu_reference(a, b), swiglu_reference(a.double(), b.double()), atol=1e-2)
