"""``python -m longcat.quant accuracy|memory``.

accuracy: SQNR / cosine of every format at the real LongCat-Video Linear shapes (CPU, float32
reference math, ~1 minute; ``--quick`` for reduced shapes, ``--peers`` adds bitsandbytes/quanto).
memory: bytes per dtype of a model described by a state-dict shape listing (``--shapes
full_state_dict.json``), before and after quantization on the meta device.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time


def _accuracy(args) -> int:
    from .accuracy import FORMATS, LAYER_SHAPES, PEER_FORMATS, accuracy_table, format_table

    shapes = LAYER_SHAPES
    if args.quick:
        shapes = {name: (max(n // 8, 64), max(k // 8, 64)) for name, (n, k) in LAYER_SHAPES.items()}
    peers = ()
    if args.peers:
        from .peers import require_peer

        peers = []
        for backend, fmt in PEER_FORMATS:
            try:
                require_peer(backend)
                peers.append((backend, fmt))
            except ImportError as e:
                print(f"skipping {backend}: {e}", file=sys.stderr)
    t0 = time.perf_counter()

    def show_progress(done: int, total: int, what: str) -> None:
        # one line per step on stderr (the table goes to stdout): visible in logs and terminals
        print(f"[{done}/{total}] {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    print(f"measuring {len(shapes)} layer shapes x 2 weight distributions x {len(FORMATS) + len(peers)} formats "
          f"(M = {args.tokens} tokens){'' if args.quick else '; --quick for shapes divided by 8'}",
          file=sys.stderr, flush=True)
    rows = accuracy_table(shapes, formats=FORMATS, tokens=args.tokens, seed=args.seed, peers=peers,
                          on_step=show_progress)
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.1f} s (M = {args.tokens} tokens, activations with 4 outlier channels x100)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows], f, indent=2)
    return 0


def _memory(args) -> int:
    from .quantize import format_memory_report, memory_report, quantize
    from .standin import load_shape_listing, module_from_shapes

    import torch

    shapes = load_shape_listing(args.shapes)
    model = module_from_shapes(shapes, device="meta", dtype=getattr(torch, args.dtype))
    print(f"float model ({args.dtype}):")
    print(format_memory_report(memory_report(model)))
    quantize(model, args.config)
    print(f"\nquantized ({args.config}):")
    print(format_memory_report(memory_report(model)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat.quant")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy", help="SQNR / cosine per layer shape and format")
    a.add_argument("--tokens", type=int, default=256)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--quick", action="store_true", help="shapes divided by 8")
    a.add_argument("--peers", action="store_true", help="add bitsandbytes / optimum-quanto rows when installed")
    a.add_argument("--json", help="also write the rows to this JSON file")
    m = sub.add_parser("memory", help="bytes per dtype of a model from a state-dict shape listing")
    m.add_argument("--shapes", required=True, help="JSON {name: [shape, dtype]} (e.g. golden/full_state_dict.json)")
    m.add_argument("--config", default="int8")
    m.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    return _accuracy(args) if args.cmd == "accuracy" else _memory(args)


if __name__ == "__main__":
    sys.exit(main())
