"""Deterministic accuracy figures: every kernel against its reference on fixed seeds, every
quantization format's SQNR / cosine at fixed seeds, and the memory planner's figures.

Kernel rule (DESIGN.md section 7, the flash-attention test rule): the kernel's max error against
the oracle (the reference on the same values in float64, float32 where the reference cannot take
float64) must be at most 2x the error of the reference run in the kernel's own dtype, plus a small
atol. These records are what ``longcat-bench accuracy`` prints and what ``longcat-bench check``
compares against the committed baseline.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .cases import Case, build_cases, kernel_path

__all__ = ["kernel_accuracy_records", "quant_accuracy_records", "planner_records", "quant_gemm_kernel_records",
           "ATOL", "CPU_QUANT_SHAPES"]

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# The real LongCat-Video Linear shapes scaled by 1/8 per side: the CPU run keeps the aspect ratios
# (what SQNR depends on, with the per-channel scales) at a cost CI can afford.
CPU_QUANT_SHAPES = {
    "attn.qkv/8": (1536, 512),
    "attn.proj/8": (512, 512),
    "cross_attn.kv_linear/8": (1024, 512),
    "ffn.w1/8": (1376, 512),
    "ffn.w2/8": (512, 1376),
    "adaLN_modulation/8": (3072, 64),
}


def _cast(inputs, dtype, keep=()):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and i not in keep else t
                 for i, t in enumerate(inputs))


def _first(out, impl):
    if impl.output is not None:
        out = impl.output(out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _oracle(ref_impl, inputs):
    """The reference on float64 copies of the inputs; float32 when it refuses float64."""
    for dt in (torch.float64, torch.float32):
        try:
            return _first(ref_impl.fn(*_cast(inputs, dt)), ref_impl).double(), str(dt)[6:]
        except Exception:
            continue
    raise RuntimeError("reference failed in float64 and float32")


def _case_accuracy(case: Case, dtype, device) -> List[dict]:
    subject = next((i for i in case.impls if i.role == "subject"), None)
    ref = next((i for i in case.impls if i.role == "reference"), None)
    rec = {"key": f"accuracy/kernel/{case.op}/{case.label}/{str(dtype)[6:]}", "name": "kernel_accuracy",
           "op": case.op, "label": case.label, "dtype": str(dtype)[6:], "params": case.params,
           "device": str(device), "path": kernel_path(device)}
    missing = [f"{i.name}: {i.unavailable or 'not available'}" for i in (subject, ref) if i is not None and (i.unavailable or i.fn is None)]
    if subject is None or ref is None or missing:
        rec.update(status="unavailable", reason="; ".join(missing) or "no subject/reference")
        return [rec]
    # The case's inputs are in its own dtype; draw in float32 and cast, so every dtype sees the same values.
    inputs = _cast(case.make_inputs(0), dtype, case.fixed_dtype_args)
    try:
        with torch.no_grad():
            oracle, oracle_dtype = _oracle(ref, inputs)
            out = _first(subject.fn(*inputs), subject)
            ref_low = _first(ref.fn(*inputs), ref)
    except Exception as e:
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        return [rec]
    err = (out.double() - oracle).abs().max().item()
    err_torch = (ref_low.double() - oracle).abs().max().item()
    bound = 2.0 * err_torch + ATOL.get(dtype, 1e-5)
    finite = bool(torch.isfinite(out).all())
    rec.update(status="ok", oracle_dtype=oracle_dtype, subject_max_abs_err=err, torch_max_abs_err=err_torch,
               bound=bound, within_bound=bool(finite and err <= bound), output_finite=finite,
               oracle_abs_max=oracle.abs().max().item())
    return [rec]


def kernel_accuracy_records(device, dtypes, size: Optional[str] = None, ops=None, progress=None) -> List[dict]:
    """Accuracy of every kernel case (not the quantized GEMMs; see quant_gemm_kernel_records)."""
    device = torch.device(device)
    records = []
    from .cases import OPS

    ops = ops or [o for o in OPS if o != "quant_gemm"]
    cases = [c for c in build_cases(device, dtype=torch.float32, ops=ops, sizes=[size] if size else None, use_compile=False)
             if c.op != "quant_gemm"]
    for dtype in dtypes:
        for case in cases:
            if progress:
                progress.update(0, note=f"{case.op} {str(dtype)[6:]}")
            records += _case_accuracy(case, dtype, device)
            if progress:
                progress.update()
    return records


def quant_gemm_kernel_records(device, tokens: int = 32, shape=(192, 128), seed: int = 0) -> List[dict]:
    """Each quantized GEMM kernel against its own reference on the same quantized operands (kernel
    error, separate from quantization error)."""
    device = torch.device(device)
    out = []
    try:
        from longcat.kernels import quant_gemm as qg
        from longcat.kernels.quantize_activations import quantize_per_token_reference
        from longcat.quant.linear import quantize_weight
    except ImportError as e:
        return [{"key": "accuracy/quant_gemm/all", "name": "quant_gemm_accuracy", "status": "unavailable", "reason": str(e)}]
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    x = torch.randn(tokens, k, generator=g).to(device)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device)
    bias = (torch.randn(n, generator=g) * 0.02).to(device)
    for fmt, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        w_q, w_s = quantize_weight(w, qdtype)
        for mode in ("w8a16", "w8a8"):
            rec = {"key": f"accuracy/quant_gemm/{fmt}-{mode}", "name": "quant_gemm_accuracy", "format": fmt, "mode": mode,
                   "tokens": tokens, "out_features": n, "in_features": k, "device": str(device), "path": kernel_path(device)}
            try:
                with torch.no_grad():
                    if mode == "w8a16":
                        y = getattr(qg, f"{fmt}_weight_only_linear")(x, w_q, w_s, bias)
                        ref = qg.weight_only_linear_reference(x.double(), w_q, w_s, bias)
                    else:
                        x_q, x_s = quantize_per_token_reference(x, qdtype)
                        y = getattr(qg, f"{fmt}_dynamic_linear")(x_q, x_s, w_q, w_s, bias, out_dtype=torch.float32)
                        ref = qg.dynamic_linear_reference(x_q, x_s, w_q, w_s, bias, out_dtype=torch.float64)
                err = (y.double() - ref.double()).abs().max().item()
                scale = ref.abs().max().item()
                rec.update(status="ok", max_abs_err=err, max_rel_err=err / scale if scale else math.nan,
                           within_bound=bool(torch.isfinite(y).all() and err <= 1e-4 * max(1.0, scale)))
            except Exception as e:
                rec.update(status="error" if not isinstance(e, (AttributeError, ImportError)) else "unavailable",
                           reason=f"{type(e).__name__}: {str(e)[:300]}")
            out.append(rec)
    return out


def quant_accuracy_records(shapes: Optional[dict] = None, tokens: int = 64, seed: int = 0,
                           dists=("gaussian", "student_t"), peers=()) -> List[dict]:
    """SQNR (dB) and cosine of every format (and importable peers) per layer shape and weight
    distribution, at fixed seeds, against float32 math."""
    try:
        from longcat.quant.accuracy import FORMATS, layer_accuracy
    except ImportError as e:
        return [{"key": "accuracy/quant/all", "name": "quant_accuracy", "status": "unavailable", "reason": str(e)}]
    shapes = CPU_QUANT_SHAPES if shapes is None else shapes
    records = []
    for i, (layer, (n, k)) in enumerate(shapes.items()):
        for j, dist in enumerate(dists):
            try:
                rows = layer_accuracy(n, k, dist=dist, formats=FORMATS, tokens=tokens, seed=seed + 100 * i + j, peers=peers)
            except Exception as e:
                records.append({"key": f"accuracy/quant/{layer}/{dist}", "name": "quant_accuracy", "status": "error",
                                "reason": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            for r in rows:
                records.append({
                    "key": f"accuracy/quant/{layer}/{dist}/{r['backend']}-{r['format']}", "name": "quant_accuracy",
                    "status": "ok", "layer": layer, "shape": list(r["shape"]), "dist": dist, "backend": r["backend"],
                    "format": r["format"], "tokens": tokens,
                    "weight_sqnr_db": None if math.isnan(r["weight_sqnr_db"]) else r["weight_sqnr_db"],
                    "sqnr_db": r["out_sqnr_db"], "cosine": r["out_cosine"],
                })
    return records


PLANNER_CONFIGS = [
    # (label, latent, batch, kwargs): the real stages of DESIGN.md section 5 and the toolkit's settings.
    ("480p-cfg/reference-bf16", (24, 60, 104), 2, dict(weights="bf16", fused=False, attention="sdpa")),
    ("480p-cfg/bf16-fused", (24, 60, 104), 2, dict(weights="bf16", fused=True, attention="sdpa")),
    ("480p-cfg/int8-fused", (24, 60, 104), 2, dict(weights="int8", fused=True, attention="sdpa")),
    ("720p/reference-bf16", (48, 88, 160), 1, dict(weights="bf16", fused=False, attention="sdpa")),
    ("720p/bf16-bsa-fused", (48, 88, 160), 1, dict(weights="bf16", fused=True, attention="bsa")),
    ("720p/fp8-bsa-fused", (48, 88, 160), 1, dict(weights="fp8", fused=True, attention="bsa")),
    ("720p/int8-bsa-fused-chunked", (48, 88, 160), 1, dict(weights="int8", fused=True, attention="bsa", ffn_chunk_frames=8)),
    ("720p/int8-bsa-fused-offload", (48, 88, 160), 1, dict(weights="int8", fused=True, attention="bsa", offload="blocks")),
    ("720p/fp8-bsa-chunked-blocks", (48, 88, 160), 1,
     dict(weights="fp8", fused=True, attention="bsa", attention_chunk_frames=4, ffn_chunk_frames=1)),
    ("720p/int8-dense-chunked-blocks", (48, 88, 160), 1, dict(weights="int8", fused=True, attention="dense", attention_chunk_frames=1)),
    ("720p/int8-bsa-chunked-blocks-offload", (48, 88, 160), 1,
     dict(weights="int8", fused=True, attention="bsa", attention_chunk_frames=4, ffn_chunk_frames=1, offload="blocks")),
    ("720p/bf16-bsa-fused-cp4", (48, 88, 160), 1, dict(weights="bf16", fused=True, attention="bsa", context_parallel=4)),
]


def planner_records() -> List[dict]:
    """The memory planner's predictions for the full model at the real stages (meta device, exact)."""
    try:
        import longcat

        plan_memory = getattr(longcat, "plan_memory", None)
        if plan_memory is None:
            from longcat.memory_plan import plan_memory
    except ImportError:
        return [{"key": "planner/all", "name": "memory_plan", "status": "unavailable", "reason": "longcat.plan_memory not available yet"}]
    records = []
    for label, latent, batch, kw in PLANNER_CONFIGS:
        rec = {"key": f"planner/{label}", "name": "memory_plan", "label": label, "latent": list(latent), "batch": batch,
               "settings": dict(kw)}
        try:
            plan = plan_memory("longcat-video", latent=latent, batch=batch, **kw)
            rec.update(status="ok", peak_bytes=int(plan.peak_bytes), weights_resident_bytes=int(plan.weights_resident_bytes),
                       activation_peak_bytes=int(plan.activation_peak_bytes), tokens=int(plan.tokens))
        except Exception as e:
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        records.append(rec)
    return records
