"""Property-based tests of every public kernel entry point (hypothesis).

Each example draws tiny random shapes, strides (contiguous, row-padded views, column-major),
dtypes (the supported ones, sometimes an unsupported one), devices (cpu, meta, sometimes one tensor
on another device) and option values, calls the public function and requires one of two outcomes:
- it returns the reference's result within the tolerance rule of the suite (max error against a
  float64 oracle at most 2x that of the reference computed in the same precision, plus a small
  atol); on the meta device, the reference's shapes and dtypes;
- or it raises a TypeError/ValueError whose message names one of the arguments.
In both cases the caller's tensors are unchanged. Any other exception fails the example.

On a CUDA machine the draws include the GPU, so the same properties check the compiled kernels
(bfloat16 included). The default profile is small and derandomized (a few seconds per entry point under the
interpreter); ``-m slow`` adds a profile with many more examples.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat.kernels import modulate, qkv_prep, quant_gemm, quantize_activations, residual, rope, swiglu
from longcat.kernels.attention import block_sparse, dense, varlen

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Mostly supported dtypes, sometimes one the entry points must refuse (or, for references that
# take it, compute correctly).
ACT_DTYPE = st.sampled_from(FLOATS * 3 + [torch.float64, torch.int32])
SCALE_DTYPE = st.sampled_from([torch.float32] * 8 + [torch.float16, torch.int32])
QUANT_DTYPE = st.sampled_from([torch.int8] * 3 + [torch.float8_e4m3fn] * 3 + [torch.int16])
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Case:
    inputs: dict[str, torch.Tensor | None]
    run: Callable[..., object]          # the public entry point, called with **inputs
    reference: Callable[..., object]    # its reference, called with **inputs
    oracle: Callable[..., object] | None = None  # called with float64 copies; default: reference
    extra_names: tuple[str, ...] = ()   # other names an error message may name (options)
    quantized: bool = False             # outputs are (q, scale) pairs


# ---------------------------------------------------------------------------------------------
# Drawing tensors
# ---------------------------------------------------------------------------------------------

def _values(gen, shape, dtype, scale=1.0):
    if dtype in (torch.int8, torch.int16, torch.int32):
        return torch.randint(-127, 128, shape, generator=gen).to(dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-448, 448).to(dtype)
    return x.to(dtype)


def draw_tensor(d, gen, shape, dtype, scale=1.0):
    """A tensor of ``shape`` and ``dtype`` laid out as drawn: contiguous, a view with padded rows
    (strided, unit last stride) or column-major (last stride not 1)."""
    shape = tuple(shape)
    layout = d.draw(st.sampled_from(["contiguous", "padded", "column-major"]))
    if layout == "padded" and len(shape) >= 1:
        full = _values(gen, shape[:-1] + (shape[-1] + 3,), dtype, scale)
        return full[..., : shape[-1]]
    if layout == "column-major" and len(shape) >= 2:
        return _values(gen, shape[:-2] + (shape[-1], shape[-2]), dtype, scale).transpose(-1, -2)
    return _values(gen, shape, dtype, scale)


def place(d, inputs):
    """All on the CPU (or, where there is one, the GPU), all on meta, or (rarely) one tensor on
    meta and the rest on the CPU."""
    where = d.draw(st.sampled_from(["cpu"] * 6 + ["meta", "one-elsewhere"] + ["cuda"] * 6 * torch.cuda.is_available()))
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor)]
    if where in ("meta", "cuda"):
        return {n: (t.to(where) if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}, where
    if where == "one-elsewhere" and len(names) > 1:
        moved = d.draw(st.sampled_from(names))
        return {n: (t.to("meta") if n == moved else t) for n, t in inputs.items()}, "mixed"
    return inputs, "cpu"


def maybe_wrong_shape(d, shape):
    """Usually ``shape``; sometimes one dimension off by one (a mismatch the op must refuse)."""
    shape = list(shape)
    if shape and d.draw(st.integers(0, 9)) == 0:
        i = d.draw(st.integers(0, len(shape) - 1))
        shape[i] += 1
    return tuple(shape)


def grid_draw(d, max_t=3, max_hw=4):
    return (d.draw(st.integers(1, max_t)), d.draw(st.integers(1, max_hw)), d.draw(st.integers(1, max_hw)))


# ---------------------------------------------------------------------------------------------
# One builder per public entry point
# ---------------------------------------------------------------------------------------------

def case_swiglu(d, gen):
    shape = tuple(d.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    dtype = d.draw(ACT_DTYPE)
    a = draw_tensor(d, gen, shape, dtype, 3.0)
    b = draw_tensor(d, gen, maybe_wrong_shape(d, shape), d.draw(st.sampled_from([dtype] * 5 + [torch.float32])))
    return Case(dict(a=a, b=b), swiglu.swiglu, swiglu.swiglu_reference)


def case_swiglu_packed(d, gen):
    shape = tuple(d.draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    half = d.draw(st.integers(1, 40))
    width = 2 * half + (1 if d.draw(st.integers(0, 9)) == 0 else 0)
    ab = draw_tensor(d, gen, shape + (width,), d.draw(ACT_DTYPE), 3.0)
    return Case(dict(ab=ab), swiglu.swiglu_packed, swiglu.swiglu_packed_reference)


def case_rms_norm(d, gen):
    lead = tuple(d.draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    D = d.draw(st.integers(1, 48))
    x = draw_tensor(d, gen, lead + (D,), d.draw(ACT_DTYPE), 2.0)
    weight = draw_tensor(d, gen, maybe_wrong_shape(d, (D,)), d.draw(ACT_DTYPE))
    eps = d.draw(st.sampled_from([1e-6, 1e-5]))
    return Case(dict(x=x, weight=weight),
                lambda x, weight: rope.rms_norm(x, weight, eps),
                lambda x, weight: rope.rms_norm_reference(x, weight, eps))


def case_rope_3d(d, gen):
    grid = grid_draw(d)
    B, H = d.draw(st.integers(1, 2)), d.draw(st.integers(1, 2))
    D = d.draw(st.sampled_from([8, 16, 24, 32, 12]))
    S = grid[0] * grid[1] * grid[2]
    x = draw_tensor(d, gen, (B, H, maybe_wrong_shape(d, (S,))[0], D), d.draw(ACT_DTYPE))
    offset = d.draw(st.integers(0, 3))
    return Case(dict(x=x),
                lambda x: rope.rope_3d(x, grid, offset),
                lambda x: rope.rope_3d_reference(x, grid, offset), extra_names=("grid", "head_dim"))


def case_qkv_norm_rope(d, gen):
    grid = grid_draw(d)
    B, heads = d.draw(st.integers(1, 2)), d.draw(st.integers(1, 2))
    D = d.draw(st.sampled_from([8, 16, 24, 12]))
    N = grid[0] * grid[1] * grid[2]
    dtype = d.draw(ACT_DTYPE)
    qkv = draw_tensor(d, gen, maybe_wrong_shape(d, (B, N, 3 * heads * D)), dtype, 2.0)
    q_weight = draw_tensor(d, gen, (D,), dtype)
    k_weight = draw_tensor(d, gen, maybe_wrong_shape(d, (D,)), dtype)
    offset = d.draw(st.integers(0, 2))
    k_pre = d.draw(st.booleans())
    return Case(dict(qkv=qkv, q_weight=q_weight, k_weight=k_weight),
                lambda **t: qkv_prep.qkv_norm_rope(**t, num_heads=heads, grid=grid, frame_offset=offset,
                                                   return_k_pre_rope=k_pre),
                lambda **t: qkv_prep.qkv_norm_rope_reference(**t, num_heads=heads, grid=grid,
                                                             frame_offset=offset, return_k_pre_rope=k_pre),
                extra_names=("grid", "num_heads", "head_dim"))


def _modulation(d, gen, B, T, C, with_affine=True):
    out = {}
    if d.draw(st.booleans()):
        out["shift"] = draw_tensor(d, gen, maybe_wrong_shape(d, (B, T, C)), d.draw(SCALE_DTYPE))
        out["scale"] = draw_tensor(d, gen, (B, T, C), d.draw(SCALE_DTYPE), 0.5)
    else:
        out["shift"] = out["scale"] = None
    if with_affine and d.draw(st.booleans()):
        out["weight"] = draw_tensor(d, gen, (C,), d.draw(ACT_DTYPE))
        out["bias"] = draw_tensor(d, gen, (C,), d.draw(ACT_DTYPE))
    else:
        out["weight"] = out["bias"] = None
    return out


def _tokens(d):
    B, T, L, C = (d.draw(st.integers(1, 2)), d.draw(st.integers(1, 3)), d.draw(st.integers(1, 5)),
                  d.draw(st.integers(1, 40)))
    return B, T, L, C


def case_layer_norm_modulate(d, gen):
    B, T, L, C = _tokens(d)
    x = draw_tensor(d, gen, (B, T * L, C), d.draw(ACT_DTYPE), 2.0)
    inputs = dict(x=x, **_modulation(d, gen, B, T, C))
    out_dtype = d.draw(st.sampled_from([None, None, torch.float32, torch.float16, torch.bfloat16]))
    return Case(inputs,
                lambda **t: modulate.layer_norm_modulate(**t, out_dtype=out_dtype),
                lambda **t: modulate.layer_norm_modulate_reference(**t, out_dtype=out_dtype),
                oracle=lambda **t: modulate.layer_norm_modulate_reference(**t),
                extra_names=("out_dtype",))


def case_layer_norm_modulate_quant(d, gen):
    B, T, L, C = _tokens(d)
    x = draw_tensor(d, gen, (B, T * L, C), d.draw(ACT_DTYPE), 2.0)
    inputs = dict(x=x, **_modulation(d, gen, B, T, C))
    qdtype = d.draw(QUANT_DTYPE)
    return Case(inputs,
                lambda **t: modulate.layer_norm_modulate_quant(**t, qdtype=qdtype),
                lambda **t: modulate.layer_norm_modulate_quant_reference(**t, qdtype=qdtype),
                extra_names=("qdtype",), quantized=True)


def case_gated_residual(d, gen):
    B, T, L, C = _tokens(d)
    x = draw_tensor(d, gen, (B, T * L, C), d.draw(ACT_DTYPE))
    y = draw_tensor(d, gen, maybe_wrong_shape(d, (B, T * L, C)), d.draw(ACT_DTYPE))
    gate = draw_tensor(d, gen, maybe_wrong_shape(d, (B, T, C)), d.draw(SCALE_DTYPE))
    return Case(dict(x=x, y=y, gate=gate), residual.gated_residual, residual.gated_residual_reference)


def case_gated_residual_layer_norm(d, gen):
    B, T, L, C = _tokens(d)
    x = draw_tensor(d, gen, (B, T * L, C), d.draw(ACT_DTYPE))
    y = draw_tensor(d, gen, (B, T * L, C), d.draw(ACT_DTYPE))
    gate = draw_tensor(d, gen, (B, T, C), d.draw(SCALE_DTYPE)) if d.draw(st.booleans()) else None
    inputs = dict(x=x, y=y, gate=gate, **_modulation(d, gen, B, T, C))
    return Case(inputs, residual.gated_residual_layer_norm, residual.gated_residual_layer_norm_reference)


def case_quantize_per_token(d, gen):
    lead = tuple(d.draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = d.draw(st.integers(1, 70))
    x = draw_tensor(d, gen, lead + (K,), d.draw(ACT_DTYPE), d.draw(st.sampled_from([1.0, 100.0])))
    qdtype = d.draw(QUANT_DTYPE)
    return Case(dict(x=x),
                lambda x: quantize_activations.quantize_per_token(x, qdtype),
                lambda x: quantize_activations.quantize_per_token_reference(x, qdtype),
                extra_names=("qdtype",), quantized=True)


def _weight(d, gen, N, K):
    wdtype = d.draw(QUANT_DTYPE)
    w_q = draw_tensor(d, gen, (N, K), wdtype, 100.0)
    w_scale = (torch.rand(maybe_wrong_shape(d, (N,)), generator=gen) * 0.01 + 1e-3).to(d.draw(SCALE_DTYPE))
    bias = draw_tensor(d, gen, (N,), d.draw(ACT_DTYPE)) if d.draw(st.booleans()) else None
    return w_q, w_scale, bias


def case_weight_only_linear(d, gen):
    lead = tuple(d.draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K, N = d.draw(st.integers(1, 40)), 2 * d.draw(st.integers(1, 12))
    swiglu_flag = d.draw(st.booleans())
    x = draw_tensor(d, gen, lead + (maybe_wrong_shape(d, (K,))[0],), d.draw(ACT_DTYPE))
    w_q, w_scale, bias = _weight(d, gen, N, K)
    return Case(dict(x=x, w_q=w_q, w_scale=w_scale, bias=bias),
                lambda **t: quant_gemm.weight_only_linear(**t, swiglu=swiglu_flag),
                lambda **t: quant_gemm.weight_only_linear_reference(**t, swiglu=swiglu_flag),
                extra_names=("swiglu", "N", "K"))


def case_dynamic_linear(d, gen):
    lead = tuple(d.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    K, N = d.draw(st.integers(1, 40)), 2 * d.draw(st.integers(1, 12))
    swiglu_flag = d.draw(st.booleans())
    w_q, w_scale, bias = _weight(d, gen, N, K)
    x_q = draw_tensor(d, gen, lead + (K,), d.draw(st.sampled_from([w_q.dtype] * 9 + [torch.float32])), 100.0)
    x_scale = (torch.rand(maybe_wrong_shape(d, lead), generator=gen) * 0.01 + 1e-3).to(d.draw(SCALE_DTYPE))
    out_dtype = d.draw(st.sampled_from(FLOATS + [torch.float64]))
    return Case(dict(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias),
                lambda **t: quant_gemm.dynamic_linear(**t, out_dtype=out_dtype, swiglu=swiglu_flag),
                lambda **t: quant_gemm.dynamic_linear_reference(**t, out_dtype=out_dtype, swiglu=swiglu_flag),
                oracle=lambda **t: quant_gemm.dynamic_linear_reference(**t, out_dtype=torch.float64,
                                                                       swiglu=swiglu_flag),
                extra_names=("out_dtype", "swiglu", "N", "K"))


def _qkv(d, gen, Sq, Skv):
    B, H = d.draw(st.integers(1, 2)), d.draw(st.integers(1, 2))
    D = d.draw(st.sampled_from([16, 16, 32, 8]))
    dtype = d.draw(ACT_DTYPE)
    q = draw_tensor(d, gen, (B, H, Sq, D), dtype)
    k = draw_tensor(d, gen, (B, H, Skv, D), dtype)
    v = draw_tensor(d, gen, maybe_wrong_shape(d, (B, H, Skv, D)), d.draw(st.sampled_from([dtype] * 6 + [torch.float32])))
    return dict(q=q, k=k, v=v)


def case_dense_attention(d, gen):
    inputs = _qkv(d, gen, d.draw(st.integers(0, 20)), d.draw(st.integers(1, 20)))
    return_lse = d.draw(st.booleans())
    return Case(inputs,
                lambda **t: dense.dense_attention(**t, return_lse=return_lse),
                lambda **t: dense.dense_attention_reference(**t, return_lse=return_lse),
                extra_names=("head_dim",))


def case_varlen_attention(d, gen):
    lens_q = d.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    lens_k = d.draw(st.lists(st.integers(0, 9), min_size=len(lens_q), max_size=len(lens_q)))
    H, D = d.draw(st.integers(1, 2)), d.draw(st.sampled_from([16, 32, 8]))
    dtype = d.draw(ACT_DTYPE)
    q = draw_tensor(d, gen, (sum(lens_q), H, D), dtype)
    k = draw_tensor(d, gen, (sum(lens_k), H, D), dtype)
    v = draw_tensor(d, gen, maybe_wrong_shape(d, (sum(lens_k), H, D)), dtype)
    cu_dtype = d.draw(st.sampled_from([torch.int32, torch.int64, torch.float32]))
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(cu_dtype)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(cu_dtype)
    # Upper bounds of the per-sample lengths (exact or loose), or read from the offsets.
    bounds = d.draw(st.sampled_from(["given", "loose", "read"]))
    extra = 3 if bounds == "loose" else 0
    max_q, max_k = (None, None) if bounds == "read" else (max(lens_q) + extra, max(lens_k) + extra)
    if bounds == "read" and d.draw(st.booleans()):
        # Offsets the launcher reads must be refused when they leave the tensors or go backwards.
        cu_k = cu_k.clone()
        if d.draw(st.booleans()):
            cu_k[-1] += d.draw(st.integers(1, 5))
        elif len(lens_k) > 1:
            cu_k[1], cu_k[-1] = cu_k[-1], cu_k[1]
    return Case(dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
                lambda **t: varlen.varlen_attention(**t, max_seqlen_q=max_q, max_seqlen_k=max_k),
                varlen.varlen_attention_reference,
                extra_names=("head_dim",))


def _bsa_args(d):
    grid_q, grid_k = grid_draw(d, 2, 3), grid_draw(d, 2, 3)
    # At most 2 x 2 x 1 tiles per grid, some partial: every interpreted selection program walks
    # all key tiles, so more tiles cost seconds per example.
    big = [max(a, b) for a, b in zip(grid_q, grid_k)]
    tile = (d.draw(st.integers(-(-big[0] // 2), big[0] + 1)), d.draw(st.integers(-(-big[1] // 2), big[1] + 1)),
            d.draw(st.integers(big[2], big[2] + 1)))
    sparsity = d.draw(st.sampled_from([0.0, 0.5, 0.75, 0.9, 0.5, 0.75, None, 1.5]))
    cdf = d.draw(st.sampled_from([None, None, 0.5, 0.9, 1.0])) if sparsity is not None else d.draw(st.sampled_from([0.8, 1.0]))
    return grid_q, grid_k, tile, sparsity, cdf


def case_block_sparse_attention(d, gen):
    grid_q, grid_k, tile, sparsity, cdf = _bsa_args(d)
    nq, nk = grid_q[0] * grid_q[1] * grid_q[2], grid_k[0] * grid_k[1] * grid_k[2]
    inputs = _qkv(d, gen, nq, nk)
    kw = dict(latent_shape_q=grid_q, latent_shape_k=grid_k, sparsity=sparsity, cdf_threshold=cdf, tile=tile)
    return Case(inputs,
                lambda **t: block_sparse.block_sparse_attention(**t, **kw),
                lambda **t: block_sparse.block_sparse_attention_reference(**t, **kw),
                extra_names=tuple(kw) + ("head_dim",))


def case_block_sparse_selection(d, gen):
    grid_q, grid_k, tile, sparsity, cdf = _bsa_args(d)
    nq, nk = grid_q[0] * grid_q[1] * grid_q[2], grid_k[0] * grid_k[1] * grid_k[2]
    inputs = _qkv(d, gen, nq, nk)
    del inputs["v"]
    kw = dict(latent_shape_q=grid_q, latent_shape_k=grid_k, sparsity=sparsity, cdf_threshold=cdf, tile=tile)
    return Case(inputs,
                lambda **t: block_sparse.block_sparse_selection(**t, **kw),
                lambda **t: block_sparse.block_sparse_selection_reference(**t, **kw),
                extra_names=tuple(kw) + ("head_dim",))


ENTRY_POINTS = {
    "swiglu": case_swiglu,
    "swiglu_packed": case_swiglu_packed,
    "rms_norm": case_rms_norm,
    "rope_3d": case_rope_3d,
    "qkv_norm_rope": case_qkv_norm_rope,
    "layer_norm_modulate": case_layer_norm_modulate,
    "layer_norm_modulate_quant": case_layer_norm_modulate_quant,
    "gated_residual": case_gated_residual,
    "gated_residual_layer_norm": case_gated_residual_layer_norm,
    "quantize_per_token": case_quantize_per_token,
    "weight_only_linear": case_weight_only_linear,
    "dynamic_linear": case_dynamic_linear,
    "dense_attention": case_dense_attention,
    "varlen_attention": case_varlen_attention,
    "block_sparse_attention": case_block_sparse_attention,
    "block_sparse_selection": case_block_sparse_selection,
}


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------

def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _to_cpu(out):
    if isinstance(out, torch.Tensor):
        return out.cpu()
    return type(out)(_to_cpu(item) for item in out)


def _float64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype.itemsize >= 2 else t


def _assert_clear_error(err: Exception, case: Case):
    names = [n for n in case.inputs] + list(case.extra_names)
    assert isinstance(err, (TypeError, ValueError)), f"{type(err).__name__} is not a clear error: {err}"
    msg = str(err)
    assert any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", msg) for n in names), (
        f"the error names none of {names}: {msg}")


def _assert_close(out, lowp, oracle):
    assert out.shape == oracle.shape and out.dtype == lowp.dtype, (out.shape, oracle.shape, out.dtype, lowp.dtype)
    if not out.is_floating_point():
        assert torch.equal(out, lowp)
        return
    o, r, ref = out.double(), lowp.double(), oracle.double()
    finite = torch.isfinite(ref)
    # Non-finite oracle entries (lse of a sample without keys: -inf) must be reproduced exactly.
    assert torch.equal(o[~finite], ref[~finite]) or (o[~finite].isnan() & ref[~finite].isnan()).all()
    if finite.any():
        o, r, ref = o[finite], r[finite], ref[finite]
        assert torch.isfinite(o).all(), "non-finite output where the oracle is finite"
        err, ref_err = (o - ref).abs().max().item(), (r - ref).abs().max().item()
        bound = 2.0 * ref_err + ATOL.get(out.dtype, 1e-5) * (1.0 + ref.abs().max().item())
        assert err <= bound, f"max error {err:.3e} > 2 x reference error {ref_err:.3e} + atol"


def _assert_quantized_close(out, lowp):
    (q, s), (q_ref, s_ref) = out, lowp
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0.0)
    deq, deq_ref = q.double() * s.double().unsqueeze(-1), q_ref.double() * s_ref.double().unsqueeze(-1)
    if q.dtype == torch.int8:
        # one step at a rounding tie at most
        assert (q.int() - q_ref.int()).abs().max().item() <= 1
    else:
        # one e4m3 step (the interpreter's fp8 down-cast rounds some values the other way)
        assert ((deq - deq_ref).abs() <= 0.125 * deq_ref.abs() + s.double().unsqueeze(-1) * 2.0 ** -9).all()


def check_entry_point(name: str, d):
    gen = torch.Generator().manual_seed(d.draw(st.integers(0, 2**31 - 1)))
    case = ENTRY_POINTS[name](d, gen)
    inputs, where = place(d, case.inputs)
    before = {n: t.clone() for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    try:
        out = case.run(**inputs)
    except (TypeError, ValueError) as err:
        _assert_clear_error(err, case)
        out = None
    except Exception as err:  # anything else is a crash of the entry point
        raise AssertionError(f"{name} raised {type(err).__name__}: {err}") from err
    finally:
        for n, t in before.items():
            assert torch.equal(inputs[n], t), f"{name} modified its input {n}"
    if out is None:
        return
    assert where != "mixed", f"{name} accepted tensors on different devices"
    cpu_inputs = case.inputs
    lowp = case.reference(**cpu_inputs)
    if where == "meta":
        got, want = _flat(out), _flat(lowp)
        assert [(t.device.type, t.shape, t.dtype) for t in got] == [("meta", t.shape, t.dtype) for t in want]
        return
    out = _to_cpu(out)
    if case.quantized:
        _assert_quantized_close(out, lowp)
        return
    oracle = (case.oracle or case.reference)(**{n: _float64(t) for n, t in cpu_inputs.items()})
    got, want, exact = _flat(out), _flat(lowp), _flat(oracle)
    assert len(got) == len(want) == len(exact)
    for o, r, ref in zip(got, want, exact):
        _assert_close(o, r, ref)


FAST = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
THOROUGH = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@FAST
@given(d=st.data())
def test_entry_point_returns_reference_numbers_or_a_clear_error(name, d):
    check_entry_point(name, d)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@THOROUGH
@given(d=st.data())
def test_entry_point_properties_thorough(name, d):
    check_entry_point(name, d)
