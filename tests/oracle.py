"""Tolerance rules of the test-suite (flash-attention's rule).

A kernel output in low precision passes when its max error against a high-precision oracle is at
most ``factor`` times the error of the same PyTorch computation done in that low precision, plus a
small atol. Never compare against zeros or all-equal data: ``assert_meaningful`` guards that.
"""
import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_meaningful(oracle: torch.Tensor) -> None:
    """The oracle must be finite and vary, or a comparison against it proves nothing."""
    o = oracle.double()
    assert torch.isfinite(o).all(), "oracle has non-finite values"
    assert o.numel() > 1 and o.std().item() > 0, "oracle is constant: the comparison would prove nothing"


def assert_by_rule(out: torch.Tensor, lowp_ref: torch.Tensor, oracle: torch.Tensor, atol: float = 1e-5, factor: float = 2.0) -> None:
    """max|out - oracle| <= factor * max|lowp_ref - oracle| + atol, with no NaN anywhere."""
    assert out.shape == oracle.shape, f"shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out.double()).all(), "output has NaN/Inf (unwritten or overflowed elements)"
    assert_meaningful(oracle)
    err = max_abs_err(out, oracle)
    ref_err = max_abs_err(lowp_ref, oracle)
    bound = factor * ref_err + atol
    assert err <= bound, f"max error {err:.3e} > {factor} x reference error {ref_err:.3e} + atol {atol:.1e}"


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Max error relative to the reference's max magnitude."""
    assert_meaningful(ref)
    rel = max_abs_err(out, ref) / ref.double().abs().max().item()
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.1e}"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with NaN (for out= buffers that must be fully written)."""
    return torch.full_like(t, float("nan"))
