"""The kernel benchmark cases: for every op, its inputs at the real LongCat-Video shapes (GPU) or
small ones (CPU), the subject (our kernel), its ``*_reference`` and the peers, with the FLOPs and
bytes that turn a time into TFLOP/s or GB/s.

A case never fails to build because an API or a peer is missing: that implementation is marked
unavailable with the reason, and the run goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .peers import Unavailable, compiled, flex_attention_fn, optional_attr, sdpa_backend_fns, upstream_bsa_fn

__all__ = ["Impl", "Case", "build_cases", "OPS", "kernel_path", "BSA_CONFIGS", "bsa_label"]

# Real shapes (DESIGN.md section 5): latent grids after patching, tokens per sample, batch.
GPU_SHAPES = {
    "480p": dict(batch=2, grid=(24, 30, 52)),
    "720p": dict(batch=1, grid=(48, 44, 80)),
    # for the accuracy sweep (float64 oracle) on a GPU; not part of the default timing run
    "gpu-small": dict(batch=2, grid=(8, 16, 16), heads=4, hidden=512, ffn=1376),
}
DEFAULT_GPU_SIZES = ("480p", "720p")
HEADS, HEAD_DIM, HIDDEN, FFN = 32, 128, 4096, 11008
CPU_SHAPES = {
    "cpu-small": dict(batch=1, grid=(8, 8, 16), heads=2, head_dim=64, hidden=128, ffn=192),
    # for tests, CI checks and the pytest-benchmark suite: seconds in the Triton interpreter
    "cpu-tiny": dict(batch=1, grid=(4, 8, 8), heads=2, head_dim=64, hidden=64, ffn=96),
}
# BSA settings measured: the published model config (dit/config.json) first, upstream's function
# defaults beside it. Labels of the BSA cases carry the setting ("720p/0.9375-4x4x4").
BSA_CONFIGS = ((0.9375, (4, 4, 4)), (0.875, (4, 4, 8)))


def bsa_label(size: str, sparsity: float, tile) -> str:
    return f"{size}/{sparsity:g}-{'x'.join(str(t) for t in tile)}"
TEXT_LENS = (512, 300)  # valid text tokens per sample of the cross-attention (varlen) case
# GEMM targets on a GPU: K = N = 4096 (attn.proj) and the FFN shapes (the packed w1|w3 with its
# SwiGLU, and w2), at a weight-bandwidth-bound M and the 480p / 720p token counts.
GEMM_SHAPES_GPU = {"attn.proj": (4096, 4096), "ffn.w2": (4096, 11008)}
GEMM_TOKENS_GPU = {"small": 1024, "480p": 37440, "720p": 168960}
GEMM_SHAPES_CPU = {"cpu-small": (256, 128), "cpu-tiny": (128, 64)}
GEMM_TOKENS_CPU = 64
# Above this the explicit-softmax / fp32 references are not run (they would only measure the
# allocator); errors are then taken against the first peer that ran.
REFERENCE_BYTES_LIMIT_GPU = 24 * 1024**3

OPS = ("attention.dense", "attention.bsa", "attention.bsa.gating", "attention.varlen", "layer_norm_modulate", "gated_residual",
       "rms_norm", "rope_3d", "qkv_norm_rope", "swiglu", "quant_gemm")


@dataclass
class Impl:
    name: str
    role: str  # "subject" | "reference" | "peer"
    fn: Optional[Callable] = None  # fn(*prepared_inputs) -> output
    prepare: Optional[Callable] = None  # inputs -> prepared inputs (not timed: layouts, masks, weights)
    output: Optional[Callable] = None  # raw output -> tensor in the reference's layout
    unavailable: str = ""
    note: str = ""


@dataclass
class Case:
    op: str
    label: str
    params: dict
    make_inputs: Callable[[int], tuple]
    impls: List[Impl] = field(default_factory=list)
    flops: float = 0.0
    nbytes: float = 0.0
    input_sets: int = 2
    # "max_abs" (kernel error against the reference) or "sqnr" (quantization: against exact float math)
    error_metric: str = "max_abs"
    exact: Optional[Callable] = None  # inputs -> float32 exact output, for error_metric "sqnr"
    # positions of inputs whose dtype is part of the API (float32 modulation tensors): the accuracy
    # sweep over activation dtypes leaves them alone
    fixed_dtype_args: tuple = ()


def kernel_path(device: torch.device) -> str:
    """Which code path our public functions take here."""
    from longcat.kernels._runtime import interpreter_enabled

    if device.type == "cuda":
        return "triton"
    return "triton-interpreter" if interpreter_enabled() else "reference-fallback"


def _lazy(module: str, name: str) -> Impl:
    """An Impl shell whose fn is ``module.name`` or unavailable with the reason."""
    try:
        return Impl(name="", role="", fn=optional_attr(module, name))
    except Unavailable as e:
        return Impl(name="", role="", unavailable=str(e))


def _impl(name, role, module, attr, call=None, **kw) -> Impl:
    shell = _lazy(module, attr)
    fn = shell.fn
    if fn is not None and call is not None:
        fn = call(fn)
    return Impl(name=name, role=role, fn=fn, unavailable=shell.unavailable, **kw)


def _compiled_impl(name: str, fn: Optional[Callable], use_compile: bool) -> Impl:
    if fn is None:
        return Impl(name, "peer", unavailable="reference not available")
    if not use_compile:
        return Impl(name, "peer", unavailable="torch.compile peers are off (--compile on to run them)")
    try:
        return Impl(name, "peer", fn=compiled(fn))
    except Unavailable as e:
        return Impl(name, "peer", unavailable=str(e))


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _shapes(device: torch.device, sizes):
    if device.type == "cuda":
        out = []
        for label, s in GPU_SHAPES.items():
            if label not in (sizes or DEFAULT_GPU_SIZES):
                continue
            out.append((label, dict(dict(heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, ffn=FFN), **s)))
        return out
    wanted = [s for s in (sizes or ["cpu-small"]) if s in CPU_SHAPES] or ["cpu-small"]
    return [(label, dict(CPU_SHAPES[label])) for label in wanted]


def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(1000 + seed)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def _attention_cases(device, dtype, sizes, use_compile) -> List[Case]:
    cases = []
    sdpa = sdpa_backend_fns(device)
    for label, s in _shapes(device, sizes):
        B, (T, H, W), Hd, D = s["batch"], s["grid"], s["heads"], s["head_dim"]
        N = T * H * W

        def make_qkv(seed, B=B, Hd=Hd, N=N, D=D):
            g = _gen(device, seed)
            return tuple(_randn((B, Hd, N, D), dtype, device, g) for _ in range(3))

        dense_flops = 4.0 * B * Hd * N * N * D
        ref_bytes = 4.0 * B * Hd * N * N * 2  # explicit scores + probabilities in fp32
        ref_ok = device.type != "cuda" or ref_bytes <= REFERENCE_BYTES_LIMIT_GPU
        big_note = f"reference skipped at this size (explicit softmax needs ~{ref_bytes / 1024**3:,.0f} GiB)"

        # dense
        dense = Case("attention.dense", label, dict(batch=B, heads=Hd, seq=N, head_dim=D, dtype=str(dtype)[6:]),
                     make_qkv, flops=dense_flops, nbytes=4.0 * B * Hd * N * D * dtype.itemsize)
        dense.impls.append(_impl("longcat", "subject", "longcat.kernels.attention", "dense_attention"))
        ref = _impl("reference", "reference", "longcat.kernels.attention", "dense_attention_reference")
        if not ref_ok:
            ref = Impl("reference", "reference", unavailable=big_note)
        dense.impls.append(ref)
        for name, fn in sdpa.items():
            dense.impls.append(Impl(name, "peer", fn=fn))
        cases.append(dense)

        for sparsity, tile in BSA_CONFIGS:
            cases += _bsa_cases(device, label, (T, H, W), B, Hd, D, dtype, make_qkv, sparsity, tile, dense_flops,
                                ref_ok, big_note, sdpa)

        # variable-length cross-attention: every sample's queries against its own valid text tokens
        lens = TEXT_LENS if device.type == "cuda" else (24, 11)
        lens = tuple(lens[i % len(lens)] for i in range(B))

        def make_varlen(seed, B=B, N=N, Hd=Hd, D=D, lens=lens):
            g = _gen(device, seed)
            q = _randn((B * N, Hd, D), dtype, device, g)
            k = _randn((sum(lens), Hd, D), dtype, device, g)
            v = _randn((sum(lens), Hd, D), dtype, device, g)
            cu_q = torch.arange(0, (B + 1) * N, N, device=device, dtype=torch.int32)
            cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
            return q, k, v, cu_q, cu_k

        var = Case("attention.varlen", label, dict(batch=B, heads=Hd, seq_q=N, text_lens=list(lens), head_dim=D, dtype=str(dtype)[6:]),
                   make_varlen, flops=4.0 * Hd * D * N * sum(lens),
                   nbytes=(2.0 * B * N + 2.0 * sum(lens)) * Hd * D * dtype.itemsize)
        var.impls.append(_impl("longcat", "subject", "longcat.kernels.attention", "varlen_attention",
                               call=lambda f, N=N, lens=lens: (lambda q, k, v, cq, ck: f(q, k, v, cq, ck, max_seqlen_q=N, max_seqlen_k=max(lens)))))
        var.impls.append(_impl("reference", "reference", "longcat.kernels.attention", "varlen_attention_reference"))
        var.impls.append(_impl("sdpa-per-sample", "peer", "longcat.ops", "sdpa_varlen_attention"))
        cases.append(var)
    return cases


def _bsa_cases(device, size, grid, B, Hd, D, dtype, make_qkv, sparsity, tile, dense_flops, ref_ok, big_note,
               sdpa) -> List[Case]:
    """BSA forward (gating included) against its reference, FlexAttention with the same block mask,
    upstream's kernel and dense attention; and the gating alone (``attention.bsa.gating``), so that
    its share of the BSA time is measured. Same inputs as the dense case; FLOPs over the kept tiles."""
    T, H, W = grid
    N = T * H * W
    label = bsa_label(size, sparsity, tile)
    bsa_kw = dict(sparsity=sparsity, tile=tile)
    n_tiles = math.prod(math.ceil(a / t) for a, t in zip(grid, tile))
    keep = max(1, int((1 - sparsity) * n_tiles)) / n_tiles
    params = dict(batch=B, heads=Hd, seq=N, head_dim=D, grid=[T, H, W], tile=list(tile), sparsity=sparsity,
                  density=keep, dtype=str(dtype)[6:])
    bsa = Case("attention.bsa", label, params, make_qkv, flops=dense_flops * keep,
               nbytes=4.0 * B * Hd * N * D * dtype.itemsize)
    call = (lambda f: (lambda q, k, v: f(q, k, v, grid, grid, **bsa_kw)))
    bsa.impls.append(_impl("longcat", "subject", "longcat.kernels.attention", "block_sparse_attention", call=call))
    ref = _impl("reference", "reference", "longcat.kernels.attention", "block_sparse_attention_reference", call=call)
    bsa.impls.append(ref if ref_ok else Impl("reference", "reference", unavailable=big_note))
    bsa.impls.append(_flex_impl(device, grid, sparsity, tile))
    up, why = upstream_bsa_fn()
    if up is None:
        bsa.impls.append(Impl("upstream-bsa", "peer", unavailable=why))
    else:
        bsa.impls.append(Impl("upstream-bsa", "peer", fn=lambda q, k, v: up(
            q, k, v, grid, grid, sparsity=sparsity, chunk_3d_shape_q=list(tile), chunk_3d_shape_k=list(tile))))
    dense_peer = "sdpa-flash" if "sdpa-flash" in sdpa else next(iter(sdpa))
    bsa.impls.append(Impl(f"dense-{dense_peer}", "peer", fn=sdpa[dense_peer],
                          note="dense attention on the same inputs: the cost BSA avoids (errors are vs dense)"))

    # The gating alone; the output compared is the 0/1 tile mask (same set of tiles = error 0).
    gating = Case("attention.bsa.gating", label, params, make_qkv, nbytes=2.0 * B * Hd * N * D * dtype.itemsize)
    sel_call = (lambda f: (lambda q, k, v: f(q, k, grid, grid, sparsity, None, tile)))
    from longcat.kernels.attention.block_sparse import selection_to_tile_mask

    for impl in (_impl("longcat", "subject", "longcat.kernels.attention", "block_sparse_selection", call=sel_call),
                 _impl("reference", "reference", "longcat.kernels.attention", "block_sparse_selection_reference",
                       call=sel_call)):
        impl.output = lambda sel: selection_to_tile_mask(*sel, n_tiles).float()
        gating.impls.append(impl)
    return [bsa, gating]


def _flex_impl(device, grid, sparsity, tile) -> Impl:
    """FlexAttention with the BSA selection as its block mask. Flex blocks are contiguous runs of
    tokens, so q, k, v are permuted to tile order first (as upstream BSA does); that and the
    selection are preparation, not timed. Needs every tile full (the grid a multiple of the tile)."""
    try:
        run, make_block_mask = flex_attention_fn(device)
    except Unavailable as e:
        return Impl("flex-attention", "peer", unavailable=str(e))
    if any(a % t for a, t in zip(grid, tile)):
        return Impl("flex-attention", "peer", unavailable=f"grid {tuple(grid)} is not a multiple of the tile {tile} (flex blocks must be full tiles)")
    from longcat.kernels.attention import block_sparse_selection
    from longcat.kernels.attention.block_sparse import token_tile_ids

    block = math.prod(tile)
    perm = torch.argsort(token_tile_ids(grid, tile, device), stable=True)
    inv = torch.argsort(perm)

    def prepare(inputs):
        q, k, v = inputs
        idx, cnt = block_sparse_selection(q, k, grid, grid, sparsity, None, tile)
        # FlexAttention reads the width of its index rows as the number of key blocks
        full = idx.new_zeros(idx.shape[:-1] + (k.shape[2] // block,))
        full[..., :idx.shape[-1]] = idx
        mask = make_block_mask(full.int(), cnt.int(), block, q.shape[2], k.shape[2])
        return q[:, :, perm].contiguous(), k[:, :, perm].contiguous(), v[:, :, perm].contiguous(), mask

    return Impl("flex-attention", "peer", fn=run, prepare=prepare, output=lambda o: o[:, :, inv],
                note="block mask = BSA selection; inputs pre-permuted to tile order")


# ---------------------------------------------------------------------------------------------
# element-wise / norm ops (memory-bound: judged in GB/s)
# ---------------------------------------------------------------------------------------------


def _elementwise_cases(device, dtype, sizes, use_compile) -> List[Case]:
    cases = []
    K = "longcat.kernels"
    for label, s in _shapes(device, sizes):
        B, (T, H, W), Hd, D, C, Fh = s["batch"], s["grid"], s["heads"], s["head_dim"], s["hidden"], s["ffn"]
        N = T * H * W
        el = dtype.itemsize
        common = dict(batch=B, tokens=N, frames=T, dtype=str(dtype)[6:])

        def make_mod(seed, B=B, N=N, T=T, C=C):
            g = _gen(device, seed)
            return (_randn((B, N, C), dtype, device, g), _randn((B, T, C), torch.float32, device, g, 0.1),
                    _randn((B, T, C), torch.float32, device, g, 0.1))

        case = Case("layer_norm_modulate", label, dict(common, hidden=C), make_mod, nbytes=2.0 * B * N * C * el,
                    fixed_dtype_args=(1, 2))
        case.impls.append(_impl("longcat", "subject", f"{K}.modulate", "layer_norm_modulate"))
        ref = _impl("reference", "reference", f"{K}.modulate", "layer_norm_modulate_reference")
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        cases.append(case)

        def make_res(seed, B=B, N=N, T=T, C=C):
            g = _gen(device, seed)
            return (_randn((B, N, C), dtype, device, g), _randn((B, N, C), dtype, device, g),
                    _randn((B, T, C), torch.float32, device, g, 0.1))

        case = Case("gated_residual", label, dict(common, hidden=C), make_res, nbytes=3.0 * B * N * C * el,
                    fixed_dtype_args=(2,))
        case.impls.append(_impl("longcat", "subject", f"{K}.residual", "gated_residual"))
        ref = _impl("reference", "reference", f"{K}.residual", "gated_residual_reference")
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        cases.append(case)

        def make_res_mod(seed, B=B, N=N, T=T, C=C):
            g = _gen(device, seed)
            return (_randn((B, N, C), dtype, device, g), _randn((B, N, C), dtype, device, g),
                    *(_randn((B, T, C), torch.float32, device, g, 0.1) for _ in range(3)))

        # "fused_norm.*": the fused norms the block calls (GB/s in ``longcat-bench kernels``; the
        # accuracy sweep of ``check`` covers their kernel through layer_norm_modulate / gated_residual)
        # the FFN input: residual + LayerNorm-modulate in one pass (reads x, y; writes x, normed)
        case = Case("fused_norm.gated_residual_layer_norm", label, dict(common, hidden=C), make_res_mod, nbytes=4.0 * B * N * C * el,
                    fixed_dtype_args=(2, 3, 4))
        case.impls.append(_impl("longcat", "subject", f"{K}.residual", "gated_residual_layer_norm"))
        ref = _impl("reference", "reference", f"{K}.residual", "gated_residual_layer_norm_reference")
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        for impl in case.impls:
            impl.output = lambda o: torch.stack([t.float() for t in o])
        cases.append(case)

        # the W8A8 GEMM inputs: LayerNorm-modulate (qkv) and residual + LayerNorm-modulate (w1|w3)
        # emitting 8-bit codes and per-token scales (compared dequantised)
        for qname, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
            codes = B * N * C + 4.0 * B * N
            call = (lambda f, qd=qdtype: (lambda *a: f(*a, qdtype=qd)))
            case = Case(f"fused_norm.layer_norm_modulate_quant[{qname}]", label, dict(common, hidden=C), make_mod,
                        nbytes=B * N * C * el + codes, fixed_dtype_args=(1, 2))
            case.impls.append(_impl("longcat", "subject", f"{K}.modulate", "layer_norm_modulate_quant", call=call))
            case.impls.append(_impl("reference", "reference", f"{K}.modulate", "layer_norm_modulate_quant_reference", call=call))
            for impl in case.impls:
                impl.output = lambda o: o[0].float() * o[1].unsqueeze(-1)
            cases.append(case)
            case = Case(f"fused_norm.gated_residual_layer_norm_quant[{qname}]", label, dict(common, hidden=C), make_res_mod,
                        nbytes=3.0 * B * N * C * el + codes, fixed_dtype_args=(2, 3, 4))
            case.impls.append(_impl("longcat", "subject", f"{K}.residual", "gated_residual_layer_norm_quant", call=call))
            case.impls.append(_impl("reference", "reference", f"{K}.residual", "gated_residual_layer_norm_quant_reference", call=call))
            for impl in case.impls:
                impl.output = lambda o: torch.cat([o[0].float(), o[1].float() * o[2].unsqueeze(-1)])
            cases.append(case)

        def make_rms(seed, B=B, N=N, Hd=Hd, D=D):
            g = _gen(device, seed)
            return _randn((B, N, Hd, D), dtype, device, g), 1 + _randn((D,), dtype, device, g, 0.1)

        case = Case("rms_norm", label, dict(common, heads=Hd, head_dim=D), make_rms, nbytes=2.0 * B * N * Hd * D * el)
        case.impls.append(_impl("longcat", "subject", f"{K}.rope", "rms_norm"))
        ref = _impl("reference", "reference", f"{K}.rope", "rms_norm_reference")
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        cases.append(case)

        grid = (T, H, W)

        def make_rope(seed, B=B, N=N, Hd=Hd, D=D):
            g = _gen(device, seed)
            return (_randn((B, Hd, N, D), dtype, device, g),)

        case = Case("rope_3d", label, dict(common, heads=Hd, head_dim=D, grid=list(grid)), make_rope, nbytes=2.0 * B * N * Hd * D * el)
        case.impls.append(_impl("longcat", "subject", f"{K}.rope", "rope_3d", call=lambda f, grid=grid: (lambda x: f(x, grid))))
        ref = _impl("reference", "reference", f"{K}.rope", "rope_3d_reference", call=lambda f, grid=grid: (lambda x: f(x, grid)))
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        cases.append(case)

        def make_qkv(seed, B=B, N=N, Hd=Hd, D=D):
            g = _gen(device, seed)
            return (_randn((B, N, 3 * Hd * D), dtype, device, g), 1 + _randn((D,), dtype, device, g, 0.1),
                    1 + _randn((D,), dtype, device, g, 0.1))

        # reads the q and k columns, writes q and k (v stays a view of qkv)
        case = Case("qkv_norm_rope", label, dict(common, heads=Hd, head_dim=D, grid=list(grid)), make_qkv,
                    nbytes=4.0 * B * N * Hd * D * el)
        call = (lambda f, Hd=Hd, grid=grid: (lambda qkv, wq, wk: f(qkv, wq, wk, Hd, grid)))
        case.impls.append(_impl("longcat", "subject", f"{K}.qkv_prep", "qkv_norm_rope", call=call))
        ref = _impl("reference", "reference", f"{K}.qkv_prep", "qkv_norm_rope_reference", call=call)
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        for impl in case.impls:
            impl.output = lambda o: torch.stack([t.float() for t in o])
        cases.append(case)

        def make_swiglu(seed, B=B, N=N, Fh=Fh):
            g = _gen(device, seed)
            return _randn((B, N, Fh), dtype, device, g), _randn((B, N, Fh), dtype, device, g)

        case = Case("swiglu", label, dict(common, ffn=Fh), make_swiglu, nbytes=3.0 * B * N * Fh * el)
        case.impls.append(_impl("longcat", "subject", f"{K}.swiglu", "swiglu"))
        ref = _impl("reference", "reference", f"{K}.swiglu", "swiglu_reference")
        case.impls += [ref, _compiled_impl("torch.compile(reference)", ref.fn, use_compile)]
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------
# quantized GEMMs (W8A16 and W8A8) against bf16 and the peers' 8-bit layers
# ---------------------------------------------------------------------------------------------


def _quant_cases(device, dtype, sizes, use_compile) -> List[Case]:
    on_gpu = device.type == "cuda"
    if on_gpu:
        tokens = [(label, m) for label, m in GEMM_TOKENS_GPU.items() if label == "small" or label in (sizes or DEFAULT_GPU_SIZES)]
        shapes = GEMM_SHAPES_GPU
    else:
        wanted = [s for s in (sizes or ["cpu-small"]) if s in GEMM_SHAPES_CPU] or ["cpu-small"]
        shapes = {s: GEMM_SHAPES_CPU[s] for s in wanted}
        tokens = [("cpu", GEMM_TOKENS_CPU)]
    try:
        from longcat.quant.linear import quantize_weight
    except ImportError as e:  # pragma: no cover - quant is part of the package
        return [Case("quant_gemm", "n/a", {}, lambda s: (), impls=[Impl("longcat", "subject", unavailable=str(e))])]
    cases = []
    for size, M in tokens:
        suffix = f" M={M}" if on_gpu else ""
        for layer, (n, k) in shapes.items():
            cases.append(_plain_gemm_case(f"{layer}{suffix}", M, n, k, device, dtype, quantize_weight))
        if on_gpu:
            n, k = FFN, HIDDEN
            cases.append(_ffn_gate_case(f"ffn.w1|w3+swiglu{suffix}", M, n, k, device, dtype, quantize_weight))
            cases.append(_ffn_block_case(f"ffn block{suffix}", M, n, k, device, dtype, quantize_weight))
    return cases


def _gemm_inputs(M, shapes, device, dtype):
    def make(seed):
        g = _gen(device, seed)
        x = _randn((M, shapes[0][1]), dtype, device, g)
        return (x, *(_randn(s, torch.float32, device, g, s[1] ** -0.5) for s in shapes))
    return make


def _plain_gemm_case(label, M, n, k, device, dtype, quantize_weight) -> Case:
    on_gpu = device.type == "cuda"
    case = Case("quant_gemm", label, dict(tokens=M, out_features=n, in_features=k, act_dtype=str(dtype)[6:]),
                _gemm_inputs(M, [(n, k)], device, dtype), flops=2.0 * M * n * k,
                nbytes=(M * k + M * n) * dtype.itemsize + n * k, input_sets=1,
                error_metric="sqnr", exact=lambda x, w: x.float() @ w.t())
    case.impls.append(Impl("bf16-linear" if dtype == torch.bfloat16 else f"{str(dtype)[6:]}-linear", "peer",
                           fn=lambda x, w: F.linear(x, w), prepare=lambda inp: (inp[0], inp[1].to(dtype)),
                           note="unquantized weights in the activation dtype (cuBLAS / MKL)"))
    qg = _lazy("longcat.kernels.quant_gemm", "_launch")
    qpt = _lazy("longcat.kernels.quantize_activations", "quantize_per_token")
    for fmt, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        def prep_w(inp, qdtype=qdtype):
            w_q, scale = quantize_weight(inp[1], qdtype)
            return inp[0], w_q, scale

        if qdtype == torch.float8_e4m3fn and on_gpu and torch.cuda.get_device_capability(device) < (8, 9):
            case.impls.append(Impl(f"longcat-{fmt}-w8a16", "subject", unavailable="fp8 needs compute capability >= 8.9"))
            continue
        wo = _impl(f"longcat-{fmt}-w8a16", "subject", "longcat.kernels.quant_gemm", f"{fmt}_weight_only_linear")
        wo.prepare = prep_w
        case.impls.append(wo)
        dyn = _lazy("longcat.kernels.quant_gemm", f"{fmt}_dynamic_linear")
        if dyn.fn is None or qpt.fn is None:
            case.impls.append(Impl(f"longcat-{fmt}-w8a8", "subject", unavailable=dyn.unavailable or qpt.unavailable))
            continue
        case.impls.append(Impl(
            f"longcat-{fmt}-w8a8", "subject", prepare=prep_w,
            fn=lambda x, w_q, s, d=dyn.fn, qp=qpt.fn, qd=qdtype: d(*qp(x, qd), w_q, s, out_dtype=x.dtype),
            note="includes the per-token quantization of the activations" + (
                "; plain fp8 GEMMs dispatch to torch._scaled_mm on sm_90" if fmt == "fp8" else "")))
        if fmt == "fp8" and qg.fn is not None:
            # Both sides of the dispatch rule: our Triton kernel, and cuBLASLt through torch._scaled_mm.
            case.impls.append(Impl(
                "longcat-fp8-w8a8-triton", "subject", prepare=prep_w,
                fn=lambda x, w_q, s, qp=qpt.fn, launch=qg.fn: launch(*_rows2(*qp(x, torch.float8_e4m3fn)), w_q, s, None, x.dtype, True, False),
                note="the Triton kernel the dispatcher bypasses for plain fp8 GEMMs; includes the activation quantization"))
            case.impls.append(_scaled_mm_impl(prep_w, qpt.fn, on_gpu))
    if M * max(n, k) * 4 <= 16384 * 11008 * 4:
        ref = _impl("reference-int8-w8a16", "reference", "longcat.kernels.quant_gemm", "weight_only_linear_reference")
        ref.prepare = lambda inp: (inp[0], *quantize_weight(inp[1], torch.int8))
        ref.note = "float32 math on a materialised weight"
    else:
        ref = Impl("reference-int8-w8a16", "reference", unavailable="the float32 reference is not run at this M (errors: SQNR against exact float math)")
    case.impls.append(ref)
    for backend, fmt in (("bitsandbytes", "int8"), ("quanto", "int8"), ("quanto", "fp8")):
        case.impls.append(_peer_linear_impl(backend, fmt, device, dtype))
    return case


def _rows2(x_q, x_scale):
    return x_q.reshape(-1, x_q.shape[-1]), x_scale.reshape(-1)


def _scaled_mm_impl(prep_w, quantize_per_token, on_gpu) -> Impl:
    if not hasattr(torch, "_scaled_mm"):
        return Impl("torch._scaled_mm-fp8", "peer", unavailable="this torch has no _scaled_mm")

    def fn(x, w_q, s):
        x_q, xs = quantize_per_token(x, torch.float8_e4m3fn)
        return torch._scaled_mm(x_q, w_q.t(), scale_a=xs.reshape(-1, 1), scale_b=s.reshape(1, -1), out_dtype=x.dtype)

    return Impl("torch._scaled_mm-fp8", "peer", prepare=prep_w, fn=fn,
                note="cuBLASLt fp8 with per-token x per-channel scales; includes our activation quantization")


def _ffn_gate_case(label, M, H, K, device, dtype, quantize_weight) -> Case:
    """silu(x W1^T) * (x W3^T): two GEMMs + SwiGLU (the unpacked FFN), one packed GEMM into [M, 2H]
    + swiglu_packed (bf16), and the 8-bit GEMMs with the fused SwiGLU epilogue."""
    from longcat.kernels.quant_gemm import dynamic_linear, weight_only_linear
    from longcat.kernels.quantize_activations import quantize_per_token
    from longcat.kernels.swiglu import swiglu, swiglu_packed

    case = Case("quant_gemm", label, dict(tokens=M, hidden=H, in_features=K, act_dtype=str(dtype)[6:]),
                _gemm_inputs(M, [(2 * H, K)], device, dtype), flops=2.0 * M * 2 * H * K,
                nbytes=(M * K + M * H) * dtype.itemsize + 2 * H * K, input_sets=1, error_metric="sqnr",
                exact=lambda x, w: F.silu(x.float() @ w[:H].t()) * (x.float() @ w[H:].t()))
    case.impls.append(Impl("bf16-unpacked", "peer", prepare=lambda inp: (inp[0], inp[1][:H].to(dtype).contiguous(), inp[1][H:].to(dtype).contiguous()),
                           fn=lambda x, w1, w3: swiglu(F.linear(x, w1), F.linear(x, w3)),
                           note="w1 and w3 as two cuBLAS GEMMs, then the SwiGLU kernel"))
    case.impls.append(Impl("longcat-bf16-packed", "subject", prepare=lambda inp: (inp[0], inp[1].to(dtype)),
                           fn=lambda x, w: swiglu_packed(F.linear(x, w)),
                           note="one cuBLAS GEMM into [M, 2H], then swiglu_packed"))
    for fmt, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        def prep_w(inp, qdtype=qdtype):
            return (inp[0], *quantize_weight(inp[1], qdtype))

        case.impls.append(Impl(f"longcat-{fmt}-w8a8-swiglu", "subject", prepare=prep_w,
                               fn=lambda x, w_q, s, qd=qdtype: dynamic_linear(*quantize_per_token(x, qd), w_q, s, None, x.dtype, swiglu=True),
                               note="fused SwiGLU epilogue; includes the activation quantization"))
        case.impls.append(Impl(f"longcat-{fmt}-w8a16-swiglu", "subject", prepare=prep_w,
                               fn=lambda x, w_q, s: weight_only_linear(x, w_q, s, None, swiglu=True),
                               note="fused SwiGLU epilogue"))
    return case


def _ffn_block_case(label, M, H, C, device, dtype, quantize_weight) -> Case:
    """The whole FFN ``w2(silu(w1 x) * w3 x)``: unpacked (three GEMMs + SwiGLU) against packed."""
    from longcat.kernels.quant_gemm import dynamic_linear
    from longcat.kernels.quantize_activations import quantize_per_token
    from longcat.kernels.swiglu import swiglu, swiglu_packed

    case = Case("quant_gemm", label, dict(tokens=M, hidden=H, dim=C, act_dtype=str(dtype)[6:]),
                _gemm_inputs(M, [(2 * H, C), (C, H)], device, dtype), flops=2.0 * M * 3 * H * C,
                nbytes=2 * M * C * dtype.itemsize + 3 * H * C * dtype.itemsize, input_sets=1, error_metric="sqnr",
                exact=lambda x, w13, w2: (F.silu(x.float() @ w13[:H].t()) * (x.float() @ w13[H:].t())) @ w2.t())
    case.impls.append(Impl("bf16-unpacked", "peer",
                           prepare=lambda inp: (inp[0], inp[1][:H].to(dtype).contiguous(), inp[1][H:].to(dtype).contiguous(), inp[2].to(dtype)),
                           fn=lambda x, w1, w3, w2: F.linear(swiglu(F.linear(x, w1), F.linear(x, w3)), w2),
                           note="the FFN before packing"))
    case.impls.append(Impl("longcat-bf16-packed", "subject", prepare=lambda inp: (inp[0], inp[1].to(dtype), inp[2].to(dtype)),
                           fn=lambda x, w13, w2: F.linear(swiglu_packed(F.linear(x, w13)), w2)))
    fp8 = torch.float8_e4m3fn

    def prep_fp8(inp):
        return (inp[0], *quantize_weight(inp[1], fp8), *quantize_weight(inp[2], fp8))

    def fp8_packed(x, w13, s13, w2, s2):
        h = dynamic_linear(*quantize_per_token(x, fp8), w13, s13, None, x.dtype, swiglu=True)
        return dynamic_linear(*quantize_per_token(h, fp8), w2, s2, None, x.dtype)

    def fp8_unpacked(x, w13, s13, w2, s2):
        xq = quantize_per_token(x, fp8)
        h = swiglu(dynamic_linear(*xq, w13[:H], s13[:H], None, x.dtype), dynamic_linear(*xq, w13[H:], s13[H:], None, x.dtype))
        return dynamic_linear(*quantize_per_token(h, fp8), w2, s2, None, x.dtype)

    case.impls.append(Impl("longcat-fp8-w8a8-unpacked", "peer", prepare=prep_fp8, fn=fp8_unpacked,
                           note="fp8 W8A8 FFN as two GEMMs + SwiGLU"))
    case.impls.append(Impl("longcat-fp8-w8a8-packed", "subject", prepare=prep_fp8, fn=fp8_packed,
                           note="fp8 W8A8 FFN with the fused SwiGLU GEMM; includes the activation quantizations"))
    return case


def _peer_linear_impl(backend: str, fmt: str, device, dtype) -> Impl:
    name = f"{backend}-{fmt}"
    try:
        from longcat.quant.peers import quantize_peer, require_peer

        require_peer(backend)
    except Exception as e:
        return Impl(name, "peer", unavailable=str(e))
    if backend == "bitsandbytes" and device.type != "cuda":
        return Impl(name, "peer", unavailable="bitsandbytes is measured on a GPU only")

    def prepare(inp):
        x, w = inp
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cpu", dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to("cpu", dtype))
        holder = torch.nn.Sequential(lin)
        quantize_peer(holder, fmt, backend=backend)
        return x, holder.to(device)

    return Impl(name, "peer", prepare=prepare, fn=lambda x, mod: mod(x))


def build_cases(device, dtype=None, ops=None, sizes=None, use_compile: Optional[bool] = None) -> List[Case]:
    """Every case for ``device`` (a GPU gets the real shapes, bf16; the CPU small shapes, fp32).
    ops: names from OPS to keep (prefix match, e.g. "attention"); sizes: "480p"/"720p" on a GPU."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    use_compile = on_gpu if use_compile is None else use_compile
    def wanted(op: str) -> bool:
        return not ops or any(op == o or op.startswith(o) for o in ops)

    cases = []
    if any(wanted(o) for o in OPS if o.startswith("attention")):
        cases += _attention_cases(device, dtype, sizes, use_compile)
    if any(wanted(o) for o in OPS if not o.startswith("attention") and o != "quant_gemm"):
        cases += _elementwise_cases(device, dtype, sizes, use_compile)
    if wanted("quant_gemm"):
        cases += _quant_cases(device, dtype, sizes, use_compile)
    if ops:
        cases = [c for c in cases if any(c.op == o or c.op.startswith(o + ".") or c.op.startswith(o) for o in ops)]
    return cases
