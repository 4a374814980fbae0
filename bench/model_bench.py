"""Whole-model measurements: one denoising step of the DiT in several configurations, in one run.

Each configuration gets a freshly built model with the same seeded random weights (quantizing is
in place and lossy, so models are never reused across configurations), its step time, its peak
memory (torch allocator and NVML on a GPU, process RSS on the CPU), the memory planner's
prediction for it, and its output error against the reference configuration's output.
"""
from __future__ import annotations

import gc
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

__all__ = ["ModelConfig", "MODEL_CONFIGS", "run_model_configs", "accelerate_available"]


@dataclass
class ModelConfig:
    name: str
    description: str
    accelerate: Optional[dict] = None  # kwargs of longcat.accelerate; None: the reference SDPA_OPS
    plan: dict = field(default_factory=dict)  # kwargs of longcat.plan_memory describing the same setup


MODEL_CONFIGS = {
    "reference": ModelConfig("reference", "SDPA_OPS: reference element-wise math, PyTorch SDPA attention",
                             None, dict(weights="bf16", fused=False, attention="sdpa")),
    "accelerated": ModelConfig("accelerated", "longcat.accelerate: bf16, BSA, fused kernels",
                               dict(attention="auto", fused=True, bsa=True), dict(weights="bf16", fused=True, attention="bsa")),
    "fp8": ModelConfig("fp8", "accelerated + fp8 weights", dict(attention="auto", fused=True, bsa=True, quantize="fp8"),
                       dict(weights="fp8", fused=True, attention="bsa")),
    "int8": ModelConfig("int8", "accelerated + int8 weights", dict(attention="auto", fused=True, bsa=True, quantize="int8"),
                        dict(weights="int8", fused=True, attention="bsa")),
    "int8-offload": ModelConfig("int8-offload", "accelerated + int8 weights + block offload",
                                dict(attention="auto", fused=True, bsa=True, quantize="int8", offload="blocks"),
                                dict(weights="int8", fused=True, attention="bsa", offload="blocks")),
    # The smallest-memory settings: blocks run 4 frames of queries at a time, their FFN 1 frame.
    "fp8-chunked": ModelConfig("fp8-chunked", "accelerated + fp8 weights + frame-chunked blocks",
                               dict(attention="auto", fused=True, bsa=True, quantize="fp8", attention_chunk_frames=4, ffn_chunk_frames=1),
                               dict(weights="fp8", fused=True, attention="bsa", attention_chunk_frames=4, ffn_chunk_frames=1)),
    "int8-chunked-offload": ModelConfig(
        "int8-chunked-offload", "accelerated + int8 weights + frame-chunked blocks + block offload",
        dict(attention="auto", fused=True, bsa=True, quantize="int8", attention_chunk_frames=4, ffn_chunk_frames=1, offload="blocks"),
        dict(weights="int8", fused=True, attention="bsa", attention_chunk_frames=4, ffn_chunk_frames=1, offload="blocks")),
}


def accelerate_available() -> Optional[Callable]:
    import longcat

    return getattr(longcat, "accelerate", None)


def _planned_peak(cfg: dict, latent, batch, plan_kw, text_len) -> Optional[int]:
    import longcat

    plan_memory = getattr(longcat, "plan_memory", None)
    if plan_memory is None:
        try:
            from longcat.memory_plan import plan_memory
        except ImportError:
            return None
    try:
        return int(plan_memory(cfg, latent=latent, batch=batch, text_len=text_len, **plan_kw).peak_bytes)
    except Exception:
        return None


def run_model_configs(preset: str, latent, batch: int, configs: List[str], *, device, dtype, text_len: int,
                      warmup: int, repeats: int, seed: int = 0, progress=None, log=print, name: str = "model_forward") -> List[dict]:
    from longcat import SDPA_OPS, get_preset

    from .memory import track_memory
    from .models import build_random_model, random_inputs
    from .timing import time_fn

    device = torch.device(device)
    accelerate = accelerate_available()
    cfg_dict = get_preset(preset)
    records: List[dict] = []
    ref_out = None
    for cname in configs:
        cfg = MODEL_CONFIGS[cname]
        rec = {"key": f"model/{preset}/{'x'.join(map(str, latent))}/b{batch}/{cname}", "name": name, "config": cname,
               "description": cfg.description, "preset": preset, "device": str(device), "dtype": str(dtype)[6:],
               "batch": batch, "latent": list(latent), "text_len": text_len}
        if progress:
            progress.update(0, note=f"{cname}: building")
        if cfg.accelerate is not None and accelerate is None:
            rec.update(status="unavailable", reason="longcat.accelerate not available yet")
            records.append(rec)
            if progress:
                progress.update(warmup + repeats)
            continue
        model = None
        try:
            model = build_random_model(preset, dtype=dtype, device=device, seed=seed)
            if cfg.accelerate is None:
                model.set_ops(SDPA_OPS)
            else:
                accelerate(model, **cfg.accelerate)
            x, t, y, mask = random_inputs(model, batch, latent, text_len, device, seed=seed + 1)
            ph, pw = model.patch_size[1:]
            tokens = latent[0] * math.ceil(latent[1] / ph) * math.ceil(latent[2] / pw)

            last = {}

            def step():
                with torch.no_grad():
                    last["out"] = model(x, t, y, mask)
                if progress:
                    progress.update(note=cname)

            with track_memory(device) as mem:
                timing = time_fn(step, warmup=warmup, repeats=repeats, device=device)
            out = last.pop("out").float()  # same inputs every call: the timed output is the output
            rec.update(status="ok", params=sum(p.numel() for p in model.parameters()), tokens_per_sample=tokens,
                       timing=timing.as_dict(), median_ms=timing.median_ms, memory=mem.report.as_dict(),
                       output_finite=bool(torch.isfinite(out).all()), output_std=float(out.std()),
                       planned_peak_bytes=_planned_peak(cfg_dict, latent, batch, cfg.plan, text_len),
                       throughput_tokens_per_s=batch * tokens / (timing.median_ms / 1e3))
            if cname == "reference":
                ref_out = out.cpu()
            elif ref_out is not None:
                o = out.cpu()
                rec["output_rel_err"] = float((o - ref_out).norm() / ref_out.norm())
                rec["output_max_abs_err"] = float((o - ref_out).abs().max())
                rec["error_baseline"] = "reference"
            report = getattr(model, "_longcat_acceleration", None)
            if report and report.get("report") is not None:
                rec["acceleration"] = str(report["report"])
        except Exception as e:
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            if log:
                log(f"{cname} failed: {rec['reason']}")
                log("".join(traceback.format_exc().splitlines(True)[-4:]))
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(rec)
    return records
