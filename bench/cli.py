"""``longcat-bench`` (also ``python -m longcat.bench``): the command-line front of the harness.

``longcat-bench`` alone runs the main job, ``model``: one forward pass (a denoising step) of the
DiT with random weights, timed, with peak memory and a summary table. Without a GPU it runs the
small preset on the CPU and says so.

Subcommands: model, kernels, memory, accuracy, report, compare, check, pipeline, compile (see ``--help`` of each).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from typing import List, Optional

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CLIError(Exception):
    """A bad argument or input file, found before any work: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def _threshold(text: str) -> float:
    from .compare import parse_percent

    try:
        return parse_percent(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_output(path: Optional[str], option: str, folder: bool = False) -> None:
    """Refuse an output path that cannot be written (an ancestor that is a file, a read-only
    folder) before the run, not after it."""
    if not path:
        return
    if not folder and os.path.isdir(path):
        raise CLIError(f"{option} {path}: is a folder; give a file name")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{option} {path}: exists and is not a folder")
    probe = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: folder {probe} is not writable")


def _read_input(path: str, what: str, results_schema: bool = True) -> dict:
    """A JSON input file, or a one-line CLIError saying why it cannot be used."""
    import json

    from .results import load_results

    try:
        if results_schema:
            return load_results(path)
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise CLIError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{what} {path}: not valid JSON ({e})") from None
    except ValueError as e:
        raise CLIError(f"{what}: {e}") from None
    if not isinstance(doc, dict):
        raise CLIError(f"{what} {path}: expected a JSON object")
    return doc


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def print_table(rows: List[tuple], title: str = "", stream=None) -> None:
    stream = stream or sys.stdout
    width = max(len(str(k)) for k, _ in rows)
    if title:
        stream.write(f"\n{title}\n{'-' * max(len(title), width + 24)}\n")
    for k, v in rows:
        stream.write(f"{str(k):<{width}}  {v}\n")
    stream.flush()


def cpu_notice(what: str = "small sizes") -> str:
    return (f"No CUDA GPU in use: running {what} on the CPU (Triton kernels in the interpreter where "
            "TRITON_INTERPRET=1, else the reference fallbacks). A functional check, not a performance measurement.")


def _device(args) -> torch.device:
    want = getattr(args, "device", None)
    return torch.device(want or ("cuda" if torch.cuda.is_available() else "cpu"))


def _write(doc: dict, path: Optional[str]) -> None:
    from .results import write_results

    if path:
        write_results(doc, path)
        print(f"results written to {path}")


def cmd_model(args) -> int:
    if getattr(args, "compare", False):
        return cmd_model_compare(args)
    from longcat import REFERENCE_OPS, SDPA_OPS

    from .memory import track_memory
    from .models import build_random_model, random_inputs
    from .progress import Progress
    from .results import make_results, write_results
    from .timing import time_fn

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(args.device or ("cuda" if on_gpu else "cpu"))
    preset = args.preset or ("longcat-video" if on_gpu else "small")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    latent = tuple(args.latent or ((24, 60, 104) if on_gpu else (4, 16, 16)))
    if not on_gpu:
        print(f"No CUDA GPU in use: running the '{preset}' preset on the CPU "
              "(a functional check, not a performance measurement).", flush=True)
    ops = {"reference": REFERENCE_OPS, "sdpa": SDPA_OPS}[args.ops]

    model = build_random_model(preset, dtype=dtype, device=device, seed=args.seed).set_ops(ops)
    x, t, y, mask = random_inputs(model, args.batch, latent, args.text_len, device, seed=args.seed + 1)
    ph, pw = model.patch_size[1:]
    tokens = latent[0] * math.ceil(latent[1] / ph) * math.ceil(latent[2] / pw)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        with torch.no_grad():
            return model(x, t, y, mask)

    with Progress(args.warmup + args.repeats, label="model forward") as bar:
        with track_memory(device) as mem:
            timing = time_fn(lambda: (step(), bar.update())[0], warmup=args.warmup, repeats=args.repeats, device=device)
    out = step()
    finite = bool(torch.isfinite(out).all())
    record = {
        "name": "model_forward",
        "preset": preset,
        "params": n_params,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "ops": ops.name,
        "batch": args.batch,
        "latent": list(latent),
        "tokens_per_sample": tokens,
        "text_len": args.text_len,
        "timing": timing.as_dict(),
        "memory": mem.report.as_dict(),
        "output_finite": finite,
        "output_std": float(out.float().std()),
    }
    rows = [
        ("model", f"{preset} ({n_params / 1e6:,.1f} M parameters, random weights)"),
        ("device / dtype", f"{device} / {record['dtype']}"),
        ("ops", ops.name),
        ("latent (T, H, W)", f"{latent} x batch {args.batch} -> {tokens:,} tokens per sample"),
        ("forward time (median)", f"{timing.median_ms:,.1f} ms over {timing.repeats} runs ({timing.clock})"),
        ("throughput", f"{args.batch * tokens / (timing.median_ms / 1e3):,.0f} tokens/s"),
        ("peak memory", f"{_fmt_bytes(mem.report.peak_bytes)} ({mem.report.peak_label})"),
        ("output", f"finite={finite}, std={record['output_std']:.4f}"),
    ]
    print_table(rows, title="longcat-bench model")
    if args.json:
        write_results(make_results("model", [record]), args.json)
        print(f"results written to {args.json}")
    return 0 if finite else 1



def _model_defaults(args, device):
    on_gpu = device.type == "cuda"
    preset = args.preset or ("longcat-video" if on_gpu else "small")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    latent = tuple(args.latent or ((24, 60, 104) if on_gpu else (4, 16, 16)))
    return preset, dtype, latent


def _model_summary(records, title):
    from .compare import _fmt

    from .memory import CPU_PEAK_LABEL

    cpu_only = not any((r.get("memory") or {}).get("torch_peak_allocated_bytes") for r in records)
    head = ("configuration", "step ms", "tokens/s", "process peak RSS*" if cpu_only else "peak memory", "NVML peak",
            "planned peak", "rel. err vs ref", "status")
    rows = [head]
    for r in records:
        mem = r.get("memory") or {}
        peak = mem.get("torch_peak_allocated_bytes") or mem.get("cpu_peak_rss_bytes")
        rows.append((r["config"], _fmt(r.get("median_ms")), f"{r.get('throughput_tokens_per_s', 0):,.0f}" if r.get("status") == "ok" else "",
                     _fmt_bytes(peak) if r.get("status") == "ok" else "", _fmt_bytes(mem.get("nvml_peak_used_bytes")) if mem.get("nvml_peak_used_bytes") else "",
                     _fmt_bytes(r.get("planned_peak_bytes")), f"{r['output_rel_err']:.2e}" if "output_rel_err" in r else "",
                     r.get("status", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')[:60]}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if cpu_only:
        print(f"  * {CPU_PEAK_LABEL}")


def cmd_model_compare(args, kind: str = "model", name: str = "model_forward") -> int:
    from .model_bench import MODEL_CONFIGS, accelerate_available, run_model_configs
    from .progress import Progress
    from .results import make_results

    device = _device(args)
    preset, dtype, latent = _model_defaults(args, device)
    notice = None if device.type == "cuda" else cpu_notice(f"the '{preset}' preset")
    if notice:
        print(notice, flush=True)
    configs = args.configs or list(MODEL_CONFIGS)
    if accelerate_available() is None:
        print("longcat.accelerate is not available yet: only the reference configuration runs.")
    with Progress(len(configs) * (args.warmup + args.repeats), label=kind) as bar:
        records = run_model_configs(preset, latent, args.batch, configs, device=device, dtype=dtype, text_len=args.text_len,
                                    warmup=args.warmup, repeats=args.repeats, seed=args.seed, progress=bar, name=name)
    extra = {"notice": notice} if notice else {}
    if kind == "memory":
        from .accuracy import planner_records

        records += planner_records()
    _model_summary([r for r in records if r.get("name") == name],
                   f"longcat-bench {kind}: {preset}, latent {latent} x batch {args.batch}, {str(dtype)[6:]} on {device}")
    plans = [r for r in records if r.get("name") == "memory_plan"]
    if plans:
        print("\nmemory planner (full model, predictions):")
        for r in plans:
            print(f"  {r['label']:<34} " + (f"{_fmt_bytes(r['peak_bytes'])}" if r.get("status") == "ok" else f"{r['status']}: {r.get('reason', '')[:70]}"))
    _write(make_results(kind, records, extra=extra), args.json)
    bad = [r for r in records if r.get("name") == name and r.get("status") == "error"]
    return 1 if bad or any(r.get("output_finite") is False for r in records) else 0


def cmd_memory(args) -> int:
    return cmd_model_compare(args, kind="memory", name="model_memory")


def cmd_kernels(args) -> int:
    from .cases import build_cases
    from .ceilings import measure_ceilings
    from .progress import Progress
    from .results import make_results
    from .runner import case_impl_count, run_cases

    device = _device(args)
    on_gpu = device.type == "cuda"
    notice = None if on_gpu else cpu_notice(f"{args.size or 'cpu-small'} shapes")
    if notice:
        print(notice, flush=True)
    dtype = DTYPES[args.dtype] if args.dtype else None
    use_compile = {"auto": None, "on": True, "off": False}[args.compile]
    cases = build_cases(device, dtype=dtype, ops=args.ops, sizes=[args.size] if args.size else None, use_compile=use_compile)
    ceilings = None if args.no_ceilings else measure_ceilings(device)
    if ceilings:
        print(f"ceilings ({device}): copy {ceilings['copy_gbps']:,.0f} GB/s (read+write), "
              f"matmul {ceilings['matmul_tflops']:,.1f} TFLOP/s ({ceilings['matmul_n']}^3 {ceilings['matmul_dtype']})", flush=True)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats if args.repeats is not None else (10 if on_gpu else 3)
    with Progress(case_impl_count(cases), label="kernels") as bar:
        records = run_cases(cases, device, warmup, repeats, ceilings, progress=bar, log=lambda m: print(m, file=sys.stderr))
    _print_kernel_table(records)
    unavailable = sorted({f"{r['op']}/{r['impl']}: {r['reason']}" for r in records if r.get("status") == "unavailable"})
    if unavailable:
        print("\nnot available here:")
        for u in unavailable:
            print(f"  {u}")
    extra = {"ceilings": ceilings, "notice": notice} if notice else {"ceilings": ceilings}
    from .targets import bsa_targets, format_targets

    targets = bsa_targets(records)
    if targets:
        print("\nblock-sparse attention targets (720p):")
        print(format_targets(targets))
        extra["bsa_targets"] = targets
    _write(make_results("kernels", records, extra=extra), args.json)
    return 1 if any(r.get("status") == "error" and r.get("role") == "subject" for r in records) else 0


def _print_kernel_table(records):
    head = ("op", "shape", "impl", "role", "median ms", "rate", "vs ref", "error", "status")
    rows = [head]
    for r in records:
        rate = f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else (f"{r['gbps']:.1f} GB/s" if "gbps" in r else "")
        err = (f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else (f"{r['sqnr_db']:.1f} dB" if "sqnr_db" in r else ""))
        rows.append((r["op"], r["label"], r["impl"], r["role"], f"{r['median_ms']:.3f}" if "median_ms" in r else "",
                     rate, f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "", err,
                     r.get("status", "") if r.get("status") in ("ok", "unavailable") else f"{r.get('status')}: {r.get('reason', '')[:50]}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _accuracy_figures(device, dtypes, size, full_quant: bool, peers=(), progress=None) -> list:
    from .accuracy import kernel_accuracy_records, planner_records, quant_accuracy_records, quant_gemm_kernel_records

    records = kernel_accuracy_records(device, dtypes, size=size, progress=progress)
    records += quant_gemm_kernel_records(device)
    if full_quant:
        from longcat.quant.accuracy import LAYER_SHAPES

        records += quant_accuracy_records(dict(LAYER_SHAPES), tokens=256, peers=peers)
    else:
        records += quant_accuracy_records(peers=peers)
    records += planner_records()
    return records


def _print_accuracy(records):
    from .report import _accuracy_tables

    print(_accuracy_tables(records))


def cmd_accuracy(args) -> int:
    from .progress import Progress
    from .results import make_results

    device = _device(args)
    on_gpu = device.type == "cuda"
    notice = None if on_gpu else cpu_notice(f"{args.size or 'cpu-tiny'} shapes")
    if notice:
        print(notice, flush=True)
    names = args.dtypes or (["bf16", "fp16", "fp32"] if on_gpu else ["fp32", "fp16"])
    dtypes = [DTYPES[n] for n in names]
    size = args.size or ("gpu-small" if on_gpu else "cpu-tiny")
    peers = []
    if args.peers:
        from .peers import peer_packages

        pk = peer_packages()
        if pk.get("bitsandbytes") and on_gpu:
            peers += [("bitsandbytes", "int8"), ("bitsandbytes", "nf4")]
        if pk.get("optimum-quanto"):
            peers += [("quanto", "int8"), ("quanto", "fp8")]
    with Progress(9 * len(dtypes), label="accuracy") as bar:
        records = _accuracy_figures(device, dtypes, size, args.full, peers=peers, progress=bar)
    _print_accuracy(records)
    extra = {"notice": notice} if notice else {}
    _write(make_results("accuracy", records, extra=extra), args.json)
    return 1 if any(r.get("within_bound") is False for r in records) else 0


def cmd_pipeline(args) -> int:
    from .pipeline_bench import pipeline_packages, run_pipeline
    from .progress import Progress
    from .results import make_results

    missing = pipeline_packages()
    if missing:
        print(f"longcat-bench pipeline needs the pipeline extra: {missing}", file=sys.stderr)
        return 2
    if args.stage == "refine" and args.resolution != "720p" or args.stage == "base" and args.resolution != "480p":
        print(f"the {args.stage} stage runs at {'720p' if args.stage == 'refine' else '480p'}", file=sys.stderr)
        return 2
    device = _device(args)
    notice = None if device.type == "cuda" else cpu_notice("the pipeline with small configs (UMT5, Wan VAE and DiT at toy widths)")
    if notice:
        print(notice, flush=True)
    from longcat.pipeline_plan import STAGES

    latent = None
    if args.latent_frames:
        latent = (args.latent_frames, *STAGES[args.stage]["latent"][1:]) if device.type == "cuda" else (args.latent_frames, 4, 8)
    # The all-resident reference runs first, so it (not a budget run) pays for kernel compilation.
    runs = list(dict.fromkeys(([None] if args.compare_resident else []) + [args.budget] + list(args.also_budgets or [])))
    results = []
    phases = (4 if args.stage == "refine" else 3) + args.steps - 1
    with Progress(phases * len(runs), label="pipeline") as bar:
        for budget in runs:
            # On a GPU the tactics are those fitted for the stage's whole video, even when fewer frames run.
            fit_latent = STAGES[args.stage]["latent"] if device.type == "cuda" else None
            results.append(run_pipeline(args.stage, budget=budget, device=device, latent=latent, steps=args.steps,
                                        seed=args.seed, progress=bar, fit_latent=fit_latent))
    records = []
    def steady_time(res):  # without the first denoising step (compilation, first copies) when there are more
        times = [r.get("time_s", 0) for r in res["records"]]
        steps = [r.get("time_s", 0) for r in res["records"] if r["phase"] == "denoising step"]
        return sum(times) - (steps[0] if len(steps) > 1 else 0)

    resident_time = next((steady_time(res) for res in results if res["budget"] is None), None)
    for res in results:
        print(f"\n{res['config']}: {res['tactics']}" + (f" (memory fraction {res['memory_fraction']:.4f})" if res["memory_fraction"] else ""))
        if device.type == "cuda":  # allocator peak (weights included) against the planned peak
            head = ("phase", "time s", "measured peak", "NVML peak", "planned peak", "measured/planned", "status")
        else:  # tensors the phase created (weights not counted); toy widths in fp32: no comparison with the plan
            head = ("phase", "time s", "live tensors peak", "", "planned activations (bf16, full plan)", "", "status")
        rows = [head]
        for r in res["records"]:
            measured = r.get("measured_peak_bytes") or r.get("live_tensor_peak_bytes")
            planned = r["planned_peak_bytes"] if device.type == "cuda" else r.get("planned_activation_bytes")
            ratio = f"{measured / planned:.2f}" if measured and planned and device.type == "cuda" else ""
            rows.append((r["phase"], f"{r['time_s']:.3f}" if "time_s" in r else "", _fmt_bytes(measured) if measured else "",
                         _fmt_bytes(r.get("nvml_peak_used_bytes")) if r.get("nvml_peak_used_bytes") else "",
                         _fmt_bytes(planned) + " (planned)" if planned else "", ratio, r["status"]))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        for i, row in enumerate(rows):
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        total = sum(r.get("time_s", 0) for r in res["records"])
        summary = dict(name="pipeline_run", config=res["config"], tactics=res["tactics"], plan=res["plan"], total_time_s=total,
                       output_finite=res["output_finite"], budget=res["budget"], memory_fraction=res["memory_fraction"],
                       status="ok" if all(r["status"] == "ok" for r in res["records"]) else "failed")
        summary["steady_time_s"] = steady_time(res)
        if resident_time and res["budget"] is not None:
            summary["time_vs_all_resident"] = summary["steady_time_s"] / resident_time
            print(f"  total {total:.2f} s, {summary['time_vs_all_resident']:.2f}x the all-resident run (without the first step)")
        else:
            print(f"  total {total:.2f} s")
        records += res["records"] + [summary]
    extra = {"notice": notice} if notice else {}
    _write(make_results("pipeline", records, extra=extra), args.json)
    return 0 if all(r["status"] == "ok" for r in records) and all(res["output_finite"] for res in results) else 1


def cmd_report(args) -> int:
    from .report import default_inputs, write_report

    inputs = args.inputs or default_inputs()
    for path in inputs:
        _read_input(path, "input", results_schema=False)
    text, note = write_report(inputs, args.output, args.plots_dir)
    print(f"{args.output} written from {len(inputs)} results file(s)" + (f"; {note}" if note else ""))
    return 0


def cmd_compile(args) -> int:
    from .compile_report import main_compile

    return main_compile(args, args.argv)


def cmd_compare(args) -> int:
    from .compare import Tolerances, compare_docs, format_rows, regressions

    frac = args.fail_above
    old, new = _read_input(args.old, "old results"), _read_input(args.new, "new results")
    if not new["records"]:
        raise CLIError(f"new results {args.new}: holds no records; nothing to compare")
    rows = compare_docs([old], [new], Tolerances.uniform(frac), with_time=not args.no_time)
    print(f"compare {args.old} -> {args.new} (fail above {frac * 100:g}%: time up, error or memory up, SQNR/cosine worse)")
    for label, doc in (("old", old), ("new", new)):
        m = doc.get("machine", {})
        print(f"  {label}: {m.get('gpu') or 'CPU'}, torch {m.get('torch')}, commit {m.get('commit')}, command: {doc.get('command')}")
    print()
    print(format_rows(rows, show_ok=not args.only_changes))
    bad = regressions(rows, missing_fails=True)
    print(f"\n{len(bad)} regression(s) (beyond {frac * 100:g}%, NaN, broken or missing) out of {len(rows)} compared values.")
    return 1 if bad else 0


CHECK_TOLERANCES = dict(time=0.10, error=1.0, sqnr=0.25, cosine=0.25, bytes=0.01, error_floor=1e-6)


def _gpu_docs(paths):
    from .results import load_results

    docs = []
    for p in paths:
        try:
            d = load_results(p)
        except (ValueError, OSError):  # not a longcat-bench results file (e.g. pytest-benchmark JSON)
            continue
        if (d.get("machine") or {}).get("gpu"):
            docs.append(d)
    return docs


def cmd_check(args) -> int:
    from .cases import kernel_path
    from .compare import Tolerances, compare_docs, format_rows, regressions
    from .results import load_results, make_results, write_results

    if kernel_path(torch.device("cpu")) == "reference-fallback":
        print("longcat-bench check measures the Triton kernels in the CPU interpreter: set TRITON_INTERPRET=1 "
              "before Python starts (TRITON_INTERPRET=1 longcat-bench check ...).", file=sys.stderr)
        return 2
    if args.update:
        _check_output(args.baseline, "--baseline")
        _check_output(args.gpu_baseline, "--gpu-baseline")
    elif os.path.isfile(args.baseline):
        _read_input(args.baseline, "baseline")
    print("longcat-bench check: deterministic accuracy of every kernel (CPU, Triton interpreter, fixed seeds), "
          "quantization SQNR/cosine, memory-planner figures; compared with the committed baseline.", flush=True)
    records = _accuracy_figures(torch.device("cpu"), [torch.float32, torch.float16], "cpu-tiny", False)
    doc = make_results("check", records, command=["longcat-bench", "check", "--baseline", args.baseline])
    _write(doc, args.json)
    tol = Tolerances(**CHECK_TOLERANCES)
    gpu_paths = args.gpu_results if args.gpu_results is not None else sorted(glob.glob(os.path.join("bench", "results", "*.json")))
    gpu_new = _gpu_docs(gpu_paths)
    if args.update:
        write_results(doc, args.baseline)
        print(f"baseline written: {args.baseline} ({len(records)} records)")
        if gpu_new:
            merged = make_results("gpu-baseline", [r for d in gpu_new for r in d["records"]],
                                  command=["longcat-bench", "check", "--update"], extra={"sources": gpu_paths})
            write_results(merged, args.gpu_baseline)
            print(f"GPU baseline written: {args.gpu_baseline} from {len(gpu_new)} GPU results file(s)")
        return 0
    if not os.path.isfile(args.baseline):
        print(f"no baseline at {args.baseline}; create it with: longcat-bench check --update --baseline {args.baseline}", file=sys.stderr)
        return 2
    base = load_results(args.baseline)
    rows = compare_docs([base], [doc], tol, with_time=False)
    bad = regressions(rows, missing_fails=True)
    print(f"\nbaseline: {args.baseline} (commit {base['machine'].get('commit')}, torch {base['machine'].get('torch')}); "
          f"tolerances: errors <= 2x baseline + {tol.error_floor:g}, SQNR noise +{tol.sqnr:.0%}, 1-cos +{tol.cosine:.0%}, "
          f"planner bytes +{tol.bytes:.0%}")
    print(format_rows(rows, show_ok=args.verbose) if (args.verbose or [r for r in rows if r.status != "ok"]) else
          f"all {len(rows)} values within tolerance")
    if gpu_new and os.path.isfile(args.gpu_baseline):
        gbase = load_results(args.gpu_baseline)
        grows = [r for r in compare_docs([gbase], gpu_new, tol, with_time=True) if r.metric == "median_ms" or r.metric == "status"]
        gbad = regressions(grows)
        print(f"\nGPU timings against {args.gpu_baseline} (time +{tol.time:.0%} allowed):")
        print(format_rows(grows, show_ok=args.verbose) if (args.verbose or gbad) else f"all {len(grows)} timings within tolerance")
        bad += gbad
    elif gpu_new:
        print(f"\nGPU results present but no GPU baseline ({args.gpu_baseline}); record it with --update.")
    else:
        print("\nGPU timings: no GPU results in bench/results/; not compared.")
    print(f"\ncheck: {'FAILED, ' + str(len(bad)) + ' regression(s)' if bad else 'passed'} ({len(rows)} values compared)")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="longcat-bench", description="Benchmark harness of the LongCat-Video toolkit.")
    sub = p.add_subparsers(dest="command")

    def model_options(m, warmup=1, repeats=3):
        m.add_argument("--preset", choices=["tiny", "small", "longcat-video"], help="model size (default: small on CPU, longcat-video on GPU)")
        m.add_argument("--latent", type=positive_int, nargs=3, metavar=("T", "H", "W"), help="latent grid before patching (default CPU 4 16 16, GPU 24 60 104 = 480p)")
        m.add_argument("--batch", type=positive_int, default=1, help="samples per forward pass (default 1; 2 = classifier-free guidance)")
        m.add_argument("--text-len", type=positive_int, default=32, help="prompt tokens per sample for cross-attention (default 32)")
        m.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on GPU")
        m.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        m.add_argument("--warmup", type=non_negative_int, default=warmup, help=f"untimed forward passes first (default {warmup})")
        m.add_argument("--repeats", type=positive_int, default=repeats, help=f"timed forward passes; the median is reported (default {repeats})")
        m.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
        m.add_argument("--json", help="also write the results JSON here")

    from .model_bench import MODEL_CONFIGS

    m = sub.add_parser("model", help="time one DiT forward pass with random weights (the default command)")
    model_options(m)
    m.add_argument("--ops", choices=["reference", "sdpa"], default="sdpa",
                   help="op table: reference (exact eager math) or sdpa (PyTorch fused attention; default)")
    m.add_argument("--compare", action="store_true", help="run reference (SDPA_OPS) and the accelerated configurations in one run")
    m.add_argument("--configs", nargs="+", choices=list(MODEL_CONFIGS), help="with --compare: which configurations (default: all)")
    m.set_defaults(func=cmd_model)

    mem = sub.add_parser("memory", help="peak memory per configuration (measured) and the memory planner's figures")
    model_options(mem, warmup=0, repeats=1)
    mem.add_argument("--configs", nargs="+", choices=list(MODEL_CONFIGS), help="default: all")
    mem.set_defaults(func=cmd_memory)

    from .cases import OPS

    k = sub.add_parser("kernels", help="every kernel vs its reference and peers: time, TFLOP/s or GB/s, memory, error")
    k.add_argument("--ops", nargs="+", metavar="OP", help=f"subset (prefixes work, e.g. attention): {', '.join(OPS)}")
    k.add_argument("--size", help="GPU: 480p or 720p (default both); CPU: cpu-small (default) or cpu-tiny")
    k.add_argument("--dtype", choices=sorted(DTYPES), help="activation dtype (default bf16 on GPU, fp32 on CPU)")
    k.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    k.add_argument("--warmup", type=non_negative_int, help="default 3 on GPU, 1 on CPU")
    k.add_argument("--repeats", type=positive_int, help="default 10 on GPU, 3 on CPU")
    k.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile peers (auto: on a GPU only)")
    k.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy / matmul ceilings")
    k.add_argument("--json", help="also write the results JSON here")
    k.set_defaults(func=cmd_kernels)

    a = sub.add_parser("accuracy", help="kernel errors vs the float64 oracle; quantization SQNR / cosine; planner figures")
    a.add_argument("--size", help="GPU: gpu-small (default; the float64 oracle does not fit at 480p/720p); CPU: cpu-tiny (default) or cpu-small")
    a.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default bf16 fp16 fp32 on GPU, fp32 fp16 on CPU")
    a.add_argument("--full", action="store_true", help="quantization at the real Linear shapes (CPU float32 math: minutes)")
    a.add_argument("--peers", action="store_true", help="include bitsandbytes / optimum-quanto when importable")
    a.add_argument("--device", help="cpu or cuda")
    a.add_argument("--json", help="also write the results JSON here")
    a.set_defaults(func=cmd_accuracy)

    pl = sub.add_parser("pipeline", help="the whole pipeline phase by phase: measured and planned peak memory, time (needs the pipeline extra)")
    pl.add_argument("--stage", choices=["refine", "base"], default="refine")
    pl.add_argument("--resolution", choices=["720p", "480p"], default="720p")
    pl.add_argument("--budget", help="memory budget, e.g. 8GB: tactics fitted to it; on a GPU enforced with a memory fraction")
    pl.add_argument("--also-budgets", nargs="+", metavar="BUDGET", help="more budgets to run in the same call")
    pl.add_argument("--compare-resident", action="store_true", help="also run with everything resident (the time reference)")
    pl.add_argument("--latent-frames", type=int, help="run fewer latent frames than the stage's (same height and width; "
                    "on a GPU the tactics stay those fitted for the whole stage)")
    pl.add_argument("--steps", type=int, default=1, help="denoising steps (default 1)")
    pl.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--json", help="also write the results JSON here")
    pl.set_defaults(func=cmd_pipeline)

    r = sub.add_parser("report", help="render BENCHMARKS.md (and PNG plots) from results files")
    r.add_argument("inputs", nargs="*", help="results files (default: bench/results/*.json and bench/baseline/cpu.json)")
    r.add_argument("--output", default="BENCHMARKS.md")
    r.add_argument("--plots-dir", help="where PNG plots go (default bench/results/plots)")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", help="regression table between two results files; non-zero exit on a regression")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--fail-above", type=_threshold, default="10%",
                   help="allowed change before a value counts as a regression, as a percentage with its %% sign "
                        "(default 10%%; a bare number is refused). NaN values, broken or missing records and an "
                        "empty or unknown-schema file fail whatever the threshold")
    c.add_argument("--no-time", action="store_true", help="ignore timings (compare accuracy and memory only)")
    c.add_argument("--only-changes", action="store_true", help="hide rows within the threshold")
    c.set_defaults(func=cmd_compare)

    ck = sub.add_parser("check", help="CI regression check against a committed baseline (CPU, deterministic)")
    ck.add_argument("--baseline", default=os.path.join("bench", "baseline", "cpu.json"))
    ck.add_argument("--update", action="store_true", help="rewrite the baseline(s) from this run")
    ck.add_argument("--gpu-baseline", default=os.path.join("bench", "baseline", "gpu-h200.json"))
    ck.add_argument("--gpu-results", nargs="*", help="GPU results files to compare with the GPU baseline (default: bench/results/*.json from a GPU)")
    ck.add_argument("--json", help="also write this run's figures here")
    ck.add_argument("--verbose", action="store_true", help="print every compared value")
    ck.set_defaults(func=cmd_check)

    cc = sub.add_parser("compile", help="compile every kernel's launch configs at the real shapes for a GPU arch, "
                        "without a GPU: registers, spills, shared memory, tensor cores, pipeline depth")
    cc.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80 (default 90)")
    cc.add_argument("--sizes", nargs="+", choices=["480p", "720p"], default=["480p", "720p"])
    cc.add_argument("--ops", nargs="+", metavar="OP", help="only cases whose name starts with one of these")
    cc.add_argument("--hot", action="store_true", help="only the inference-path cases (what the CI gate compiles)")
    cc.add_argument("--fail", action="store_true", help="exit 1 when a config fails to compile, spills or exceeds shared memory")
    cc.add_argument("--verbose", action="store_true", help="print each compilation as it starts")
    cc.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compilations at a time (default: up to 2)")
    cc.add_argument("--cache", help="JSON file of static stats per kernel specialisation, read and rewritten "
                    "(only compilations whose kernel source, specialisation and Triton version match are reused)")
    cc.add_argument("--json", help="write the results JSON here (e.g. bench/results/compile-sm90.json)")
    cc.set_defaults(func=cmd_compile)
    return p


# Subcommands that measure the Triton kernels: on a machine without a GPU they need the interpreter,
# which must be switched on before triton is first imported.
_INTERPRETED = ("kernels", "accuracy", "check")


def _reexec_with_interpreter(argv: List[str]) -> None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") or os.environ.get("LONGCAT_BENCH_NO_REEXEC"):
        return
    if not argv or argv[0] not in _INTERPRETED or "--device" in argv and "cuda" in argv:
        return
    env = dict(os.environ, TRITON_INTERPRET="1", LONGCAT_BENCH_NO_REEXEC="1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "longcat.bench", *argv], env)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["model", *argv]
    if as_program:
        _reexec_with_interpreter(argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    try:
        for option in ("json", "output"):
            _check_output(getattr(args, option, None), "--" + option)
        _check_output(getattr(args, "plots_dir", None), "--plots-dir", folder=True)
        return args.func(args)
    except CLIError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
