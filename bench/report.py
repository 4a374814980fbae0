"""``longcat-bench report``: BENCHMARKS.md tables and PNG plots from committed results files.

Every table names the command that produced it and the machine it ran on. Nothing is computed
here that was not measured: without GPU results the file says so and lists the commands that
produce each table on an H200. matplotlib is optional and imported only when plotting.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Dict, List, Optional, Tuple

__all__ = ["render_markdown", "render_plots", "write_report", "default_inputs", "GPU_COMMANDS"]

GPU_SESSION = "bash bench/gpu_session.sh"
# What bench/gpu_session.sh runs on the H200 (also the commands for each table on their own).
GPU_COMMANDS = [
    ("ceilings + kernels at the 480p and 720p shapes", "longcat-bench kernels --json bench/results/kernels-h200.json"),
    ("accuracy (bf16 / fp16 / fp32 kernels, quantization formats, planner)",
     "longcat-bench accuracy --json bench/results/accuracy-h200.json"),
    ("model step: reference vs accelerated configurations (480p)",
     "longcat-bench model --compare --configs reference accelerated fp8 int8 int8-offload --warmup 1 --repeats 2 --json bench/results/model-h200.json"),
    ("memory per configuration at 720p, measured and planned",
     "longcat-bench memory --latent 48 88 160 --configs fp8 fp8-chunked int8-offload int8-chunked-offload --json bench/results/memory-h200.json"),
    ("pytest-benchmark suite", "LONGCAT_BENCH_SIZES=480p pytest bench/ --benchmark-only -k 'not compile' "
     "--benchmark-json bench/results/pytest-benchmark-h200.json"),
    ("this file", "longcat-bench report"),
]


def default_inputs(root: str = "") -> List[str]:
    files = sorted(glob.glob(os.path.join(root, "bench", "results", "*.json")))
    baseline = os.path.join(root, "bench", "baseline", "cpu.json")
    if os.path.isfile(baseline):
        files.append(baseline)
    return files


def _machine_line(doc: dict) -> str:
    m = doc.get("machine", {})
    where = f"GPU {m['gpu']} (driver {m.get('driver')})" if m.get("gpu") else f"CPU only ({m.get('cpu_count')} cores)"
    interp = ", Triton interpreter" if m.get("triton_interpret") and not m.get("gpu") else ""
    return (f"{where}{interp}; torch {m.get('torch')}, triton {m.get('triton')}, python {m.get('python')}; "
            f"commit `{m.get('commit')}`; {doc.get('created_utc')}")


def _f(v, fmt="{:.3g}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def _gib(v) -> str:
    return "" if v is None else f"{v / 1024**3:.2f}"


def _table(head: List[str], rows: List[list]) -> str:
    if not rows:
        return "_(no records)_\n"
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _status(rec: dict) -> str:
    s = rec.get("status", "ok")
    return s if s == "ok" else f"{s}: {rec.get('reason', '')}"


def _kernel_table(records: List[dict]) -> str:
    rows = []
    for r in records:
        if r.get("name") != "kernel":
            continue
        p = r.get("params", {})
        size = p.get("seq") or p.get("tokens") or p.get("seq_q") or ""
        rate = (f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else (f"{r['gbps']:.0f} GB/s" if "gbps" in r else ""))
        pct = r.get("pct_of_matmul_ceiling", r.get("pct_of_copy_ceiling"))
        err = r.get("max_abs_err")
        err_txt = (f"{err:.2e} vs {r.get('error_baseline')}" if err is not None else
                   (f"{r['sqnr_db']:.1f} dB SQNR" if r.get("sqnr_db") is not None else ""))
        rows.append([r["op"], r["label"], _f(size, "{:,}"), r["impl"], r["role"], r.get("path", ""),
                     _f(r.get("median_ms"), "{:.3f}"), rate, _f(pct, "{:.0f}%"),
                     _f(r.get("speedup_vs_reference"), "{:.2f}x"), err_txt, _status(r)])
    return _table(["op", "shape", "tokens", "impl", "role", "path", "median ms", "rate", "% ceiling",
                   "vs reference", "error", "status"], rows)


def _accuracy_tables(records: List[dict]) -> str:
    parts = []
    kern = [r for r in records if r.get("name") == "kernel_accuracy"]
    if kern:
        parts.append("Kernels against the oracle (reference in float64); bound = 2 x error of the reference in the same dtype + atol:\n\n")
        parts.append(_table(["op", "shape", "dtype", "path", "kernel max err", "torch max err", "bound", "within", "status"],
                            [[r["op"], r["label"], r["dtype"], r.get("path", ""), _f(r.get("subject_max_abs_err"), "{:.2e}"),
                              _f(r.get("torch_max_abs_err"), "{:.2e}"), _f(r.get("bound"), "{:.2e}"), _f(r.get("within_bound")),
                              _status(r)] for r in kern]))
    qg = [r for r in records if r.get("name") == "quant_gemm_accuracy"]
    if qg:
        parts.append("\nQuantized GEMM kernels against their reference on the same 8-bit operands:\n\n")
        parts.append(_table(["format", "mode", "max abs err", "max rel err", "within", "status"],
                            [[r.get("format", ""), r.get("mode", ""), _f(r.get("max_abs_err"), "{:.2e}"),
                              _f(r.get("max_rel_err"), "{:.2e}"), _f(r.get("within_bound")), _status(r)] for r in qg]))
    q = [r for r in records if r.get("name") == "quant_accuracy"]
    if q:
        parts.append("\nQuantization formats against float32 math (activations with outlier channels):\n\n")
        parts.append(_table(["layer", "out x in", "weights", "backend", "format", "weight SQNR dB", "output SQNR dB", "cosine", "status"],
                            [[r.get("layer", ""), "x".join(map(str, r.get("shape", []))), r.get("dist", ""), r.get("backend", ""),
                              r.get("format", ""), _f(r.get("weight_sqnr_db"), "{:.2f}"), _f(r.get("sqnr_db"), "{:.2f}"),
                              _f(r.get("cosine"), "{:.6f}"), _status(r)] for r in q]))
    plan = [r for r in records if r.get("name") == "memory_plan"]
    if plan:
        parts.append("\nMemory planner (full 13.6B model, computed on the meta device; a prediction, not a measurement):\n\n")
        parts.append(_table(["configuration", "latent", "batch", "weights on GPU GiB", "activation peak GiB", "expected peak GiB", "status"],
                            [[r["label"], "x".join(map(str, r.get("latent", []))), r.get("batch", ""), _gib(r.get("weights_resident_bytes")),
                              _gib(r.get("activation_peak_bytes")), _gib(r.get("peak_bytes")), _status(r)] for r in plan]))
    return "".join(parts) or "_(no records)_\n"


def _model_table(records: List[dict]) -> str:
    rows = []
    for r in records:
        if r.get("name") not in ("model_forward", "model_memory"):
            continue
        mem = r.get("memory") or {}
        rows.append([r.get("config", r.get("ops", "")), r.get("preset", ""), "x".join(map(str, r.get("latent", []))),
                     r.get("batch", ""), r.get("dtype", ""), _f((r.get("timing") or {}).get("median_ms"), "{:,.1f}"),
                     _gib(mem.get("torch_peak_allocated_bytes")), _gib(mem.get("nvml_peak_used_bytes")),
                     _gib(mem.get("cpu_peak_rss_bytes")) if not mem.get("torch_peak_allocated_bytes") else "",
                     _gib(r.get("planned_peak_bytes")), _f(r.get("output_rel_err"), "{:.2e}"), _status(r)])
    return _table(["configuration", "preset", "latent", "batch", "dtype", "step ms", "torch peak GiB", "NVML peak GiB",
                   "process RSS GiB", "planned peak GiB", "rel. error vs reference", "status"], rows)


def _pytest_benchmark_table(doc: dict) -> str:
    rows = []
    for b in doc.get("benchmarks", []):
        s, extra = b.get("stats", {}), b.get("extra_info", {})
        rows.append([b.get("name"), _f(s.get("median", 0) * 1e3, "{:.3f}"), _f(s.get("rounds"), "{}"),
                     _f(extra.get("tflops"), "{:.1f}"), _f(extra.get("gbps"), "{:.0f}"), _gib(extra.get("peak_bytes"))])
    return _table(["benchmark", "median ms", "rounds", "TFLOP/s", "GB/s", "peak GiB"], rows)


STATIC_CHANGES_SCHEMA = "longcat-static-changes/1"


def _kb(v) -> str:
    return "" if v is None else f"{v / 1024:.0f}"


def _constexpr_text(ce: dict) -> str:
    keep = [(k, v) for k, v in (ce or {}).items() if k.startswith(("BLOCK", "ROWS", "TILE", "Q_SPLIT", "K_SPLIT", "NK_PAD", "GROUP"))
            or k in ("QUANT", "SWIGLU", "A8", "INT_ACC", "HAS_BIAS", "INVERSE")]
    return " ".join(f"{k}={v}" for k, v in keep)


def _compiled_section(docs: List[Tuple[str, dict]]) -> List[str]:
    """The "Compiled, not run" section: static facts of every launch config from `longcat-bench
    compile`, the model line per op, and the before/after tables of static-changes files."""
    compile_docs = [(p, d) for p, d in docs if d.get("kind") == "compile"]
    change_docs = [(p, d) for p, d in docs if d.get("schema") == STATIC_CHANGES_SCHEMA]
    if not compile_docs and not change_docs:
        return []
    lines = ["## Compiled, not run", "",
             "Static facts of the compiled GPU code, read on a machine without a GPU (ptxas, the kernel metadata, the",
             "TTGIR and the SASS); nothing here was run or timed. Each row is a launch config a launcher picks at the",
             "real shape (for autotuned kernels, every config pruning keeps: autotuning picks one of them on the GPU).",
             "\"model ms\" is the time the H200 ceilings allow for the bytes and FLOPs the op must move and do (copy",
             "4.3 TB/s, bf16 790 TFLOP/s, fp8/int8 1979 TFLOP/s datasheet): a model, not a measurement. Block-sparse",
             "attention counts the K/V of every selected tile once per query tile that selects it (no L2 reuse): an",
             "upper bound on its bytes. \"released inference path\": the op runs in a denoising step of the released",
             "model (these are the configs the CI compile gate checks at 720p); \"no\": backward (LoRA training) or",
             "varlen cross-attention (the released model pads text to 512 tokens).", ""]
    for path, doc in compile_docs:
        rel = os.path.relpath(path) if os.path.isabs(path) else path
        recs = doc.get("records", [])
        configs = [r for r in recs if r.get("name") == "compiled_config"]
        bad = [r for r in configs if r.get("status") != "ok"]
        lines += [f"### Triton {doc.get('triton', '')}: `{rel}`", "", f"Command: `{doc.get('command')}`", "",
                  f"Machine: {_machine_line(doc)}", "",
                  f"{len(configs)} launch configs of {len({r['kernel'] for r in configs})} kernels; "
                  f"{len(bad)} fail (compile error, spills, or shared memory over the limit).", ""]
        for arch in doc.get("archs", sorted({r.get("arch") for r in recs})):
            for size in doc.get("sizes", []):
                cases = [r for r in recs if r.get("name") == "compile_case" and r.get("arch") == arch and r.get("size") == size]
                if not cases:
                    continue
                lines += [f"#### sm_{arch}, {size}: model per op", ""]
                lines.append(_table(["op", "released inference path", "MB moved", "GFLOP", "bound", "model ms", "status"],
                                    [[c["op"], "yes" if c.get("hot") else "no", _f((c.get("model") or {}).get("bytes", 0) / 1e6, "{:,.0f}"),
                                      _f((c.get("model") or {}).get("flops", 0) / 1e9, "{:,.1f}"), (c.get("model") or {}).get("bound", ""),
                                      _f((c.get("model") or {}).get("model_ms"), "{:.3f}"), _status(c)] for c in cases]) + "\n")
                rows = []
                for r in configs:
                    if r.get("arch") != arch or r.get("size") != size:
                        continue
                    cand = f" (1 of {r['autotune_candidates']})" if r.get("autotune_candidates") else ""
                    rows.append([r["op"], f"`{r['kernel']}`", _constexpr_text(r.get("constexprs")) + f" w={r['num_warps']} s={r['num_stages']}{cand}",
                                 "x".join(map(str, r.get("grid", []))), _f(r.get("registers"), "{}"),
                                 f"{r.get('spill_stores') or 0}/{r.get('spill_loads') or 0}",
                                 f"{_kb(r.get('shared_bytes'))} / {_kb(r.get('shared_limit'))}", _f(r.get("ctas_per_sm"), "{}"),
                                 r.get("wgmma", 0), r.get("mma_sync", 0), r.get("tma", 0), _f(r.get("tiles_in_flight"), "{}"),
                                 " ".join(a.split(")")[0] for a in r.get("advisories", [])), _f(r.get("main_loop_instructions"), "{}"),
                                 "ok" if r.get("status") == "ok" else f"FAIL: {r.get('reason', '')}"])
                lines += [f"#### sm_{arch}, {size}: launch configs", ""]
                lines.append(_table(["op", "kernel", "config", "grid", "regs", "spill st/ld B", "shared KB / limit", "CTAs/SM",
                                     "wgmma", "mma.sync", "TMA", "tiles in flight", "ptxas advisories", "main-loop SASS", "status"], rows) + "\n")
    for path, doc in change_docs:
        rel = os.path.relpath(path) if os.path.isabs(path) else path
        lines += [f"### Before / after: {doc.get('area', '')} (sm_{doc.get('arch', 90)}, `{rel}`)", ""]
        keys = ["registers", "spills", "shared_bytes", "tiles_in_flight", "main_loop_instructions", "wgmma"]
        rows = []
        for r in doc.get("rows", []):
            before, after = r.get("before") or {}, r.get("after") or {}
            rows.append([f"`{r.get('kernel', '')}`", r.get("shape", ""), r.get("config", "")]
                        + [f"{_f(before.get(k), '{}')} -> {_f(after.get(k), '{}')}" for k in keys] + [r.get("note", "")])
        lines.append(_table(["kernel", "shape", "config", "registers", "spills B", "shared B", "tiles in flight",
                             "main-loop SASS", "wgmma", "note"], rows) + "\n")
    return lines


def _is_gpu(doc: dict) -> bool:
    return bool((doc.get("machine") or doc.get("machine_info") or {}).get("gpu"))  # None / "" on a CPU run


def render_block_traffic(latent=(48, 88, 160), ceiling_gbps: float = 4300.0) -> str:
    """The HBM-traffic-per-block table at 720p for each quantization mode, from the memory
    planner's ``block_traffic`` (a model, not a measurement)."""
    from longcat.memory_plan import block_traffic

    modes = [("bf16", True), ("int8", True), ("fp8", True),
             ("int8-dynamic", False), ("int8-dynamic", True), ("fp8-dynamic", False), ("fp8-dynamic", True)]
    rows, passes = [], None
    for weights, once in modes:
        t = block_traffic(latent=latent, weights=weights, quantize_once=once)
        w8a8 = weights.endswith("-dynamic")
        label = weights + (" (activations quantized once)" if w8a8 and once else " (every Linear quantizes)" if w8a8 else "")
        rows.append([label, _f(t.weight_bytes / 1e9, "{:.3f}"), _f(t.activation_bytes / 1e9, "{:.1f}"),
                     _f(t.total_bytes / 1e9, "{:.1f}"), _f(t.total_bytes / (ceiling_gbps * 1e9) * 1e3, "{:.1f}")])
        if weights == "bf16":
            passes = [[k, _f(v / 1e9, "{:.2f}")] for k, v in t.passes.items()]
    tokens = t.tokens
    return "\n".join([
        "## HBM traffic per block at 720p (model)", "",
        f"Computed by `longcat.memory_plan.block_traffic(latent={tuple(latent)})` ({tokens:,} tokens, fused ops): the bytes",
        "each pass must read and write once; GEMM tile re-reads from L2 and the 512 text tokens are not counted. A model,",
        f"not a measurement; the time column is the traffic at {ceiling_gbps / 1e3:.1f} TB/s.", "",
        _table(["quantization", "weights GB", "activations GB", "total GB", "ms at copy bandwidth"], rows), "",
        "Per pass (bf16):", "", _table(["pass", "GB"], passes), "",
    ])


def render_markdown(docs: List[Tuple[str, dict]], plots: Optional[List[str]] = None, plot_note: str = "") -> str:
    gpu_docs = [d for _, d in docs if _is_gpu(d)]
    lines = ["# Benchmarks", "",
             "Generated by `longcat-bench report` from the committed results files listed below; do not edit by hand.",
             "Every table names the command that produced it and the machine it ran on.", ""]
    if not gpu_docs:
        lines += ["**There are no GPU results yet.** No timing, throughput or GPU memory figure in this file has been",
                  "measured on a GPU; the only tables below are CPU runs (functional and accuracy checks in the",
                  "Triton interpreter, and the memory planner's predictions), which say nothing about GPU speed.", ""]
    lines += ["## Producing the GPU tables on an H200", "",
              f"All of them in one call (installs the project, runs `pytest -m gpu`, then every benchmark at real shapes,",
              f"writing JSON to `$OUT` and `bench/results/`): `{GPU_SESSION}`. One by one:", ""]
    lines += [f"- {what}: `{cmd}`" for what, cmd in GPU_COMMANDS]
    lines += ["", "Then commit `bench/results/*.json` and this file.", ""]
    for path, doc in docs:
        rel = os.path.relpath(path) if os.path.isabs(path) else path
        if doc.get("kind") == "compile" or doc.get("schema") == STATIC_CHANGES_SCHEMA:
            continue  # rendered in the "Compiled, not run" section
        if "benchmarks" in doc and "records" not in doc:  # a pytest-benchmark JSON file
            lines += [f"## pytest-benchmark: `{rel}`", "", f"Machine: {doc.get('machine_info', {}).get('gpu') or doc.get('machine_info', {}).get('cpu', {}).get('brand_raw', 'CPU')}; "
                      f"commit `{(doc.get('commit_info') or {}).get('id')}`; {doc.get('datetime')}", "",
                      _pytest_benchmark_table(doc)]
            continue
        kind = doc.get("kind", "")
        lines += [f"## {kind}: `{rel}`", "", f"Command: `{doc.get('command')}`", "", f"Machine: {_machine_line(doc)}", ""]
        if doc.get("notice"):
            lines += [f"> {doc['notice']}", ""]
        ceil = doc.get("ceilings")
        if ceil:
            lines += [f"Ceilings measured in this run: copy {ceil.get('copy_gbps', 0):,.0f} GB/s (read + write, "
                      f"{ceil.get('copy_bytes', 0) / 1024**3:.2f} GiB), matmul {ceil.get('matmul_tflops', 0):,.1f} TFLOP/s "
                      f"({ceil.get('matmul_n')}^3 {ceil.get('matmul_dtype')}).", ""]
        recs = doc.get("records", [])
        if kind == "kernels":
            lines.append(_kernel_table(recs))
        elif kind in ("accuracy", "check"):
            lines.append(_accuracy_tables(recs))
        elif kind in ("model", "memory"):
            lines.append(_model_table(recs))
            if any(r.get("name") == "memory_plan" for r in recs):
                lines.append(_accuracy_tables([r for r in recs if r.get("name") == "memory_plan"]))
        else:
            lines.append(_kernel_table(recs) if any(r.get("name") == "kernel" for r in recs) else _accuracy_tables(recs))
    lines.append(render_block_traffic())
    lines += _compiled_section(docs)
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in plots] + [""]
    if plot_note:
        lines += [plot_note, ""]
    return "\n".join(lines).rstrip() + "\n"


def render_plots(docs: List[Tuple[str, dict]], out_dir: str) -> Tuple[List[str], str]:
    """Time vs sequence length per attention op and memory per configuration, as PNGs (only from
    GPU results: CPU interpreter times are not speeds). Returns (paths, note)."""
    gpu = [d for _, d in docs if _is_gpu(d)]
    if not gpu:
        return [], "Plots: none (they are drawn from GPU results only)."
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install matplotlib, then rerun `longcat-bench report`)."
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    series: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    for d in gpu:
        for r in d.get("records", []):
            if r.get("name") == "kernel" and r.get("status") == "ok" and r["op"].startswith("attention"):
                seq = r["params"].get("seq") or r["params"].get("seq_q")
                series.setdefault(r["op"], {}).setdefault(r["impl"], []).append((seq, r["median_ms"]))
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
        for ax, (op, impls) in zip(axes[0], sorted(series.items())):
            for impl, pts in sorted(impls.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set(title=op, xlabel="sequence length (tokens)", ylabel="median ms", yscale="log")
            ax.legend(fontsize=7)
        path = os.path.join(out_dir, "attention_time_vs_seq.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    mem = [(r.get("config", r.get("ops")), (r.get("memory") or {}).get("torch_peak_allocated_bytes"))
           for d in gpu for r in d.get("records", []) if r.get("name") in ("model_forward", "model_memory")]
    mem = [(c, b) for c, b in mem if b]
    if mem:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([c for c, _ in mem], [b / 1024**3 for _, b in mem])
        ax.set(xlabel="peak GiB (torch allocator)", title="memory per configuration")
        fig.tight_layout()
        path = os.path.join(out_dir, "memory_per_config.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths, ""


def write_report(inputs: List[str], output: str, plot_dir: Optional[str] = None) -> Tuple[str, str]:
    """Render ``output`` (markdown) from ``inputs``; returns (markdown, plot note)."""
    import json

    docs = []
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            docs.append((path, json.load(f)))
    out_dir = os.path.dirname(os.path.abspath(output))
    plot_dir = plot_dir or os.path.join("bench", "results", "plots")
    paths, note = render_plots(docs, plot_dir)
    rel_paths = [os.path.relpath(p, out_dir) for p in paths]
    text = render_markdown(docs, rel_paths, note)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    return text, note
