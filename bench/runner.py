"""Runs kernel cases: every implementation of a case on the same rotating input sets, timed
(CUDA events / perf_counter, warm-up, median), its peak memory, its error against the reference,
and TFLOP/s or GB/s against the ceilings measured in the same run."""
from __future__ import annotations

import math
import traceback
from typing import List, Optional

import torch

from .cases import Case, kernel_path
from .memory import track_memory
from .peers import Unavailable
from .timing import gbps, tflops, time_fn

__all__ = ["run_cases", "record_key", "case_impl_count"]


def record_key(rec: dict) -> str:
    """The identity of a record across runs (what ``compare`` and ``check`` match on)."""
    if "key" in rec:
        return rec["key"]
    parts = [str(rec.get(k)) for k in ("name", "op", "label", "impl", "preset", "config") if rec.get(k) is not None]
    return "/".join(parts) or "record"


def case_impl_count(cases: List[Case]) -> int:
    return sum(len(c.impls) for c in cases)


def _to_tensor(out, impl) -> torch.Tensor:
    if impl.output is not None:
        out = impl.output(out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _error(case: Case, out: torch.Tensor, baseline: torch.Tensor) -> dict:
    if case.error_metric == "sqnr":
        from longcat.quant.accuracy import cosine_similarity, sqnr_db

        return {"sqnr_db": sqnr_db(baseline, out.float()), "cosine": cosine_similarity(baseline, out.float())}
    diff = (out.float() - baseline.float()).abs()
    scale = baseline.float().abs().max().item()
    max_abs = diff.max().item()
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / scale if scale else math.nan}


def run_cases(cases: List[Case], device, warmup: int, repeats: int, ceilings: Optional[dict] = None,
              progress=None, log=None) -> List[dict]:
    device = torch.device(device)
    path = kernel_path(device)
    records: List[dict] = []
    for case in cases:
        input_sets = [case.make_inputs(i) for i in range(case.input_sets)]
        outputs = {}
        case_recs = []
        exact = case.exact(*input_sets[0]).float() if case.exact is not None else None
        # ~1 s a call (dense attention at 720p): fewer repeats keep a GPU session within its minutes
        c_warmup, c_repeats = (min(warmup, 1), min(repeats, 3)) if case.flops > 1e14 else (warmup, repeats)
        for impl in case.impls:
            rec = {
                "key": f"kernels/{case.op}/{case.label}/{impl.name}",
                "name": "kernel", "op": case.op, "label": case.label, "impl": impl.name, "role": impl.role,
                "params": case.params, "device": str(device),
                "path": path if impl.role == "subject" else "pytorch",
            }
            if impl.note:
                rec["note"] = impl.note
            if progress:
                progress.update(0, note=f"{case.op} {case.label} {impl.name}")
            if impl.unavailable or impl.fn is None:
                rec.update(status="unavailable", reason=impl.unavailable or "not available")
                case_recs.append(rec)
                if progress:
                    progress.update()
                continue
            try:
                prepared = [impl.prepare(s) for s in input_sets] if impl.prepare else input_sets
                with torch.no_grad():
                    out = _to_tensor(impl.fn(*prepared[0]), impl)  # first call also compiles / autotunes
                    with track_memory(device) as mem:
                        t = time_fn(impl.fn, prepared, warmup=c_warmup, repeats=c_repeats, device=device)
                outputs[impl.name] = out
                rec.update(status="ok", median_ms=t.median_ms, timing=t.as_dict(), memory=mem.report.as_dict())
                if case.flops:
                    rec["tflops"] = tflops(case.flops, t.median_ms)
                    if ceilings and ceilings.get("matmul_tflops"):
                        rec["pct_of_matmul_ceiling"] = 100.0 * rec["tflops"] / ceilings["matmul_tflops"]
                if case.nbytes:
                    rec["gbps"] = gbps(case.nbytes, t.median_ms)
                    if ceilings and ceilings.get("copy_gbps") and not case.flops:
                        rec["pct_of_copy_ceiling"] = 100.0 * rec["gbps"] / ceilings["copy_gbps"]
                del prepared
            except Unavailable as e:
                rec.update(status="unavailable", reason=str(e))
            except Exception as e:
                rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
                if log:
                    log(f"  {case.op}/{case.label}/{impl.name} failed: {rec['reason']}")
                    log("".join(traceback.format_exception_only(type(e), e)).strip()[:300])
            case_recs.append(rec)
            if progress:
                progress.update()
        _attach_errors(case, case_recs, outputs, exact)
        records += case_recs
        del input_sets, outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _attach_errors(case: Case, recs: List[dict], outputs: dict, exact) -> None:
    """Errors against the reference when it ran (else the first peer that ran), speedups against
    the reference and the best peer."""
    if case.error_metric == "sqnr" and exact is not None:
        for rec in recs:
            if rec["impl"] in outputs:
                rec.update(_error(case, outputs[rec["impl"]], exact), error_baseline="float32 exact")
    else:
        base_name = next((r["impl"] for r in recs if r["role"] == "reference" and r["impl"] in outputs), None)
        if base_name is None:
            base_name = next((r["impl"] for r in recs if r["role"] == "peer" and r["impl"] in outputs), None)
        if base_name is not None:
            for rec in recs:
                if rec["impl"] in outputs and rec["impl"] != base_name:
                    rec.update(_error(case, outputs[rec["impl"]], outputs[base_name]), error_baseline=base_name)
    ok = [r for r in recs if r.get("status") == "ok"]
    ref = next((r for r in ok if r["role"] == "reference"), None)
    peers = [r for r in ok if r["role"] == "peer"]
    best_peer = min(peers, key=lambda r: r["median_ms"]) if peers else None
    for rec in ok:
        if ref is not None:
            rec["speedup_vs_reference"] = ref["median_ms"] / rec["median_ms"]
        if best_peer is not None and rec["role"] == "subject":
            rec["best_peer"] = best_peer["impl"]
            rec["speedup_vs_best_peer"] = best_peer["median_ms"] / rec["median_ms"]
