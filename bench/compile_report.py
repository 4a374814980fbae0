"""``longcat-bench compile``: every Triton kernel of the package, compiled for a GPU architecture
without a GPU, in exactly the launch configs its launcher picks at the real LongCat-Video shapes.

Each case calls a public op on ``meta`` tensors of the real shape (no memory) inside
``longcat.kernels._capture.capture_launches``: the real launcher validates, allocates and chooses
its config, and the launch is recorded instead of run (for autotuned kernels, every config that
pruning keeps). Every distinct launch is then specialised by Triton's own binder and compiled for
``sm_<arch>`` (``bench.static_compile``): registers, spills, shared memory against the limit,
CTAs/SM, wgmma / mma.sync / TMA, tiles in flight, ptxas advisories, main-loop SASS instructions.

Each case also carries a model line: the bytes it must move and the FLOPs it must do at that shape,
and the time the H200 ceilings allow (copy ~4.3 TB/s, bf16 ~790 TFLOP/s, fp8/int8 ~1979 TFLOP/s
datasheet). These are a model, never a measurement.

Must run where ``TRITON_INTERPRET`` is unset (under the interpreter kernels cannot be compiled for a
GPU); ``run_compile_subprocess`` starts such a process from anywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

__all__ = ["SIZES", "CASES", "H200_CEILINGS", "Size", "Case", "select_cases", "capture_case", "compile_cases",
           "run_compile_subprocess", "failing_configs", "main_compile"]

# DESIGN.md section 5: measured bf16 matmul and copy on the H200; fp8/int8 from the datasheet.
H200_CEILINGS = {"copy_bytes_per_s": 4.3e12, "bf16_flops": 790e12, "8bit_flops": 1979e12}

# The released model (DESIGN.md section 3)
HIDDEN, HEADS, HEAD_DIM, FFN_HIDDEN, TEXT_TOKENS, ADALN_DIM = 4096, 32, 128, 11008, 512, 512


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    batch: int
    latent: tuple[int, int, int]  # (T, H, W) after patching

    @property
    def tokens(self) -> int:
        return math.prod(self.latent)


SIZES = {
    "480p": Size("480p", 2, (24, 30, 52)),   # base stage, batch 2 with CFG: 37,440 tokens
    "720p": Size("720p", 1, (48, 44, 80)),   # refinement stage: 168,960 tokens
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape. ``run(size, launches)`` calls the public op on meta tensors (a backward
    case drops the forward's launches from ``launches``); ``model(size)`` gives
    ``(bytes, flops, flops_ceiling_key)``. ``hot``: on the inference path of a denoising step (the
    CI gate compiles these at 720p)."""

    op: str
    run: Callable
    model: Callable
    hot: bool = True


def _meta(*shape, dtype=None, grad=False):
    import torch

    return torch.empty(*shape, dtype=dtype or torch.bfloat16, device="meta", requires_grad=grad)


def _mod(s: Size):
    import torch

    return _meta(s.batch, s.latent[0], HIDDEN, dtype=torch.float32)


def _drop_forward(launches, run_backward):
    n = len(launches)
    run_backward()
    del launches[:n]


# ---- element-wise and norm ops ----------------------------------------------------------------

def _lnm(s, launches):
    from longcat.kernels.modulate import layer_norm_modulate

    layer_norm_modulate(_meta(s.batch, s.tokens, HIDDEN), _mod(s), _mod(s))


def _lnm_bwd(s, launches):
    from longcat.kernels.modulate import layer_norm_modulate

    x = _meta(s.batch, s.tokens, HIDDEN, grad=True)
    y = layer_norm_modulate(x, _mod(s), _mod(s))
    _drop_forward(launches, lambda: y.backward(_meta(*y.shape)))


def _lnm_quant(qdtype):
    def run(s, launches):
        from longcat.kernels.modulate import layer_norm_modulate_quant

        layer_norm_modulate_quant(_meta(s.batch, s.tokens, HIDDEN), _mod(s), _mod(s), qdtype=qdtype)
    return run


def _residual(s, launches):
    from longcat.kernels.residual import gated_residual

    gated_residual(_meta(s.batch, s.tokens, HIDDEN), _meta(s.batch, s.tokens, HIDDEN), _mod(s))


def _residual_norm(s, launches):
    from longcat.kernels.residual import gated_residual_layer_norm

    gated_residual_layer_norm(_meta(s.batch, s.tokens, HIDDEN), _meta(s.batch, s.tokens, HIDDEN), _mod(s),
                              _mod(s), _mod(s))


def _qkv_prep(s, launches):
    from longcat.kernels.qkv_prep import qkv_norm_rope

    qkv_norm_rope(_meta(s.batch, s.tokens, 3 * HIDDEN), _meta(HEAD_DIM), _meta(HEAD_DIM), HEADS, s.latent)


def _rope(s, launches):
    from longcat.kernels.rope import rope_3d

    rope_3d(_meta(s.batch, HEADS, s.tokens, HEAD_DIM), s.latent)


def _rms(s, launches):
    from longcat.kernels.rope import rms_norm

    rms_norm(_meta(s.batch, s.tokens, HEADS, HEAD_DIM), _meta(HEAD_DIM))


def _swiglu_packed(s, launches):
    from longcat.kernels.swiglu import swiglu_packed

    swiglu_packed(_meta(s.batch * s.tokens, 2 * FFN_HIDDEN))


def _swiglu_packed_bwd(s, launches):
    from longcat.kernels.swiglu import swiglu_packed

    ab = _meta(s.batch * s.tokens, 2 * FFN_HIDDEN, grad=True)
    y = swiglu_packed(ab)
    _drop_forward(launches, lambda: y.backward(_meta(*y.shape)))


def _quantize(qdtype, width):
    def run(s, launches):
        from longcat.kernels.quantize_activations import quantize_per_token

        quantize_per_token(_meta(s.batch * s.tokens, width), qdtype)
    return run


def _copy_model(bytes_per_token):
    return lambda s: (s.batch * s.tokens * bytes_per_token, 0, None)


# ---- quantized GEMMs ----------------------------------------------------------------------------

# (layer, rows(size), in, out, bias, swiglu): every Linear of a block, plus adaLN (rows = frames)
GEMM_LAYERS = [
    ("qkv", lambda s: s.batch * s.tokens, HIDDEN, 3 * HIDDEN, True, False),
    ("attn proj", lambda s: s.batch * s.tokens, HIDDEN, HIDDEN, True, False),
    ("cross q", lambda s: s.batch * s.tokens, HIDDEN, HIDDEN, True, False),
    ("cross kv (text)", lambda s: s.batch * TEXT_TOKENS, HIDDEN, 2 * HIDDEN, True, False),
    ("ffn w1|w3 + SwiGLU", lambda s: s.batch * s.tokens, HIDDEN, 2 * FFN_HIDDEN, False, True),
    ("ffn w2", lambda s: s.batch * s.tokens, FFN_HIDDEN, HIDDEN, False, False),
    ("adaLN (per frame)", lambda s: s.batch * s.latent[0], ADALN_DIM, 6 * HIDDEN, True, False),
]
GEMM_FORMATS = ["W8A16 int8", "W8A16 fp8", "W8A8 int8", "W8A8 fp8"]


def _gemm(fmt, rows, k, n, bias, swiglu):
    def run(s, launches):
        import torch

        from longcat.kernels import quant_gemm

        m = rows(s)
        wdt = torch.int8 if "int8" in fmt else torch.float8_e4m3fn
        w, ws = _meta(n, k, dtype=wdt), _meta(n, dtype=torch.float32)
        b = _meta(n) if bias else None
        if fmt.startswith("W8A16"):
            quant_gemm.weight_only_linear(_meta(m, k), w, ws, b, swiglu=swiglu)
        else:
            quant_gemm.dynamic_linear(_meta(m, k, dtype=wdt), _meta(m, dtype=torch.float32), w, ws, b,
                                      torch.bfloat16, swiglu=swiglu)

    def model(s):
        m = rows(s)
        a_bytes = 2 if fmt.startswith("W8A16") else 1
        out = n // 2 if swiglu else n
        return m * k * a_bytes + n * k + m * out * 2, 2 * m * n * k, "bf16_flops" if a_bytes == 2 else "8bit_flops"
    return run, model


# ---- attention ----------------------------------------------------------------------------------

def _qkv4(s, seq=None, grad=False):
    seq = s.tokens if seq is None else seq
    return (_meta(s.batch, HEADS, seq, HEAD_DIM, grad=grad) for _ in range(3))


def _bsa(sparsity, tile, backward=False):
    def run(s, launches):
        from longcat.kernels.attention import block_sparse_attention

        q, k, v = _qkv4(s, grad=backward)
        out = block_sparse_attention(q, k, v, s.latent, s.latent, sparsity=sparsity, tile=tile)
        if backward:
            _drop_forward(launches, lambda: out.backward(_meta(*out.shape)))

    def model(s):
        tile_tokens = math.prod(tile)
        n_tiles = math.prod(-(-g // t) for g, t in zip(s.latent, tile))
        kept = max(1, int((1 - sparsity) * n_tiles))
        bh = s.batch * HEADS
        flops = 4 * bh * s.tokens * kept * tile_tokens * HEAD_DIM
        # q and out once; K/V of every kept tile once per query tile (no L2 reuse: the upper bound)
        traffic = bh * (2 * s.tokens * HEAD_DIM * 2 + n_tiles * kept * tile_tokens * HEAD_DIM * 2 * 2)
        if backward:  # dq, dk, dv: ~2.5x the forward FLOPs, inputs read twice and dq/dk/dv written
            flops, traffic = int(2.5 * flops), 2 * traffic + bh * 3 * s.tokens * HEAD_DIM * 2
        return traffic, flops, "bf16_flops"
    return run, model


def _dense(kv_tokens=None, backward=False):
    def run(s, launches):
        from longcat.kernels.attention import dense_attention

        q = _meta(s.batch, HEADS, s.tokens, HEAD_DIM, grad=backward)
        k, v = (_meta(s.batch, HEADS, kv_tokens or s.tokens, HEAD_DIM, grad=backward) for _ in range(2))
        out = dense_attention(q, k, v)
        if backward:
            _drop_forward(launches, lambda: out.backward(_meta(*out.shape)))

    def model(s):
        skv = kv_tokens or s.tokens
        bh = s.batch * HEADS
        flops = 4 * bh * s.tokens * skv * HEAD_DIM
        traffic = bh * (2 * s.tokens + 2 * skv) * HEAD_DIM * 2
        if backward:
            flops, traffic = int(2.5 * flops), 2 * traffic + bh * (s.tokens + 2 * skv) * HEAD_DIM * 2
        return traffic, flops, "bf16_flops"
    return run, model


def _varlen(backward=False):
    def run(s, launches):
        import torch

        from longcat.kernels.attention import varlen_attention

        q = _meta(s.batch * s.tokens, HEADS, HEAD_DIM, grad=backward)
        k, v = (_meta(s.batch * TEXT_TOKENS, HEADS, HEAD_DIM, grad=backward) for _ in range(2))
        cu_q = _meta(s.batch + 1, dtype=torch.int32)
        cu_k = _meta(s.batch + 1, dtype=torch.int32)
        out = varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=s.tokens, max_seqlen_k=TEXT_TOKENS)
        if backward:
            _drop_forward(launches, lambda: out.backward(_meta(*out.shape)))
    return run, _dense(TEXT_TOKENS, backward)[1]


def _selection(sparsity, tile):
    def run(s, launches):
        from longcat.kernels.attention import block_sparse_selection

        q, k, _ = _qkv4(s)
        block_sparse_selection(q, k, s.latent, s.latent, sparsity=sparsity, tile=tile)

    def model(s):
        n_tiles = math.prod(-(-g // t) for g, t in zip(s.latent, tile))
        bh = s.batch * HEADS
        # q and k read once for the tile means; the score matrix written and read once (fp32)
        return bh * (2 * s.tokens * HEAD_DIM * 2 + 2 * n_tiles * n_tiles * 4), 2 * bh * n_tiles * n_tiles * HEAD_DIM, "bf16_flops"
    return run, model


def _build_cases() -> list[Case]:
    import torch

    C = HIDDEN
    cases = [
        Case("layer_norm_modulate", _lnm, _copy_model(C * 4)),
        Case("layer_norm_modulate backward", _lnm_bwd, _copy_model(C * 8), hot=False),
        Case("layer_norm_modulate_quant int8", _lnm_quant(torch.int8), _copy_model(C * 3 + 4)),
        Case("layer_norm_modulate_quant fp8", _lnm_quant(torch.float8_e4m3fn), _copy_model(C * 3 + 4)),
        Case("gated_residual", _residual, _copy_model(C * 6)),
        Case("gated_residual_layer_norm", _residual_norm, _copy_model(C * 8)),
        Case("qkv_norm_rope", _qkv_prep, _copy_model(3 * C * 2 * 2)),
        Case("rope_3d", _rope, _copy_model(C * 4)),
        Case("rms_norm", _rms, _copy_model(C * 4)),
        Case("swiglu_packed", _swiglu_packed, _copy_model(FFN_HIDDEN * 6)),
        Case("swiglu_packed backward", _swiglu_packed_bwd, _copy_model(FFN_HIDDEN * 12), hot=False),
        Case("quantize_per_token int8 (ffn hidden)", _quantize(torch.int8, FFN_HIDDEN), _copy_model(FFN_HIDDEN * 3 + 4)),
        Case("quantize_per_token fp8 (ffn hidden)", _quantize(torch.float8_e4m3fn, FFN_HIDDEN), _copy_model(FFN_HIDDEN * 3 + 4)),
    ]
    for fmt in GEMM_FORMATS:
        for layer, rows, k, n, bias, swiglu in GEMM_LAYERS:
            run, model = _gemm(fmt, rows, k, n, bias, swiglu)
            cases.append(Case(f"{fmt} {layer}", run, model))
    for sparsity, tile in ((0.9375, (4, 4, 4)), (0.875, (4, 4, 8))):
        tag = f"{sparsity} / {'x'.join(map(str, tile))}"
        cases.append(Case(f"bsa selection {tag}", *_selection(sparsity, tile)))
        cases.append(Case(f"bsa attention {tag}", *_bsa(sparsity, tile)))
        cases.append(Case(f"bsa attention backward {tag}", *_bsa(sparsity, tile, backward=True), hot=False))
    cases += [
        Case("dense self-attention", *_dense()),
        Case("dense self-attention backward", *_dense(backward=True), hot=False),
        Case("dense cross-attention (512 text tokens)", *_dense(TEXT_TOKENS)),
        Case("varlen cross-attention", *_varlen(), hot=False),
        Case("varlen cross-attention backward", *_varlen(backward=True), hot=False),
    ]
    return cases


CASES: list[Case] = _build_cases()


def capture_case(case: Case, size: Size, arch: int = 90) -> list:
    """The launches (``longcat.kernels._capture.Launch``) the case's launcher makes at ``size``."""
    import warnings

    from longcat.kernels._capture import capture_launches

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a guarded fallback is reported as no launch
        with capture_launches(arch) as launches:
            case.run(size, launches)
    return launches


def _launch_key(launch, arch: int) -> str:
    """What determines the compiled code: Triton's version, the kernel's source with everything it
    calls (``JITFunction.cache_key``), the specialisation for ``sm_<arch>`` and the options."""
    import triton

    from .static_compile import launch_specialization

    signature, constexprs, attrs, options = launch_specialization(launch, arch)
    return hashlib.sha256(json.dumps([
        triton.__version__, launch.name, launch.kernel.cache_key, arch, signature,
        sorted((str(k), str(v)) for k, v in constexprs.items()), sorted((str(k), str(v)) for k, v in attrs.items()),
        sorted((k, str(v)) for k, v in options.items()),
    ]).encode()).hexdigest()[:32]


def load_cache(path: Optional[str]) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("entries", {})


def save_cache(path: str, entries: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"what": "longcat-bench compile: static stats per compiled kernel specialisation (key: triton "
                           "version, kernel source hash, specialisation, options, arch)", "entries": entries}, f, indent=1, sort_keys=True)
        f.write("\n")


def _model_record(case: Case, size: Size) -> dict:
    traffic, flops, peak_key = case.model(size)
    t_bytes = traffic / H200_CEILINGS["copy_bytes_per_s"]
    t_flops = flops / H200_CEILINGS[peak_key] if peak_key else 0.0
    return {"bytes": int(traffic), "flops": int(flops), "flops_ceiling": peak_key,
            "model_ms": 1e3 * max(t_bytes, t_flops), "bound": "compute" if t_flops > t_bytes else "memory"}


def compile_cases(cases: Iterable[Case], sizes: Iterable[Size], archs: Iterable[int] = (90,),
                  progress: Optional[Callable[[str], None]] = None, jobs: int = 1,
                  cache: Optional[dict] = None) -> list[dict]:
    """One record per (case, size, arch, distinct launch config), plus one model record per
    (case, size). Identical compilations (same kernel specialisation) are compiled once, ``jobs``
    at a time (ptxas and much of Triton's pipeline run outside the GIL); ``cache`` maps launch
    keys to stats already known and receives the new ones."""
    from concurrent.futures import ThreadPoolExecutor

    from .static_compile import compile_launch

    compiled: dict[str, dict] = cache if cache is not None else {}
    pending: dict[str, tuple] = {}
    records = []
    for arch in archs:
        for size in sizes:
            for case in cases:
                base = {"op": case.op, "size": size.name, "arch": arch, "hot": case.hot}
                try:
                    launches = capture_case(case, size, arch)
                except Exception as exc:  # a launcher that cannot be driven is a finding, not a crash
                    records.append({"name": "compile_case", **base, "status": "error",
                                    "reason": f"capture: {type(exc).__name__}: {exc}"[:400]})
                    continue
                records.append({"name": "compile_case", **base, "status": "ok" if launches else "no_launch",
                                "reason": "" if launches else "the launcher falls back to the reference here",
                                "model": _model_record(case, size)})
                seen = set()
                for launch in launches:
                    key = _launch_key(launch, arch)
                    if key in seen:  # e.g. the same kernel launched per slab of rows
                        continue
                    seen.add(key)
                    if key not in compiled and key not in pending:
                        pending[key] = (launch, arch, f"sm_{arch} {size.name} {case.op}: {launch.name} "
                                                      f"warps={launch.num_warps} stages={launch.num_stages}")
                    records.append({"name": "compiled_config", **base, "key": key, "grid": list(launch.grid),
                                    "autotune_candidates": launch.autotune_candidates})

    def build(item):
        key, (launch, arch, what) = item
        if progress:
            progress(what)
        stats = compile_launch(launch, arch).as_dict()
        stats.pop("loops", None)
        return key, stats

    with ThreadPoolExecutor(max(1, int(jobs))) as pool:
        for key, stats in pool.map(build, pending.items()):
            compiled[key] = stats
    for r in records:
        if r["name"] == "compiled_config":
            stats = compiled[r["key"]]
            r.update(stats, status="ok" if stats["clean"] else "fail", reason=_failure(stats))
    return records


def _failure(stats: dict) -> str:
    if not stats["ok"]:
        return f"compile error: {stats['error']}"
    problems = []
    if stats["spills"]:
        problems.append(f"spills {stats['spill_stores']} B stores / {stats['spill_loads']} B loads")
    if stats["over_shared_limit"]:
        problems.append(f"shared memory {stats['shared_bytes']:,} B > {stats['shared_limit']:,} B")
    return "; ".join(problems)


def failing_configs(records: Iterable[dict]) -> list[dict]:
    """The compiled configs that do not compile, spill, or exceed the shared-memory limit."""
    return [r for r in records if r.get("name") == "compiled_config" and r.get("status") != "ok"]


def select_cases(ops: Optional[Iterable[str]] = None, hot_only: bool = False) -> list[Case]:
    chosen = [c for c in CASES if not hot_only or c.hot]
    if ops:
        ops = list(ops)
        chosen = [c for c in chosen if any(c.op.startswith(o) for o in ops)]
    return chosen


def run_compile_subprocess(args: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run ``longcat-bench compile ARGS`` in a fresh Python without ``TRITON_INTERPRET`` (the
    kernels must be compiled, not interpreted; triton reads the variable at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "longcat.bench", "compile", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def main_compile(args, argv: list[str]) -> int:
    """The ``compile`` subcommand (``argv``: its own arguments, to rerun it in a clean process
    when this one has the interpreter on)."""
    from .results import make_results, write_results

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        proc = run_compile_subprocess(argv)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode
    import triton

    sizes = [SIZES[s] for s in args.sizes]
    cases = select_cases(args.ops, args.hot)
    start = time.perf_counter()
    cache = load_cache(args.cache)
    records = compile_cases(cases, sizes, args.arch, progress=(lambda m: print(m, flush=True)) if args.verbose else None,
                            jobs=args.jobs, cache=cache)
    if args.cache:
        used = {r["key"] for r in records if r["name"] == "compiled_config"}
        save_cache(args.cache, {k: v for k, v in cache.items() if k in used})
    configs = [r for r in records if r["name"] == "compiled_config"]
    bad = failing_configs(records)
    errors = [r for r in records if r["name"] == "compile_case" and r["status"] == "error"]
    print(f"triton {triton.__version__}: {len(configs)} launch configs of {len({r['kernel'] for r in configs})} kernels "
          f"compiled for sm_{'/'.join(map(str, args.arch))} at {', '.join(args.sizes)} "
          f"in {time.perf_counter() - start:.0f} s; {len(bad)} fail (compile error, spill or shared memory over the limit)")
    for r in bad:
        print(f"  FAIL sm_{r['arch']} {r['size']} {r['op']}: {r['kernel']} {_config_text(r)}: {r['reason']}")
    for r in errors:
        print(f"  ERROR {r['size']} {r['op']}: {r['reason']}")
    if args.json:
        extra = {"archs": list(args.arch), "sizes": list(args.sizes), "triton": triton.__version__,
                 "ceilings_model": H200_CEILINGS}
        write_results(make_results("compile", records, extra=extra), args.json)
        print(f"results written to {args.json}")
    return 1 if (bad or errors) and args.fail else 0


def _config_text(r: dict) -> str:
    ce = r.get("constexprs", {})
    blocks = " ".join(f"{k}={v}" for k, v in ce.items() if k.startswith("BLOCK") or k in ("ROWS", "Q_SPLIT", "NK_PAD"))
    return f"[{blocks} warps={r['num_warps']} stages={r['num_stages']}]"
