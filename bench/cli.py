"""``longcat-bench`` (also ``python -m longcat.bench``): the command-line front of the harness.

``longcat-bench`` alone runs the main job, ``model``: one forward pass (a denoising step) of the
DiT with random weights, timed, with peak memory and a summary table. Without a GPU it runs the
small preset on the CPU and says so.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def cmd_model(args) -> int:
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
        ("peak memory", _fmt_bytes(mem.report.peak_bytes) + (" (torch allocator)" if device.type == "cuda" else " (process RSS)")),
        ("output", f"finite={finite}, std={record['output_std']:.4f}"),
    ]
    print_table(rows, title="longcat-bench model")
    if args.json:
        write_results(make_results("model", [record]), args.json)
        print(f"results written to {args.json}")
    return 0 if finite else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-bench", description="Benchmark harness of the LongCat-Video toolkit.")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("model", help="time one DiT forward pass with random weights (the default command)")
    m.add_argument("--preset", choices=["tiny", "small", "longcat-video"], help="model size (default: small on CPU, longcat-video on GPU)")
    m.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"), help="latent grid before patching (default CPU 4 16 16, GPU 24 60 104 = 480p)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--text-len", type=int, default=32)
    m.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    m.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    m.add_argument("--ops", choices=["reference", "sdpa"], default="sdpa")
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", help="also write the results JSON here")
    m.set_defaults(func=cmd_model)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["model", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
